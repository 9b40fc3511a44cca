"""Memory and time a real model needs with train.py's paper recipe, computed from its size: estimates,
until a run on a GPU measures them (benchmarks/gpu_check.py is the prepared check).

    python benchmarks/estimate_real_models.py      # prints the table docs/real-models.md quotes

Each model is built on the meta device from its released config.json's shapes (no weights, no
memory), with the recipe's experts added by the project's own code, so the parameter counts are
exact. The rest is arithmetic on them, under the assumptions written below; tests/test_recipes.py
checks that the docs hold this script's table.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import omoe  # noqa: E402
import train  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from plumbing.gate import experts_of  # noqa: E402

# The released config.json's shapes: (dim, layers, heads, kv heads, MLP width, vocabulary, tied, head_dim)
MODELS = {
    "meta-llama/Llama-2-7b-hf": (4096, 32, 32, 32, 11008, 32000, False, None),
    "meta-llama/Llama-3.1-8B": (4096, 32, 32, 8, 14336, 128256, False, None),
    "meta-llama/Llama-3.2-1B": (2048, 16, 32, 8, 8192, 128256, True, 64),
    "mistralai/Mistral-7B-v0.1": (4096, 32, 32, 8, 14336, 32000, False, None),
    "HuggingFaceTB/SmolLM2-1.7B": (2048, 24, 32, 32, 8192, 49152, True, None),
    "HuggingFaceTB/SmolLM2-135M": (576, 30, 9, 3, 1536, 49152, True, None),
}
# The data and the run: commonsense_170k, 2 epochs, micro-batches of 4 (the paper's recipe).
EXAMPLES, EPOCHS, MICRO, CUTOFF = 170_420, 2, 4, 512
# An example with its template is 441 characters on average (the shared commonsense test sets,
# which are written like the training set); at about 3.8 characters per token, 116 tokens. A
# micro-batch is padded to its longest example: about 1.3 times the mean (an assumption).
TOKENS_PER_EXAMPLE, PADDING = 441 / 3.8, 1.3
# A frozen base costs about 6 FLOPs per parameter per token with --grad-checkpoint: 2 forward,
# 2 backward (the gradient of the activations only: the base has no weight gradients), 2 for the
# forward recomputed. The adapters add under 2%: left out.
FLOPS_PER_PARAM_TOKEN = 6
# An H100 SXM's bf16 dense peak, and the share of it this unfused PyTorch code is assumed to reach
# on short sequences in micro-batches of 4.
PEAK, UTILISATION = 989e12, 0.30
GB = 1e9


def counts(name: str) -> tuple[int, int]:
    """(base parameters, adapter parameters) of `name` with the paper recipe's two experts."""
    dim, layers, heads, kv, hidden, vocab, tied, head_dim = MODELS[name]
    _, args = train.parse_args(["--model", name, "--experts", "2"])
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                                      hidden_dim=hidden, vocab_size=vocab, tie_embeddings=tied,
                                      head_dim=head_dim))
        base = sum(p.numel() for p in model.parameters())
        omoe.add_experts(model, **experts_of(args))
    return base, sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_memory(name: str, base: int, adapters: int) -> float:
    """Peak GPU memory in GB, at the cutoff's worst case (every micro-batch 512 tokens long)."""
    dim, layers, heads, kv, hidden, vocab, _, head_dim = MODELS[name]
    head_dim = head_dim or dim // heads
    tokens = MICRO * CUTOFF
    outputs = (heads + 2 * kv) * head_dim + dim + 2 * hidden + dim  # the 7 projections' widths
    weights = 2 * base                         # bf16
    adapter_state = 16 * adapters              # float32 weights, gradients, AdamW's two moments
    kept = layers * tokens * dim * 2           # --grad-checkpoint keeps each block's input (bf16)
    block = tokens * (outputs + 4 * dim + 2 * hidden) * 2 * 2  # one block recomputed, and its gradients
    experts = tokens * 2 * outputs * 4 * 3     # 2 experts' float32 outputs, Gram-Schmidt's and the mix
    logits = tokens * vocab * (2 + 4 + 4)      # bf16 logits, their float copy, its gradient
    total = weights + adapter_state + kept + block + experts + logits
    return total * 1.1 / GB + 1                # allocator slack, and the CUDA context


def hours(base: int) -> float:
    tokens = EXAMPLES * EPOCHS * TOKENS_PER_EXAMPLE * PADDING
    return FLOPS_PER_PARAM_TOKEN * base * tokens / (PEAK * UTILISATION) / 3600


def laptop_minutes() -> float:
    """docs/real-models.md's laptop recipe on SmolLM2-135M, on a CPU: 100 steps of 8 ARC-Easy examples
    (512 characters with the template, the shared test set's mean: ~135 tokens), in float32 without
    gradient checkpointing (4 FLOPs per parameter per token), then 100 test questions of about 4
    answers, each scored by one forward pass (2 FLOPs per parameter per token). A laptop CPU is
    assumed to sustain 100 GFLOP/s on these matrices (the embedded model's tok/s is no guide: its
    matrices are tiny)."""
    base, _ = counts("HuggingFaceTB/SmolLM2-135M")
    tokens = 512 / 3.8
    flops = 4 * base * 100 * 8 * tokens * PADDING + 2 * base * 100 * 4 * tokens
    return flops / 100e9 / 60


def duration(h: float) -> str:
    return f"~{h:.1f} h" if h >= 1 else f"~{h * 60:.0f} min"


def table() -> str:
    rows = ["| model | parameters | adapters (2 experts, r=16, 7 projections) | weights in bf16 | "
            "training, peak GPU memory | training time on one H100, 2 epochs of commonsense_170k |",
            "|---|---|---|---|---|---|"]
    for name in MODELS:
        base, adapters = counts(name)
        rows.append(f"| {name} | {base / 1e9:.2f} B | {adapters / 1e6:.1f} M | {2 * base / GB:.1f} GB | "
                    f"~{training_memory(name, base, adapters):.0f} GB | {duration(hours(base))} |")
    rows.append(f"\nThe laptop recipe below, SmolLM2-135M on a CPU: ~{laptop_minutes():.0f} min (a CPU that "
                f"sustains 100 GFLOP/s, assumed).")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
