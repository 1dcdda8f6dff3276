import numpy as np
import pytest
import torch
from PIL import Image

from core.datasets import (cifar_arrays_to_tensors, load_dataset, stratified_subset,
                           svhn_arrays_to_tensors)
from core.errors import DataUnavailable, LabError
from core.synthetic import generate


def test_offline_default_is_deterministic_balanced_and_labelled_generated(shapes):
    assert shapes.generated and "generated" in shapes.label
    assert shapes.train_x.dtype == torch.uint8 and shapes.train_x.shape[1:] == (3, 32, 32)
    assert len(shapes.classes) == 10 and len(shapes.test_y) == 2000
    counts = torch.bincount(shapes.train_y, minlength=10)
    assert counts.min() == counts.max() == 1000
    a, la = generate(50, seed=7)
    b, lb = generate(50, seed=7)
    c, _ = generate(50, seed=8)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    # images vary (not blank): per-image std well above zero
    assert shapes.train_x[:100].float().std(dim=(1, 2, 3)).min() > 5


def test_eval_subset_is_fixed_stratified_and_full_on_zero(shapes):
    idx1, idx2 = shapes.eval_indices(1000), shapes.eval_indices(1000)
    assert torch.equal(idx1, idx2) and len(idx1) == 1000 and len(idx1.unique()) == 1000
    per_class = torch.bincount(shapes.test_y[idx1], minlength=10)
    assert per_class.min() >= 90 and per_class.max() <= 110
    assert len(shapes.eval_indices(0)) == len(shapes.test_y)


def test_stratified_subset_keeps_class_proportions():
    labels = torch.tensor([0] * 900 + [1] * 100)
    idx = stratified_subset(labels, 100, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [90, 10]


def _write_folder(root, classes, n, size=(40, 30), mode="RGB", with_test=False):
    for split in (["train", "test"] if with_test else ["train"]):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.full((size[1], size[0], 3), (ci * 60 + i) % 255, np.uint8)
                img = Image.fromarray(arr).convert(mode)
                img.save(d / f"{i}.png")


def test_folder_dataset_resizes_any_size_and_holds_out_10_percent(tmp_path):
    _write_folder(tmp_path / "pets", ["cat", "dog", "emu"], 20, size=(64, 48), mode="L")
    d = load_dataset(f"folder:{tmp_path / 'pets'}")
    assert d.classes == ["cat", "dog", "emu"] and not d.generated
    assert d.train_x.shape[1:] == (3, 32, 32)
    assert len(d.test_y) == 6 and len(d.train_y) == 54           # 10% of each class held out
    assert torch.bincount(d.test_y).tolist() == [2, 2, 2]
    # the same folder gives the same split
    from core.datasets import _folder
    again = _folder(str(tmp_path / "pets"))
    assert torch.equal(again.test_x, d.test_x)


def test_folder_dataset_uses_test_split_when_present(tmp_path):
    _write_folder(tmp_path / "two", ["a", "b"], 5, with_test=True)
    d = load_dataset(f"folder:{tmp_path / 'two'}")
    assert len(d.train_y) == 10 and len(d.test_y) == 10


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no train/ folder"),
    (lambda p: (p / "train" / "only").mkdir(parents=True), "at least 2 class folders"),
    (lambda p: [(p / "train" / c).mkdir(parents=True) for c in "ab"], "has no images"),
])
def test_broken_folder_datasets_give_clear_errors(tmp_path, setup, message):
    root = tmp_path / "broken"
    setup(root)
    with pytest.raises(LabError, match=message):
        load_dataset(f"folder:{root}")


def test_unknown_dataset_name():
    with pytest.raises(LabError, match="unknown dataset 'cifar100'"):
        load_dataset("cifar100")


@pytest.mark.parametrize("name, label", [("cifar10", "CIFAR-10"), ("svhn", "SVHN")])
def test_torchvision_datasets_offline_error_names_dataset_folder_and_fix(tmp_path, name, label):
    root = tmp_path / "nodata"
    with pytest.raises(DataUnavailable) as exc:
        load_dataset(name, data_root=root)
    msg = str(exc.value)
    assert label in msg and str(root) in msg and "copy" in msg


def test_cifar_and_svhn_arrays_become_nchw_uint8_tensors():
    data = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    x, y = cifar_arrays_to_tensors(data, [3, 1, 4, 1])
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x[2, 1, 5, 7] == data[2, 5, 7, 1] and y.tolist() == [3, 1, 4, 1]
    sv = np.random.default_rng(1).integers(0, 255, (3, 3, 32, 32), dtype=np.uint8)
    x2, y2 = svhn_arrays_to_tensors(sv, np.array([10, 0, 9]))
    assert torch.equal(x2, torch.from_numpy(sv)) and y2.tolist() == [0, 0, 9]


def test_normalize_uses_dataset_statistics(shapes):
    x = shapes.normalize(shapes.train_x[:2000])
    assert abs(float(x.mean())) < 0.1 and 0.8 < float(x.std()) < 1.2


def test_folder_fingerprint_keeps_its_definition_so_cached_teachers_stay_found(tmp_path):
    """Cached teachers and results are keyed on the fingerprint: a faster listing must not change it."""
    import hashlib
    from core.datasets import _folder
    root = tmp_path / "set"
    _write_folder(root, ["b", "a"], 12, with_test=True)
    (root / "train" / "a" / "notes.txt").write_text("not an image")    # not listed
    (root / "train" / "a" / "UPPER.PNG").write_bytes((root / "train" / "a" / "0.png").read_bytes())
    h = hashlib.sha256()
    for split in ("train", "test"):
        for c in ("a", "b"):
            for f in sorted(p for p in (root / split / c).iterdir() if p.suffix.lower() == ".png"):
                st = f.stat()
                h.update(f"{f.relative_to(root)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    d = _folder(str(root))
    assert d.fingerprint == f"folder-{h.hexdigest()[:16]}" and len(d.train_y) == 25


def test_channel_statistics_match_float64_arithmetic():
    from core.datasets import _channel_stats
    x = torch.randint(0, 256, (3, 10_001), dtype=torch.uint8)
    x[1] = 7                                                            # a constant channel
    means, stds = _channel_stats(x)
    ref = x.double()
    assert means == pytest.approx(ref.mean(1).tolist(), rel=1e-12)
    assert stds == pytest.approx(ref.std(1).tolist(), rel=1e-9, abs=1e-12) and stds[1] == 0


def test_big_jpegs_decode_at_reduced_scale_with_the_same_32x32_result(tmp_path):
    """A teacher's folder of phone photos: JPEG's DCT scaling decodes a 1/8-size image, not 12 megapixels."""
    import io
    from core.images import DRAFT_SIZE, load_image_32, open_image
    yy, xx = np.mgrid[0:1200, 0:1600]
    arr = np.stack([xx / 1600 * 255, yy / 1200 * 255, (xx + yy) % 300 / 300 * 255], -1)
    arr += np.random.default_rng(0).normal(0, 10, arr.shape)
    arr[400:800, 600:1000] = [220, 30, 40]
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    small = open_image(buf.getvalue(), min_size=DRAFT_SIZE)
    assert small.size == (200, 150) and min(small.size) >= DRAFT_SIZE        # decoded at 1/8 scale
    assert open_image(buf.getvalue()).size == (1600, 1200)                   # the full image on request
    full = np.asarray(open_image(buf.getvalue()).resize((32, 32), Image.BICUBIC, reducing_gap=3.0), np.int16)
    got = load_image_32(buf.getvalue()).transpose(1, 2, 0).astype(np.int16)
    assert np.abs(got - full).mean() < 1.0 and np.abs(got - full).max() <= 16   # measured 0.3 / 7 on 4000x3000
    png = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(png, "PNG")
    assert open_image(png.getvalue(), min_size=DRAFT_SIZE).size == (1600, 1200)   # only JPEG can do this
