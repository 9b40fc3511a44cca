"""The regime study: the paper's regime in miniature, scarce adapters, collapse measured where it could cost.

    python study/regime_study.py --plan        # the runs and the CPU-hours, running nothing
    python study/regime_study.py               # every length (--jobs 2, one thread each)
    python study/regime_study.py --epochs 3    # one length only
    python study/regime_study.py --report      # the tables from the records so far
    python study/regime_study.py --placement o_proj --report   # the first placement's
    python study/regime_study.py --world twelve   # on the twelve tasks of study/regime/TWELVE.md

What it runs (the methods, the lengths, the placement) is regime_design.py's, written down before
the first run in study/regime/DESIGN.md; the report is regime_report.py's, rewritten at the end.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "study"))
import harness  # noqa: E402
import regime_report  # noqa: E402
from regime_design import (METHODS, PLACEMENT, PLACEMENTS, POINTS, WORLD, WORLDS,  # noqa: E402
                           arm, lengths, out)


# CPU seconds of a run on one thread before any of its kind is recorded (then the records' own),
# from three one-epoch sweep runs timed for the plan (LoRA r=8 30.7 s, OMoE-2 36.2 s, OMoE top-2
# of 4 36.2 s): a fixed part (start, loading, the final validation) and a part per epoch, times the
# method's cost; a validation pass.
FIXED, PER_EPOCH, VAL_PASS = 8.0, 22.0, 2.5
COST = {"LoRA": 1.0, "2": 1.25, "4": 1.25}


def estimate_seconds(run: harness.Run, epochs: int, method_flags: list[str]) -> float:
    """A run's CPU seconds on one thread, before any is measured."""
    if run.stage == "retest":
        return 8.0
    experts = method_flags[method_flags.index("--experts") + 1] if "--experts" in method_flags \
        else "LoRA"
    seconds = FIXED + PER_EPOCH * epochs * COST[experts]
    if run.stage == "final":
        seconds += POINTS * VAL_PASS + 2 * VAL_PASS  # the curve, and the test
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, nargs="+", default=None,
                   help="these lengths only (default: all of the world's, 1 3 6 or 2 6 12)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="these methods only (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    p.add_argument("--plan", action="store_true", help="print the runs and the CPU-hours, run nothing")
    p.add_argument("--report", action="store_true", help="rewrite the report, run nothing")
    p.add_argument("--placement", choices=PLACEMENTS, default=PLACEMENT,
                   help="where the adapters sit (the first attempt: o_proj; see GATE.md)")
    p.add_argument("--world", choices=list(WORLDS), default=WORLD,
                   help="the tasks: the six embedded ones, or the twelve of study/regime/TWELVE.md")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.epochs = args.epochs or list(lengths(args.world))
    if not set(args.epochs) <= set(lengths(args.world)):
        p.error(f"--epochs: the {args.world} tasks' lengths are {' '.join(map(str, lengths(args.world)))}")
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    arms = {e: arm(e, log, args.methods, args.placement, args.world) for e in args.epochs}
    for a in arms.values():
        a.check_records(harness.plan(a.s))
    # Method by method, each length's runs side by side, the shortest length first: a method's
    # results arrive together, and a partial study holds whole methods.
    order = list(args.methods or METHODS)
    runs = [(a, r) for m in order for e, a in sorted(arms.items()) for r in harness.plan(a.s)
            if r.method == m]
    if args.plan:
        left = total = 0.0
        measured = {}  # (arm, method, stage) -> CPU seconds of its records so far
        for a in arms.values():
            for path in a.runs_dir.glob("*/*.json"):
                r = json.loads(path.read_text())
                measured.setdefault((a.out, r["method"], r["stage"]), []).append(r["cpu_seconds"])
        for a, run in runs:
            e = next(k for k, v in arms.items() if v is a)
            resolved = a.resolve(run)
            done = resolved is harness.NO_RUN or (resolved is not None and a.record(resolved))
            known = measured.get((a.out, run.method, run.stage))
            seconds = sum(known) / len(known) if known else \
                estimate_seconds(run, e, a.s.methods[run.method])
            # An extension runs in about 2 of 5 sweeps (the earlier studies: 9 of 22).
            seconds *= 0.4 if run.stage == "sweep" and run.lr is None else 1.0
            total += seconds
            left += 0 if done else seconds
            print(f"{'done' if done else 'to run':<7} {e} ep  {run.method:<36} "
                  f"{(resolved if isinstance(resolved, harness.Run) else run).name}")
        print(f"\n{len(runs)} runs; estimated {total / 3600:.1f} CPU-hours in all, "
              f"{left / 3600:.1f} for those left: about {left / args.jobs / 3600:.1f} h with "
              f"--jobs {args.jobs} on free cores")
        return
    if not args.report:
        harness.run_all(runs, args.jobs, lambda: None, log)
    regime_report.write(args.placement, args.world)
    log(f"wrote the report in {out(args.placement, args.world)}")


if __name__ == "__main__":
    main()
