"""Does OMoE do what the paper claims? A small-scale reproduction on the embedded tiny LLaMA, with seeds.

    python benchmarks/study.py               # every method x 3 seeds, the real-data check, throughput
    python benchmarks/study.py --quick       # 4 methods x 1 seed, short runs: a few minutes
    python benchmarks/study.py --seeds 5     # more seeds (runs already done are kept)

Every run is `python train.py` (the embedded recipe: same base model, data, steps and learning rate)
with a method's flags, in its own process, so that its peak memory is its own. A run whose
results.json exists is not run again: an interrupted study continues where it stopped. Writes
<out>/results.json (every number) and <out>/results.md (the tables), default out = study/.

The paper's claims, and what each table checks:
  experts of vanilla MoE-LoRA collapse   expert |cos| before Gram-Schmidt, per layer
  OMoE keeps them diverse                the same diagnostic for OMoE (after Gram-Schmidt it is ~0 by construction)
  OMoE beats MoE-LoRA and LoRA           held-out accuracy, mean ± std over seeds, with fewer experts
  at little extra cost                   step time relative to LoRA, peak memory, trainable parameters
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import omoe  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from train import EMBEDDED  # noqa: E402

# name -> train.py flags. The embedded recipe's alpha/r = 2 is kept for every rank.
METHODS = {
    "LoRA r=16": ["--lora", "--rank", "16", "--alpha", "32"],
    "LoRA, OMoE-2's parameters": None,  # rank chosen in main() to match "OMoE 2 experts"
    "MoE-LoRA soft, 2 experts": ["--experts", "2", "--orth", "none"],
    "MoE-LoRA top-2 of 8": ["--experts", "8", "--top-k", "2", "--orth", "none"],
    "MoE-LoRA top-2 of 8 + balance loss": ["--experts", "8", "--top-k", "2", "--orth", "none",
                                           "--aux-loss-coef", "0.01"],
    "OMoE 2 experts": ["--experts", "2"],
    "OMoE orthogonal, 2 experts": ["--experts", "2", "--orth", "orthogonal"],
    "OMoE 4 experts": ["--experts", "4"],
    "OMoE 8 experts": ["--experts", "8"],
    "OMoE top-2 of 8": ["--experts", "8", "--top-k", "2"],
}
LR_CHECK = ("1e-3", "5e-3")  # the baselines at other learning rates than the recipe's
RECIPE_LR = f"{EMBEDDED['lr']:.0e}".replace("e-0", "e-")  # 2e-3
QUICK = ("LoRA r=16", "MoE-LoRA soft, 2 experts", "MoE-LoRA top-2 of 8", "OMoE 2 experts")


def trainable_parameters(flags: list[str]) -> int:
    """Trainable parameters of the embedded model with a method's adapters (built on the meta device)."""
    import train
    _, args = train.parse_args(flags)
    config = json.loads((Path(EMBEDDED["model"]) / "config.json").read_text())
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf_config(config))
        omoe.add_experts(model, targets=args.targets, experts=args.experts, top_k=args.top_k, rank=args.rank,
                         alpha=args.alpha, dropout=args.dropout, orth=args.orth)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_lora_rank(target: int) -> int:
    """The LoRA rank whose trainable parameters are closest to `target`."""
    return min(range(1, 129), key=lambda r: abs(trainable_parameters(["--lora", "--rank", str(r)]) - target))


def run(flags: list[str], out: Path, log) -> dict:
    """One training run in its own process -> its results.json plus peak memory (max resident set)."""
    if (out / "results.json").is_file() and (out / "peak_rss.json").is_file():
        return {**json.loads((out / "results.json").read_text()), **json.loads((out / "peak_rss.json").read_text())}
    out.mkdir(parents=True, exist_ok=True)
    # A run without results here was cut short (the study was interrupted): it is run again from the start.
    command = [sys.executable, str(ROOT / "train.py"), *flags, "--out", str(out), "--overwrite"]
    log(" ".join(command[1:]))
    with open(out / "stdout.txt", "w") as stdout:
        proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS alone
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"study.py: error: run failed, see {out / 'stdout.txt'}")
    peak = {"peak_rss_mib": usage.ru_maxrss / 1024}  # Linux reports KiB
    (out / "peak_rss.json").write_text(json.dumps(peak) + "\n")
    return {**json.loads((out / "results.json").read_text()), **peak}


def last_diagnostics(out: Path) -> dict:
    """Per block: mean |cos| before Gram-Schmidt and router load, from the run's last logged step."""
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return omoe.diagnostics_by_block([e for e in entries if "experts" in e][-1]["experts"])


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def within_noise(a: list[float], b: list[float]) -> bool:
    """Two methods' seed means differ by less than twice the standard error of the difference
    (a rough two-sigma rule: with 3 seeds, only large gaps count)."""
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    return abs(statistics.mean(a) - statistics.mean(b)) < 2 * se


# ── Throughput: one training step of a bigger random model, per method ───────────────────────────

THROUGHPUT_METHODS = {"LoRA r=16": ["--lora", "--rank", "16", "--alpha", "32"],
                      "MoE-LoRA soft, 2 experts": ["--experts", "2", "--orth", "none", "--rank", "16", "--alpha", "32"],
                      "OMoE 2 experts": ["--experts", "2", "--rank", "16", "--alpha", "32"]}
SHAPES = {  # name -> (ModelArgs fields, batch, tokens per row)
    "LLaMA-7B width, 2 layers": (dict(dim=4096, n_layers=2, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                                      vocab_size=32000), 1, 256),
    "1024 wide, 4 layers": (dict(dim=1024, n_layers=4, n_heads=16, n_kv_heads=16, hidden_dim=2752,
                                 vocab_size=32000), 2, 128),
}


def throughput_worker(spec: dict) -> None:
    """Time `steps` training steps (after one warm-up step) and print tokens/s as JSON."""
    import train
    torch.manual_seed(0)
    _, args = train.parse_args(spec["flags"])
    fields, batch, length = SHAPES[spec["shape"]]
    device = torch.device(spec["device"])
    with device:
        model = Transformer(ModelArgs(**fields, max_seq_len=length))
    if device.type == "cuda":
        model.to(torch.bfloat16)  # the frozen base in bfloat16, as train.py stores it on CUDA
    omoe.add_experts(model, targets=args.targets, experts=args.experts, top_k=args.top_k, rank=args.rank,
                     alpha=args.alpha, dropout=args.dropout, orth=args.orth)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, fields["vocab_size"], (batch, length + 1), device=device)
    # As train.py: the float32 adapters meet the bfloat16 base under autocast on CUDA; float32 on the CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    times = []
    for step in range(spec["steps"] + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print(json.dumps({"tokens_per_s": batch * length / statistics.median(times[1:]), "peak_gpu_mib": peak_gpu,
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


def throughput(shape: str, steps: int, device: str, log) -> dict:
    out = {}
    for name, flags in THROUGHPUT_METHODS.items():
        spec = json.dumps({"flags": flags, "shape": shape, "steps": steps, "device": device})
        log(f"throughput: {name}, {shape}, {device}")
        proc = subprocess.Popen([sys.executable, __file__, "--throughput-worker", spec], stdout=subprocess.PIPE,
                                cwd=ROOT, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"study.py: error: the throughput run of {name} failed")
        out[name] = {**json.loads(stdout), "peak_rss_mib": usage.ru_maxrss / 1024}
    return out


# ── The study ──────────────────────────────────────────────────────────────────────────────────

def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def summarise(runs: list[dict], outs: list[Path]) -> dict:
    """Seeds of one method -> means, stds and the raw per-seed numbers."""
    tasks = list(runs[0]["after"])
    avg = [statistics.mean(r["after"][t]["accuracy"] for t in tasks) for r in runs]
    diag = [last_diagnostics(o) for o in outs] if runs[0]["config"]["experts"] > 1 else []
    blocks = sorted(diag[0], key=int) if diag and diag[0] else []
    return {
        "trainable": runs[0]["trainable_params"],
        "avg": avg,
        "tasks": {t: [r["after"][t]["accuracy"] for r in runs] for t in tasks},
        "step_seconds": statistics.mean(r["train_seconds"] / r["steps"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "cos_before": {b: statistics.mean(d[b]["cos_before"] for d in diag) for b in blocks},
        "load": {b: [statistics.mean(x) for x in zip(*(d[b]["load"] for d in diag))] for b in blocks},
    }


def markdown(study: dict) -> str:
    methods, base, chance = study["methods"], study["base"], study["chance"]
    tasks = list(base)
    ref = methods["LoRA r=16"]["step_seconds"]
    omoe2 = methods["OMoE 2 experts"]["avg"]
    lines = [f"### Held-out accuracy on the embedded tasks ({study['seeds']} seeds, mean ± std)", "",
             "| method | trainable | average | " + " | ".join(tasks)
             + " | step time vs LoRA | peak RSS | vs OMoE 2 experts |",
             "|---|---|---|" + "---|" * len(tasks) + "---|---|---|",
             "| base model (no training) | 0 | " + f"{statistics.mean(base[t] for t in tasks):.3f} | "
             + " | ".join(f"{base[t]:.3f}" for t in tasks) + " | | | |",
             "| chance | | " + f"{statistics.mean(chance[t] for t in tasks):.3f} | "
             + " | ".join(f"{chance[t]:.3f}" for t in tasks) + " | | | |"]
    for name, m in methods.items():
        mean, std = mean_std(m["avg"])
        verdict = "—" if name == "OMoE 2 experts" else "n/a (1 seed)" if len(omoe2) < 2 else (
            "within noise" if within_noise(m["avg"], omoe2) else
            ("lower" if mean < statistics.mean(omoe2) else "higher"))
        lines.append(f"| {name} | {m['trainable']:,} | {mean:.3f} ± {std:.3f} | "
                     + " | ".join(f"{statistics.mean(m['tasks'][t]):.3f}" for t in tasks)
                     + f" | {m['step_seconds'] / ref:.2f} | {m['peak_rss_mib']:.0f} MiB | {verdict} |")
    routed = {n: m for n, m in methods.items() if m["cos_before"]}
    blocks = sorted(next(iter(routed.values()))["cos_before"]) if routed else []
    lines += ["", "### Expert similarity before Gram–Schmidt (mean |cos| between two experts' outputs for one "
              "token, last logged step, mean over seeds and each block's layers) and router load", "",
              "| method | " + " | ".join(f"block {b}" for b in blocks) + " | load per expert (mean over blocks) |",
              "|---|" + "---|" * len(blocks) + "---|"]
    for name, m in routed.items():
        load = [statistics.mean(x) for x in zip(*m["load"].values())]
        lines.append(f"| {name} | " + " | ".join(f"{m['cos_before'][b]:.3f}" for b in blocks)
                     + " | " + " ".join(f"{x:.2f}" for x in load) + " |")
    if study.get("lr_check"):
        lrs = sorted({lr for row in study["lr_check"].values() for lr in row}, key=float)
        lines += ["", "### The baselines at other learning rates (average held-out accuracy, mean ± std over seeds)",
                  "",
                  "| method | " + " | ".join(f"lr {lr}" + (" (the recipe's)" if lr == RECIPE_LR else "") for lr in lrs)
                  + " |", "|---|" + "---|" * len(lrs)]
        for name, row in study["lr_check"].items():
            lines.append(f"| {name} | " + " | ".join("{:.3f} ± {:.3f}".format(*mean_std(row[lr])) for lr in lrs)
                         + " |")
    if study.get("real"):
        lines += ["", "### The same pipeline on the real commonsense data (tiny model, 1 seed: a check, not a result)",
                  "", "| method | " + " | ".join(study["real"]["tasks"]) + " |",
                  "|---|" + "---|" * len(study["real"]["tasks"])]
        for row, values in study["real"]["rows"].items():
            lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    for shape, result in study.get("throughput", {}).items():
        lora = result["LoRA r=16"]
        lines += ["", f"### Training throughput, {shape} ({study['device_name']})", "",
                  "| method | trainable | tokens/s | tokens/s vs LoRA | peak RSS vs LoRA |" +
                  (" peak GPU memory vs LoRA |" if lora["peak_gpu_mib"] else ""),
                  "|---|---|---|---|---|" + ("---|" if lora["peak_gpu_mib"] else "")]
        for name, r in result.items():
            gpu = f" {r['peak_gpu_mib'] / lora['peak_gpu_mib']:.2f} |" if lora["peak_gpu_mib"] else ""
            lines.append(f"| {name} | {r['trainable']:,} | {r['tokens_per_s']:.0f} | "
                         f"{r['tokens_per_s'] / lora['tokens_per_s']:.2f} | "
                         f"{r['peak_rss_mib'] / lora['peak_rss_mib']:.2f} |{gpu}")
    return "\n".join(lines) + "\n"


def figure(study: dict, path: Path) -> None:
    """Expert similarity per block before Gram–Schmidt, one line per routed method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-dev.txt): no figure")
        return
    fig, ax = plt.subplots(figsize=(8.4, 3.8))
    for name, m in study["methods"].items():
        if m["cos_before"]:
            blocks = sorted(m["cos_before"], key=int)
            ax.plot([int(b) for b in blocks], [m["cos_before"][b] for b in blocks], marker="o", label=name,
                    linestyle="--" if "MoE-LoRA" in name else "-")
    ax.set_xticks(range(len(next(m for m in study["methods"].values() if m["cos_before"])["cos_before"])))
    ax.set_xlabel("block (layer) of the tiny LLaMA")
    ax.set_ylabel("mean |cos| between experts' outputs")
    ax.set_title("Expert similarity before Gram–Schmidt, after fine-tuning")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the plot, not over the lines
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "study"), help="folder for the runs and the results")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method")
    p.add_argument("--quick", action="store_true", help="4 methods, 1 seed, 60 steps, 64 test questions per task")
    p.add_argument("--skip-real", action="store_true", help="skip the check on ../shared/commonsense")
    p.add_argument("--skip-throughput", action="store_true", help="skip the throughput measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the throughput measurement (the runs use train.py's default)")
    p.add_argument("--throughput-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.throughput_worker:
        return throughput_worker(json.loads(args.throughput_worker))
    out, start = Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)  # noqa: E731

    methods = dict(METHODS)
    rank = matched_lora_rank(trainable_parameters(methods["OMoE 2 experts"]))
    methods["LoRA, OMoE-2's parameters"] = ["--lora", "--rank", str(rank), "--alpha", str(2 * rank)]
    methods = {f"LoRA r={rank} (OMoE-2's parameters)" if k.startswith("LoRA, ") else k: v for k, v in methods.items()}
    seeds = 1 if args.quick else args.seeds
    if args.quick:
        methods = {k: v for k, v in methods.items() if k in QUICK}
    short = ["--max-steps", "60", "--eval-limit", "64"] if args.quick else []

    study = {"seeds": seeds, "quick": args.quick, "methods": {}}
    for i, (name, flags) in enumerate(methods.items()):
        outs = [out / "runs" / slug(name) / f"seed{seed}" for seed in range(seeds)]
        # The base model's accuracy is the same for every run: the first run measures it.
        runs = [run([*flags, *short, "--seed", str(seed), "--log-every", "20", "--save-every", "100000"]
                    + ([] if i == seed == 0 else ["--skip-base-eval"]), o, log) for seed, o in enumerate(outs)]
        study["methods"][name] = summarise(runs, outs)
        if i == 0:
            study["base"] = {t: r["accuracy"] for t, r in runs[0]["before"].items()}
            study["chance"] = {t: r["chance"] for t, r in runs[0]["before"].items()}
        m = study["methods"][name]
        log(f"{name}: average held-out accuracy {statistics.mean(m['avg']):.3f} ± {mean_std(m['avg'])[1]:.3f}")

    # The learning rate is the embedded recipe's, chosen on OMoE runs: would the baselines do better at their own?
    if not args.quick:
        study["lr_check"] = {}
        for name in ("LoRA r=16", "MoE-LoRA soft, 2 experts"):
            for lr in LR_CHECK:
                outs = [out / "lr" / f"{slug(name)}-lr{lr}" / f"seed{seed}" for seed in range(seeds)]
                runs = [run([*methods[name], "--lr", lr, "--seed", str(seed), "--log-every", "20",
                             "--save-every", "100000", "--skip-base-eval"], o, log) for seed, o in enumerate(outs)]
                study["lr_check"].setdefault(name, {})[lr] = [statistics.mean(r["after"][t]["accuracy"] for t in
                                                                              r["after"]) for r in runs]
            study["lr_check"][name][RECIPE_LR] = study["methods"][name]["avg"]

    real = ROOT.parent / "shared" / "commonsense"
    if not args.skip_real and real.is_dir():
        rows, tasks = {}, None
        for name in ("LoRA r=16", "OMoE 2 experts"):
            r = run([*METHODS[name], "--data", str(real), "--train-limit", "200", "--max-steps", "100",
                     "--eval-limit", "100", "--log-every", "50", "--save-every", "100000"]
                    + (["--skip-base-eval"] if rows else []), out / "real" / slug(name), log)
            tasks = list(r["after"])
            if not rows:
                rows["chance"] = [r["after"][t]["chance"] for t in tasks]
                rows["base model"] = [r["before"][t]["accuracy"] for t in tasks]
            rows[name] = [r["after"][t]["accuracy"] for t in tasks]
        study["real"] = {"tasks": tasks, "rows": rows}
    elif not args.skip_real:
        log(f"no {real}: skipping the real-data check")

    if not args.skip_throughput:
        study["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
        shapes = ["1024 wide, 4 layers"] if args.quick else list(SHAPES)
        saved = out / "throughput.json"  # measured once, like the runs: a continued study keeps it
        measured = json.loads(saved.read_text()) if saved.is_file() else {}
        study["throughput"] = {s: measured.get(s) or throughput(s, 2 if args.quick else 3, args.device, log)
                               for s in shapes}
        saved.write_text(json.dumps(study["throughput"], indent=1) + "\n")

    (out / "results.json").write_text(json.dumps(study, indent=1) + "\n")
    (out / "results.md").write_text(markdown(study))
    figure(study, out / "similarity.png")
    print(markdown(study))
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
