"""The recipes the documentation gives. The paper-scale ones (study/README.md): each one's trainable share of
LLaMA-2-7B, computed from train.py's own flags on a model built on the meta device (no weights, no memory),
beside the published share, and the table holding exactly these numbers. The laptop recipe
(docs/real-models.md): run as written on a tiny model, it trains at the learning rate it names."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import omoe
from plumbing.gate import experts_of
import train
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "study" / "README.md"  # where the paper-scale comparison is described

# name -> (train.py flags, trainable % as published by CoMoE for LLaMA-2-7B)
RECIPES = {
    "LoRA r=80": ("--lora --rank 80 --alpha 160", 2.9),
    "MixLoRA-style: 8 experts top-2 on the MLP, LoRA on attention":
        ("--experts 8 --top-k 2 --orth none --aux-loss-coef 0.01 --targets gate_proj,up_proj,down_proj "
         "--lora-targets q_proj,k_proj,v_proj,o_proj", 2.9),
    "OMoE-LoRA: 2 experts on the MLP": ("--experts 2 --targets gate_proj,up_proj,down_proj", 0.73),
}


def trainable_percent(flags: str) -> float:
    """PEFT's trainable%: 100 x trainable / all parameters (adapters included), LLaMA-2-7B's shapes."""
    _, args = train.parse_args(["--model", "unused", *flags.split()])
    with torch.device("meta"):
        model = Transformer(ModelArgs())  # the defaults are LLaMA-2-7B's (4096 wide, 32 layers, 11008 MLP)
        omoe.add_experts(model, **experts_of(args))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 100 * trainable / sum(p.numel() for p in model.parameters())


def test_llama2_7b_shapes():
    with torch.device("meta"):
        model = Transformer(ModelArgs())
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616  # LLaMA-2-7B's parameter count


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_share_is_near_the_published_one_and_in_the_readme(name):
    flags, published = RECIPES[name]
    computed = trainable_percent(flags)
    assert abs(computed - published) < 0.15 * published, (computed, published)
    row = f"| {name} | `{flags}` | {computed:.2f}% | {published}% |"
    assert row in README.read_text(), f"README lacks the row {row}"


def test_default_paper_recipes_for_comparison():
    """The shares of `--lora` (r=16) and `--experts 2` on all seven projections that the README quotes."""
    assert f"{trainable_percent('--lora'):.2f}" == "0.59"
    assert f"{trainable_percent('--experts 2'):.2f}" == "1.21"


def test_the_laptop_recipe_trains_at_the_rate_it_names(tiny_model_dir, task_dir, tmp_path):
    """docs/real-models.md's CPU recipe for a downloaded model, run as written on the tiny model and tasks:
    its warm-up ends within the run, and the log's rates reach the --lr it gives (a recipe whose warm-up
    outlasted the run would train below it, silently)."""
    text = (ROOT / "docs" / "real-models.md").read_text()
    command = re.search(r"```bash\n(python train.py --model HuggingFaceTB/SmolLM2-135M.*?)```", text, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))[2:]
    paths = {"HuggingFaceTB/SmolLM2-135M": tiny_model_dir,
             "/path/to/LLM-Adapters/dataset/ARC-Easy/train.json": task_dir / "alpha" / "train.json",
             "/path/to/LLM-Adapters/dataset/ARC-Easy": task_dir / "alpha"}
    argv = [str(paths.get(a, a)) for a in argv] + ["--out", str(tmp_path / "out"), "--skip-base-eval"]
    assert train.main(argv) == 0
    lr = float(argv[argv.index("--lr") + 1])
    rates = [e["lr"] for e in map(json.loads, (tmp_path / "out" / "log.jsonl").read_text().splitlines()) if "lr" in e]
    assert max(rates) == pytest.approx(lr) and rates[0] == pytest.approx(lr)  # warm-up over by the first log
    assert rates == sorted(rates, reverse=True)  # then it decays


def test_the_docs_hold_the_estimates_of_the_script():
    """docs/real-models.md's memory and time table is benchmarks/estimate_real_models.py's output, and its
    parameter counts are the released models' (Llama-2-7B's exactly, as above)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("estimate", ROOT / "benchmarks" / "estimate_real_models.py")
    estimate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(estimate)
    assert estimate.table() in (ROOT / "docs" / "real-models.md").read_text()
    assert estimate.counts("meta-llama/Llama-2-7b-hf")[0] == 6_738_415_616
    assert round(estimate.counts("meta-llama/Llama-3.1-8B")[0] / 1e6) == 8030  # 8.03 B, as released
