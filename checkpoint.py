"""A run's files in --out, kept so that no run loses another's work and no damaged file is trusted.

    checkpoint.pt   everything a resume needs, written atomically (a temporary file, fsync, rename),
                    with a SHA-256 of every entry, verified before a resume uses it
    log.jsonl       one JSON line per logged step; a resume first cuts it back to the checkpoint's step
    results.json    written atomically at the end
    adapter/        adapter_config.json + the adapter weights (per-tensor checksums, see weights.py)

An --out that holds any of these is a run: a new run into it needs --resume or --overwrite, and
--overwrite deletes nothing until every input was checked.
"""

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from weights import load_refusal, tensor_sha256

RUN_FILES = ("checkpoint.pt", "log.jsonl", "results.json", "adapter")


class RunError(ValueError):
    """An --out or checkpoint that cannot be used as asked: one line naming it, exit code 2."""


class SaveError(Exception):
    """A file of the run could not be written (a full disk): one line, exit code 1, the previous file kept."""


def rng_state() -> dict:
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "torch": torch.get_rng_state(), **cuda}


def set_rng_state(states: list | dict, rank: int = 0) -> None:
    """Restore process `rank`'s state from a checkpoint's list of one per process (dropout draws differ
    between processes); a checkpoint of fewer processes gives the first one's, an older one its only one."""
    state = states if isinstance(states, dict) else states[rank] if rank < len(states) else states[0]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, adapters: dict, optimizer: dict, scheduler, step: int, steps_per_epoch: int, args,
                    before, fingerprint: str, val_before=None, rng: list | None = None) -> None:
    """Everything a resumed run needs, in one file written atomically (write_atomically),
    so an interrupt leaves either the old checkpoint or the new one, never half of one. Checksums of
    every entry let a resume tell a damaged file from a good one. adapters: omoe.adapter_state_dict;
    optimizer: the optimizer's state_dict (both whole, also for a sharded model: parallel.py); rng:
    every process's rng_state(), rank by rank (default: this process's alone)."""
    state = {"adapters": {k: v.cpu() for k, v in adapters.items()},
             "optimizer": optimizer, "scheduler": scheduler.state_dict(),
             "rng": rng if rng is not None else [rng_state()], "step": step, "args": vars(args),
             "before": before, "val_before": val_before,
             "data_fingerprint": fingerprint,
             # Informative: the next batch is fixed by the step alone (see data.batch_indices).
             "data_position": dict(zip(("epoch", "batch_in_epoch"), divmod(step, steps_per_epoch)))}
    state["checksums"] = checksums(state)
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except SaveError as e:
        raise SaveError(f"step {step}: {e}") from None


def write_atomically(path: Path, write) -> None:
    """write(f) into a temporary file beside `path`, synced to disk, then renamed over `path`: a kill
    at any moment leaves the old file or the new one, and a failure (a full disk) keeps the old one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, or a power cut could leave an empty file
        os.replace(tmp, path)
    except OSError as e:
        kept = "the previous one is kept" if path.exists() else "there was none before"
        raise SaveError(f"could not write {path} ({e.strerror or e}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)


def checksums(state: dict, prefix: str = "") -> dict[str, str]:
    """SHA-256 of every tensor of a (nested) checkpoint, and of the repr of everything else: "path" -> hex."""
    sums = {}
    for key, value in (state.items() if isinstance(state, dict) else enumerate(state)):
        if key == "checksums" and not prefix:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            sums[name] = tensor_sha256(value)
        elif isinstance(value, dict) or (isinstance(value, (list, tuple))
                                         and any(isinstance(v, (dict, torch.Tensor)) for v in value)):
            sums |= checksums(value, name + "/")
        else:
            sums[name] = hashlib.sha256(repr(value).encode()).hexdigest()
    return sums


CHECKPOINT_KEYS = ("adapters", "optimizer", "scheduler", "rng", "step", "args", "before", "data_fingerprint",
                   "checksums")


def load_checkpoint(path: Path) -> dict:
    """checkpoint.pt, unpickled without running code and checked against its checksums: a truncated,
    corrupted, foreign or unsafe file is one line naming it."""
    if not path.is_file():
        raise RunError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many types; all mean "not a checkpoint we can trust"
        raise RunError(f"--resume: {path} cannot be read (truncated, corrupted or not a checkpoint): "
                       f"{load_refusal(e)}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"--resume: {path} is not a checkpoint of this train.py (no {', '.join(missing)})")
    if not (isinstance(ckpt["checksums"], dict) and isinstance(ckpt["args"], dict) and type(ckpt["step"]) is int):
        raise RunError(f"--resume: {path} is not a checkpoint of this train.py (its checksums, args or step "
                       f"have the wrong type)")
    try:
        found = checksums(ckpt)
    except RecursionError:
        raise RunError(f"--resume: {path} is not a checkpoint of this train.py (nested too deeply)") from None
    expected = ckpt["checksums"]
    damaged = [k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k)]
    if damaged:
        raise RunError(f"--resume: {path} is corrupted: {sorted(damaged)[0]} does not match its checksum")
    return ckpt


def data_fingerprint(examples: list) -> str:
    """SHA-256 of the training examples as read (after --train-limit): a resume must see the same data."""
    rows = [[ex.task, ex.instruction, ex.input, ex.output, ex.answer] for ex in examples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def check_out_dir(args, out: Path) -> list[Path]:
    """Refuse an --out holding a run (any of RUN_FILES) unless --resume or --overwrite says what to do
    with it. Returns what --overwrite will replace: nothing is deleted here, only after every input was
    checked (clear_run)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: exists and is not a folder")
    held = [out / name for name in RUN_FILES if (out / name).exists()]
    if args.resume:
        if not (out / "checkpoint.pt").is_file():
            raise RunError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
        return []
    if held and not args.overwrite:
        raise RunError(f"--out {out} holds a run ({', '.join(p.name for p in held)}): continue it with "
                       f"--resume, replace it with --overwrite, or choose another --out")
    # --eval-only replaces results.json alone (when it is written); the run's other files stay.
    return [] if args.eval_only else held


def clear_run(out: Path, replaced: list[Path]) -> None:
    """Delete what --overwrite replaces, and temporaries a killed save left behind."""
    stale = [out / f"{name}.tmp" for name in RUN_FILES] + list((out / "adapter").glob(".*.tmp"))  # see weights.py
    for path in replaced + stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def truncate_log(path: Path, step: int) -> None:
    """Cut log.jsonl back to the entries of steps up to `step`, the checkpoint's. A run that stopped
    after it (a second Ctrl-C, kill -9) logged steps which the resumed run will log again; a line
    cut short by a kill ends the log too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(entry, dict) or entry.get("step", 0) > step:
            break
        keep.append(line + "\n")
    write_atomically(path, lambda f: f.write("".join(keep).encode()))


def append_log(out: Path, entry: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def write_json(path: Path, obj) -> None:
    write_atomically(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))

