"""The protocol every study here follows, and the one-epoch study's methods: a seeded study on the
embedded tiny LLaMA, each method at its own learning rate. one_epoch_study.py runs it as it is;
length_study.py and regime_study.py change its settings.

The protocol, for every method (train.py's embedded recipe with the method's flags, on assets/world-val:
the embedded tasks with 32 of the 192 fine-tuning creatures held out of training as validation):
  1. sweep    each learning rate of LRS (40x from end to end), seeds 0 and 1, evaluated on validation only
              (the test is not looked at);
  2. pick     the rate with the best mean validation accuracy;
  3. final    seeds 0-4 at the picked rate, evaluated on the test: seeds 0 and 1 are the sweep's runs (their
              saved adapters evaluated with --eval-only), seeds 2-4 are new runs that also evaluate validation
              every EVAL_EVERY steps, for the step at which each reaches 90% of its final accuracy;
  4. alpha    for the normalised methods (and LoRA as the control) alpha x 1/4 and x 4 at the picked rate,
              seeds 2 and 3, on validation, beside the final runs at alpha x 1: with unit-length expert
              outputs the update per token is the gates' length whatever B and alpha are, once past the
              ridge, so alpha should not matter.
Test accuracy is reported only at the picked rate, as mean ± std over seeds, with the noise rule.

Each run is `python train.py` in its own process of one thread (OMP_NUM_THREADS=1; --jobs of them at a
time: on a small CPU that is faster than one process of several threads). What a run measured is written
to <out>/runs/<method>/<run>.json, small files kept in the repository; the run's own folder (adapters,
logs) goes to <out>/work/, which is not. A run whose record exists is not run again: an interrupted study,
rerun with the same command, continues where it stopped; a record made with other flags is an error.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "study"))
import omoe  # noqa: E402
from common import average, portable, slug, write_text  # noqa: E402
from plumbing.diagnostics import diagnostics_by_block  # noqa: E402
from plumbing.gate import experts_of  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from train import EMBEDDED  # noqa: E402

# name -> train.py flags. The embedded recipe's alpha / r = 2 is kept at every rank.
MATCHED = "LoRA, OMoE-2's parameters"  # its rank is computed: matched_lora_rank
METHODS = {
    "LoRA r=16": ["--lora", "--rank", "16", "--alpha", "32"],
    MATCHED: None,
    "normalised LoRA (1 expert)": ["--lora", "--orth", "normalized"],
    "vanilla MoE-LoRA soft-2": ["--experts", "2", "--orth", "none"],
    "vanilla top-2 of 8": ["--experts", "8", "--top-k", "2", "--orth", "none"],
    "vanilla top-2 of 8 + balance loss": ["--experts", "8", "--top-k", "2", "--orth", "none",
                                          "--aux-loss-coef", "0.01"],
    "OMoE-2 orthonormal": ["--experts", "2"],
    "OMoE-2 orthogonal": ["--experts", "2", "--orth", "orthogonal"],
    "normalised only, 2 experts": ["--experts", "2", "--orth", "normalized"],
    "OMoE-4 soft": ["--experts", "4"],
    "OMoE-8 soft": ["--experts", "8"],
    "OMoE top-2 of 8": ["--experts", "8", "--top-k", "2"],
}
REFERENCE = "OMoE-2 orthonormal"  # the noise rule compares every method with it
DATA = ROOT / "assets" / "world-val"  # the embedded tasks with validation: <task>/{train,val,test}.json
ALPHA_METHODS = ("OMoE-2 orthonormal", "normalised only, 2 experts", "normalised LoRA (1 expert)", "LoRA r=16")
LRS = ("5e-4", "1e-3", "2e-3", "5e-3", "1e-2", "2e-2")
GRID = ("1e-4", "2e-4", *LRS, "5e-2")  # the 1-2-5 steps a sweep may be extended along (Settings.extend)
SWEEP_SEEDS, FINAL_SEEDS, ALPHA_FACTORS, EVAL_EVERY = (0, 1), (0, 1, 2, 3, 4), (0.25, 4.0), 24
QUICK = dict(methods=("LoRA r=16", "vanilla MoE-LoRA soft-2", "OMoE-2 orthonormal", "normalised only, 2 experts"),
             lrs=("1e-3", "5e-3", "2e-2"), sweep_seeds=(0,), final_seeds=(0, 1), alpha_factors=(4.0,),
             alpha_methods=("normalised only, 2 experts",), eval_every=20,
             train_flags=["--max-steps", "60"], eval_flags=["--eval-limit", "32"])

# CPU seconds of one sweep run of LoRA r=16 on one thread, and each method's sweep run relative to it: the
# means of the full study's records (study/results.md, "Time per sweep run"; a shared 2-core machine).
# --plan uses the records' own times wherever there are any.
UNIT_SECONDS = 64.0
RELATIVE_COST = {"LoRA r=16": 1.0, MATCHED: 1.05, "normalised LoRA (1 expert)": 1.17, "vanilla MoE-LoRA soft-2": 1.09,
                 "vanilla top-2 of 8": 1.61, "vanilla top-2 of 8 + balance loss": 1.58, "OMoE-2 orthonormal": 1.64,
                 "OMoE-2 orthogonal": 1.61, "normalised only, 2 experts": 1.30, "OMoE-4 soft": 1.81,
                 "OMoE-8 soft": 3.14, "OMoE top-2 of 8": 3.16}
# A stage's cost in sweep runs: a test evaluation is ~0.25 of a run, a validation evaluation ~0.17.
STAGE_COST = {"sweep": 1.0, "alpha": 1.0, "retest": 0.45, "final": 1.0 + 0.25 + 0.17 * 4}


SWITCH = "--switch-at"  # a method run by switch_run.py, which changes orth after some steps


def train_flags(flags: list[str]) -> list[str]:
    """A method's flags that train.py knows (switch_run.py's own taken out)."""
    out, skip = [], 0
    for flag in flags:
        if skip or flag in (SWITCH, "--switch-to"):
            skip = 0 if skip else 1
            continue
        out.append(flag)
    return out


def trainable_parameters(flags: list[str]) -> int:
    """Trainable parameters of the embedded model with a method's adapters (built on the meta device)."""
    import train
    _, args = train.parse_args(train_flags(flags))
    config = json.loads((Path(EMBEDDED["model"]) / "config.json").read_text())
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf_config(config))
        omoe.add_experts(model, **experts_of(args))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def normalises(flags: list[str]) -> bool:
    """Whether a method's experts' outputs are scaled to unit length (orthonormal or normalized), as its layers
    are built: one expert keeps no Gram-Schmidt unless --orth normalized."""
    import train
    _, args = train.parse_args(train_flags(flags))
    layer = omoe.OMoELinear(torch.nn.Linear(4, 4, device="meta"), experts=args.experts, top_k=args.top_k,
                            rank=1, alpha=1.0, orth=args.orth)
    return layer.orth in ("orthonormal", "normalized")


def matched_lora_rank(target: int) -> int:
    """The LoRA rank whose trainable parameters are closest to `target`."""
    return min(range(1, 129), key=lambda r: abs(trainable_parameters(["--lora", "--rank", str(r)]) - target))


def methods() -> dict[str, list[str]]:
    """METHODS with the matched rank filled in; without orth="normalized" in omoe.py, its methods are left out."""
    out = dict(METHODS)
    rank = matched_lora_rank(trainable_parameters(out[REFERENCE]))
    out[MATCHED] = ["--lora", "--rank", str(rank), "--alpha", str(2 * rank)]
    if "normalized" not in omoe.ORTH_MODES:
        print("harness.py: omoe.py has no orth='normalized' yet: the normalised methods are left out")
        out = {k: v for k, v in out.items() if "normalized" not in v}
    return out


# ── The plan: every run, its flags and what it waits for ──────────────────────────────────────────

@dataclass
class Run:
    method: str
    stage: str             # sweep, final (a new run), retest (a sweep run's adapters on the test), alpha
    seed: int
    lr: str | None         # None: the rate picked from the method's sweep, known once that is done
    alpha_factor: float = 1.0

    @property
    def name(self) -> str:
        lr = self.lr or "picked"
        return (f"{self.stage}-lr{lr}" + (f"-alpha{self.alpha_factor:g}x" if self.stage == "alpha" else "")
                + f"-seed{self.seed}")


@dataclass
class Settings:
    methods: dict
    lrs: tuple | dict = LRS   # the sweep's rates: for every method, or {method: its rates}
    sweep_seeds: tuple = SWEEP_SEEDS
    final_seeds: tuple = FINAL_SEEDS
    alpha_factors: tuple = ALPHA_FACTORS
    alpha_methods: tuple = ALPHA_METHODS
    eval_every: int = EVAL_EVERY
    train_flags: list = field(default_factory=list)  # added to every training run (--quick: fewer steps)
    eval_flags: list = field(default_factory=list)   # added to every run (--quick: fewer questions)
    extend: bool = False      # a pick at the sweep's smallest or largest rate adds the next rate of GRID
    sweep_curves: bool = False  # the sweep's runs too evaluate validation every eval_every steps
    data: Path = DATA         # the tasks, with validation: <task>/{train,val,test}.json

    def rates(self, method: str) -> tuple:
        return self.lrs[method] if isinstance(self.lrs, dict) else self.lrs


def plan(s: Settings) -> list[Run]:
    """Every run of the study, in the order they are started: each method's sweep, then its final and alpha
    runs (which wait for the sweep's pick). Methods in METHODS order, so results arrive method by method."""
    runs = []
    for m in s.methods:
        runs += [Run(m, "sweep", seed, lr) for lr in s.rates(m) for seed in s.sweep_seeds]
        if s.extend:  # a sweep run whose rate is known once the others are done, or none
            runs += [Run(m, "sweep", seed, None) for seed in s.sweep_seeds]
        runs += [Run(m, "retest" if seed in s.sweep_seeds else "final", seed, None) for seed in s.final_seeds]
        if m in s.alpha_methods:
            runs += [Run(m, "alpha", seed, None, f) for f in s.alpha_factors for seed in alpha_seeds(s)]
    return runs


def alpha_seeds(s: Settings) -> tuple:
    """The alpha check's seeds: the final stage's new ones (their runs at alpha x 1 are the comparison), not
    the sweep's, whose validation accuracy at the picked rate is biased upwards by the pick itself."""
    return tuple(seed for seed in s.final_seeds if seed not in s.sweep_seeds)[:2]


def pick_lr(val_by_lr: dict[str, list[float]]) -> str:
    """The learning rate with the highest mean validation accuracy (ties: the smaller rate)."""
    return max(sorted(val_by_lr, key=float), key=lambda lr: statistics.mean(val_by_lr[lr]))


def extension(val_by_lr: dict[str, list[float]]) -> str | None:
    """The next rate of GRID beyond the sweep's pick when it is the smallest or largest rate swept, else None."""
    rates, pick = sorted(val_by_lr, key=float), pick_lr(val_by_lr)
    step = -1 if pick == rates[0] else 1 if pick == rates[-1] else 0
    i = GRID.index(pick) + step
    return GRID[i] if step and 0 <= i < len(GRID) else None


NO_RUN = object()  # what an extension resolves to when the sweep's pick is inside it


def steps_to_fraction(curve: list[tuple[int, float]], fraction: float = 0.9) -> int:
    """The first evaluated step whose accuracy reaches `fraction` of the last one's (the final accuracy)."""
    final = curve[-1][1]
    return next(step for step, acc in curve if acc >= fraction * final)


def within_noise(a: list[float], b: list[float]) -> bool:
    """Two methods' seed means differ by less than twice the standard error of the difference (a rough
    two-sigma rule: with 5 seeds, only large gaps count)."""
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return abs(statistics.mean(a) - statistics.mean(b)) < 2 * se


def last_loss(log: list[dict]) -> float | None:
    """A run's training loss at its end: the mean over its last logged interval (train.py's log.jsonl)."""
    return next((e["loss"] for e in reversed(log) if "loss" in e), None)


# ── Running ────────────────────────────────────────────────────────────────────────────────────

class Study:
    def __init__(self, out: Path, settings: Settings, log=print):
        self.out, self.s, self.log = out, settings, log
        self.runs_dir, self.work = out / "runs", out / "work"

    def record_path(self, run: Run) -> Path:
        return self.runs_dir / slug(run.method) / f"{run.name}.json"

    def record(self, run: Run) -> dict | None:
        path = self.record_path(run)
        return json.loads(path.read_text()) if path.is_file() else None

    def sweep(self, method: str, rates: tuple | None = None) -> dict[str, list[float]] | None:
        """{lr: [validation average per seed]} once every sweep run of the method is recorded (its extension
        too, with Settings.extend), else None. rates: these rates only, no extension."""
        extend = rates is None and self.s.extend
        rates = rates or self.s.rates(method)
        records = {(lr, seed): self.record(Run(method, "sweep", seed, lr))
                   for lr in rates for seed in self.s.sweep_seeds}
        if any(r is None for r in records.values()):
            return None
        sweep = {lr: [average(records[lr, seed]["val"]) for seed in self.s.sweep_seeds] for lr in rates}
        beyond = extension(sweep) if extend else None
        return self.sweep(method, (*rates, beyond)) if beyond else sweep

    def resolve(self, run: Run) -> Run | None:
        """The run with its learning rate: for final, retest and alpha runs the sweep's pick, for a sweep's
        extension the rate beyond its pick or NO_RUN (None until the sweep says)."""
        if run.lr is not None:
            return run
        if run.stage == "sweep":
            core = self.sweep(run.method, self.s.rates(run.method))
            beyond = None if core is None else extension(core)
            return None if core is None else Run(run.method, "sweep", run.seed, beyond) if beyond else NO_RUN
        sweep = self.sweep(run.method)
        return None if sweep is None else Run(run.method, run.stage, run.seed, pick_lr(sweep), run.alpha_factor)

    def flags(self, run: Run) -> list[str]:
        """train.py's command line for a (resolved) run."""
        method = self.s.methods[run.method]
        work = self.work / slug(run.method)
        if run.stage == "retest":  # the sweep run's saved adapters, on the test (and validation again)
            sweep_dir = work / Run(run.method, "sweep", run.seed, run.lr).name
            return ["--eval-only", "--adapter", portable(sweep_dir / "adapter"), "--data", portable(self.s.data),
                    *self.s.eval_flags]
        flags = [*method, "--data", portable(self.s.data), *self.s.train_flags, *self.s.eval_flags, "--lr", run.lr,
                 "--seed", str(run.seed),
                 "--save-every", "1000000", "--log-every", "40"]
        first_new = next((s for s in self.s.final_seeds if s not in self.s.sweep_seeds), None)
        if not (run.stage == "final" and run.method == next(iter(self.s.methods)) and run.seed == first_new):
            flags.append("--skip-base-eval")  # one run measures the base model: it is the same for all
        if run.stage == "alpha":
            import train
            _, args = train.parse_args(method)
            flags += ["--alpha", f"{args.alpha * run.alpha_factor:g}"]
        if run.stage in ("sweep", "alpha"):
            flags.append("--skip-test-eval")
        if run.stage == "final" or (run.stage == "sweep" and self.s.sweep_curves):
            flags += ["--eval-every", str(self.s.eval_every)]
        return flags

    def execute(self, run: Run) -> dict:
        """One train.py process of one thread -> its record (written last: a run without one is not done)."""
        flags, folder = self.flags(run), self.work / slug(run.method) / run.name
        if run.stage == "retest" and not (ROOT / flags[2] / "adapter_config.json").is_file():
            # The sweep's adapters are not kept in the repository: without them, train that run again.
            sweep = Run(run.method, "sweep", run.seed, run.lr)
            flags = [f for f in self.flags(sweep) if f != "--skip-test-eval"]
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished run's leftovers
        folder.mkdir(parents=True)
        command = [sys.executable, str(self.script(flags)), *flags, "--out", str(folder)]
        self.log(f"start {run.method}: {run.name}")
        start = time.time()
        with open(folder / "stdout.txt", "w") as stdout:
            proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{run.method} {run.name} failed, see {folder / 'stdout.txt'}")
        (folder / "checkpoint.pt").unlink(missing_ok=True)  # the adapters are saved apart; this is 3x their size
        # --eval-only writes eval-<data>.json beside a run, a training run results.json
        results = next(folder.glob("eval-*.json")) if "--eval-only" in flags else folder / "results.json"
        result = json.loads(results.read_text())
        log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()] \
            if (folder / "log.jsonl").is_file() else []
        accuracies = lambda r: {t: x["accuracy"] for t, x in (r or {}).items()} or None  # noqa: E731
        answers = lambda r: {t: x["answers"] for t, x in (r or {}).items() if "answers" in x} or None  # noqa: E731
        val = accuracies(result.get("val_after"))
        curve = [[e["step"], average(accuracies(e["val"]))] for e in log if "val" in e]  # --eval-every
        answer_curve = [[e["step"], answers(e["val"])] for e in log if "val" in e]
        record = {"method": run.method, "stage": run.stage, "seed": run.seed, "lr": run.lr,
                  "alpha_factor": run.alpha_factor, "flags": self.flags(run), "val": val,
                  "test": accuracies(result.get("after")),
                  "base": {"val": accuracies(result.get("val_before")), "test": accuracies(result.get("before"))},
                  "baselines": {split: {t: {k: x[k] for k in ("chance", "majority")} for t, x in (r or {}).items()}
                                for split, r in (("val", result.get("val_after")), ("test", result.get("after")))},
                  "val_curve": curve + [[result["steps"], average(val)]] if curve else [],
                  "answers": {"val": answers(result.get("val_after")), "test": answers(result.get("after")),
                              "val_curve": answer_curve + [[result["steps"], answers(result.get("val_after"))]]
                              if answer_curve else []},
                  "environment": result.get("environment"),
                  "diagnostics": diagnostics_by_block(next((e["experts"] for e in reversed(log)
                                                                  if e.get("experts")), {})),
                  "trainable": result.get("trainable_params"),
                  "train_loss": last_loss(log),
                  "wall_seconds": time.time() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mib": usage.ru_maxrss / 1024, **self.extra(folder, result, log)}
        path = self.record_path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(record, indent=1) + "\n")
        return record

    def script(self, flags: list[str]) -> Path:
        """The program a run's flags are for: train.py, or the control's wrapper of it."""
        return ROOT / ("study/switch_run.py" if SWITCH in flags else "train.py")

    def extra(self, folder: Path, result: dict, log: list[dict]) -> dict:
        """What a study adds to each record from the run's folder (nothing here)."""
        return {}

    def check_records(self, runs: list[Run]) -> None:
        """A recorded run made with other flags than this study would use: refuse to mix the two."""
        for run in runs:
            resolved = self.resolve(run)
            record = self.record(resolved) if resolved and resolved is not NO_RUN else None
            if record is not None and record["flags"] != self.flags(resolved):
                program = Path(sys.argv[0]).name  # the study's command, as argparse names it
                raise SystemExit(f"{program}: error: {self.record_path(resolved)} was made with other flags "
                                 f"({' '.join(record['flags'])}); use another --out or delete it")

    def run_all(self, runs: list[Run], jobs: int, on_record) -> None:
        run_all([(self, run) for run in runs], jobs, on_record, self.log)

    def estimate(self, runs: list[Run], jobs: int) -> float:
        """Seconds of wall-clock time for the runs not yet recorded, --jobs at a time."""
        measured: dict[tuple, list] = {}
        for path in self.runs_dir.glob("*/*.json"):
            r = json.loads(path.read_text())
            measured.setdefault((r["method"], r["stage"]), []).append(r["wall_seconds"])
        scale = 0.5 if self.s.train_flags else 1.0  # --quick: 60 steps, 32 questions per task
        total = 0.0
        for run in runs:
            resolved = self.resolve(run)
            if resolved is NO_RUN or resolved is not None and self.record(resolved) is not None:
                continue
            seconds = measured.get((run.method, run.stage))
            total += (statistics.mean(seconds) if seconds else
                      scale * UNIT_SECONDS * RELATIVE_COST[run.method] * STAGE_COST[run.stage])
        return total / jobs


def run_all(runs: list[tuple[Study, Run]], jobs: int, on_record, log=print) -> None:
    """Runs (of one or several studies) in the order given, `jobs` at a time; a run waiting for its method's
    pick starts once it is known."""
    pending, running = list(runs), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for study, run in list(pending):
                if len(running) >= jobs:
                    break
                resolved = study.resolve(run)
                if resolved is None:
                    continue  # its sweep is not finished
                pending.remove((study, run))
                if resolved is not NO_RUN and study.record(resolved) is None:
                    running[pool.submit(study.execute, resolved)] = resolved
            if not running:
                if pending:  # nothing runnable and nothing running: a sweep cannot finish
                    raise RuntimeError(f"cannot resolve {pending[0][1]}")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                future.result()
                log(f"done  {run.method}: {run.name}")
                on_record()
