"""The results of a study run by harness.py: its run records -> summaries, results.json, results.md, lr.png.

Everything here is computed from the records in <out>/runs/ alone, so it can be rewritten after each run
and from a partial study (a method whose sweep is unfinished has no pick yet, and says so).
"""
import json
import statistics
from pathlib import Path

import common
import harness
import stats


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]


def summarise(method: str, rs: list[dict], s) -> dict:
    """One method's records -> its sweep, pick, test seeds, 90% steps, alpha check and diagnostics."""
    rates = sorted({*s.rates(method), *(r["lr"] for r in rs if r["stage"] == "sweep")}, key=float)
    sweep = {lr: [common.average(r["val"]) for r in rs if r["stage"] == "sweep" and r["lr"] == lr] for lr in rates}
    swept = [lr for lr in s.rates(method)]
    complete = all(len(sweep[lr]) == len(s.sweep_seeds) for lr in swept)
    beyond = harness.extension({lr: sweep[lr] for lr in swept}) if complete and s.extend else None
    if beyond:
        swept.append(beyond)
        complete = len(sweep.get(beyond, [])) == len(s.sweep_seeds)
    pick = harness.pick_lr({lr: sweep[lr] for lr in swept}) if complete else None
    final = sorted((r for r in rs if r["stage"] in ("final", "retest") and r["lr"] == pick), key=lambda r: r["seed"])
    curves = [r["val_curve"] for r in final if r["val_curve"]]
    alpha = {f: [common.average(r["val"]) for r in rs if r["stage"] == "alpha" and r["alpha_factor"] == f]
             for f in s.alpha_factors}
    diag = [r["diagnostics"] for r in final if r["diagnostics"]]
    # A retest evaluates a sweep run's adapters: its training loss is that run's.
    trained = {(r["seed"], r["lr"]): r.get("train_loss") for r in rs if r["stage"] in ("sweep", "final")}
    blocks = sorted(diag[0], key=int) if diag else []
    return {
        "trainable": next((r["trainable"] for r in rs if r["trainable"]), None),
        "sweep": {lr: v for lr, v in sweep.items() if v},
        "picked_lr": pick,
        "pick_at_edge": pick in (min(swept, key=float), max(swept, key=float)),
        "test": [common.average(r["test"]) for r in final],
        "test_tasks": {t: [r["test"][t] for r in final] for t in (final[0]["test"] if final else {})},
        "seeds": [r["seed"] for r in final],
        "train_loss": [trained.get((r["seed"], r["lr"])) for r in final],
        "steps_to_90": [harness.steps_to_fraction(c) for c in curves],
        "final_val": [c[-1][1] for c in curves],
        "alpha": {f: v for f, v in {1.0: [common.average(r["val"]) for r in final if r["stage"] == "final"],
                                    **alpha}.items() if v},
        "cos_before": {b: statistics.mean(d[b]["cos_before"] for d in diag) for b in blocks},
        "sweep_run_seconds": [r["wall_seconds"] for r in rs if r["stage"] == "sweep"],
        "sweep_run_cpu_seconds": [r["cpu_seconds"] for r in rs if r["stage"] == "sweep"],
    }


def baselines(rs: list[dict]) -> dict:
    """Base model, uniform chance and majority label per task, on validation and test, where recorded."""
    out = {}
    for split in ("val", "test"):
        with_labels = next((r["baselines"][split] for r in rs if r["baselines"][split]), {})
        base = next((r["base"][split] for r in rs if r["base"][split]), None)
        out[split] = {"chance": {t: b["chance"] for t, b in with_labels.items()},
                      "majority": {t: b["majority"] for t, b in with_labels.items()}, "base model": base}
    return out


def fmt(xs: list[float]) -> str:
    if not xs:
        return "—"
    mean, std = common.mean_std(xs)
    return f"{mean:.3f} ± {std:.3f}" if len(xs) > 1 else f"{mean:.3f}"


def comparisons(methods: dict) -> list[dict]:
    """Each method with all its seeds against the reference: Welch's test, Holm over them all."""
    ref = methods.get(harness.REFERENCE, {}).get("test", [])
    rows = [{"a": name, "b": harness.REFERENCE, **stats.compare(m["test"], ref)}
            for name, m in methods.items() if name != harness.REFERENCE and m["test"]]
    return stats.adjust(rows)


def tested(methods: dict) -> list[str]:
    """The test average's 95% interval per method, and the comparisons with the reference, tested."""
    rows = comparisons(methods)
    if not rows:
        return []
    lines = ["", "### The test average's 95% interval, and each method against the reference, tested", "",
             "| method | test average [95% interval] |", "|---|---|"]
    for name, m in methods.items():
        if len(m["test"]) > 1:
            mean, half = stats.mean_ci(m["test"])
            lines.append(f"| {name} | {mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] |")
    return lines + ["", f"Welch's t-test, Holm-adjusted over the {len(rows)} comparisons; a verdict is 'higher' or "
                    "'lower' where Holm's p is below 0.05, else 'no difference shown'.", "",
                    *stats.table(rows)]


def markdown(summary: dict, s) -> str:
    methods, base = summary["methods"], summary["baselines"]
    tasks = sorted(base["test"]["chance"])
    ref = methods.get(harness.REFERENCE, {}).get("test", [])
    rates = sorted({lr for m in methods.values() for lr in m["sweep"]}, key=float)
    n_seeds = len(s.final_seeds)
    header = ["method", "trainable", "picked lr", "val at the pick", "test average", *tasks,
              "steps to 90% of final val", f"vs {harness.REFERENCE} (noise rule)"]
    lines = [f"### Held-out test accuracy at each method's learning rate, picked on validation "
             f"({n_seeds} seeds, mean ± std)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in ("base model", "chance", "majority"):
        row = base["test"][name]
        if row:
            val = f"{common.average(base['val'][name]):.3f}" if base["val"][name] else ""
            lines.append(f"| {name} | | | {val} | {common.average(row):.3f} | "
                         + " | ".join(f"{row[t]:.3f}" for t in tasks) + " | | |")
    for name, m in methods.items():
        if m["picked_lr"] is None:
            cells = [name, f"{m['trainable']:,}" if m['trainable'] else "", "sweep unfinished"]
            cells += [""] * (len(header) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        verdict = ("—" if name == harness.REFERENCE else "n/a" if min(len(ref), len(m["test"])) < 2 else
                   "within noise" if harness.within_noise(m["test"], ref) else
                   "lower" if statistics.mean(m["test"]) < statistics.mean(ref) else "higher")
        lr = m["picked_lr"] + (" (edge)" if m["pick_at_edge"] else "")
        steps = "—" if not m["steps_to_90"] else "{:.0f} ± {:.0f}".format(*common.mean_std(m["steps_to_90"])) \
            if len(m["steps_to_90"]) > 1 else f"{m['steps_to_90'][0]}"
        seeds = "" if len(m["test"]) == n_seeds else f" ({len(m['test'])} seeds so far)"
        per_task = [f"{statistics.mean(m['test_tasks'][t]):.3f}" if m["test_tasks"] else "—" for t in tasks]
        lines.append(f"| {name} | {m['trainable']:,} | {lr} | {fmt(m['sweep'][m['picked_lr']])} | "
                     f"{fmt(m['test'])}{seeds} | " + " | ".join(per_task) + f" | {steps} | {verdict} |")
    lines += ["", "(edge): the picked rate is the sweep's smallest or largest; the best rate may lie outside it.",
              f"vs {harness.REFERENCE}: the noise rule, a gap of more than twice the standard error of the difference "
              "(about p < 0.1 with 5 seeds, uncorrected: a rough rule, kept beside the tests below).",
              *tested(methods), "",
              f"### Validation accuracy over the learning-rate sweep (mean ± std over {len(s.sweep_seeds)} seeds; "
              "**bold**: the pick)", "", "| method | " + " | ".join(rates) + " |", "|---|" + "---|" * len(rates)]
    val_baselines = {n: common.average(base["val"][n]) for n in ("chance", "majority") if base["val"][n]}
    for name, value in val_baselines.items():  # the same at every rate: no model involved
        lines.append(f"| {name} | " + " | ".join(f"{value:.3f}" for _ in rates) + " |")
    for name, m in methods.items():
        cells = [fmt(m["sweep"].get(lr, [])) for lr in rates]
        cells = [f"**{c}**" if lr == m["picked_lr"] else c for lr, c in zip(rates, cells)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    alpha_rows = {n: m for n, m in methods.items() if n in s.alpha_methods and m["alpha"]}
    if alpha_rows:
        factors = sorted({1.0, *s.alpha_factors})
        lines += ["", "### Alpha at the picked rate (validation accuracy, mean ± std over seeds; alpha x 1: the "
                  "new final runs)", "", "| method | " + " | ".join(f"alpha x {f:g}" for f in factors) + " | spread |",
                  "|---|" + "---|" * (len(factors) + 1)]
        for name, value in val_baselines.items():
            lines.append(f"| {name} | " + " | ".join(f"{value:.3f}" for _ in factors) + " | |")
        for name, m in alpha_rows.items():
            means = [statistics.mean(m["alpha"][f]) for f in factors if m["alpha"].get(f)]
            spread = f"{max(means) - min(means):.3f}" if len(means) > 1 else ""
            lines.append(f"| {name} | " + " | ".join(fmt(m["alpha"].get(f, [])) for f in factors) + f" | {spread} |")
    routed = {n: m for n, m in methods.items() if m["cos_before"]}
    if routed:
        blocks = sorted(next(iter(routed.values()))["cos_before"], key=int)
        lines += ["", "### Expert similarity before orthogonalisation (mean |cos| between two active experts' "
                  "outputs for one token, last logged step of the new final runs, mean over seeds)", "",
                  "| method | " + " | ".join(f"block {b}" for b in blocks) + " |", "|---|" + "---|" * len(blocks)]
        for name, m in routed.items():
            lines.append(f"| {name} | " + " | ".join(f"{m['cos_before'][b]:.3f}" for b in blocks) + " |")
    picked = {n: m for n, m in methods.items() if m["picked_lr"] and m["test"]}
    if picked:
        lines += ["", "### What one run gives: the range over seeds at the picked rate (for a lab, where each "
                  "student runs one seed)", "", "| method | command | test average, lowest – highest | seeds |",
                  "|---|---|---|---|"]
        for name, m in picked.items():
            command = " ".join(["python train.py --data assets/world-val", *s.methods[name], "--lr", m["picked_lr"]])
            lines.append(f"| {name} | `{command}` | {min(m['test']):.3f} – {max(m['test']):.3f} | {len(m['test'])} |")
    fitted = {name: m for name, m in methods.items() if m["test"] and any(x is not None for x in m["train_loss"])}
    if fitted:
        lines += ["", "### Does a seed that fails on the test fit its training questions? (each seed at the pick: "
                  "training loss over the last logged 40 steps / test average, lowest test first)", "",
                  "| method | seeds |", "|---|---|"]
        for name, m in fitted.items():
            pairs = sorted(zip(m["test"], m["train_loss"]))
            lines.append(f"| {name} | " + ", ".join(f"{'—' if loss is None else f'{loss:.3f}'} / {acc:.3f}"
                                                  for acc, loss in pairs) + " |")
    lines += ["", "### Time per sweep run (one thread; wall clock as measured, on a possibly shared machine)", "",
              "| method | wall seconds | CPU seconds |", "|---|---|---|"]
    for name, m in methods.items():
        if m["sweep_run_seconds"]:
            lines.append(f"| {name} | {statistics.mean(m['sweep_run_seconds']):.0f} | "
                         f"{statistics.mean(m['sweep_run_cpu_seconds']):.0f} |")
    known = [e for e in summary.get("environments", []) if e != "null"]
    lines += ["", "### What the records were computed with", ""]
    lines += [f"- `{e}`" for e in known]
    if "null" in summary.get("environments", []):
        lines.append("- not recorded for the records made before each record named its torch release and processor")
    return "\n".join(lines) + "\n"


def figure(summary: dict, s, path: Path) -> None:
    """Validation accuracy against the learning rate, one line per method, the pick marked; two panels:
    the methods whose experts' outputs are scaled to unit length, and those whose are not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    titles = ("outputs not normalised", "outputs normalised to unit length")
    majority = summary["baselines"]["val"]["majority"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        if majority:
            ax.axhline(common.average(majority), color="grey", linewidth=0.8, linestyle=":", label="majority label")
    for name, m in summary["methods"].items():
        lrs = sorted((lr for lr in m["sweep"] if m["sweep"][lr]), key=float)
        if not lrs:
            continue
        ax = axes[int(harness.normalises(summary["flags"][name]))]
        mean = [statistics.mean(m["sweep"][lr]) for lr in lrs]
        std = [common.mean_std(m["sweep"][lr])[1] for lr in lrs]
        line = ax.errorbar([float(lr) for lr in lrs], mean, yerr=std, marker="o", capsize=2, label=name)
        if m["picked_lr"]:
            ax.plot(float(m["picked_lr"]), statistics.mean(m["sweep"][m["picked_lr"]]), marker="*", markersize=14,
                    color=line[0].get_color())
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    axes[0].set_ylabel("validation accuracy (mean over tasks)")
    fig.suptitle(f"Accuracy against learning rate (mean ± std over {len(s.sweep_seeds)} seeds; ★ the pick)",
                 fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, path, 120)
    plt.close(fig)


def write(out: Path, s, runner=None) -> dict:
    rs = records(out)
    # The tasks' folder is in every record's flags (--data), as each method's flags are.
    summary = {"settings": {k: v for k, v in vars(s).items() if k not in ("methods", "data")}, "flags": s.methods,
               "baselines": baselines(rs),
               "environments": sorted({json.dumps(r.get("environment"), sort_keys=True) for r in rs}),
               "methods": {m: summarise(m, [r for r in rs if r["method"] == m], s) for m in s.methods}}
    summary["comparisons"] = comparisons(summary["methods"])
    common.write_text(out / "results.json", json.dumps(summary, indent=1) + "\n")
    common.write_text(out / "results.md", markdown(summary, s))
    figure(summary, s, out / "lr.png")
    return summary
