"""`info`: datasets, models, students, devices and the cache's contents."""
from __future__ import annotations

from .. import cache, hardware, settings
from ..datasets import DATASETS
from ..models import MODELS, STUDENTS, TEACHERS
from .common import print_json


def register(sub):
    p = sub.add_parser("info", help="what the lab knows: datasets, models, devices, cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run)


def info() -> dict:
    cached = [{"kind": m.get("kind", "teacher"), "dataset": m.get("dataset"), "model": m.get("model"),
               "accuracy": (m.get("metrics") or {}).get("accuracy"), "created": m.get("created"),
               "path": m.get("path")} for m in cache.list_entries("teachers")]
    return {
        "datasets": [{"name": s.name, "title": s.title, "description": s.description,
                      "generated": not s.needs_download} for s in DATASETS.values()]
        + [{"name": "folder:<path>", "title": "Image folder", "generated": False,
            "description": "<path>/train/<class>/* (and optional test/<class>/*), resized to 32×32"}],
        "models": [{"name": n, "title": MODELS[n].title, "description": MODELS[n].description} for n in TEACHERS],
        "students": [{"name": n, "title": MODELS[n].title, "description": MODELS[n].description} for n in STUDENTS],
        "devices": settings.available_devices(),
        "cpu": hardware.cpu_summary(),
        "cache": cached,
        "cache_dir": str(settings.cache_dir()),
        "data_root": str(settings.data_root()),
    }


def run(args) -> int:
    data = info()
    if args.json:
        print_json(data)
        return 0
    print("Datasets:")
    for d in data["datasets"]:
        print(f"  {d['name']:<15} {d['description']}")
    print("Teachers:")
    for m in data["models"]:
        print(f"  {m['name']:<15} {m['description']}")
    print("Students:")
    for m in data["students"]:
        print(f"  {m['name']:<15} {m['description']}")
    print(f"Devices: {', '.join(data['devices'])} (latency is always measured on the CPU)")
    print(f"CPU: {hardware.cpu_line(data['cpu'])}")
    print(f"Cache: {data['cache_dir']} ({len(data['cache'])} teachers)")
    for c in data["cache"]:
        acc = f"{c['accuracy']:.3f}" if c["accuracy"] is not None else "?"
        print(f"  {c['dataset']:<15} {c['model']:<12} accuracy {acc}  {c['created']}")
    return 0
