"""The checks behind omoe.py's layer and add_experts: every argument's type and range, and the
refusals of targets that name no layer, or a layer for both roles. The same checks read
adapter_config.json (plumbing/adapters.py), so a file and a call are held to one rule. A failure
is a ValueError naming the argument and its value. And the check every file the project reads
goes through first: it must be a regular file.
"""
import math
import stat
from pathlib import Path


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


def target_names(targets) -> list[str]:
    """A target or a list of them, as a list; each must be a non-empty name."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    for t in targets:
        if not isinstance(t, str) or not t:
            raise ValueError(f"targets must be names of linear layers, got {t!r}")
    return targets


def check_target_hits(target, role, hits, linears, chosen) -> None:
    """omoe.layers_to_adapt's refusals: a target naming no nn.Linear (linears: all their names), or
    naming layers already chosen for the other role (chosen: {name: (target, role)})."""
    if not hits:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(f"target {target!r} matches no nn.Linear in the model; its linear layers are "
                         f"named {', '.join(leaves) or '(none)'}")
    both = [name for name in hits if chosen.get(name, (None, role))[1] != role]
    if both:
        raise ValueError(f"lora target {target!r} names layers that targets also name ({both[0]}, ...): "
                         "a layer gets experts or plain LoRA, not both")
