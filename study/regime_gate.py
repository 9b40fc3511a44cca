"""The regime's gate: at which placement does a rank-8 LoRA clearly beat a rank-4 one?

    python study/regime_gate.py            # every run not yet recorded (--jobs 2, one thread each)
    python study/regime_gate.py --report   # the table from the records so far

What it runs, and what passes, was written before its first run: study/regime/GATE.md. Records go to
study/regime/gate/<placement>/r<rank>-seed<seed>.json; a run without a record is run again.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "study"))
from common import write_text  # noqa: E402
from regime_design import folder  # noqa: E402

OUT = ROOT / "study" / "regime" / "gate"
PLACEMENTS = ("q_proj,v_proj", "k_proj,v_proj", "up_proj", "down_proj")
RANKS = (4, 8)
SEEDS = (0, 1, 2)
MAJORITY = 0.47  # the validation's majority label, averaged over the six tasks


def record_path(place: str, rank: int, seed: int) -> Path:
    return OUT / folder(place) / f"r{rank}-seed{seed}.json"


def run(place: str, rank: int, seed: int) -> None:
    flags = ["--lora", "--targets", place, "--rank", str(rank), "--alpha", str(2 * rank),
             "--data", "assets/world-val", "--epochs", "3", "--lr", "5e-3", "--seed", str(seed),
             "--skip-test-eval", "--skip-base-eval", "--eval-every", "36", "--save-every", "1000000"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        proc = subprocess.Popen([sys.executable, "train.py", *flags, "--out", f"{tmp}/run"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{place} r={rank} seed {seed} failed: {proc.stderr.read().decode()}")
        result = json.loads(Path(f"{tmp}/run/results.json").read_text())
        log = [json.loads(line) for line in Path(f"{tmp}/run/log.jsonl").read_text().splitlines()]
    val = {t: x["accuracy"] for t, x in result["val_after"].items()}
    curve = [[e["step"], mean([x["accuracy"] for x in e["val"].values()])] for e in log if "val" in e]
    record = {"placement": place, "rank": rank, "seed": seed, "flags": flags, "val": val,
              "val_average": mean(list(val.values())), "val_curve": curve,
              "trainable": result["trainable_params"], "total": result["total_params"],
              "train_loss": next(e["loss"] for e in reversed(log) if "loss" in e),
              "environment": result.get("environment"),
              "wall_seconds": time.time() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime}
    path = record_path(place, rank, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"{place} r={rank} seed {seed}: val {record['val_average']:.3f} "
          f"({record['cpu_seconds']:.0f} CPU s)", flush=True)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def report() -> str:
    """GATE.md's four conditions per placement, from the records so far."""
    lines = ["| placement | r=4 val (seeds) | r=8 val (seeds) | gap | r=8 above every r=4 | passes |",
             "|---|---|---|---|---|---|"]
    for place in PLACEMENTS:
        vals = {r: [json.loads(record_path(place, r, s).read_text())["val_average"]
                    for s in SEEDS if record_path(place, r, s).is_file()] for r in RANKS}
        if any(len(v) < len(SEEDS) for v in vals.values()):
            lines.append(f"| `{place}` | {len(vals[4])} of 3 | {len(vals[8])} of 3 | | | pending |")
            continue
        gap = mean(vals[8]) - mean(vals[4])
        above = min(vals[8]) > max(vals[4])
        passes = gap >= 0.05 and above and mean(vals[8]) < 0.95 and mean(vals[8]) >= MAJORITY + 0.10
        seeds = lambda v: f"{mean(v):.3f} ({', '.join(f'{x:.3f}' for x in v)})"  # noqa: E731
        lines.append(f"| `{place}` | {seeds(vals[4])} | {seeds(vals[8])} | {gap:+.3f} | "
                     f"{'yes' if above else 'no'} | **{'yes' if passes else 'no'}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report", action="store_true", help="the table from the records so far, run nothing")
    args = p.parse_args()
    if not args.report:
        todo = [(p, r, s) for p in PLACEMENTS for s in SEEDS for r in RANKS
                if not record_path(p, r, s).is_file()]
        with ThreadPoolExecutor(args.jobs) as pool:
            for f in [pool.submit(run, *t) for t in todo]:
                f.result()
    table = report()
    write_text(OUT / "results.md", "# The gate's records so far\n\nRules: [../GATE.md](../GATE.md).\n\n"
               + table)
    print(table)


if __name__ == "__main__":
    main()
