"""The packfile (core/packfile.py): a compressed model as a real file, loaded back bit for bit, never unpickled;
and `python -m core evaluate`, which measures such a file (or a result's saved model) as the result did."""
import copy
import json
import pickle
import struct
import zlib

import pytest
import torch

from core import packfile
from core.cli import main
from core.errors import CorruptCacheEntry, LabError
from core.models import build_model
from core.runner import ExperimentConfig, run_experiment
from core.techniques import Context, get_technique, quant_fake
from core.training import TrainConfig, predict_logits

SUBSET = 500
# the make_teacher fixture's recipe, so run_experiment finds the very same cached teacher
TEACHER_CFG = TrainConfig(epochs=1, subset=SUBSET, batch_size=64, lr=0.05)
EVAL = 200


@pytest.fixture(scope="module")
def teacher(make_teacher):
    return make_teacher("resnet34", subset=SUBSET)


@pytest.fixture(scope="module")
def teacher_file(teacher, shapes, tmp_path_factory):
    """(bytes on disk, body bytes before compression, path) of the fp32 teacher's packfile."""
    path = tmp_path_factory.mktemp("pack") / "teacher.mclpack"
    n = packfile.write(path, teacher.model, "resnet34", 10, packfile.meta_for(shapes))
    assert n == path.stat().st_size
    return n, packfile.read_header(path)["body_bytes"], path


@pytest.fixture(scope="module")
def structured(teacher, shapes):
    return _apply("prune", {"ratio": 0.5, "method": "structured", "bn_correction": False}, teacher, shapes)


@pytest.fixture(scope="module")
def sparse(teacher, shapes):
    return _apply("prune", {"ratio": 0.7, "method": "unstructured", "bn_correction": False}, teacher, shapes)


def _apply(technique, params, teacher, shapes):
    spec = get_technique(technique)
    ctx = Context(teacher=teacher, data=shapes, params=spec.validate(params), device="cpu", eval_size=EVAL)
    return spec.apply(ctx).model


def _roundtrip(model, shapes, tmp_path, arch="resnet34", **kw):
    path = tmp_path / "model.mclpack"
    n = packfile.write(path, model, arch, shapes.num_classes, packfile.meta_for(shapes), **kw)
    assert n == path.stat().st_size
    loaded, header = packfile.load(path)
    assert header["file_bytes"] == n
    return loaded, header


def _assert_same(a, b, shapes):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k
    x = shapes.test_x[:64]
    assert torch.equal(predict_logits(a, shapes, x), predict_logits(b, shapes, x))


def _quantized(header):
    return {t["name"]: t["values"]["bits"] for t in header["tensors"] if t["values"]["kind"] == "codes"}


def _conv_linear(model):
    return {f"{n}.weight" for n, _ in quant_fake.quantizable_layers(model)}


# ----------------------------------------------------------------------------- round trips
def test_teacher_round_trip_with_its_data(teacher, shapes, teacher_file):
    loaded, header = packfile.load(teacher_file[2])
    assert header["file_bytes"] == teacher_file[0]
    _assert_same(teacher.model, loaded, shapes)
    meta = header["meta"]
    assert (meta["dataset"], meta["classes"]) == ("shapes", shapes.classes)
    assert (tuple(meta["mean"]), tuple(meta["std"])) == (tuple(shapes.mean), tuple(shapes.std))
    assert not _quantized(header) and header["compressor"] == "zlib"
    assert header["body_bytes"] > 4 * sum(p.numel() for p in teacher.model.parameters())   # fp32 weights


def test_structured_pruned_rebuilt_from_saved_shapes(teacher, structured, shapes, tmp_path, teacher_file):
    loaded, header = _roundtrip(structured, shapes, tmp_path)
    _assert_same(structured, loaded, shapes)
    assert loaded.layer1[0].conv1.out_channels < teacher.model.layer1[0].conv1.out_channels
    assert header["file_bytes"] < 0.45 * teacher_file[0]


def test_unstructured_stored_sparse(sparse, shapes, tmp_path, teacher_file):
    loaded, header = _roundtrip(sparse, shapes, tmp_path)
    _assert_same(sparse, loaded, shapes)
    layouts = {t["name"]: t["layout"] for t in header["tensors"]}
    assert all(layouts[k] in ("bitmask", "indices") for k in _conv_linear(sparse))
    # 30% of the weights (fp32) plus a bit per weight; the dense teacher's file is 4 bytes per weight
    assert header["body_bytes"] < 0.45 * teacher_file[1]
    assert header["file_bytes"] < 0.5 * teacher_file[0]


@pytest.mark.parametrize("bits, per_channel", [(8, True), (4, True), (2, True), (4, False)])
def test_fake_quantized_codes_found_and_packed(teacher, shapes, tmp_path, teacher_file, bits, per_channel):
    model = copy.deepcopy(teacher.model)
    quant_fake.fake_quantize_weights(model, bits, per_channel)
    loaded, header = _roundtrip(model, shapes, tmp_path)
    _assert_same(model, loaded, shapes)   # the weights come back bit for bit
    assert _quantized(header) == {k: bits for k in _conv_linear(model)}
    assert {t["values"]["per_channel"] for t in header["tensors"] if t["values"]["kind"] == "codes"} == {per_channel}
    ratio = header["body_bytes"] / teacher_file[1]   # before compression: bits/32 of fp32, plus batch norms
    assert bits / 32 <= ratio < bits / 32 + 0.006
    assert header["file_bytes"] <= header["body_bytes"]


def test_pruned_then_quantized(structured, sparse, shapes, tmp_path, teacher_file):
    sizes = {}
    for name, pruned in (("structured", structured), ("unstructured", sparse)):
        model = copy.deepcopy(pruned)
        quant_fake.fake_quantize_weights(model, 4, True)
        loaded, header = _roundtrip(model, shapes, tmp_path)
        _assert_same(model, loaded, shapes)
        assert _quantized(header) == {k: 4 for k in _conv_linear(model)}
        sizes[name] = header["file_bytes"]
    layouts = {t["layout"] for t in header["tensors"] if t["values"]["kind"] == "codes"}
    assert layouts <= {"bitmask", "indices"}   # the unstructured model's zero codes are not stored
    # 4-bit codes of a quarter of the weights (structured 0.5) / of 30% of them plus a bit per weight
    assert sizes["structured"] < 0.3 * teacher_file[0] * 4 / 32
    assert sizes["unstructured"] < 0.6 * teacher_file[0] * 4 / 32


def test_activation_ranges_and_half_models_kept(teacher, shapes, tmp_path):
    fake = _apply("quantize", {"mode": "fake", "bits": 8, "activations": True, "act_bits": 6,
                               "calibration_images": 32, "bn_correction": False}, teacher, shapes)
    loaded, header = _roundtrip(fake, shapes, tmp_path)
    assert header["activations"]["bits"] == 6
    assert loaded._activation_quantizer.qparams == fake._activation_quantizer.qparams
    _assert_same(fake, loaded, shapes)
    half = copy.deepcopy(teacher.model).half().to(memory_format=torch.channels_last)
    loaded, header = _roundtrip(half, shapes, tmp_path)
    assert packfile.input_dtype(header) == torch.float16 and header["memory_format"] == "channels_last"
    assert all(torch.equal(v, loaded.state_dict()[k]) and v.dtype == loaded.state_dict()[k].dtype
               for k, v in half.state_dict().items())


def test_find_grid_widths_axes_and_hints(shapes, tmp_path):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    for bits in (1, 3, 5, 7, 11, 16):
        for per_channel, axis in ((True, 0), (True, 1), (False, 0)):
            codes, scale = quant_fake.quantize_tensor(w, bits, per_channel, axis)
            wq = quant_fake.dequantize(codes, scale, axis, per_channel)
            found = packfile.find_grid(wq, axis)
            assert found is not None and found[0] <= bits, (bits, per_channel, axis)
            assert torch.equal(packfile.dequantize(found[3], found[4], found[2], found[1]), wq)
    assert packfile.find_grid(w) is None   # fp32 weights lie on no grid
    model = build_model("cnn_small", 10).eval()
    quant_fake.fake_quantize_weights(model, 3, True)
    first = quant_fake.quantizable_layers(model)[0][0]
    header = _roundtrip(model, shapes, tmp_path, arch="cnn_small", bits={first: 3})[1]
    assert _quantized(header) == {f"{first}.weight": 3}   # hints: only the layers named
    with pytest.raises(LabError, match="2-bit grid"):
        packfile.encode(model, "cnn_small", 10, {}, bits={first: 2})
    with pytest.raises(LabError, match="neither a layer nor a tensor"):
        packfile.encode(model, "cnn_small", 10, {}, bits={"nope": 4})
    with pytest.raises(LabError, match="not a resnet34"):   # refused when written, not when loaded
        packfile.encode(model, "resnet34", 10, {})


def test_onnx_payload(shapes, tmp_path):
    from core.techniques import onnx_export, ort_session
    model = build_model("cnn_small", 10).eval()
    ort = ort_session.OrtModule(onnx_export.export_onnx(model), "fp32")
    loaded, header = _roundtrip(ort, shapes, tmp_path, arch="cnn_small")
    assert header["kind"] == "onnx" and loaded.onnx_bytes == ort.onnx_bytes
    x = shapes.test_x[:16]
    assert torch.equal(predict_logits(ort, shapes, x), predict_logits(loaded, shapes, x))


# ----------------------------------------------------------------------------- evaluate
def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else None), err


def test_evaluate_reproduces_the_reported_accuracy(teacher, shapes, tmp_path, capsys):
    cfg = ExperimentConfig(dataset="shapes", model="resnet34", technique="quantize",
                           params={"mode": "fake", "bits": 4}, eval_size=EVAL, teacher_train=TEACHER_CFG, device="cpu")
    r = run_experiment(cfg)
    reported = r.compressed["accuracy"]
    out = tmp_path / "r.mclpack"
    rc, packed, _ = _cli(capsys, "evaluate", "--run", r.key, "--pack", str(out), "--json")
    assert rc == 0 and packed["accuracy"] == reported == packed["reported_accuracy"]
    assert packed["file_bytes"] == out.stat().st_size and packed["eval_images"] == r.eval_images == EVAL
    assert packed["format"] == "mclpack" and packed["encoding"]["bits"] == [4]
    rc, again, _ = _cli(capsys, "evaluate", "--file", str(out), "--dataset", "shapes", "--eval-size", str(EVAL),
                        "--json")
    assert rc == 0 and again["accuracy"] == reported and (again["model"], again["dataset"]) == ("resnet34", "shapes")
    rc, entry, _ = _cli(capsys, "evaluate", "--file", r.model_path, "--eval-size", str(EVAL), "--json")
    assert rc == 0 and entry["accuracy"] == reported and entry["format"] == "cache-entry"
    rc, _, err = _cli(capsys, "evaluate", "--file", str(out), "--dataset", "cifar10", "--json")
    assert rc == 2 and "holds a model for shapes" in err


# ----------------------------------------------------------------------------- bad files
def _small_file(shapes):
    model = build_model("cnn_small", 10).eval()
    return packfile.encode(model, "cnn_small", 10, packfile.meta_for(shapes))


def _rebuild(data, edit):
    """The same packfile with its header edited (valid checksum and compression: only the content is wrong)."""
    body = zlib.decompress(data[22:])
    (hlen,) = struct.unpack_from("<I", body)
    header = json.loads(body[4:4 + hlen])
    head = edit(header)
    head = head if isinstance(head, bytes) else json.dumps(header).encode()
    body = struct.pack("<I", len(head)) + head + body[4 + hlen:]
    return data[:10] + struct.pack("<QI", len(body), zlib.crc32(body)) + zlib.compress(body)


def _wrong_shape(h):
    h["tensors"][0]["shape"][0] += 1


def _short_segment(h):
    t = next(t for t in h["tensors"] if "data" in t)
    t["data"][1] -= 4


@pytest.mark.parametrize("damage, needle", [
    (lambda d: b"PK\x03\x04" + d[4:], "not a packfile"),
    (lambda d: d[:12], "truncated"),
    (lambda d: d[:len(d) // 2], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:40] + bytes([d[40] ^ 0xFF]) + d[41:], "damaged|truncated"),
    (lambda d: d[:8] + b"\x07" + d[9:], "version 7"),
    (lambda d: _rebuild(d, lambda h: b"{not json"), "header does not parse"),
    (lambda d: _rebuild(d, lambda h: h.pop("tensors")), "header does not parse"),
    (lambda d: _rebuild(d, _wrong_shape), "cannot be pruned to"),
    (lambda d: _rebuild(d, lambda h: h.update(blob_bytes=h["blob_bytes"] + 1)), "the header says"),
    (lambda d: _rebuild(d, _short_segment), "expected"),
    (lambda d: _rebuild(d, lambda h: h["tensors"].pop()), "does not fit cnn_small"),
    (lambda d: _rebuild(d, lambda h: h.update(arch="resnet9000")), "unknown model"),
])
def test_damaged_files_refused_in_one_line(shapes, tmp_path, capsys, damage, needle):
    bad = damage(_small_file(shapes))
    with pytest.raises(LabError, match=needle) as exc:
        packfile.decode(bad)
    assert "\n" not in str(exc.value)
    path = tmp_path / "bad.mclpack"
    path.write_bytes(bad)
    rc, _, err = _cli(capsys, "evaluate", "--file", str(path), "--dataset", "shapes", "--json")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_is_never_unpickled(shapes, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Exploit(marker)}))
    with pytest.raises(CorruptCacheEntry, match="not a packfile"):
        packfile.load(path)
    rc, _, err = _cli(capsys, "evaluate", "--file", str(path), "--dataset", "shapes", "--json")
    assert rc == 2 and "neither a packfile nor a finished cache entry" in err
    # with a sidecar that calls it a finished cache entry: loaded with weights_only, refused
    path.with_suffix(".json").write_text(json.dumps({"status": "complete", "kind": "compressed", "technique": "prune",
                                                     "dataset": "shapes", "model": "resnet34", "params": {}}))
    rc, _, err = _cli(capsys, "evaluate", "--file", str(path), "--dataset", "shapes", "--json")
    assert rc == 2 and "could not be loaded" in err
    assert not marker.exists()
