"""Adapter files: what a run saves in <out>/adapter and what --adapter, generate.py and the notebooks
read back, in our format or in PEFT's.

    adapter_config.json       {"format_version": 1, "base_model_name_or_path": ..., and the
                               add_experts arguments: targets, experts, top_k, rank, alpha, dropout,
                               orth, [lora_targets]}
    omoe_model.safetensors    the experts and routers, keyed like omoe.adapter_state_dict

A plain LoRA (one expert, no normalisation, one rank, alpha and dropout everywhere) is saved as PEFT
saves it instead (plumbing/peft_format.py), so PEFT and transformers load it as it is. Ours is named
so that PEFT refuses it (its file is not adapter_model.safetensors) instead of running the base model.
Every value of a config is checked as add_experts checks its arguments, naming the file and the key.
"""
import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

import omoe
from plumbing import peft_format
from plumbing.base import files
from plumbing.base.checks import check_regular_file
from plumbing.base.errors import BadInput
from plumbing.base.weights import load_safetensors, save_safetensors

ADAPTER_WEIGHTS, ADAPTER_CONFIG, FORMAT_VERSION = "adapter_model.safetensors", "adapter_config.json", 1
OMOE_WEIGHTS = "omoe_model.safetensors"
# The settings of a layer are omoe.layer_settings' arguments, declared there once; with the targets
# they are an adapter's layout: the keys of its config, the add_experts arguments, what a resumed run
# must keep.
LAYER_KEYS = tuple(inspect.signature(omoe.layer_settings).parameters)
LAYOUT_KEYS = ("targets", *LAYER_KEYS, "lora_targets")
KNOWN_KEYS = ("format_version", "base_model_name_or_path", "revision", "identity", *LAYOUT_KEYS)


def adapter_config(model: nn.Module) -> dict:
    """The add_experts arguments that rebuild this model's adapters: add_experts(model, **config).
    "lora_targets" appears only when some layers have plain LoRA beside the experts."""
    def settings(m):  # the layer keeps each setting as an attribute; top_k = experts is soft
        values = {k: getattr(m, k) for k in LAYER_KEYS}
        return {**values, "top_k": None if m.top_k == m.experts else m.top_k}

    layers = list(omoe.adapted_layers(model).values())
    if not layers:
        raise ValueError("model has no experts: call add_experts first")
    experts, lora = ([m for m in layers if m.role == role] for role in ("experts", "lora"))
    configs = [settings(m) for m in experts] or [settings(lora[0])]
    plain = {**configs[0], "experts": 1, "top_k": None, "orth": "none"}
    if any(c != configs[0] for c in configs) or any(settings(m) != plain for m in lora):
        raise ValueError("adapted layers have different settings; one adapter config cannot "
                         "describe them")
    config = {"targets": list(dict.fromkeys(m.target for m in experts)), **configs[0]}
    if lora:
        config["lora_targets"] = list(dict.fromkeys(m.target for m in lora))
    return config


def load_adapters(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter weights into the model's adapters; every key and shape must match."""
    check_adapter_state(model, state)
    with torch.no_grad():
        for k, p in omoe.adapter_state_dict(model).items():
            p.copy_(state[k])  # copy_ converts dtype and device


def check_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Refuse adapter weights that do not fit the model's adapters, naming every key that does not."""
    own = omoe.adapter_state_dict(model)
    if not own:
        raise ValueError("model has no experts: call add_experts (with the saved adapter config) first")
    check_state_fits({k: tuple(p.shape) for k, p in own.items()}, state)


def expected_shapes(model: nn.Module, targets=omoe.TARGETS, lora_targets=(), **settings) -> dict:
    """The shapes of the parameters add_experts(model, ...) would add, by name, without adding
    them: what the doors check memory and adapter files against before any weight is loaded, so
    that a run builds its adapters once. OMoELinear's parameters: lora_A (E, R, D_in), lora_B
    (E, D_out, R) and, with several experts, router.weight (E, D_in); tests/test_omoe.py holds the
    two to each other. Bad settings or targets: the layer's own ValueError."""
    settings = omoe.layer_settings(**settings)
    shapes = {}
    for name, (_, role) in omoe.layers_to_adapt(model, targets, lora_targets).items():
        linear = model.get_submodule(name)
        E, R = 1 if role == "lora" else settings["experts"], settings["rank"]
        shapes[f"{name}.lora_A"] = (E, R, linear.in_features)
        shapes[f"{name}.lora_B"] = (E, linear.out_features, R)
        if E > 1:
            shapes[f"{name}.router.weight"] = (E, linear.in_features)
    return shapes


def check_state_fits(shapes: dict[str, tuple], state: dict[str, Tensor]) -> None:
    """Adapter weights against the shapes of the adapters they are for (keys and shapes; finite
    floating-point values), naming every key that does not fit."""
    missing, unexpected = sorted(shapes.keys() - state.keys()), sorted(state.keys() - shapes.keys())
    wrong = [f"{k}: given {tuple(state[k].shape)}, model has {shapes[k]}"
             for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape mismatch", wrong)) if keys]
    if problems:
        raise ValueError("adapter weights do not fit this model; " + "; ".join(problems))
    for k in shapes:  # copy_ would silently turn integers into floats and carry NaN into every output
        if not state[k].is_floating_point():
            raise ValueError(f"adapter weight {k} has dtype {state[k].dtype}, not a floating-point dtype")
        if not torch.isfinite(state[k]).all():
            raise ValueError(f"adapter weight {k} is not finite (it holds NaN or infinity)")


def save_adapters(model: nn.Module, directory, base_model: str | dict | None = None,
                  state: dict | None = None) -> None:
    """Write the adapters into `directory`, PEFT's files for a plain LoRA, else ours (see above).
    base_model is recorded as base_model_name_or_path (a dict: with its "revision", as
    plumbing/gate.py's base_record makes it, and the run's "identity", written into our config);
    state: the weights if not the model's own
    (those of a sharded model, gathered: plumbing/parallel.py). The folder is written beside its
    place and moved there once complete: a failure (a full disk) keeps what was there."""
    directory = Path(directory)
    record = base_model if isinstance(base_model, dict) else \
        {"base_model_name_or_path": base_model, "revision": None}
    base_model = record["base_model_name_or_path"]
    state = {k: v.contiguous().cpu()
             for k, v in (omoe.adapter_state_dict(model) if state is None else state).items()}
    layers = list(omoe.adapted_layers(model).values())
    settings = {(m.rank, m.alpha, m.dropout) for m in layers}
    if all(m.experts == 1 and m.orth == "none" for m in layers) and len(settings) == 1:
        targets = list(dict.fromkeys(m.target for m in layers))
        config, state = peft_format.to_peft(targets, *settings.pop(), state, base_model)
        config["revision"] = record["revision"]
        weights = ADAPTER_WEIGHTS
    else:
        config = {"format_version": FORMAT_VERSION, "base_model_name_or_path": base_model,
                  **({"revision": record["revision"]} if record["revision"] else {}),
                  **adapter_config(model),
                  **({"identity": record["identity"]} if record.get("identity") else {})}
        weights = OMOE_WEIGHTS
    files.make_folder(directory.parent)
    tmp = files.temporary_folder(directory)  # the user's umask, not tempfile's 0700
    try:
        save_safetensors(state, tmp / weights, metadata={"format": "pt"})
        files.write_file(tmp / ADAPTER_CONFIG, lambda f: f.write((json.dumps(config, indent=2)
                                                                   + "\n").encode()))
        replace_folder(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, old: Path) -> None:
    """Move the folder `new` to `old`'s place; an `old` folder is set aside first and removed last."""
    if old.is_symlink() or (old.exists() and not old.is_dir()):
        raise BadInput(f"{old} exists and is not a folder: not replacing it")
    aside = old.with_name(f".{old.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if old.exists():
        os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside, ignore_errors=True)


def load_adapter_files(directory) -> tuple[dict, dict[str, Tensor]]:
    """An adapter directory, ours or a PEFT LoRA's -> (config for add_experts(model, **config),
    state for load_adapters). Errors are BadInput naming the file and the key."""
    config = read_adapter_config(directory)
    config.pop("base_model")
    config.pop("revision")
    directory = Path(directory)
    if config.pop("peft"):
        return config, peft_format.from_peft_state(directory / ADAPTER_WEIGHTS)
    weights = directory / OMOE_WEIGHTS
    if not weights.is_file() and (directory / ADAPTER_WEIGHTS).is_file():
        weights = directory / ADAPTER_WEIGHTS  # written before the experts' file was renamed
    return config, load_safetensors(weights)


def read_adapter_config(directory) -> dict:
    """adapter_config.json, checked key by key -> the add_experts arguments, "base_model" (the path
    or hub id the adapters were trained on, or None) and "peft" (whether the files are PEFT's)."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise BadInput(f"{path} not found: {directory} is not an adapter directory "
                       f"(save_adapters or PEFT)")
    config = _json(path)
    if "peft_type" in config:
        base = config.get("base_model_name_or_path")
        return {**peft_format.from_peft_config(path, config, omoe.TARGETS),
                "base_model": base if isinstance(base, str) and base else None,
                "revision": _revision(path, config), "peft": True}
    unknown = [key for key in config if key not in KNOWN_KEYS]
    if unknown:
        raise BadInput(f"{path}: unknown key {unknown[0]!r} (an adapter config has "
                       f"{', '.join(KNOWN_KEYS)})")
    if config.get("format_version") != FORMAT_VERSION or type(config["format_version"]) is not int:
        raise BadInput(f"{path}: format_version {config.get('format_version')!r} is not "
                       f"{FORMAT_VERSION}")
    base = config.get("base_model_name_or_path")
    if base is not None and (not isinstance(base, str) or not base):
        raise BadInput(f"{path}: base_model_name_or_path must be a path or null, got {base!r}")
    layout = {k: config[k] for k in LAYOUT_KEYS if k in config}
    check_layout(path, layout)
    return {**layout, "base_model": base, "revision": _revision(path, config), "peft": False}


def _revision(path: Path, config: dict) -> str | None:
    revision = config.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise BadInput(f"{path}: revision must be a branch, tag or commit name or null, got "
                       f"{revision!r}")
    return revision


def check_layout(path: Path, layout: dict) -> None:
    """The add_experts arguments of a config file, held to add_experts' own checks."""
    for key in ("targets", "lora_targets"):
        names = layout.get(key, [] if key == "lora_targets" else None)
        if not isinstance(names, list) or not all(isinstance(t, str) and t for t in names) \
                or (key == "targets" and not names):
            raise BadInput(f"{path}: {key} must be a list of layer names, got {names!r}")
    missing = [k for k in ("experts", "rank", "alpha") if k not in layout]
    if missing:
        raise BadInput(f"{path}: no {missing[0]!r}")
    try:
        omoe.layer_settings(**{"dropout": 0.0, **{k: layout[k] for k in LAYER_KEYS if k in layout}})
    except ValueError as e:
        raise BadInput(f"{path}: {e}") from None


def _json(path: Path) -> dict:
    check_regular_file(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise BadInput(f"{path} is nested too deeply") from None
    if not isinstance(config, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return config
