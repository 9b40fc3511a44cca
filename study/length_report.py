"""The length study's report: length_study.py's records -> study/length/results.md, results.json and
curves.png. Everything here is computed from the records alone (and the validation files, for which label
is the majority one), so it can be rewritten at any time from a partial study.

  1. each method at each length: its pick, the test over 5 seeds, and the noise rule against OMoE-2 at the
     same length and against itself at the other length;
  2. the learning curves (validation every 24 steps, all 5 seeds at the pick), and the same at equal steps
     and at equal compute (steps scaled by each method's measured time per step, study/step_times.json);
  3. the plateau: what a run answers while its validation accuracy is near the majority label, and when each
     seed leaves it;
  4. the control (switch_run.py): a method switched from normalised to plain, and the reverse.
"""
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "study"))
import common  # noqa: E402
import harness  # noqa: E402
import length_study  # noqa: E402
import report  # noqa: E402
import stats  # noqa: E402

OUT = length_study.OUT
STEP_TIMES = ROOT / "study" / "step_times.json"  # benchmarks/bench_step.py --study writes it
MARGIN = 0.10  # a run has left the plateau once its validation average is this far above the majority label


def val_majority() -> dict[str, tuple[str, float]]:
    """{task: (its validation set's most frequent gold label, that label's share)}."""
    out = {}
    for path in sorted((harness.DATA).glob("*/val.json")):
        counts = Counter(r["answer"] for r in json.loads(path.read_text()))
        label, n = counts.most_common(1)[0]
        out[path.parent.name] = (label, n / sum(counts.values()))
    return out


def method_summary(arm: harness.Study, method: str) -> dict:
    """report.py's summary of one method of one arm, and the curves of all its seeds at the pick."""
    rs = [r for r in report.records(arm.out) if r["method"] == method]
    s = report.summarise(method, rs, arm.s)
    pick = s["picked_lr"]
    runs = sorted((r for r in rs if r["lr"] == pick and r["stage"] in ("sweep", "final") and r["val_curve"]),
                  key=lambda r: r["seed"])
    s["curves"] = {r["seed"]: r["val_curve"] for r in runs}
    s["answer_curves"] = {r["seed"]: r["answers"]["val_curve"] for r in runs}
    s["environment"] = sorted({json.dumps(r.get("environment"), sort_keys=True) for r in rs})
    s["final_cpu_seconds"] = [r["cpu_seconds"] for r in rs if r["stage"] == "final"]
    s["method"], s["flags"] = method, arm.s.methods[method]
    return s


def earlier_machine(method: str, lr: str | None) -> list[float]:
    """The one-epoch study's test averages (made on an earlier machine) of `method` at `lr`, if that study
    picked the same rate: the same runs on another processor, for the range a student's run may land in."""
    summary = json.loads((ROOT / "study" / "results.json").read_text())["methods"].get(method, {})
    return summary.get("test", []) if lr is not None and summary.get("picked_lr") == lr else []


def verdict(a: list[float], b: list[float]) -> str:
    if min(len(a), len(b)) < 2:
        return "n/a"
    if harness.within_noise(a, b):
        return "within noise"
    return "higher" if statistics.mean(a) > statistics.mean(b) else "lower"


def at_step(curve: list, step: int) -> float | None:
    """A curve's validation average at `step`, linear between its evaluated steps (None past its end)."""
    points = [(0, None)] + [tuple(p) for p in curve]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 < step <= s1:
            return v1 if v0 is None else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return None


def leaves_plateau(curve: list, majority: float) -> int | None:
    """The first evaluated step whose validation average is MARGIN above the majority label, or None."""
    return next((step for step, acc in curve if acc >= majority + MARGIN), None)


def plateau_answers(summary: dict, majority: dict, mean_majority: float) -> dict:
    """At the curve points where a seed is still near the majority label (below it + MARGIN / 2): the mean
    share of each task's most frequent answer, and how often that answer is the task's majority label."""
    shares, is_majority, points = [], [], 0
    for seed, curve in summary["curves"].items():
        answers = dict((step, a) for step, a in summary["answer_curves"][seed])
        for step, acc in curve:
            if acc >= mean_majority + MARGIN / 2 or not answers.get(step):
                continue
            points += 1
            for task, counts in answers[step].items():
                label, n = max(counts.items(), key=lambda kv: kv[1])
                shares.append(n / sum(counts.values()))
                is_majority.append(label == majority[task][0])
    if not points:
        return {"points": 0}
    return {"points": points, "top_share": statistics.mean(shares), "majority_share": statistics.mean(is_majority)}


def fmt(xs) -> str:
    return report.fmt(xs)


def summaries() -> dict:
    arms = {e: length_study.arm(e) for e in length_study.LENGTHS}
    return {e: {m: method_summary(a, m) for m in length_study.METHODS} for e, a in arms.items()}


def final_runs(out: Path, names) -> dict:
    """{name: its runs' summary}: the one-lr, 5-seed arms (the controls, the longer arm) of `out`."""
    rs = report.records(out) if (out / "runs").is_dir() else []
    found = {}
    for name in names:
        mine = sorted((r for r in rs if r["method"] == name), key=lambda r: r["seed"])
        found[name] = {"lr": mine[0]["lr"] if mine else None,
                       "test": [common.average(r["test"]) for r in mine if r["test"]],
                       "val": [common.average(r["val"]) for r in mine if r["val"]],
                       "curves": {r["seed"]: r["val_curve"] for r in mine if r["val_curve"]},
                       "train_loss": [r["train_loss"] for r in mine],
                       "environment": sorted({json.dumps(r.get("environment"), sort_keys=True) for r in mine})}
    return found


def control_summaries() -> dict:
    found = final_runs(OUT / "controls", length_study.CONTROLS)
    for name, (parent, _) in length_study.CONTROLS.items():
        found[name]["parent"] = parent
    return found


def long_summaries() -> dict:
    """The longer arm's runs, per method (at the 3-epoch pick)."""
    found = final_runs(OUT / f"{length_study.LONG}-epochs", length_study.LONG_METHODS)
    for c in found.values():
        c["picked_lr"] = c.pop("lr")  # the name the figure and the tables read for every arm
    return found


def step_times() -> dict:
    return json.loads(STEP_TIMES.read_text()) if STEP_TIMES.is_file() else {}


def comparisons(by_length: dict, controls: dict, longer: dict) -> list[dict]:
    """Every comparison the report makes, as one family: Welch's test, Holm over all of them."""
    ref, rows = harness.REFERENCE, []

    def add(label, a, b):
        rows.append({"comparison": label, **stats.compare(a, b)})
    for e in (1, 3):
        for m in length_study.METHODS:
            if m != ref:
                add(f"{e} epoch{'s' if e > 1 else ''}: {m} vs {ref}", by_length[e][m]["test"],
                    by_length[e][ref]["test"])
    for m in length_study.METHODS:
        add(f"{m}: 3 epochs vs 1", by_length[3][m]["test"], by_length[1][m]["test"])
    n = length_study.LONG
    for m, c in longer.items():
        if m != ref:
            add(f"{n} epochs: {m} vs {ref}", c["test"], longer.get(ref, {}).get("test", []))
        add(f"{m}: {n} epochs vs 3", c["test"], by_length[3][m]["test"])
    for name, c in controls.items():
        parent = c["parent"]
        other = "vanilla MoE-LoRA soft-2" if parent != "vanilla MoE-LoRA soft-2" else "normalised only, 2 experts"
        for x in (parent, other):
            add(f"{name} vs {x} (3 epochs)", c["test"], by_length[3][x]["test"])
    return stats.adjust(rows)


def intervals(by_length: dict, longer: dict) -> list[str]:
    """Each method's test mean and its 95% interval at each length."""
    n = length_study.LONG
    lines = ["| method | 1 epoch | 3 epochs | " + f"{n} epochs (3-epoch lr) |", "|---|---|---|---|"]
    for m in length_study.METHODS:
        cells = []
        for xs in (by_length[1][m]["test"], by_length[3][m]["test"], longer.get(m, {}).get("test", [])):
            mean, half = stats.mean_ci(xs) if xs else (None, None)
            cells.append("—" if mean is None else f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def markdown(by_length: dict, controls: dict, majority: dict, longer: dict) -> str:
    mean_majority = statistics.mean(share for _, share in majority.values())
    ref = harness.REFERENCE
    rows = comparisons(by_length, controls, longer)
    lines = ["### Test average at each method's rate, picked on validation at each length (5 seeds, mean ± std)", "",
             "| method | 1 epoch: lr | 1 epoch: test | vs OMoE-2 (noise rule) | 3 epochs: lr | 3 epochs: test | "
             "vs OMoE-2 (noise rule) | 3 epochs vs 1 (noise rule) |", "|---|---|---|---|---|---|---|---|"]
    for m in length_study.METHODS:
        one, three = by_length[1][m], by_length[3][m]
        cells = [m]
        for s, e in ((one, 1), (three, 3)):
            lr = (s["picked_lr"] or "—") + (" (edge)" if s["pick_at_edge"] else "")
            cells += [lr, fmt(s["test"]), "—" if m == ref else verdict(s["test"], by_length[e][ref]["test"])]
        cells.append(verdict(three["test"], one["test"]))
        lines.append("| " + " | ".join(cells) + " |")
    if any(c["test"] for c in longer.values()):
        n = length_study.LONG
        lines += ["", f"### {n} epochs, where validation still climbed at the end of 3 (at the 3-epoch pick, up to "
                  "5 seeds: those recorded so far)", "",
                  f"| method | lr | seeds | {n} epochs: test | vs OMoE-2 (noise rule) | {n} epochs vs 3 (noise rule) |",
                  "|---|---|---|---|---|---|"]
        for m, c in longer.items():
            lines.append(f"| {m} | {c['picked_lr'] or '—'} | {len(c['test'])} | {fmt(c['test'])} | "
                         f"{'—' if m == ref else verdict(c['test'], longer.get(ref, {}).get('test', []))} | "
                         f"{verdict(c['test'], by_length[3][m]['test'])} |")
    test = report.baselines(report.records(length_study.arm(3).out))["test"]
    lines += ["", f"On the test the majority label scores {common.average(test['majority']):.3f} and chance "
              f"{common.average(test['chance']):.3f}; on validation the majority label {mean_majority:.3f}. The "
              f"noise rule: a gap counts when it exceeds twice the standard error of the difference (about p < 0.1 "
              f"with 5 seeds, uncorrected: a rough rule, kept beside the tests below).", "",
              "### The test average's 95% interval (t-interval over the 5 seeds)", "", *intervals(by_length, longer),
              "", f"### Every comparison above, tested: Welch's t-test, Holm-adjusted over all {len(rows)}", "",
              "A verdict is 'higher' or 'lower' where Holm's p is below 0.05, else 'no difference shown'. The paired "
              "test pairs runs by seed (the same data order); the noise rule is the earlier rough rule.", "",
              *stats.table(rows, label=lambda r: r["comparison"]), "",
              "### What one run gives: the lowest – highest test average over the seeds at the pick", "",
              "Runs on another processor or torch release round differently, and a small model's training follows "
              "the difference as it would another seed: the one-epoch column on both machines holds the same "
              "runs (same flags and seeds) made by the one-epoch study on an earlier machine, where it picked the "
              "same rate.", "",
              "| method | 1 epoch, this machine (5 seeds) | 1 epoch, both machines (runs) | 3 epochs, this machine "
              "(5 seeds) | command (1 epoch; 3 epochs: its --lr and --epochs 3) |", "|---|---|---|---|---|"]
    for m in length_study.METHODS:
        one, three = by_length[1][m], by_length[3][m]
        both = one["test"] + earlier_machine(m, one["picked_lr"])
        rng = [f"{min(x):.3f} – {max(x):.3f}" if x else "—" for x in (one["test"], both, three["test"])]
        command = " ".join(["python train.py --data assets/world-val", *harness.METHODS[m], "--lr",
                            one["picked_lr"] or "?"])
        lines.append(f"| {m} | {rng[0]} | {rng[1]} ({len(both)}) | {rng[2]} (`--lr {three['picked_lr']} "
                     f"--epochs 3`) | `{command}` |")
    lines += ["", "### Validation accuracy at equal steps (mean over the 5 seeds at the pick)", "",
              "| method | 1 epoch, step 120 (its end) | 3 epochs, step 120 | 3 epochs, step 240 | 3 epochs, step 360 | "
              f"{length_study.LONG} epochs, step {120 * length_study.LONG} |", "|---|---|---|---|---|---|"]
    for m in length_study.METHODS:
        one, three = by_length[1][m], by_length[3][m]
        cells = [mean_at(one, 120)] + [mean_at(three, s) for s in (120, 240, 360)]
        cells.append(mean_at(longer[m], 720) if m in longer and longer[m]["curves"] else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    times = step_times()
    if times:
        base = times["LoRA r=16"]
        lines += ["", "### Validation accuracy at equal compute (the time of 120 and 360 steps of LoRA r=16, each "
                  "method's time per step: the median of interleaved rounds of `OMP_NUM_THREADS=1 python "
                  "benchmarks/bench_step.py --study`; validation linear between evaluated steps, read off each "
                  "method's own runs of that length: its 1-epoch runs for 120 steps, its 3-epoch runs for 360)", "",
                  "| method | time per step / LoRA r=16's | steps in 120 LoRA steps' time | val | steps in 360 | val |",
                  "|---|---|---|---|---|---|"]
        for m in length_study.METHODS:
            if m not in times:
                continue
            ratio = times[m] / base
            cells = [f"{ratio:.2f}"]
            for budget, length in ((120, 1), (360, 3)):  # each budget read off the runs of its own length
                steps = int(budget / ratio)
                cells += [str(steps), mean_at(by_length[length][m], steps)]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "### The plateau: when each seed leaves it, and what a run on it answers", "",
              f"A seed has left the plateau at the first evaluated step whose validation average is {MARGIN:.2f} "
              f"above the majority label ({mean_majority + MARGIN:.3f}); 'never' counts seeds that did not within the "
              f"run. On the plateau (validation below {mean_majority + MARGIN / 2:.3f}): the mean share of each task's "
              f"most frequent answer (1.0: one answer to every question), and how often that answer is the task's "
              f"majority label.", "",
              "| method | length | leaves the plateau at step (each seed) | points on the plateau | most frequent "
              "answer's share | it is the majority label |", "|---|---|---|---|---|---|"]
    for m in length_study.METHODS:
        for e in (1, 3):
            s = by_length[e][m]
            leaves = [leaves_plateau(c, mean_majority) for _, c in sorted(s["curves"].items())]
            p = plateau_answers(s, majority, mean_majority)
            shares = (f"{p['top_share']:.2f} | {p['majority_share']:.2f}" if p["points"] else "— | —")
            lines.append(f"| {m} | {e} | " + ", ".join("never" if x is None else str(x) for x in leaves)
                         + f" | {p['points']} | {shares} |")
    if any(c["test"] for c in controls.values()):
        lines += ["", f"### The control: switched at step {length_study.SWITCH_AT} of 3 epochs "
                  "(study/switch_run.py), at the starting method's 3-epoch pick", "",
                  "| run | lr | test | seeds | vs the method it starts as | vs the method it ends as | leaves the "
                  "plateau at step |", "|---|---|---|---|---|---|---|"]
        for name, c in controls.items():
            parent = c["parent"]
            other = "vanilla MoE-LoRA soft-2" if parent != "vanilla MoE-LoRA soft-2" else "normalised only, 2 experts"
            leaves = [leaves_plateau(cv, mean_majority) for _, cv in sorted(c["curves"].items())]
            against = [f"{verdict(c['test'], by_length[3][x]['test'])} ({x}: {fmt(by_length[3][x]['test'])})"
                       for x in (parent, other)]
            lines.append(f"| {name} | {c['lr']} | {fmt(c['test'])} | {len(c['test'])} | {against[0]} | {against[1]} | "
                         + ", ".join("never" if x is None else str(x) for x in leaves) + " |")
    lines += ["", "### Time per run (CPU seconds of one thread, the mean of the new final runs, which also evaluate "
              "validation every 24 steps: an upper bound for the same command without --eval-every)", "",
              "| method | 1 epoch | 3 epochs |", "|---|---|---|"]
    for m in length_study.METHODS:
        cells = [f"{statistics.mean(x):.0f}" if x else "—" for x in (by_length[e][m]["final_cpu_seconds"]
                                                                     for e in (1, 3))]
        lines.append(f"| {m} | {cells[0]} | {cells[1]} |")
    environments = sorted({e for by in [*by_length.values(), longer, controls] for s in by.values()
                           for e in s["environment"]})
    lines += ["", "### What the records were computed with", ""] + [f"- `{e}`" for e in environments]
    return "\n".join(lines) + "\n"


def mean_at(s: dict, step: int) -> str:
    values = [v for v in (at_step(c, step) for c in s["curves"].values()) if v is not None]
    return f"{statistics.mean(values):.3f}" if values else "—"


def figure(by_length: dict, controls: dict, majority: dict, longer: dict, path: Path) -> None:
    """Validation against the step, one panel per method: each length's mean over seeds and the band of its
    lowest and highest seed; the controls dashed in the panel of the method they start as."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    mean_majority = statistics.mean(share for _, share in majority.values())
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharex=True, sharey=True)
    for ax, m in zip(axes.flat, length_study.METHODS):
        arms = [(1, "tab:orange", by_length[1][m]), (3, "tab:blue", by_length[3][m])]
        if m in longer and longer[m]["curves"]:
            arms.append((length_study.LONG, "tab:green", longer[m]))
        for e, color, summary in arms:
            curves = list(summary["curves"].values())
            if not curves:
                continue
            steps = [p[0] for p in curves[0]]
            rows = [[at_step(c, s) for s in steps] for c in curves]
            mean = [statistics.mean(r[i] for r in rows) for i in range(len(steps))]
            ax.fill_between(steps, [min(r[i] for r in rows) for i in range(len(steps))],
                            [max(r[i] for r in rows) for i in range(len(steps))], color=color, alpha=0.2)
            ax.plot(steps, mean, color=color, marker="o", ms=3,
                    label=f"{e} epoch{'s' if e > 1 else ''} (lr {summary['picked_lr']})")
        for name, c in controls.items():
            if c["parent"] == m and c["curves"]:
                curves = list(c["curves"].values())
                steps = [p[0] for p in curves[0]]
                mean = [statistics.mean(at_step(cv, s) for cv in curves) for s in steps]
                ax.plot(steps, mean, color="black", ls="--", lw=1.2, label=name.split(", then ")[-1].replace(
                    "from step", "after step"))
        ax.axhline(mean_majority, color="grey", lw=0.8, ls=":", label="majority label")
        ax.set_title(m, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy (mean over tasks)")
    fig.suptitle("Validation accuracy during training: mean over 5 seeds at each length's pick, band: lowest to "
                 "highest seed", fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, path, 110)
    plt.close(fig)


def write() -> dict:
    by_length, controls, majority, longer = summaries(), control_summaries(), val_majority(), long_summaries()
    OUT.mkdir(parents=True, exist_ok=True)
    summary = {"lengths": {e: {m: {k: v for k, v in s.items() if k not in ("answer_curves",)}
                               for m, s in by.items()} for e, by in by_length.items()},
               "controls": controls, "longer": longer, "val_majority": majority, "step_times": step_times(),
               "comparisons": comparisons(by_length, controls, longer)}
    common.write_text(OUT / "results.json", json.dumps(summary, indent=1) + "\n")
    common.write_text(OUT / "results.md", markdown(by_length, controls, majority, longer))
    figure(by_length, controls, majority, longer, OUT / "curves.png")
    return summary


if __name__ == "__main__":
    write()
    print(f"wrote {OUT / 'results.md'}, results.json and curves.png")
