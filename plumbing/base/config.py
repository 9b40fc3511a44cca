"""config.json of a Hugging Face LLaMA directory: read, checked value by value, and sized.

model.py maps the checked dict to ModelArgs (ModelArgs.from_hf_config); everything here makes sure
that mapping never meets a value it cannot use: a string where a size belongs, a feature the model
does not implement (biases, another activation, an unknown RoPE scaling), or a model too large for
the machine. Every refusal is one line naming the file and the key.
"""

import json
import math
import os
from pathlib import Path

import torch

from plumbing.base.checks import check_regular_file
from plumbing.base.errors import BadInput

# The parameters each RoPE scaling reads (model.rope_inv_freq says what they do).
ROPE_SCALING = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
# The type of every key ModelArgs reads (absent is always allowed: the default applies).
POSITIVE_INTS = (*REQUIRED, "max_position_embeddings")
OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "sliding_window")  # or null
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
STRINGS = ("model_type", "hidden_act")
OPTIONAL_DICTS = ("rope_scaling", "rope_parameters")  # or null; their contents: rope_scaling()


def read_config(directory) -> dict:
    """The checked config.json of a model directory; any fault is one line naming the file."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise BadInput(f"{directory}: no such directory (expected a Hugging Face model directory "
                       f"with config.json and model weights)")
    if not path.exists():
        raise BadInput(f"{directory}: no config.json in this directory")
    check_regular_file(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        check(d)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise BadInput(f"{path}: {e}") from None
    except RecursionError:
        raise BadInput(f"{path}: JSON nested too deeply") from None
    return d


def _positive_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and v > 0
    except OverflowError:  # an integer of hundreds of digits
        return False


def _size(v) -> bool:
    return type(v) is int and 0 < v < 2**40


def check(d) -> None:
    """Refuse a config whose values have the wrong type or range, or that asks for what the model
    does not implement (ValueError naming the key)."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of settings, found a JSON {type(d).__name__}")
    rules = ([(k, _size, "a positive integer") for k in POSITIVE_INTS]
             + [(k, lambda v: v is None or _size(v), "a positive integer or null")
                for k in OPTIONAL_POSITIVE_INTS]
             + [(k, _positive_number, "a positive finite number") for k in POSITIVE_NUMBERS]
             + [(k, lambda v: isinstance(v, bool), "true or false") for k in BOOLS]
             + [(k, lambda v: isinstance(v, str), "a string") for k in STRINGS]
             + [(k, lambda v: v is None or isinstance(v, dict), "an object or null")
                for k in OPTIONAL_DICTS])
    for key, valid, expected in rules:
        if key in d and not valid(d[key]):
            raise ValueError(f"{key}={json.dumps(d[key])[:80]} must be {expected}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(f"config is missing {', '.join(missing)}")
    check_architecture(d)
    rope_theta(d), rope_scaling(d)  # noqa: B018  (both raise on a bad value)


def check_architecture(d: dict) -> None:
    """What model.py implements: LLaMA or Mistral blocks, SwiGLU, no biases, whole heads."""
    kind = d.get("model_type", "llama")
    if kind not in ("llama", "mistral"):
        raise ValueError(f"model_type={kind!r} is not supported (only 'llama' and 'mistral')")
    if d.get("sliding_window") is not None and kind != "mistral":
        raise ValueError(f"sliding_window={d['sliding_window']!r} with model_type={kind!r}: "
                         f"transformers' LLaMA ignores it, only 'mistral' has a sliding window")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ValueError(f"{key}={d[key]!r} is not supported (the projections have no bias)")
    heads, kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    if head_dim % 2 or head_dim == 0:
        raise ValueError(f"head_dim={head_dim} must be even and positive for rotary embeddings")


def rope_theta(d: dict) -> float:
    """The base of the rotary frequencies, from either layout: transformers >= 5 writes
    rope_parameters = {"rope_theta": ..., "rope_type": ...}, older configs a top-level rope_theta."""
    value = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 10000.0))
    if not _positive_number(value):
        raise ValueError(f"rope_theta={json.dumps(value)[:80]} must be a positive finite number")
    return float(value)


def rope_scaling(d: dict) -> dict | None:
    """The RoPE scaling of a config in either layout -> {"rope_type": ..., its parameters} or None."""
    for key in ("rope_parameters", "rope_scaling"):
        value = d.get(key) or {}
        kind = value.get("rope_type", value.get("type", "default"))
        if kind == "default":
            continue
        if not isinstance(kind, str) or kind not in ROPE_SCALING:
            raise ValueError(f"{key} of type {repr(kind)[:40]} is not supported "
                             f"(only default, {', '.join(ROPE_SCALING)})")
        missing = [k for k in ROPE_SCALING[kind] if k not in value]
        if missing:
            raise ValueError(f"{key} of type {kind!r} has no {', '.join(missing)}")
        bad = [k for k in ROPE_SCALING[kind] if not _positive_number(value[k])]
        if bad:
            raise ValueError(f"{key}: {bad[0]}={json.dumps(value[bad[0]])[:40]} must be a positive "
                             f"finite number")
        return {"rope_type": kind, **{k: value[k] for k in ROPE_SCALING[kind]}}
    return None


def parameter_count(args) -> int:
    """The parameters model.Transformer(args) has, from ModelArgs alone (a tied lm_head counts once)."""
    D, H, K, hd = args.dim, args.n_heads, args.n_kv_heads, args.head_dim
    F, V = args.hidden_dim, args.vocab_size
    per_block = D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F + 2 * D  # attention, MLP, norms
    return V * D * (1 if args.tie_embeddings else 2) + D + args.n_layers * per_block


def check_memory(args, dtype, device, where, shards: int = 1, extra: int = 0) -> None:
    """Refuse a model that cannot fit in the memory of `device`, before allocating anything: a config
    with absurd sizes would otherwise build modules for minutes and then fail. shards: processes it
    is split over (FSDP), each holding 1/shards of it; extra: bytes needed beside the weights."""
    device = torch.device(device or "cpu")
    needed = parameter_count(args) * (dtype or torch.float32).itemsize / shards + extra
    if device.type == "cuda" and torch.cuda.is_available():
        available = torch.cuda.mem_get_info(device)[1]
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if needed > available:
        each = f" (1/{shards} of it in each of {shards} processes)" if shards > 1 else ""
        beside = f", plus {extra / 2**30:,.1f} GiB for the adapters and their optimizer state" \
            if extra else ""
        raise BadInput(f"{where}: the model it describes has {parameter_count(args):,} parameters, "
                       f"{parameter_count(args) * (dtype or torch.float32).itemsize / 2**30:,.1f} GiB "
                       f"in {dtype or torch.float32}{each}{beside}, more than the "
                       f"{available / 2**30:,.1f} GiB of memory of {device}")
