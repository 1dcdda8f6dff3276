"""One result type for every technique, and the SQLite store every run lands in.

The store uses the standard library's sqlite3 in WAL mode with a busy timeout, so several
processes (CLI sweeps, app sessions) can write at once without losing a row.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import settings

METRIC_KEYS = ["accuracy", "size_bytes", "gzip_bytes", "params", "nonzero_params", "macs",
               "latency_ms_b1", "latency_p95_ms_b1", "latency_ms_b64", "latency_p95_ms_b64", "threads", "threads_b1"]


@dataclass
class ExperimentResult:
    key: str
    dataset: str
    dataset_label: str
    model: str
    technique: str
    params: dict
    baseline: dict                    # ModelMetrics as dict
    compressed: dict
    eval_images: int
    seconds: float                    # wall time of the computation (not of a cache hit)
    timings: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    scratch: dict | None = None       # distillation: the from-scratch student
    scratch_history: list = field(default_factory=list)
    model_path: str = ""
    teacher_path: str = ""
    runtime: str = "pytorch-eager"
    notes: list = field(default_factory=list)
    cpu: str = ""                     # the CPU latency was timed on (hardware.cpu_id); "" in older rows
    engine: dict = field(default_factory=dict)   # where it ran: {"kind", "address", "node", "local"}
    target: str = "edge-cpu"          # the deployment target latency was measured for (core.targets)
    layers: list = field(default_factory=list)   # one row per conv/linear layer (core.layers); [] in older rows
    created: float = field(default_factory=time.time)
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def summary(self) -> dict:
        """The CLI's --json shape."""
        def pick(m):
            return None if m is None else {k: m.get(k) for k in METRIC_KEYS + ["eval_images", "extra"] if k in m}
        out = {"dataset": self.dataset, "model": self.model, "technique": self.technique,
               "params": self.params, "baseline": pick(self.baseline), "compressed": pick(self.compressed),
               "eval_images": self.eval_images, "seconds": self.seconds, "cached": self.cached,
               "key": self.key, "model_path": self.model_path, "runtime": self.runtime,
               "notes": self.notes, "history": self.history, "timings": self.timings, "cpu": self.cpu,
               "engine": self.engine, "target": self.target, "layers": self.layers}
        if self.technique == "distill" or self.scratch is not None:
            out["scratch"] = pick(self.scratch)
            out["scratch_history"] = self.scratch_history
        return out

    def label(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.technique}({p})"


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    created REAL NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    technique TEXT NOT NULL,
    params TEXT NOT NULL,
    eval_images INTEGER,
    seconds REAL,
    baseline_accuracy REAL, compressed_accuracy REAL,
    baseline_size_bytes INTEGER, compressed_size_bytes INTEGER,
    baseline_latency_ms_b1 REAL, compressed_latency_ms_b1 REAL,
    baseline_macs INTEGER, compressed_macs INTEGER,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_dataset ON runs(dataset, model, technique);
"""


class ResultStore:
    """The runs table in one SQLite file. Each method opens its own connection, so one instance
    serves every thread; `ResultStore.default()` is the one this process uses for the cache's file."""

    _default: "ResultStore | None" = None
    _default_key: Path | None = None
    _default_lock = threading.Lock()

    @classmethod
    def default(cls) -> "ResultStore":
        """This process's store for `<cache>/results.sqlite`, opened once (WAL pragma, schema script) and
        reused; opened again only when the cache moves (`COMPRESSION_LAB_CACHE`) or the file is gone."""
        path = settings.cache_dir() / "results.sqlite"
        key = path.resolve()
        with cls._default_lock:
            if cls._default is None or cls._default_key != key or not path.exists():
                cls._default, cls._default_key = cls(path), key
            return cls._default

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else settings.cache_dir() / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        con.execute("PRAGMA busy_timeout=60000")
        return con

    def add(self, r: ExperimentResult) -> None:
        row = (r.key, r.created, r.dataset, r.model, r.technique, json.dumps(r.params, sort_keys=True),
               r.eval_images, r.seconds, r.baseline.get("accuracy"), r.compressed.get("accuracy"),
               r.baseline.get("size_bytes"), r.compressed.get("size_bytes"),
               r.baseline.get("latency_ms_b1"), r.compressed.get("latency_ms_b1"),
               r.baseline.get("macs"), r.compressed.get("macs"),
               json.dumps({**r.to_dict(), "cached": False}, default=_json_default))
        with closing(self._connect()) as con:
            con.execute("INSERT OR REPLACE INTO runs VALUES (" + ",".join("?" * len(row)) + ")", row)

    def get(self, key: str) -> ExperimentResult | None:
        with closing(self._connect()) as con:
            row = con.execute("SELECT result FROM runs WHERE key=?", (key,)).fetchone()
        return ExperimentResult.from_dict(json.loads(row[0])) if row else None

    def all(self, dataset: str | None = None, technique: str | None = None) -> list[ExperimentResult]:
        q, args = "SELECT result FROM runs WHERE 1=1", []
        if dataset:
            q, args = q + " AND dataset=?", args + [dataset]
        if technique:
            q, args = q + " AND technique=?", args + [technique]
        with closing(self._connect()) as con:
            rows = con.execute(q + " ORDER BY created", args).fetchall()
        return [ExperimentResult.from_dict(json.loads(r[0])) for r in rows]

    def delete(self, key: str) -> None:
        with closing(self._connect()) as con:
            con.execute("DELETE FROM runs WHERE key=?", (key,))

    def clear(self) -> None:
        with closing(self._connect()) as con:
            con.execute("DELETE FROM runs")

    def count(self) -> int:
        with closing(self._connect()) as con:
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def dataframe(self, dataset: str | None = None):
        """All runs as a flat pandas table (one row per run) for tables and charts."""
        return results_frame(self.all(dataset))


def results_frame(results: list[ExperimentResult]):
    import pandas as pd
    rows = []
    for r in results:
        row = {"key": r.key, "created": pd.Timestamp(r.created, unit="s"), "dataset": r.dataset,
               "model": r.model, "technique": r.technique, "setting": r.label(),
               "params": json.dumps(r.params, sort_keys=True), "eval_images": r.eval_images,
               "seconds": r.seconds, "runtime": r.runtime, "cpu": r.cpu,
               "node": (r.engine or {}).get("node", ""), "target": r.target}
        for side in ("baseline", "compressed"):
            for k in METRIC_KEYS:
                row[f"{side}_{k}"] = getattr(r, side).get(k)
            # rows stored before batch 1 had its own thread count timed it with all of them
            row[f"{side}_threads_b1"] = getattr(r, side).get("threads_b1", getattr(r, side).get("threads"))
        row["accuracy_drop"] = (row["baseline_accuracy"] or 0) - (row["compressed_accuracy"] or 0)
        row["size_ratio"] = _ratio(row["baseline_size_bytes"], row["compressed_size_bytes"])
        row["latency_speedup_b1"] = _ratio(row["baseline_latency_ms_b1"], row["compressed_latency_ms_b1"])
        row["macs_ratio"] = _ratio(row["baseline_macs"], row["compressed_macs"])
        row["scratch_accuracy"] = (r.scratch or {}).get("accuracy")
        rows.append(row)
    return pd.DataFrame(rows)


def cpu_counts(frame):
    """Runs per CPU their latency was timed on (results_frame's `cpu`; rows from before it was recorded
    count as "not recorded"), most runs first; empty without the column."""
    import pandas as pd
    if not len(frame) or "cpu" not in frame:
        return pd.Series(dtype=int)
    return frame["cpu"].fillna("").replace("", "not recorded").value_counts()


def _ratio(a, b):
    try:
        return a / b if a and b else None
    except TypeError:
        return None


def _json_default(o):
    try:
        return float(o)
    except Exception:
        return str(o)
