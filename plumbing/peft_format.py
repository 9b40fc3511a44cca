"""PEFT's LoRA adapter files, both ways: a plain-LoRA adapter of ours written exactly as PEFT writes it,
and a PEFT LoRA adapter read as add_experts arguments and adapter weights (plumbing/adapters.py calls
these).

    adapter_config.json        {"peft_type": "LORA", "r": R, "lora_alpha": alpha, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (R, D_in)
                               base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  (D_out, R)

PEFT's names are its wrapper's prefix "base_model.model." and then transformers' module names, whose
"model." ours drop (lm_head has none). Ours stack the experts: lora_A (E, R, D_in), lora_B (E, D_out, R),
so one PEFT matrix is expert 0 of E = 1.
"""

from pathlib import Path

from torch import Tensor

from plumbing.base.checks import check_layer_args
from plumbing.base.errors import BadInput
from plumbing.base.weights import load_safetensors

PREFIX = "base_model.model."
PEFT_NAMES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
# The settings PEFT writes whose other values change the layer (DoRA, rsLoRA's alpha / sqrt(r), biases,
# per-layer ranks, ...): a PEFT adapter is read only with these values, and ours are written with them.
PLAIN_LORA = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}}
# Newer PEFT releases write these too (an older PEFT would not know them, so we do not write them).
PLAIN_LORA_READ = {**PLAIN_LORA, "lora_bias": False, "exclude_modules": None, "layer_replication": None,
                   "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None}


def _peft_name(path: str) -> str:
    return PREFIX + (path if path.startswith("lm_head") else "model." + path)


def to_peft(targets: list[str], rank: int, alpha: float, dropout: float, state: dict[str, Tensor],
            base_model: str | None) -> tuple[dict, dict[str, Tensor]]:
    """Our one-expert adapter -> PEFT's adapter_config.json dict and adapter_model.safetensors tensors."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "revision": None, "inference_mode": True, "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
              "target_modules": targets, "init_lora_weights": True, **PLAIN_LORA}
    tensors = {}
    for name, t in state.items():
        module, _, kind = name.rpartition(".")  # "layers.0.self_attn.q_proj", "lora_A"
        tensors[f"{_peft_name(module)}.{kind}.weight"] = t[0]  # (1, R, D_in) -> (R, D_in); (1, D_out, R) -> (D_out, R)
    return config, tensors


def from_peft_config(path: Path, c: dict, projections) -> dict:
    """PEFT's adapter_config.json (at path) -> add_experts arguments; anything but plain LoRA is
    refused. target_modules are layer names, as ours are: the projections come first in the model's
    order (PEFT stores a set), then any other names (lm_head, ...) sorted."""
    if c["peft_type"] != "LORA":
        raise BadInput(f"{path}: peft_type {c['peft_type']!r} is not supported (only 'LORA')")
    for key, default in PLAIN_LORA_READ.items():
        value = c.get(key)
        if value is not None and value != default and not (default in ({}, None) and not value):
            raise BadInput(f"{path}: {key}={value!r} is not supported (plain LoRA only: {key}={default!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in c:
            raise BadInput(f"{path}: no {key!r}")
    targets = c["target_modules"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise BadInput(f"{path}: target_modules={targets!r} must be a list of layer names, such as the "
                       f"projections {', '.join(projections)}")
    targets = [t for t in projections if t in targets] + sorted(set(targets) - set(projections))
    config = dict(targets=targets, experts=1, top_k=None, rank=c["r"], alpha=c["lora_alpha"],
                  dropout=c.get("lora_dropout") or 0.0, orth="none")
    try:
        check_layer_args(1, None, config["rank"], config["alpha"], config["dropout"], "none", ("none",))
    except ValueError as e:  # named as PEFT names them
        ours, rest = str(e).split(" ", 1)
        raise BadInput(f"{path}: {PEFT_NAMES.get(ours, ours)} {rest}") from None
    return config


def from_peft_state(weights: Path) -> dict[str, Tensor]:
    """PEFT's adapter_model.safetensors -> our adapter state ("<path>.lora_A" (1, R, D_in), ...)."""
    state = {}
    for name, tensor in load_safetensors(weights).items():
        module, dot, kind = name.removesuffix(".weight").rpartition(".")
        if not (name.endswith(".weight") and kind in ("lora_A", "lora_B") and module.startswith(PREFIX)):
            raise BadInput(f"{weights}: tensor {name!r} is not a lora_A or lora_B matrix of PEFT's LoRA")
        ours = module.removeprefix(PREFIX).removeprefix("model.")
        state[f"{ours}.{kind}"] = tensor[None]  # (R, D_in) -> (1, R, D_in); (D_out, R) -> (1, D_out, R)
    return state
