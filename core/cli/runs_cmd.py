"""`runs`: the stored run history — list it (table, JSON or CSV) or delete one run.

Listing reads the result store (ResultStore, sqlite) oldest first, so the newest run is the last
line. `--delete KEY` removes the run's row and its compressed model (weights and sidecar, only
inside the cache's compressed/ folder). In class mode (an instructor password configured, as for
the app: COMPRESSION_LAB_INSTRUCTOR_PASSWORD or `instructor_password` in a Streamlit secrets file)
deleting needs that password: from COMPRESSION_LAB_PASSWORD, or typed at a hidden prompt when
stdin is a terminal; never as an argument, which every user of the machine could read in `ps`.
"""
from __future__ import annotations

import csv
import getpass
import io
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from .. import roles, settings
from ..errors import LabError
from .common import human_bytes, print_json

COLUMNS = ["key", "dataset", "model", "technique", "params", "accuracy", "size_bytes", "latency_ms_b1",
           "created", "target"]
PASSWORD_INPUT_ENV = "COMPRESSION_LAB_PASSWORD"   # the instructor password as the CLI's user types it in
SECRETS_FILES = (Path.home() / ".streamlit" / "secrets.toml", Path(".streamlit") / "secrets.toml")


def register(sub):
    p = sub.add_parser(
        "runs", help="list stored runs (keys, headline metrics) or delete one",
        description="List the stored runs, oldest first (the newest is the last line), or delete one. "
                    "Metrics are the compressed model's: accuracy (0-1), size_bytes, latency_ms_b1 "
                    "(ms per image at batch 1). `created` is ISO-8601 UTC (e.g. 2025-01-31T12:00:00+00:00) in "
                    "--json and --csv; params is an object in --json and a JSON string in --csv.")
    p.add_argument("--dataset", default=None, help="only runs on this dataset (shapes, cifar10, svhn, folder:<path>)")
    p.add_argument("--technique", default=None, help="only runs of this technique (prune, quantize, distill, ...)")
    p.add_argument("--model", default=None, help="only runs of this teacher (resnet34, ...)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="last stdout line: a JSON list of {" + ", ".join(COLUMNS) + "}")
    out.add_argument("--csv", action="store_true", help="CSV with those columns, a header first")
    p.add_argument("--delete", metavar="KEY", default=None,
                   help="delete this run and its compressed model file; in class mode needs the instructor "
                        f"password from {PASSWORD_INPUT_ENV} or a prompt (never an argument)")
    p.set_defaults(handler=run)


# ----------------------------------------------------------------------------- rows


def iso(created) -> str | None:
    try:
        return datetime.fromtimestamp(float(created), timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def run_row(r) -> dict:
    """One run as `runs --json` prints it (the compressed model's headline metrics)."""
    c = r.compressed or {}
    return {"key": r.key, "dataset": r.dataset, "model": r.model, "technique": r.technique,
            "params": r.params, "accuracy": c.get("accuracy"), "size_bytes": c.get("size_bytes"),
            "latency_ms_b1": c.get("latency_ms_b1"), "created": iso(r.created), "target": r.target}


def _dataset_name(name: str) -> str:
    from ..datasets import DATASETS, dataset_names
    name = name.strip()
    if name.startswith("folder:"):
        if not name[len("folder:"):]:
            raise LabError("folder dataset needs a path: folder:/path/to/images")
        return "folder:" + str(Path(name[len("folder:"):]).expanduser().resolve())   # as load_dataset stores it
    if name not in DATASETS:
        raise LabError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    return name


def select(store, dataset=None, technique=None, model=None) -> list:
    """The stored runs matching the filters, oldest first; unknown names raise LabError."""
    if technique is not None:
        from ..techniques import get_technique
        technique = get_technique(technique).name
    if model is not None:
        from ..models import get_spec
        model = get_spec(model).name
    if dataset is not None:
        dataset = _dataset_name(dataset)
    runs = store.all(dataset, technique)
    return [r for r in runs if model is None or r.model == model]


# ----------------------------------------------------------------------------- delete


def _secret_password() -> str | None:
    """The app's Streamlit secret `instructor_password` (the later file wins, as in Streamlit); a file that
    cannot be read refuses rather than silently leaving class mode off."""
    import tomllib
    value = None
    for f in SECRETS_FILES:
        if not f.is_file():
            continue
        try:
            value = tomllib.loads(f.read_text(encoding="utf-8")).get(roles.SECRETS_KEY, value)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise LabError(f"cannot read {f} to see whether class mode is on: {exc}") from None
    return value


def configured_password() -> str | None:
    """The instructor password when class mode is on (the environment first, like the app), else None."""
    return roles.password(None if os.environ.get(roles.PASSWORD_ENV) else _secret_password())


def _typed_password() -> str | None:
    value = os.environ.get(PASSWORD_INPUT_ENV)
    if value:
        return value
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            return getpass.getpass("Instructor password: ")
        except (EOFError, KeyboardInterrupt):
            return None
    return None


def require_instructor() -> None:
    """Nothing outside class mode; in class mode the instructor password, or LabError."""
    pw = configured_password()
    if pw is None:
        return
    attempt = _typed_password()
    if not attempt:
        raise LabError(f"class mode: only the instructor deletes runs; set {PASSWORD_INPUT_ENV} "
                       "or run from a terminal to be asked for the password")
    if not roles.check_password(attempt, pw):   # constant-time comparison
        raise LabError("class mode: wrong instructor password; nothing was deleted")


def delete_run(store, key: str) -> list[Path]:
    """Delete a run's row and its compressed model (weights and sidecar, only under the cache's compressed/
    folder, only when no other stored run points at the same file); the files removed."""
    from ..cache import sidecar_path
    r = store.get(key)
    if r is None:
        raise LabError(f"no stored run has key {key!r}; `python -m core runs` lists the keys; nothing was deleted")
    store.delete(key)
    removed = []
    if r.model_path:
        path = Path(r.model_path).resolve()
        root = (settings.cache_dir() / "compressed").resolve()
        shared = any(o.model_path and Path(o.model_path).resolve() == path for o in store.all())
        if root in path.parents and path.suffix == ".pt" and not shared:
            for p in (path, sidecar_path(path)):
                if p.exists():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


# ----------------------------------------------------------------------------- output


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_table(rows: list[dict], filtered: bool = False) -> None:
    if not rows:
        print("No stored runs match." if filtered else "No runs stored yet.")
        return
    head = f"{'created (UTC)':<17} {'key':<17} {'dataset':<10} {'model':<12} {'target':<9} " \
           f"{'accuracy':>8} {'size':>9} {'ms/img':>7}  setting"
    print(head)
    for row in rows:
        created = (row["created"] or "-")[:16].replace("T", " ")
        setting = f"{row['technique']}(" + ", ".join(f"{k}={v}" for k, v in (row["params"] or {}).items()) + ")"
        size = "-" if row["size_bytes"] is None else human_bytes(row["size_bytes"])
        print(f"{created:<17} {row['key']:<17} {row['dataset']:<10} {row['model']:<12} {row['target']:<9} "
              f"{_num(row['accuracy'], '.4f'):>8} {size:>9} {_num(row['latency_ms_b1'], '.2f'):>7}  {setting}")
    print(f"{len(rows)} run(s), newest last; `--delete KEY` removes one")


def print_csv(rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({**row, "params": json.dumps(row["params"], sort_keys=True)})
    sys.stdout.write(buf.getvalue())
    sys.stdout.flush()


def run(args) -> int:
    from ..results import ResultStore
    if args.delete is not None:
        if args.csv or any(v is not None for v in (args.dataset, args.technique, args.model)):
            raise LabError("--delete takes one run key and no --dataset/--technique/--model/--csv")
        store = ResultStore()
        if store.get(args.delete) is None:   # an unknown key fails before any password is asked for
            raise LabError(f"no stored run has key {args.delete!r}; `python -m core runs` lists the keys; "
                           "nothing was deleted")
        require_instructor()
        removed = delete_run(store, args.delete)
        if args.json:
            print_json({"deleted": args.delete, "files": [str(p) for p in removed]})
        else:
            print(f"deleted run {args.delete}" + (f" and {len(removed)} file(s)" if removed else ""))
        return 0
    rows = [run_row(r) for r in select(ResultStore(), args.dataset, args.technique, args.model)]
    if args.json:
        print_json(rows)
    elif args.csv:
        print_csv(rows)
    else:
        print_table(rows, filtered=any(v is not None for v in (args.dataset, args.technique, args.model)))
    return 0
