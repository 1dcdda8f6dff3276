"""`train`: train (or reuse from the cache) a teacher and print its metrics."""
from __future__ import annotations

import dataclasses

from .. import engine, jobs
from ..datasets import load_dataset
from ..errors import LabError
from ..models import DEFAULT_TEACHER, get_spec
from ..training import PRECISIONS, recipe_for
from .common import add_data_args, float_range, human_bytes, int_range, print_json, progress_for


def register(sub):
    p = sub.add_parser("train", help="train or reuse a teacher")
    add_data_args(p)
    p.add_argument("--model", default=DEFAULT_TEACHER)
    recipe = "the dataset's recipe: {} on real data, {} on generated data"
    p.add_argument("--epochs", type=int_range(0, 500), default=None,
                   help=recipe.format("8, more on sets under ~45,000 images (at least 2,800 steps, up to 60)", 5))
    p.add_argument("--batch-size", type=int_range(2, 4096), default=None, help=recipe.format(128, 64))
    p.add_argument("--lr", type=float_range(0, 10, lo_open=True), default=None, help="peak learning rate (0.1)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 autocast or plain fp32 (default: bf16 where the CPU/GPU runs it natively)")
    p.add_argument("--subset", type=int_range(0), default=0, help="train on this many images (0 = all)")
    p.add_argument("--seed", type=int_range(0), default=0)
    p.add_argument("--pretrained", action="store_true",
                   help="start from ImageNet weights, as the seed study did (downloaded once into torch's hub cache; "
                        "offline they must be there already, or it stops with how to get them)")
    p.set_defaults(handler=run)


def run(args) -> int:
    get_spec(args.model, "teacher")
    engine.check_reachable(args.ray_address)
    data = load_dataset(args.dataset, args.data_root)
    chosen = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "precision": args.precision}
    cfg = dataclasses.replace(recipe_for(data, args.model, args.device), subset=args.subset, seed=args.seed,
                              **{k: v for k, v in chosen.items() if v is not None})
    cfg.validate()
    if args.pretrained:   # offline without the weights: say so now, not after starting the workers
        from ..teachers import TeacherSettings, pretrained_problem
        problem = pretrained_problem(data, TeacherSettings(args.model, cfg, pretrained=True))
        if problem:
            raise LabError(problem)
    out = jobs.run("train", {"dataset": args.dataset, "data_root": args.data_root, "model": args.model,
                             "train": dataclasses.asdict(cfg), "pretrained": args.pretrained, "device": args.device},
                   progress=progress_for(args), address=args.ray_address, label=f"train {args.model} on {data.name}")
    if args.json:
        print_json(out)
        return 0
    print(f"{out['model']} on {data.label}: {'from cache' if out['cached'] else 'trained'} ({out['path']}; "
          f"ran on {out['engine']['node']})")
    print(f"  accuracy   {out['accuracy']:.4f} on {out['eval_images']} test images")
    print(f"  size       {human_bytes(out['size_bytes'])} (gzip {human_bytes(out['gzip_bytes'])})")
    print(f"  params     {out['params']:,}   MACs {out['macs']:,}")
    print(f"  latency    {out['latency_ms_b1']:.2f} ms (batch 1), {out['latency_ms_b64']:.1f} ms (batch 64), "
          f"CPU, {out['threads']} threads")
    return 0
