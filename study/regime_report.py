"""The regime study's report: its records -> study/regime/[twelve/]<placement>/results.md and .json.

Everything is computed from the records alone, so it can be rewritten from a partial study: a cell
whose sweep or seeds are unfinished says so, and the planned comparisons are Holm-adjusted over the
whole planned family (33), counting the ones not yet known as if they were larger, so that a
"higher" or "lower" here can only become more certain when the rest arrive.
"""
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "study"))
import common  # noqa: E402
import harness  # noqa: E402
import regime_design  # noqa: E402
import report  # noqa: E402
import stats  # noqa: E402

LORA4, LORA8, LORA9 = (f"LoRA r={r} ({w})" for r, w in ((4, "one expert's rank"),
                                                         (8, "two experts' rank"),
                                                         (9, "OMoE-2's parameters")))
VANILLA, TIED, OMOE = "vanilla MoE-LoRA soft-2", "vanilla soft-2, tied experts", "OMoE-2 orthonormal"
COMPARISONS = [  # (id, method, against, the question): study/regime/DESIGN.md
    ("C1", LORA8, LORA4, "does capacity bind?"),
    ("C2", VANILLA, LORA8, "does vanilla use its total rank as well as one LoRA?"),
    ("C3", VANILLA, TIED, "is vanilla's second expert worth anything?"),
    ("C4", OMOE, VANILLA, "does Gram–Schmidt help?"),
    ("C5", OMOE, LORA8, "OMoE-2 against one LoRA of its total rank"),
    ("C6", OMOE, LORA9, "the same at equal parameters, routers counted"),
    ("C7", OMOE, "normalised only, 2 experts", "orthogonality beyond the unit length"),
    ("C8", OMOE, "orthogonal only, 2 experts", "the unit length beyond orthogonality"),
    ("C9", "OMoE-2, learned magnitude", OMOE, "does the length cap bind?"),
    ("C10", "OMoE top-2 of 4", "vanilla top-2 of 4", "Gram–Schmidt under sparse routing"),
    ("C11", "vanilla top-2 of 4 + balance loss", "vanilla top-2 of 4", "does balancing help?"),
]
FAMILY = len(COMPARISONS) * len(regime_design.LENGTHS)
PLACEMENT_NOTES = {"o_proj": "the first placement: C1 failed there",
                   "k_proj,v_proj": "the placement the gate chose",
                   "q_proj,v_proj": "the second placement gated on the twelve tasks",
                   regime_design.BLOCKS[0]: "one block, gated in BLOCK.md: C1 failed at 6 epochs",
                   regime_design.BLOCKS[1]: "one block, the placement BLOCK.md's gate chose; its "
                                            "mixtures run at 3 and 6 epochs only, by BLOCK.md's "
                                            "cost rule"}
COLLAPSED_COS, COLLAPSED_ERANK = 0.8, 1.2  # DESIGN.md: a layer's experts count as collapsed
IMBALANCED_LOAD = 0.75  # DESIGN.md: under sparse routing, one expert in 3/4 of a layer's tokens
MIXTURES = [n for n, flags in regime_design.METHODS.items() if "--lora" not in flags]
SPARSE = [n for n, flags in regime_design.METHODS.items() if "--top-k" in flags]
PROBED = ("abs_cos", "cos", "out_erank", "A_erank", "B_erank", "A_overlap", "B_overlap", "entropy",
          "mi_soft", "mi_top1", "switched", "magnitude")


def final_probes(arm: harness.Study, method: str, pick: str) -> list[list[dict]]:
    """Each final seed's probe entries (the sweep's run for seeds 0 and 1, whose retest has none)."""
    out = []
    for seed in arm.s.final_seeds:
        stage = "sweep" if seed in arm.s.sweep_seeds else "final"
        r = arm.record(harness.Run(method, stage, seed, pick))
        if r and r.get("probe") and r["probe"][-1]["layers"]:  # a LoRA has no experts to probe
            out.append(r["probe"])
    return out


def probe_summary(probes: list[list[dict]]) -> dict:
    """The last probe's quantities, mean over seeds and layers (and their spread over seeds); the
    share of (seed, layer) pairs whose experts are collapsed; each quantity's mean curve over the
    probes (by tenth of the run)."""
    if not probes:
        return {}
    def per_seed(entry, key):
        vals = [layer[key] for layer in entry["layers"].values() if layer.get(key) is not None]
        return statistics.mean(vals) if vals else None
    end = {k: [v for v in (per_seed(p[-1], k) for p in probes) if v is not None] for k in PROBED}
    layers = [layer for p in probes for layer in p[-1]["layers"].values()]
    collapsed = [layer["abs_cos"] >= COLLAPSED_COS or layer["out_erank"] <= COLLAPSED_ERANK
                 for layer in layers]
    max_load = [max(layer["load"]) / sum(layer["load"]) for layer in layers]
    # load: each expert's share of the tokens; under soft routing every expert has every token
    imbalanced = [max(layer["load"]) >= IMBALANCED_LOAD for layer in layers
                  if sum(layer["load"]) < len(layer["load"]) - 1e-6]
    n = min(len(p) for p in probes)
    curves = {k: [statistics.mean(v) for v in zip(*[[per_seed(e, k) for e in p[:n]]
                                                    for p in probes]) if None not in v]
              for k in ("abs_cos", "out_erank", "mi_soft", "switched", "magnitude")}
    magnitudes = [layer["magnitude"] for layer in layers if "magnitude" in layer]
    return {"seeds": len(probes), "end": {k: common.mean_std(v) for k, v in end.items() if v},
            "collapsed_share": sum(collapsed) / len(collapsed),
            "imbalanced_share": sum(imbalanced) / len(imbalanced) if imbalanced else None,
            "magnitude_above_1_5": (sum(m > 1.5 for m in magnitudes) / len(magnitudes)
                                    if magnitudes else None),
            "max_load_share": statistics.mean(max_load),
            "steps": [e["step"] for e in probes[0][:n]], "curves": curves}


def summarise_arm(epochs: int, placement: str, world: str) -> dict:
    arm = regime_design.arm(epochs, log=lambda *_: None, placement=placement, world=world)
    rs = report.records(arm.out)
    out = {}
    for method in arm.s.methods:
        mine = [r for r in rs if r["method"] == method]
        s = report.summarise(method, mine, arm.s)
        share = next((r["share"] for r in mine if r.get("share")), None)
        probes = final_probes(arm, method, s["picked_lr"]) if s["picked_lr"] else []
        s.update(share=share, ci=stats.mean_ci(s["test"])[1] if len(s["test"]) > 1 else None,
                 cpu_seconds=[r["cpu_seconds"] for r in mine if r["stage"] in ("sweep", "final")],
                 probe=probe_summary(probes))
        out[method] = s
    return {"methods": out, "baselines": report.baselines(rs), "records": len(rs),
            "environments": sorted({json.dumps(r.get("environment"), sort_keys=True) for r in rs})}


def comparisons(by_length: dict) -> list[dict]:
    """Every planned comparison whose two cells have all their seeds, Holm-adjusted over the family."""
    rows = []
    for epochs, arm in by_length.items():
        seeds = len(regime_design.settings(epochs).final_seeds)
        for cid, a, b, question in COMPARISONS:
            ta, tb = (arm["methods"].get(m, {}).get("test", []) for m in (a, b))
            complete = len(ta) == len(tb) == seeds
            rows.append({"id": cid, "epochs": epochs, "a": a, "b": b, "question": question,
                         **(stats.compare(ta, tb) if complete else {})})
    return stats.adjust(rows, FAMILY)


def answers(by_length: dict, rows: list[dict]) -> list[str]:
    """DESIGN.md's rules, applied to the records as they are: one line per length and question,
    'pending' where a cell it needs is unfinished."""
    verdict = {(r["id"], r["epochs"]): r for r in rows}
    lines = []
    for e, arm in by_length.items():
        def v(cid):
            r = verdict[(cid, e)]
            return r.get("verdict"), r.get("diff")
        probe = arm["methods"].get(VANILLA, {}).get("probe") or {}
        c1, c2, c3, c4, c7, c9 = (v(c)[0] for c in ("C1", "C2", "C3", "C4", "C7", "C9"))
        valid = None if c1 is None else c1 == "higher" and v("C1")[1] >= 0.05
        collapsed = None if not probe else probe["collapsed_share"] > 0.5
        say = lambda q, a: lines.append(f"- {e} epoch{'s' if e > 1 else ''}, {q}: {a}")  # noqa: E731
        seen, learnt = world_check(arm)
        say("the regime is valid (C1 higher by 0.05 or more)", "pending" if valid is None else
            "yes" if valid else "no: capacity does not bind, nothing below reads as a cost of collapse"
            if learnt else "no: LoRA r=8 has not learnt the tasks, so C1 cannot show capacity binding")
        say("the world (saturated: a best test average of 0.95 or more, or a task at 0.99 or more for "
            "every method; learnt: LoRA r=8 0.10 or more above the majority label)", seen)
        if None in (valid, collapsed, c2, c3):
            say("collapse costs accuracy", "pending")
        elif not collapsed:
            say("collapse costs accuracy", f"no collapse in vanilla's probe (collapsed share "
                f"{probe['collapsed_share']:.2f}); C2 {c2}, C3 {c3}")
        else:
            costs = valid and c2 == "lower" and c3 != "higher"
            say("collapse costs accuracy", "yes" if costs else
                "collapse happens but costs nothing shown" if c2 == "no difference shown" else
                f"not as defined (C2 {c2}, C3 {c3})")
        say("Gram–Schmidt helps (C4), beyond the unit length (C7)", "pending" if None in (c4, c7)
            else f"C4 {c4}, C7 {c7}" + (": the gain is the unit length's" if c4 == "higher" and
                                         c7 != "higher" else ""))
        mag = arm["methods"].get("OMoE-2, learned magnitude", {}).get("probe") or {}
        say("the length cap binds (C9, the magnitude above 1.5 in most layers)",
            "pending" if c9 is None or not mag else
            f"C9 {c9}; magnitude above 1.5 in {mag['magnitude_above_1_5']:.0%} of (seed, layer)")
        say(*sparse_routing(arm, v("C10")[0], v("C11")[0]))
        say(*something_to_route(arm))
    return lines


def sparse_routing(arm: dict, c10, c11) -> tuple[str, str]:
    """DESIGN.md: collapse under sparse routing as load imbalance, and what C10 and C11 say about it."""
    question = (f"sparse routing (imbalanced: one expert in {IMBALANCED_LOAD:.0%} or more of a layer's "
                "tokens; C10, C11)")
    sparse = {n: arm["methods"].get(n, {}).get("probe") for n in SPARSE}
    if c10 is None or c11 is None or not all(sparse.values()):
        return question, "pending"
    shares = "; ".join(f"{n} imbalanced in {p['imbalanced_share']:.0%} of (seed, layer), the busiest "
                       f"expert's share of the routed slots {p['max_load_share']:.2f}"
                       for n, p in sparse.items())
    return question, f"{shares}; C10 {c10}, C11 {c11}"


def something_to_route(arm: dict) -> tuple[str, str]:
    """DESIGN.md: routing has something to route if the mixtures' task-expert information (from the
    mean router probabilities per task) ends above the tied control's, whose router is untrained."""
    question = "routing has something to route (I(task; expert) at the end above the tied control's)"
    probes = {n: arm["methods"].get(n, {}).get("probe") for n in MIXTURES}
    if not all(probes.values()):
        return question, "pending"
    tied = probes.pop(TIED)["end"]["mi_soft"][0]
    others = {n: p["end"]["mi_soft"][0] for n, p in probes.items()}
    above = [n for n, mi in others.items() if mi > tied]
    return question, (f"the tied control {tied:.4f} nats; above it: {len(above)} of {len(others)} "
                      f"mixtures (" + ", ".join(f"{n} {mi:.4f}" for n, mi in others.items()) + ")")


def world_check(arm: dict) -> tuple[str, bool | None]:
    """DESIGN.md's saturation check and the learnability that TWELVE.md adds, from the finished cells:
    what they say, and whether LoRA r=8 has learnt the tasks (None: not yet known)."""
    done = {n: m for n, m in arm["methods"].items() if len(m["test"]) == len(harness.FINAL_SEEDS)}
    majority = arm["baselines"]["test"]["majority"]
    if LORA8 not in done or not majority:
        return "pending", None
    best = max(done, key=lambda n: statistics.mean(done[n]["test"]))
    top = [t for t in done[best]["test_tasks"]
           if all(statistics.mean(m["test_tasks"][t]) >= 0.99 for m in done.values())]
    lora8, floor = statistics.mean(done[LORA8]["test"]), common.average(majority)
    learnt = lora8 >= floor + 0.10
    return (f"best {statistics.mean(done[best]['test']):.3f} ({best}); tasks at 0.99 or more for all "
            f"{len(done)} finished methods: {', '.join(top) or 'none'}; LoRA r=8 {lora8:.3f} against "
            f"the majority label's {floor:.3f} ({'learnt' if learnt else 'not learnt'})"), learnt


def method_row(name: str, m: dict) -> str:
    share = f"{m['share']:.2%}" if m.get("share") else ""
    if m["picked_lr"] is None:
        return f"| {name} | {share} | sweep unfinished |" + " |" * 9
    probe, end = m["probe"], m["probe"].get("end", {})
    def cell(key, form="{:.2f}"):
        return form.format(end[key][0]) if key in end else "—"
    seeds = len(m["test"])
    test = report.fmt(m["test"]) + ("" if seeds == 5 else f" ({seeds} seeds)")
    ci = "" if m["ci"] is None else f"{m['ci']:.3f}"
    lr = m["picked_lr"] + (" (edge)" if m["pick_at_edge"] else "")
    collapsed = f"{probe['collapsed_share']:.2f}" if probe else "—"
    load = f"{probe['max_load_share']:.2f}" if probe else "—"
    return (f"| {name} | {share} | {lr} | {report.fmt(m['sweep'][m['picked_lr']])} | {test} "
            f"| {ci} | {cell('abs_cos')} | {cell('out_erank')} | {collapsed} | {load} | "
            f"{cell('mi_soft', '{:.3f}')} | {cell('magnitude')} |")


def comparison_row(r: dict) -> str:
    head = f"| {r['id']} | {r['epochs']} | {r['a']} vs {r['b']} |"
    if "p" not in r:
        return head + " not all seeds yet |" + " |" * 5
    lo, hi = r["ci"]
    pl, ph = r["paired"]["ci"]
    fmt_p = stats.fmt_p
    return (head + f" {r['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {fmt_p(r['p'])} | "
            f"{fmt_p(r['p_holm'])} | **{r['verdict']}** | {pl:+.3f}, {ph:+.3f} "
            f"(p {fmt_p(r['paired']['p'])}) | {r['noise_rule']} |")


def markdown(by_length: dict, rows: list[dict], placement: str, world: str = "six") -> str:
    where = f"`{placement}` ({PLACEMENT_NOTES[placement]})"
    up = "../" * (1 + (world != "six"))  # the records of the twelve tasks sit one folder deeper
    title = "" if world == "six" else ", twelve tasks ([TWELVE.md](../../TWELVE.md))"
    gate = "BLOCK.md" if placement in regime_design.BLOCKS else "GATE.md"
    lines = [f"# The regime study on {where}{title}: results from the records so far", "",
             f"Design, and what would count as each answer: [DESIGN.md]({up}DESIGN.md), written before "
             f"the first run; the placement: [{gate}]({up}{gate}). Held-out test average over the "
             "seeds at each method's rate picked on "
             "validation at that length: mean ± std, and the half-width of its 95% interval. The probe "
             "columns are the last probe's (the end of training), mean over seeds and layers:",
             "abs cos, the absolute cosine between two experts' outputs; out erank, the effective "
             "rank of a token's expert outputs (1: all alike); collapsed, the share of (seed, layer) "
             f"pairs with abs cos >= {COLLAPSED_COS} or out erank <= {COLLAPSED_ERANK}; max load, the "
             "busiest expert's share of the routed slots; MI, the task-expert mutual information in "
             "nats (from the mean router probabilities per task); magnitude, the learned exp(m).", ""]
    for epochs, arm in by_length.items():
        base = arm["baselines"]["test"]
        lines += [f"## {epochs} epoch{'s' if epochs > 1 else ''} ({120 * epochs} steps; "
                  f"{arm['records']} records)", "",
                  "| method | share | lr | val at pick | test | ±95% | abs cos | out erank | "
                  "collapsed | max load | MI | magnitude |", "|" + "---|" * 12]
        if base["majority"]:
            lines.append(f"| majority label | | | | {common.average(base['majority']):.3f} |"
                         + " |" * 7)
        lines += [method_row(name, m) for name, m in arm["methods"].items()] + [""]
    lines += ["## The planned comparisons", "",
              f"Welch's t-test on the 5 seeds' test averages; p Holm-adjusted over the {FAMILY} "
              "planned comparisons (those not yet known counted as larger); the verdict at 5%; the "
              "paired test by seed and the earlier noise rule beside, for comparison.", "",
              "| # | epochs | comparison | difference [95%] | p | p Holm | verdict | paired [95%] | "
              "noise rule |", "|" + "---|" * 9]
    lines += [comparison_row(r) for r in rows] + [""]
    lines += ["## What the rules of DESIGN.md say, so far", "", *answers(by_length, rows), ""]
    lines += ["## Time per run (CPU seconds of one thread, mean over the method's training runs)", "",
              "| method | " + " | ".join(f"{e} epoch{'s' if e > 1 else ''}" for e in by_length) + " |",
              "|---|" + "---|" * len(by_length)]
    for name in regime_design.METHODS:
        cells = [by_length[e]["methods"].get(name, {}).get("cpu_seconds") for e in by_length]
        lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(c):.0f}" if c else "—"
                                                 for c in cells) + " |")
    environments = sorted({e for arm in by_length.values() for e in arm["environments"]})
    lines += ["", "## What the records were computed with", ""] + [f"- `{e}`" for e in environments]
    return "\n".join(lines) + "\n"


def figure(by_length: dict, path: Path) -> None:
    """The probe over training at each method's pick: absolute cosine, output effective rank and
    task-expert information (mean over seeds and layers), one column per length."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = (("abs_cos", "|cos| between experts"), ("out_erank", "effective rank of outputs"),
            ("mi_soft", "I(task; expert), nats"))
    fig, axes = plt.subplots(len(rows), len(by_length), figsize=(4.2 * len(by_length), 9),
                             squeeze=False, sharex="col")
    colours = plt.get_cmap("tab10")
    for col, (e, arm) in enumerate(by_length.items()):
        probed = [(n, m["probe"]) for n, m in arm["methods"].items() if m.get("probe")]
        for i, (name, probe) in enumerate(probed):
            for row, (key, _) in enumerate(rows):
                curve = probe["curves"].get(key)
                if curve:
                    axes[row][col].plot(probe["steps"][:len(curve)], curve, marker="o", ms=3,
                                        color=colours(i), label=name)
        axes[0][col].set_title(f"{e} epoch{'s' if e > 1 else ''}", fontsize=10)
        axes[-1][col].set_xlabel("optimizer step")
        axes[0][col].set_ylim(0, 1.02)  # |cos| lies in [0, 1]
        for row, (_, label) in enumerate(rows):
            axes[row][col].grid(alpha=0.3)
            if col == 0:
                axes[row][0].set_ylabel(label)
    handles, labels = next(((h, lb) for ax in axes.flat for h, lb in [ax.get_legend_handles_labels()]
                            if h), ([], []))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("The experts over training, at each method's pick (mean over seeds and layers)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    common.save_figure(fig, path, 110)
    plt.close(fig)


def summarise(placement: str = regime_design.PLACEMENT, world: str = regime_design.WORLD) -> dict:
    """Everything results.json holds, from the records alone."""
    by_length = {e: summarise_arm(e, placement, world) for e in regime_design.lengths(world)}
    rows = comparisons(by_length)
    summary = {"placement": placement, "lengths": by_length, "comparisons": rows, "family": FAMILY,
               "design_rules": answers(by_length, rows)}  # DESIGN.md's rules, as results.md says them
    return summary if world == "six" else {"world": world, **summary}


def write(placement: str = regime_design.PLACEMENT, world: str = regime_design.WORLD) -> dict:
    out = regime_design.out(placement, world)
    summary = summarise(placement, world)
    by_length, rows = summary["lengths"], summary["comparisons"]
    common.write_text(out / "results.json", json.dumps(summary, indent=1) + "\n")
    common.write_text(out / "results.md", markdown(by_length, rows, placement, world))
    figure(by_length, out / "probe.png")
    return summary


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="The regime study's report, from its records so far.")
    p.add_argument("--placement", choices=regime_design.PLACEMENTS, default=regime_design.PLACEMENT)
    p.add_argument("--world", choices=list(regime_design.WORLDS), default=regime_design.WORLD)
    args = p.parse_args()
    write(args.placement, args.world)
    print(f"wrote {regime_design.out(args.placement, args.world) / 'results.md'}")
