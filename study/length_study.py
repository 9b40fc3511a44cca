"""Speed or destination? The study's methods trained for 1 and for 3 epochs, each at its own rate per length.

    python study/length_study.py --plan         # the runs and the estimated time, running nothing
    python study/length_study.py                # both lengths: 142 runs, 5.2 CPU-hours (2.6 h, --jobs 2)
    python study/length_study.py --epochs 3     # one length only
    python study/length_study.py --controls     # the control and the 6-epoch arm (after the 3-epoch sweeps)
    python study/length_study.py --report       # each arm's tables and figure from the records so far
    python study/length_report.py               # the study's report: study/length/results.md, curves.png

The one-epoch study (one_epoch_study.py) trains every method for 120 steps. A method that has not left the
training loss's plateau by then scores near the majority label, so that study may measure how quickly a
method learns rather than where it ends. Here the length is a factor. For each method of METHODS and each
length of LENGTHS, harness.py's protocol with three changes:
  1. sweep   three rates around the method's one-epoch pick (the neighbours on harness.GRID), seeds 0 and 1,
             on validation; where the pick lands on the smallest or largest of them, one more rate beyond it;
  2. curves  every training run evaluates validation every EVAL_EVERY steps, and records how often each
             label was answered, so that a run on the plateau can be recognised by what it answers;
  3. both lengths run here, on one machine and one torch release (each record names them), so that the two
             lengths differ in nothing else; the one-epoch study's records came from an earlier machine.
The picks, the final seeds 0-4 on the test and the noise rule are harness.py's. Records go to
study/length/<n>-epochs/runs/, the report to study/length/ (results.md, results.json, curves.png).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "study"))
import harness  # noqa: E402
import report  # noqa: E402

METHODS = ("LoRA r=16", "normalised LoRA (1 expert)", "vanilla MoE-LoRA soft-2", "OMoE-2 orthonormal",
           "normalised only, 2 experts", "OMoE-2 orthogonal")
LENGTHS = (3, 1)  # epochs; the longer first: its runs take longest
EVAL_EVERY = 24
OUT = ROOT / "study" / "length"
# The longer arm: where validation still climbs at the end of 3 epochs, 6 epochs at the 3-epoch pick
# (no sweep of its own), 5 seeds, validation every LONG_EVAL_EVERY steps.
LONG, LONG_EVAL_EVERY = 6, 48
LONG_METHODS = ("LoRA r=16", "vanilla MoE-LoRA soft-2", "OMoE-2 orthonormal", "normalised only, 2 experts")
# The control (switch_run.py): a pair of methods that differ in normalisation alone, each
# switched to the other's orth after SWITCH_AT steps of the 3-epoch runs, at its own method's 3-epoch
# pick, 5 seeds on the test. name -> (the method it starts as, its flags).
SWITCH_AT = 48
CONTROLS = {
    f"normalised only, 2 experts, then none from step {SWITCH_AT}":
        ("normalised only, 2 experts", ["--switch-at", str(SWITCH_AT), "--switch-to", "none"]),
    f"vanilla MoE-LoRA soft-2, then normalised from step {SWITCH_AT}":
        ("vanilla MoE-LoRA soft-2", ["--switch-at", str(SWITCH_AT), "--switch-to", "normalized"]),
}


def one_epoch_picks() -> dict[str, str]:
    """Each method's learning rate picked by the one-epoch study (its committed results)."""
    summary = json.loads((ROOT / "study" / "results.json").read_text())
    return {m: summary["methods"][m]["picked_lr"] for m in METHODS}


def around(lr: str) -> tuple[str, ...]:
    """The rate and its neighbours on the grid: the sweep of one length."""
    i = harness.GRID.index(lr)
    return harness.GRID[max(0, i - 1):i + 2]


def settings(epochs: int) -> harness.Settings:
    flags = harness.methods()
    picks = one_epoch_picks()
    return harness.Settings({m: flags[m] for m in METHODS}, lrs={m: around(picks[m]) for m in METHODS},
                            alpha_methods=(), eval_every=EVAL_EVERY, train_flags=["--epochs", str(epochs)],
                            extend=True, sweep_curves=True)


def arm(epochs: int, log=print) -> harness.Study:
    return harness.Study(OUT / f"{epochs}-epoch{'s' if epochs > 1 else ''}", settings(epochs), log)


def picks_at_three(methods: list[str]) -> dict[str, str]:
    three = arm(3)
    picks = {}
    for m in methods:
        sweep = three.sweep(m)
        if sweep is None:
            raise SystemExit(f"length_study.py: this waits for {m!r}'s 3-epoch sweep")
        picks[m] = harness.pick_lr(sweep)
    return picks


def long_arm(log=print) -> tuple[harness.Study, list]:
    """The longer arm's study and runs, each method at its 3-epoch pick."""
    picks, flags = picks_at_three(list(LONG_METHODS)), harness.methods()
    s = harness.Settings({m: flags[m] for m in LONG_METHODS}, lrs={m: (picks[m],) for m in LONG_METHODS},
                         sweep_seeds=(), alpha_methods=(), eval_every=LONG_EVAL_EVERY,
                         train_flags=["--epochs", str(LONG)])
    runs = [harness.Run(m, "final", seed, picks[m]) for m in LONG_METHODS for seed in s.final_seeds]
    return harness.Study(OUT / f"{LONG}-epochs", s, log), runs


def controls(log=print) -> tuple[harness.Study, list]:
    """The control's study and runs: at each starting method's 3-epoch pick (its sweep must be done)."""
    parents = picks_at_three([parent for parent, _ in CONTROLS.values()])
    picks = {name: parents[parent] for name, (parent, _) in CONTROLS.items()}
    flags = harness.methods()
    s = harness.Settings({name: flags[parent] + extra for name, (parent, extra) in CONTROLS.items()},
                         lrs={name: (picks[name],) for name in CONTROLS}, sweep_seeds=(), alpha_methods=(),
                         eval_every=EVAL_EVERY, train_flags=["--epochs", "3"])
    runs = [harness.Run(name, "final", seed, picks[name]) for name in CONTROLS for seed in s.final_seeds]
    return harness.Study(OUT / "controls", s, log), runs


def estimate_seconds(run: harness.Run, epochs: int) -> float:
    """A run's CPU seconds, from the one-epoch study's measured sweep runs (training ~80% of such a run,
    a validation pass ~8% of it) scaled to this length and its evaluations."""
    summary = json.loads((ROOT / "study" / "results.json").read_text())
    one = statistics.mean(summary["methods"][run.method]["sweep_run_cpu_seconds"])
    if run.stage == "retest":
        return 0.3 * one
    evals = 120 * epochs // EVAL_EVERY
    return one * (0.2 + 0.8 * epochs + 0.08 * evals) + (0.15 * one if run.stage == "final" else 0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, nargs="+", default=list(LENGTHS), choices=LENGTHS,
                   help="the lengths to run (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    p.add_argument("--plan", action="store_true", help="print the runs and the estimated time, run nothing")
    p.add_argument("--report", action="store_true", help="rewrite the reports from the records, run nothing")
    p.add_argument("--controls", action="store_true", help="run the control and the longer arm instead: "
                   f"{', '.join(CONTROLS)}; {LONG} epochs of {', '.join(LONG_METHODS)}")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    if args.controls:
        (control, runs), (longer, long_runs) = controls(log), long_arm(log)
        pairs = [(control, r) for r in runs] + [(longer, r) for r in long_runs]
        if args.plan:
            for st, run in pairs:
                print(f"{'done' if st.record(run) else 'to run':<7} {run.method:<60} {run.name}")
            return
        if not args.report:
            harness.run_all(pairs, args.jobs, lambda: None, log)
        log(f"{sum(st.record(r) is not None for st, r in pairs)} of {len(pairs)} runs recorded")
        return
    arms = {e: arm(e, log) for e in args.epochs}
    # Method by method, each length's runs side by side: a method's results arrive together.
    runs = [(a, r) for m in METHODS for e, a in arms.items() for r in harness.plan(a.s) if r.method == m]
    for a in arms.values():
        a.check_records(harness.plan(a.s))
    if args.plan:
        left = 0.0
        for e, a in arms.items():
            for run in harness.plan(a.s):
                resolved = a.resolve(run)
                done = resolved is harness.NO_RUN or (resolved is not None and a.record(resolved) is not None)
                name = "(extension, if the pick is at an edge)" if run.stage == "sweep" and run.lr is None \
                    else (resolved or run).name
                print(f"{'done' if done else 'to run':<7} {e} ep  {run.method:<28} {name}")
                left += 0 if done else estimate_seconds(run, e)
        print(f"\n{len(runs)} runs; estimated {left / 3600:.1f} CPU-hours for those left, about "
              f"{left / args.jobs / 3600:.1f} h with --jobs {args.jobs} on free cores")
        return
    if not args.report:
        def write():
            try:
                for a in arms.values():
                    report.write(a.out, a.s, a)
            except Exception as e:  # noqa: BLE001
                log(f"writing the report failed ({type(e).__name__}: {e}); the runs go on")
        harness.run_all(runs, args.jobs, write, log)
    for a in arms.values():
        report.write(a.out, a.s, a)
    log(f"wrote the reports in {OUT}")


if __name__ == "__main__":
    main()
