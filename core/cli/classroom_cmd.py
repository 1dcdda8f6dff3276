"""`classroom-check`: simulate a class on the job layer and say how many students this machine holds."""
from __future__ import annotations

import os

from ..errors import LabError
from .common import add_data_args, float_range, int_range, print_json, progress_for


def register(sub):
    p = sub.add_parser("classroom-check", help="simulate a class of students on the job layer (docs/classroom.md)")
    add_data_args(p)
    p.add_argument("--students", type=int_range(1, 1000), default=30,
                   help="simulated students (plus the instructor)")
    p.add_argument("--minutes", type=float_range(0, 60, lo_open=True), default=3.0,
                   help="how long students submit; running requests then get --drain more seconds")
    p.add_argument("--model", default="resnet34", help="the teacher (its newest cached version; a small one is "
                                                      "trained first if none)")
    p.add_argument("--eval-size", type=int_range(0), default=1000, help="test images per run (0 = the full test set)")
    p.add_argument("--workers", type=int_range(1), default=None,
                   help="interactive workers (default: one per CPU of the engine)")
    p.add_argument("--step-seconds", type=float_range(0, 600, lo_open=True), default=10.0,
                   help="seconds between the instructor's slider moves")
    p.add_argument("--drain", type=float_range(0, 3600), default=120.0,
                   help="seconds requests still running at the end may take before they count as lost")
    p.add_argument("--no-long-job", action="store_true", help="no long job in the middle third of the run")
    p.add_argument("--seed", type=int_range(0), default=0)
    p.set_defaults(handler=run)


def run(args) -> int:
    from .. import classroom, engine, jobs
    if args.workers:
        import ray
        engine.connect(args.ray_address)   # an unreachable address fails here, in one line
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if args.workers > cpus:
            raise LabError(f"--workers {args.workers}: the engine has {cpus} CPUs (one per interactive worker)")
        os.environ["COMPRESSION_LAB_WORKERS"] = str(args.workers)   # read when this process's manager starts
    lab = jobs.manager(args.ray_address)
    report = classroom.classroom_check(
        args.students, args.minutes, dataset=args.dataset, model=args.model, eval_size=args.eval_size,
        data_root=args.data_root, device=args.device, address=args.ray_address, step_s=args.step_seconds,
        seed=args.seed, drain_s=args.drain, long_job=not args.no_long_job, lab=lab, progress=progress_for(args))
    print_report(report)
    if args.json:
        print_json(report)
    return 1 if report["lost"] or report["failures"] or report["duplicates_computed"] else 0


def _s(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_report(r: dict) -> None:
    e, w, i, lo = r["engine"], r["workers"], r["lanes"]["interactive"], r["lanes"]["long"]
    cpus = sum(n.get("cpus", 0) for n in e.get("nodes", []))
    t = r["teacher"]
    print(f"Classroom check: {r['students']} students + the instructor, {r['settings']['minutes']:g} min of "
          f"requests ({r['seconds']:.0f} s in all) on Ray {e['address']} ({len(e.get('nodes', []))} node(s), "
          f"{cpus} CPUs; {w['interactive']} interactive + {w['long']} long workers)")
    print(f"teacher: {t['model']} ({'trained first, ' + str(t['train_s']) + ' s' if t['trained'] else 'cached'}; "
          f"{t['path']}); {r['settings']['eval_size']} test images per run")
    print(f"  {'lane':<12}{'requests':>9}{'cached':>8}{'computed':>9}{'shared':>8}{'p50 s':>8}{'p95 s':>8}"
          f"{'max s':>8}{'per min':>9}")
    print(f"  {'interactive':<12}{i['requests']:>9}{i['cached']:>8}{i['computed']:>9}{i['shared']:>8}"
          f"{_s(i['p50_s']):>8}{_s(i['p95_s']):>8}{_s(i['max_s']):>8}{_s(i['throughput_per_min'], 1):>9}")
    print(f"  {'long':<12}{lo['requests']:>9}{'-':>8}{lo['computed']:>9}{lo['shared']:>8}{'-':>8}"
          f"{_s(lo['p95_s'], 1):>8}{'-':>8}{_s(lo['throughput_per_min'], 1):>9}   ({lo['state'] or 'none'}"
          + (f", ran {lo['ran_s']:.0f} s)" if lo["ran_s"] is not None else ")"))
    print(f"  interactive p95 with the long job running {_s(i['p95_with_long_job_s'])} s, without "
          f"{_s(i['p95_without_long_job_s'])} s; served from the store p95 {_s(i['p95_cached_s'], 4)} s")
    refused = i["refused"] + lo["refused"]
    print(f"  duplicates computed {r['duplicates_computed']} · lost results {r['lost']} · failures {r['failures']}"
          + (f" · refused {refused}" if refused else "")
          + f" · image uploads {r['uploads']['count']} (p95 {_s(r['uploads']['p95_s'], 3)} s, in-process)")
    for err in r["errors"]:
        print(f"  error: {err}")
    est = r["estimate"]
    print(f"this machine holds about {r['students_at_3s']} students at a <= {est['target_s']:g} s p95 interactive "
          f"wait (run p95 {_s(i['service_p95_s'])} s, mean {_s(i['service_mean_s'])} s on {est['workers']} workers; "
          f"{est['jobs_per_student_per_min']} jobs per student per minute for their own settings + "
          f"{est['shared_jobs_per_min']} shared; docs/classroom.md)")
