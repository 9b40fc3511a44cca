"""The paper's regime in miniature: scarce adapters, six tasks, collapse measured where it could cost.

    python benchmarks/regime.py --plan        # the runs and the CPU-hours, running nothing
    python benchmarks/regime.py               # every length (--jobs 2, one thread each)
    python benchmarks/regime.py --epochs 3    # one length only
    python benchmarks/regime.py --report      # the tables from the records so far

The design, what each result would mean, and why this placement: study/regime/DESIGN.md, written
before the first run. In short: every adapter sits on o_proj alone, in the 4 blocks, at rank 4 per
expert (alpha / r = 2, the embedded recipe's), so that OMoE-2 holds about 1% of the model's
parameters (the paper's layout on a 7B LLaMA: 0.7%) and a LoRA of the mixture's total rank beats one
of an expert's rank by far: capacity binds. Every method, at every length of LENGTHS, follows
benchmarks/study.py's protocol on assets/world-val: a sweep of SWEEP rates (seeds 0 and 1, on
validation, extended by one rate where the pick is at an edge), the pick, seeds 0-4 on the test at
the pick (0 and 1 the sweep's runs' adapters), validation every 1/10 of the run on the new seeds.
Every training run is benchmarks/regime_run.py, which probes the experts 10 times per run (routing,
similarity, effective ranks, task-expert information) into the record. Records go to
study/regime/<n>-epoch(s)/runs/.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import study  # noqa: E402

OUT = ROOT / "study" / "regime"
PLACE = ["--targets", "o_proj"]
EXPERT = ["--rank", "4", "--alpha", "8"]  # each expert's rank; alpha / r = 2 at every rank
WRAPPER_FLAGS = ("--tie-experts", "--magnitude")  # regime_run.py's, kept by an evaluation too


def lora(rank: int) -> list[str]:
    return ["--lora", *PLACE, "--rank", str(rank), "--alpha", str(2 * rank)]


def mixture(*flags: str) -> list[str]:
    return [*PLACE, *EXPERT, *flags]


METHODS = {
    "LoRA r=4 (one expert's rank)": lora(4),
    "LoRA r=8 (two experts' rank)": lora(8),
    "LoRA r=9 (OMoE-2's parameters)": lora(9),
    "vanilla MoE-LoRA soft-2": mixture("--experts", "2", "--orth", "none"),
    "vanilla soft-2, tied experts": mixture("--experts", "2", "--orth", "none", "--tie-experts"),
    "OMoE-2 orthonormal": mixture("--experts", "2"),
    "normalised only, 2 experts": mixture("--experts", "2", "--orth", "normalized"),
    "orthogonal only, 2 experts": mixture("--experts", "2", "--orth", "orthogonal"),
    "OMoE-2, learned magnitude": mixture("--experts", "2", "--magnitude"),
    "vanilla top-2 of 4": mixture("--experts", "4", "--top-k", "2", "--orth", "none"),
    "vanilla top-2 of 4 + balance loss": mixture("--experts", "4", "--top-k", "2", "--orth", "none",
                                                 "--aux-loss-coef", "0.01"),
    "OMoE top-2 of 4": mixture("--experts", "4", "--top-k", "2"),
}
LENGTHS = (1, 3, 6)  # epochs of 120 steps
SWEEP = ("2e-3", "5e-3", "1e-2")
POINTS = 10  # validation (new final seeds) and probes, per run


def every(epochs: int) -> int:
    return 120 * epochs // POINTS


class RegimeStudy(study.Study):
    """study.Study whose runs are regime_run.py's, and whose records hold the probe and the
    router's statistics over training."""

    def script(self, flags: list[str]) -> Path:
        return ROOT / "benchmarks" / "regime_run.py"

    def flags(self, run: study.Run) -> list[str]:
        flags = super().flags(run)
        if run.stage == "retest":  # the adapters' extra parameters must exist to be loaded
            flags += [f for f in self.s.methods[run.method] if f in WRAPPER_FLAGS]
        return flags

    def extra(self, folder: Path, result: dict, log: list[dict]) -> dict:
        probe = folder / "probe.jsonl"
        entries = [json.loads(line) for line in probe.read_text().splitlines()] \
            if probe.is_file() else []
        total = result.get("total_params")
        return {"share": result["trainable_params"] / total if total else None,
                "probe": rounded(entries),
                "experts_curve": rounded([[e["step"], e["experts"]] for e in log if e.get("experts")])}


def rounded(x, digits: int = 4):
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    return x


def settings(epochs: int, methods=None) -> study.Settings:
    chosen = {m: METHODS[m] for m in (methods or METHODS)}
    return study.Settings(chosen, lrs=SWEEP, alpha_methods=(), eval_every=every(epochs),
                          train_flags=["--epochs", str(epochs), "--probe-every", str(every(epochs))],
                          extend=True, sweep_curves=False)


def arm(epochs: int, log=print, methods=None) -> RegimeStudy:
    return RegimeStudy(OUT / f"{epochs}-epoch{'s' if epochs > 1 else ''}", settings(epochs, methods),
                       log)


# CPU seconds of a run on one thread before any of its kind is recorded (then the records' own),
# from three one-epoch sweep runs timed for the plan (LoRA r=8 30.7 s, OMoE-2 36.2 s, OMoE top-2
# of 4 36.2 s): a fixed part (start, loading, the final validation) and a part per epoch, times the
# method's cost; a validation pass.
FIXED, PER_EPOCH, VAL_PASS = 8.0, 22.0, 2.5
COST = {"LoRA": 1.0, "2": 1.25, "4": 1.25}


def estimate_seconds(run: study.Run, epochs: int, method_flags: list[str]) -> float:
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
    p.add_argument("--epochs", type=int, nargs="+", default=list(LENGTHS), choices=LENGTHS)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="these methods only (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    p.add_argument("--plan", action="store_true", help="print the runs and the CPU-hours, run nothing")
    p.add_argument("--report", action="store_true", help="rewrite the report, run nothing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    arms = {e: arm(e, log, args.methods) for e in args.epochs}
    for a in arms.values():
        a.check_records(study.plan(a.s))
    # Method by method, each length's runs side by side, the shortest length first: a method's
    # results arrive together, and a partial study holds whole methods.
    order = list(args.methods or METHODS)
    runs = [(a, r) for m in order for e, a in sorted(arms.items()) for r in study.plan(a.s)
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
            done = resolved is study.NO_RUN or (resolved is not None and a.record(resolved))
            known = measured.get((a.out, run.method, run.stage))
            seconds = sum(known) / len(known) if known else \
                estimate_seconds(run, e, a.s.methods[run.method])
            # An extension runs in about 2 of 5 sweeps (the earlier studies: 9 of 22).
            seconds *= 0.4 if run.stage == "sweep" and run.lr is None else 1.0
            total += seconds
            left += 0 if done else seconds
            print(f"{'done' if done else 'to run':<7} {e} ep  {run.method:<36} "
                  f"{(resolved if isinstance(resolved, study.Run) else run).name}")
        print(f"\n{len(runs)} runs; estimated {total / 3600:.1f} CPU-hours in all, "
              f"{left / 3600:.1f} for those left: about {left / args.jobs / 3600:.1f} h with "
              f"--jobs {args.jobs} on free cores")
        return
    if not args.report:
        study.run_all(runs, args.jobs, lambda: None, log)
    import regime_report
    regime_report.write()
    log(f"wrote the report in {OUT}")


if __name__ == "__main__":
    main()
