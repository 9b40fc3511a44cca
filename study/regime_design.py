"""The regime study's design: the paper's regime in miniature, scarce adapters, six tasks, collapse
measured where it could cost. regime_study.py runs it, regime_report.py reads its records.

The design, what each result would mean, and why this placement: study/regime/DESIGN.md, written
before the first run, and GATE.md, which chose the placement again when the first one failed the
design's validity check (C1 failed there too, and on the twelve tasks; BLOCK.md's gate then chose
q_proj,v_proj of block 2, BLOCKS[1], where the mixtures run). In short: every adapter sits on
k_proj and v_proj (first: o_proj alone), in the 4 blocks, at rank 4 per expert (alpha / r = 2, the
embedded recipe's), so that OMoE-2 holds about 1.5% of the model's parameters (the paper's layout on
a 7B LLaMA: 0.7%) and, if capacity binds, a LoRA of the mixture's total rank beats one of an
expert's rank. Every method, at every length of LENGTHS, follows harness.py's protocol on
assets/world-val: a sweep of SWEEP rates (seeds 0 and 1, on validation, extended by one rate where
the pick is at an edge), the pick, seeds 0-4 on the test at the pick (0 and 1 the sweep's runs'
adapters), validation every 1/10 of the run on the new seeds. Every training run is regime_run.py,
which probes the experts 10 times per run (routing, similarity, effective ranks, task-expert
information) into the record. Records go to study/regime/<placement>/<n>-epoch(s)/runs/.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "study"))
import harness  # noqa: E402

# Where the adapters sit: o_proj first; its records failed the validity check (C1), and the gate of
# study/regime/GATE.md chose k_proj,v_proj, the placement the study now runs on. The twelve tasks
# are gated at k_proj,v_proj and at q_proj,v_proj (study/regime/TWELVE.md), the six tasks again on
# q_proj,v_proj of one block (study/regime/BLOCK.md). Each placement's records and report live in
# study/regime/[twelve/]<folder(placement)>/.
BLOCKS = tuple(f"layers.{i}.self_attn.q_proj,layers.{i}.self_attn.v_proj" for i in (0, 2))
PLACEMENTS = ("o_proj", "k_proj,v_proj", "q_proj,v_proj", *BLOCKS)
PLACEMENT = "k_proj,v_proj"
# The tasks: the six embedded ones first; C1 failed on them at both placements, so GATE.md's harder
# world followed, twelve tasks (study/regime/TWELVE.md), its records in study/regime/twelve/.
WORLDS = {"six": ROOT / "assets" / "world-val", "twelve": ROOT / "assets" / "world12-val"}
WORLD = "six"
EXPERT = ["--rank", "4", "--alpha", "8"]  # each expert's rank; alpha / r = 2 at every rank
WRAPPER_FLAGS = ("--tie-experts", "--magnitude")  # regime_run.py's, kept by an evaluation too


def folder(placement: str) -> str:
    """A placement's folder: "k_proj+v_proj"; one block's layers as "block2-q_proj+v_proj"."""
    names = placement.split(",")
    blocks = {n.split(".")[1] for n in names if n.startswith("layers.")}
    if len(blocks) == 1 and all(n.startswith("layers.") for n in names):
        return f"block{blocks.pop()}-" + "+".join(n.rsplit(".", 1)[-1] for n in names)
    return "+".join(names)


def out(placement: str = PLACEMENT, world: str = WORLD) -> Path:
    return ROOT / "study" / "regime" / ("" if world == "six" else world) / folder(placement)


def methods(placement: str = PLACEMENT) -> dict[str, list[str]]:
    place = ["--targets", placement]

    def lora(rank: int) -> list[str]:
        return ["--lora", *place, "--rank", str(rank), "--alpha", str(2 * rank)]

    def mixture(*flags: str) -> list[str]:
        return [*place, *EXPERT, *flags]

    return {
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
        "vanilla top-2 of 4 + balance loss": mixture("--experts", "4", "--top-k", "2", "--orth",
                                                     "none", "--aux-loss-coef", "0.01"),
        "OMoE top-2 of 4": mixture("--experts", "4", "--top-k", "2"),
    }


METHODS = methods()  # the labels are the same at every placement
LENGTHS = (1, 3, 6)  # epochs of 120 steps
# Twelve tasks share an epoch's 120 steps, so each is asked half as often: twice the epochs give each
# task as many questions as the six-task lengths do.
TWELVE_LENGTHS = (2, 6, 12)


SWEEP = ("2e-3", "5e-3", "1e-2")
POINTS = 10  # validation (new final seeds) and probes, per run


def lengths(world: str = WORLD) -> tuple:
    return LENGTHS if world == "six" else TWELVE_LENGTHS


def every(epochs: int) -> int:
    return 120 * epochs // POINTS


class RegimeStudy(harness.Study):
    """harness.Study whose runs are regime_run.py's, and whose records hold the probe and the
    router's statistics over training."""

    def script(self, flags: list[str]) -> Path:
        return ROOT / "study" / "regime_run.py"

    def flags(self, run: harness.Run) -> list[str]:
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


def settings(epochs: int, chosen=None, placement: str = PLACEMENT, world: str = WORLD) -> harness.Settings:
    every_method = methods(placement)
    chosen = {m: every_method[m] for m in (chosen or every_method)}
    return harness.Settings(chosen, lrs=SWEEP, alpha_methods=(), eval_every=every(epochs),
                            train_flags=["--epochs", str(epochs), "--probe-every", str(every(epochs))],
                            extend=True, sweep_curves=False, data=WORLDS[world])


def arm(epochs: int, log=print, chosen=None, placement: str = PLACEMENT, world: str = WORLD) -> RegimeStudy:
    return RegimeStudy(out(placement, world) / f"{epochs}-epoch{'s' if epochs > 1 else ''}",
                       settings(epochs, chosen, placement, world), log)
