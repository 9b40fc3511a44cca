"""The one-epoch study: what makes OMoE work? Twelve methods, each at its own learning rate, 120 steps.

    python study/one_epoch_study.py --plan      # the runs and the estimated time, without running anything
    python study/one_epoch_study.py             # the full study (about 3 hours on a quiet 2-core CPU, --jobs 2)
    python study/one_epoch_study.py --quick     # every stage once, small: 21 runs, about 6 minutes
    python study/one_epoch_study.py --report    # the tables and figure from the records so far, running nothing

The methods and the protocol (sweep, pick, final seeds on the test, alpha) are harness.py's, run as they
are; the records go to study/runs/. After every run <out>/results.json, results.md and lr.png are rewritten
from the records so far (report.py).
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "study"))
import harness  # noqa: E402
import report  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "study"), help="folder of the records, work folders and results")
    p.add_argument("--quick", action="store_true", help="every stage once, small: 4 methods, 3 rates, 60 steps, "
                                                        "32 questions per task (out: study/quick)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    p.add_argument("--plan", action="store_true", help="print the runs and the estimated time, run nothing")
    p.add_argument("--first", action="append", default=[], metavar="METHOD",
                   help="run this method's runs before the others (repeatable, in the order given; the rest follow "
                        "in plan order)")
    p.add_argument("--report", action="store_true",
                   help="rewrite results.json, results.md and lr.png from the records so far, run nothing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    all_methods = harness.methods()
    if args.quick:
        settings = harness.Settings({k: v for k, v in all_methods.items() if k in harness.QUICK["methods"]},
                                    **{k: v for k, v in harness.QUICK.items() if k != "methods"})
        out = Path(args.out) / "quick" if args.out == str(ROOT / "study") else Path(args.out)
    else:
        settings, out = harness.Settings(all_methods), Path(args.out)
    settings.alpha_methods = tuple(m for m in settings.alpha_methods if m in settings.methods)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    unknown = [m for m in args.first if m not in settings.methods]
    if unknown:
        p.error(f"--first {unknown[0]!r}: not a method of the study ({', '.join(settings.methods)})")
    study = harness.Study(out, settings, log)
    first = {m: i for i, m in enumerate(args.first)}  # in the order given; the rest after, in plan order
    runs = sorted(harness.plan(settings), key=lambda run: first.get(run.method, len(first)))
    study.check_records(runs)
    if args.plan:
        for run in runs:
            resolved = study.resolve(run) or run
            status = "done" if study.resolve(run) and study.record(resolved) else "to run"
            print(f"{status:<7} {run.method:<36} {resolved.name:<34} {' '.join(settings.methods[run.method])}")
        left = study.estimate(runs, args.jobs)
        print(f"\n{len(runs)} runs; estimated {left / 3600:.1f} h ({left / 60:.0f} min) for those left, "
              f"{args.jobs} at a time")
        return
    if args.report:
        report.write(out, settings, study)
        print(f"wrote {out / 'results.md'} from the records in {out / 'runs'}")
        return

    def write():  # a failing report must not stop hours of runs: their records are what counts
        try:
            report.write(out, settings, study)
        except Exception as e:  # noqa: BLE001
            log(f"writing the report failed ({type(e).__name__}: {e}); the runs go on")

    study.run_all(runs, args.jobs, write)
    report.write(out, settings, study)
    log(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
