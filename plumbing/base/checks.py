"""The checks behind omoe.py's layer and add_experts: every argument's type and range, and the layers
that the targets name. The same checks read adapter_config.json (plumbing/adapters.py), so a file
and a call are held to one rule. A failure is a ValueError naming the argument and its value.
And the check every file the project reads goes through first: it must be a regular file.
"""
import math
import stat
from pathlib import Path

from torch import nn

from plumbing.base.errors import BadInput


def check_regular_file(path, error=BadInput) -> None:
    """Reading a FIFO, a device or a socket where a file should be would wait forever, or for ever
    more bytes: refuse it, naming it."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: not a regular file (a FIFO, device or socket cannot be read as one)")


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_layer_args(experts, top_k, rank, alpha, dropout, orth, modes) -> None:
    """omoe.OMoELinear's settings; modes: the orth values it knows."""
    if not _integer(experts) or experts < 1:
        raise ValueError(f"experts must be an integer >= 1, got {experts!r}")
    if top_k is not None and (not _integer(top_k) or not 1 <= top_k <= experts):
        raise ValueError(f"top_k must be None (soft routing) or an integer in 1..experts={experts}, "
                         f"got {top_k!r}")
    if not _integer(rank) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not _number(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not _number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(orth, str) or orth not in modes:
        raise ValueError(f"orth must be one of {', '.join(map(repr, modes))}, got {orth!r}")


def check_targets(model: nn.Module, targets, lora_targets=()) -> dict[str, tuple[str, str]]:
    """{layer name: (target, "experts" or "lora")} for every nn.Linear a target names (the layer's
    name is the target, or ends with ".<target>"); a target naming none, or a layer named by both
    lists, is a ValueError. Callers run it on a meta-device model to refuse bad targets early."""
    targets, lora_targets = ([t] if isinstance(t, str) else list(t) for t in (targets, lora_targets))
    for t in targets + lora_targets:
        if not isinstance(t, str) or not t:
            raise ValueError(f"targets must be names of linear layers, got {t!r}")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = {}
    for t, role in [(t, "experts") for t in targets] + [(t, "lora") for t in lora_targets]:
        hits = [name for name in linears if name == t or name.endswith("." + t)]
        if not hits:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"target {t!r} matches no nn.Linear in the model; its linear layers are "
                             f"named {', '.join(leaves) or '(none)'}")
        both = [name for name in hits if chosen.get(name, (None, role))[1] != role]
        if both:
            raise ValueError(f"lora target {t!r} names layers that targets also name ({both[0]}, ...): "
                             "a layer gets experts or plain LoRA, not both")
        chosen.update(dict.fromkeys(hits, (t, role)))
    return chosen
