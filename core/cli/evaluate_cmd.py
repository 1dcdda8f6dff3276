"""`evaluate`: the accuracy of a compressed model file, measured as the lab measures every result.

`--file PATH` takes a packfile (core/packfile.py) or a result's saved model (a cache entry: a .pt file with
its .json sidecar, loaded with weights_only like runner.load_compressed); `--run KEY` a stored run's saved
model, and with `--pack OUT` first writes that model as a packfile and evaluates the file written. Accuracy:
measure.predict + metrics.accuracy on data.eval_split(N), the images and the arithmetic of the result.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from .common import int_range, print_json


def register(sub):
    p = sub.add_parser("evaluate", help="accuracy of a compressed model file (a packfile or a result's saved model)",
                       description="Load a compressed model file and measure its accuracy on the lab's fixed "
                                   "evaluation subset, as the result that made it did (docs/packfile.md).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--file", metavar="PATH", help="a packfile, or a result's saved model (.pt with its .json "
                                                      "sidecar under the cache's compressed/ or teachers/)")
    which.add_argument("--run", metavar="KEY", help="a stored run's key (compress --json prints it): its saved model")
    p.add_argument("--pack", metavar="OUT", default=None,
                   help="with --run: write the run's model as a packfile to OUT and evaluate that file")
    p.add_argument("--dataset", default=None, help="the dataset to evaluate on (default: the one the file records; "
                                                   "another one is refused)")
    p.add_argument("--data-root", default=None, help="where cifar10/svhn live (env COMPRESSION_LAB_DATA)")
    p.add_argument("--eval-size", type=int_range(0), default=None,
                   help="images of the fixed evaluation subset, 0 = the full test set (default: what the file "
                        "or run records, else 1000)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..errors import LabError
    t0 = time.perf_counter()
    if args.pack and not args.run:
        raise LabError("--pack writes a stored run's model: give the run with --run KEY")
    if args.run:
        report = _evaluate_run(args)
    else:
        report = evaluate_file(args.file, args.dataset, args.eval_size, args.data_root)
    report["seconds"] = time.perf_counter() - t0
    if args.json:
        print_json(report)
        return 0
    print(f"{report['model']} on {report['dataset']}: accuracy {report['accuracy']:.4f} on {report['eval_images']} "
          f"images ({report['format']}, {report['file_bytes']:,} bytes: {report['file']})")
    if report.get("reported_accuracy") is not None:
        same = "the same" if report["accuracy"] == report["reported_accuracy"] else "NOT the same"
        print(f"the result reported {report['reported_accuracy']:.4f}: {same}")
    return 0


# ----------------------------------------------------------------------------- library side
def evaluate_file(path, dataset: str | None = None, eval_size: int | None = None, data_root=None) -> dict:
    """{"accuracy", "eval_images", "file", "file_bytes", "format", "model", "dataset", ...} of a packfile or a
    result's saved model (cache entry); LabError (one line) for anything else."""
    from .. import packfile
    from ..errors import LabError
    path = Path(path)
    if not path.is_file():
        raise LabError(f"no file {path}")
    if packfile.is_packfile(path):
        model, header = packfile.load(path)
        meta = header["meta"]
        data = _dataset(meta.get("dataset"), dataset, data_root, path)
        _check_fit(meta, header["num_classes"], data, path)
        size = eval_size if eval_size is not None else meta.get("eval_size")
        info = {"format": packfile.FORMAT, "model": header["arch"], "encoding": packfile.summary(header),
                "technique": meta.get("technique"), "reported_accuracy": meta.get("accuracy")}
    else:
        model, state, meta = load_entry(path, data_root)
        data = _dataset(meta.get("dataset"), dataset, data_root, path)
        size = eval_size
        info = {"format": "cache-entry", "model": arch_of(state, meta),
                "technique": meta.get("technique", meta.get("kind"))}
    acc, n = accuracy(model, data, size)
    return dict(info, accuracy=acc, eval_images=n, file=str(path), file_bytes=path.stat().st_size, dataset=data.name)


def accuracy(model, data, eval_size: int | None) -> tuple[float, int]:
    """(accuracy, images) on data.eval_split(eval_size), computed as measure.evaluate_output does: on the CPU,
    fed in the model's own float dtype (a half model takes half inputs, an ONNX Runtime model fp32)."""
    import torch
    import torch.nn as nn

    from .. import metrics
    from ..datasets import DEFAULT_EVAL_SIZE
    from ..measure import predict
    x, y = data.eval_split(DEFAULT_EVAL_SIZE if eval_size is None else int(eval_size))
    params = model.parameters() if isinstance(model, nn.Module) else []
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    logits = predict(model, data, x, "cpu", dtype)
    return metrics.accuracy(logits, y), len(y)


def load_entry(path, data_root=None):
    """(model, state, sidecar) of a finished cache entry: a teacher or a technique's compressed model, loaded
    with weights_only (cache.load_state) and the technique's own `load`, as runner.load_compressed does."""
    from .. import cache
    from ..datasets import load_dataset
    from ..errors import LabError
    from ..models import build_model
    from ..techniques import Context, get_technique
    path = Path(path)
    meta = cache.read_sidecar(path)
    if meta is None:
        raise LabError(f"{path} is neither a packfile nor a finished cache entry (a .pt file with its .json "
                       "sidecar, as the lab writes them); nothing was loaded from it")
    state = cache.load_state(path, meta)   # the checksum, then torch.load(weights_only=True)
    kind = meta.get("kind")
    try:
        if kind == "teacher":
            model = build_model(meta["model"], int(meta["num_classes"]))
            model.load_state_dict(state)
        elif kind == "compressed":
            spec = get_technique(meta["technique"])
            data = load_dataset(meta["dataset"], data_root)
            ctx = Context(teacher=_teacher_for(meta, data), data=data, params=meta["params"])
            model = spec.load(state, ctx)
        else:
            raise LabError(f"{path} is a cache entry of kind {kind!r}, not a model this command evaluates")
    except (KeyError, TypeError, RuntimeError) as exc:
        raise LabError(f"{path} could not be rebuilt ({type(exc).__name__}: {str(exc)[:160]})") from None
    return model.eval(), state, meta


def arch_of(state, meta: dict) -> str:
    """The architecture a cache entry's model is built from: a pruned model's base, a distilled student's
    architecture, else the teacher's."""
    if isinstance(state, dict):
        for key in ("arch", "student"):
            if isinstance(state.get(key), str):
                return state[key]
    return meta["model"]


def _teacher_for(meta: dict, data):
    """The entry's teacher (a technique's `load` may read it), or a stand-in with its name and classes."""
    from ..teachers import load_teacher_file
    teacher_path = meta.get("teacher_path")
    teacher = load_teacher_file(Path(teacher_path)) if teacher_path and Path(teacher_path).exists() else None
    return teacher or SimpleNamespace(meta={"model": meta["model"], "num_classes": data.num_classes},
                                      model=None, path=None)


def _dataset(recorded: str | None, asked: str | None, data_root, path):
    from ..datasets import load_dataset
    from ..errors import LabError
    if recorded and asked and recorded != asked:
        raise LabError(f"{path} holds a model for {recorded}, not {asked}")
    if not (recorded or asked):
        raise LabError(f"{path} does not say which dataset it was made for: give --dataset")
    return load_dataset(asked or recorded, data_root)


def _check_fit(meta: dict, num_classes: int, data, path) -> None:
    from ..errors import LabError
    if num_classes != data.num_classes or (meta.get("classes") and list(meta["classes"]) != list(data.classes)):
        raise LabError(f"{path} was made for the classes {meta.get('classes') or num_classes}; {data.name} has "
                       f"{data.classes}")


def _evaluate_run(args) -> dict:
    from .. import packfile
    from ..datasets import load_dataset
    from ..errors import LabError
    from ..results import ResultStore
    result = ResultStore.default().get(args.run)
    if result is None:
        raise LabError(f"no stored run {args.run!r} (a run key is the 16-character key compress --json prints)")
    if args.dataset and args.dataset != result.dataset:
        raise LabError(f"run {args.run} is on {result.dataset}, not {args.dataset}")
    size = args.eval_size if args.eval_size is not None else result.eval_images
    reported = (result.compressed or {}).get("accuracy")
    if not args.pack:
        report = evaluate_file(result.model_path, result.dataset, size, args.data_root)
    else:
        model, state, meta = load_entry(result.model_path, args.data_root)
        data = load_dataset(result.dataset, args.data_root)
        packfile.write(args.pack, model, arch_of(state, meta), data.num_classes,
                       packfile.meta_for(data, technique=result.technique, params=result.params, run=result.key,
                                         eval_size=result.eval_images, accuracy=reported))
        report = evaluate_file(args.pack, result.dataset, size, args.data_root)
    report.update(run=result.key, reported_accuracy=reported)
    return report
