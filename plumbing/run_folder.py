"""A run's folder (--out), kept so that no run loses another's work and no damaged file is trusted.

    .omoe-lock      held while a run runs (its pid and host): a second run into the folder is refused
    .omoe-files     the names of the files the project wrote here: --overwrite deletes those, no others
    checkpoint.pt   everything a resume needs, written atomically (a temporary file, fsync, rename),
                    with a SHA-256 of every entry, verified before a resume uses it
    log.jsonl       one JSON line per logged step; a resume first cuts it back to the checkpoint's step
    results.json    written atomically at the end (eval-<data>.json: an --eval-only evaluation)
    adapter/        adapter_config.json + the adapter weights (per-tensor checksums, see base/weights.py)

An --out that holds a run needs --resume or --overwrite, and --overwrite deletes nothing until every
input was checked. A run's folder is kept apart from its inputs: it never is, holds or lies inside the
model or the data. A failed write (a full disk) keeps the previous file and says which one failed.
"""

import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import torch

from plumbing import adapters
from plumbing.base import files
from plumbing.base.errors import BadInput, RunFailed
from plumbing.base.weights import load_refusal, tensor_sha256

RUN_FILES = ("checkpoint.pt", "log.jsonl", "results.json", "adapter")
LOCK, MANIFEST = ".omoe-lock", ".omoe-files"
CHECKPOINT_FORMAT = 2  # 2: a single expert's orth is what the layer does (1: "orthonormal" was plain)


class RunError(BadInput):
    """An --out or checkpoint that cannot be used as asked: one line naming it, exit code 2."""


class SaveError(RunFailed):
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


def save_checkpoint(path: Path, checkpoint: dict, steps_per_epoch: int) -> None:
    """train.py's checkpoint dict (train.save builds it: adapters, optimizer, scheduler, rng, step,
    args, before, val_before, loss_window, identity), in one file written atomically
    (write_atomically), so an interrupt leaves either the old checkpoint or the new one, never half
    of one. Added here: the format, where in the data the run stands, and checksums of every entry,
    which let a resume tell a damaged file from a good one."""
    state = {**checkpoint, "adapters": {k: v.cpu() for k, v in checkpoint["adapters"].items()},
             "data_fingerprint": checkpoint["identity"]["data"], "format": CHECKPOINT_FORMAT,
             # Informative: the next batch is fixed by the step alone (see data.batch_indices).
             "data_position": dict(zip(("epoch", "batch_in_epoch"),
                                       divmod(checkpoint["step"], steps_per_epoch)))}
    state["checksums"] = checksums(state)
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except SaveError as e:
        raise SaveError(f"step {checkpoint['step']}: {e}") from None


def write_atomically(path: Path, write, replace: bool = True) -> None:
    """write(f) into a new file at `path` the one way the project creates files (base/files.py): a
    kill at any moment leaves the old file or the new one, a failure (a full disk) keeps the old
    one, and no link planted in the folder is followed. replace=False: never replace a file."""
    try:
        files.write_file(path, write, replace=replace)
    except FileExistsError:
        raise RunError(f"{path} appeared while it was being written (another process wrote it); "
                       f"it is kept as it is: choose another --out") from None
    except OSError as e:
        kept = "the previous one is kept" if path.exists() else "there was none before"
        raise SaveError(f"could not write {path} ({e.strerror or e}); {kept}") from None


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
    """Refuse an --out holding a run unless --resume or --overwrite says what to do with it. Returns
    what --overwrite will replace: nothing is deleted here, only once every input was checked."""
    try:
        held = [out / name for name in RUN_FILES if _exists(out / name)]
    except OSError as e:  # a name longer than the file system allows, a folder we may not read
        raise RunError(f"--out {out}: cannot use it ({e.strerror or e})") from None
    if args.resume:
        if not (out / "checkpoint.pt").is_file():
            raise RunError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
        return []
    if args.eval_only:  # it writes eval-<data>.json beside the run, nothing else
        return []
    if held and not args.overwrite:
        raise RunError(f"--out {out} holds a run ({', '.join(p.name for p in held)}): continue it with "
                       f"--resume, replace it with --overwrite, or choose another --out")
    return ours(out) if args.overwrite else []


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_writable(out: Path, rank: int = 0) -> None:
    """--out must be a folder this process can write in (made if it is not there)."""
    try:
        if _exists(out) and not out.is_dir():
            raise RunError(f"--out {out}: exists and is not a folder")
        files.make_folder(out)
        files.probe(out)
    except OSError as e:
        raise RunError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def check_apart(out: Path, inputs: dict, overwrite: bool) -> None:
    """--overwrite never deletes in a folder that is, holds or lies inside one of the run's inputs
    ({flag: path or None}): a file there could be named like one of the run's."""
    if not overwrite:
        return
    o = out.resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        relation = "is" if o == p else "lies inside" if p in o.parents else "holds" \
            if o in p.parents else None
        if relation:
            raise RunError(f"--overwrite: --out {out} {relation} {flag} {path}, and nothing is deleted "
                           f"among a run's inputs; choose another --out")


def record(out: Path, names) -> None:
    """Add `names` to the folder's list of files the project writes there (what --overwrite may
    delete), before they are written: a run records its files when it starts, into a folder that
    holds none of them (or whose old ones --overwrite has just deleted)."""
    listed = set(_manifest(out))
    if not listed.issuperset(names):
        write_atomically(out / MANIFEST, lambda f: f.write(json.dumps(sorted(listed | set(names)))
                                                        .encode()))


def _manifest(out: Path) -> list[str]:
    """The names the folder's list holds; a list that is not a small regular file (a planted link
    or FIFO) is none of ours."""
    try:
        st = (out / MANIFEST).lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return []
        names = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")] \
        if isinstance(names, list) else []


def ours(out: Path) -> list[Path]:
    """The files of the run in `out` that the project wrote: those its list names, or, in a folder
    from a version that kept no list, the run files that look as ours do (never through a link)."""
    listed = _manifest(out)
    if listed:
        return [out / n for n in listed if _exists(out / n)]
    kinds = {"checkpoint.pt": "file", "log.jsonl": "file", "results.json": "file", "adapter": "dir"}
    found = []
    for name, kind in kinds.items():
        path = out / name
        if path.is_symlink() or (path.is_file() if kind == "file" else
                                 (path / "adapter_config.json").is_file()):
            found.append(path)
    return found


def clear_run(out: Path, replaced: list[Path]) -> None:
    """Delete what --overwrite replaces (a link itself, never what it points to), and temporaries a
    killed save left behind; then record the files this run will write."""
    stale = [out / f"{name}.tmp" for name in RUN_FILES] + list(out.glob(".adapter.*.tmp")) + \
        [p for name in RUN_FILES for p in out.glob(f".{name}.*.tmp")]
    for path in replaced + stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    record(out, RUN_FILES)


def truncate_log(path: Path, step: int) -> None:
    """Cut log.jsonl back to the entries of steps up to `step`, the checkpoint's. A run that stopped
    after it (a second Ctrl-C, kill -9) logged steps which the resumed run will log again; a line
    cut short by a kill, or anything else that is not one of ours, ends the log too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(entry, dict) or type(entry.get("step")) is not int or entry["step"] > step:
            break
        keep.append(line + "\n")
    write_atomically(path, lambda f: f.write("".join(keep).encode()))


def append_log(out: Path, entry: dict) -> None:
    path = out / "log.jsonl"
    try:
        files.append_line(path, json.dumps(entry) + "\n")
    except OSError as e:
        raise SaveError(f"could not append to {path} ({e.strerror or e}); the lines written before "
                        f"are kept") from None


def write_json(path: Path, obj, replace: bool = True) -> None:
    write_atomically(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()), replace)


# ── Resuming: the same run, whatever the text of its command line ─────────────────────────────

PATHS = ("model", "tokenizer", "data")


def check_resumable(ckpt: dict, args, path: Path, identity: dict, defaults: dict,
                    must_match: tuple) -> None:
    """Refuse a checkpoint made with other settings (must_match: the flags that change what a run
    computes, cli.must_match) or another identity (base, tokenizer, data), naming each. Paths are
    compared resolved; a setting the checkpoint's version did not have matches when its default
    reproduces that run."""
    fingerprint = identity["data"]
    saved = upgrade(ckpt)
    differ = []
    for k in must_match:
        now = getattr(args, k)
        was = saved.get(k, defaults.get(k))
        if k in PATHS and was is not None and now is not None:
            same = Path(str(was)).resolve() == Path(str(now)).resolve()
        else:
            same = (was or None) == (now or None) if k in ("targets", "lora_targets") else was == now
        if not same:
            differ.append(f"--{k.replace('_', '-')} was {was!r}, now {now!r}")
    if fingerprint != ckpt["data_fingerprint"]:
        differ.append(f"the training data of --data {args.data} have changed (fingerprint "
                      f"{str(ckpt['data_fingerprint'])[:12]}, now {fingerprint[:12]})")
    was = ckpt.get("identity") if isinstance(ckpt.get("identity"), dict) else {}
    base = was.get("base") if isinstance(was.get("base"), dict) else {}
    if "fingerprint" in base and base["fingerprint"] != identity["base"]["fingerprint"]:
        differ.append(f"the base model's config or weight files differ from {base.get('base_model_name_or_path')}'s")
    if "tokenizer" in was and was["tokenizer"] != identity["tokenizer"]:
        differ.append("the tokenizer's file differs from the one the run began with")
    if differ:
        raise RunError(f"--resume: {path} was made with other settings: " + "; ".join(differ))


def upgrade(ckpt: dict) -> dict:
    """A checkpoint's settings as this version names them."""
    saved = dict(ckpt["args"])
    if ckpt.get("format", 1) < 2 and (saved.get("lora") or saved.get("experts") == 1) \
            and saved.get("orth") == "orthonormal":
        saved["orth"] = "none"  # one expert "orthonormal" was plain LoRA
    return saved


# ── The folder's lock, and stopping cleanly ──────────────────────────────────────────────────

class Lock:
    """<out>/.omoe-lock, made exclusively: the pid and host of the run that holds the folder. A lock
    whose process is gone (on this host) is stale and taken over."""

    def __init__(self, out: Path):
        self.path, self.held = out / LOCK, False

    def acquire(self) -> "Lock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%c")}
        for _ in range(2):
            try:
                fd = os.open(self.path, files.NEW, 0o666)  # exclusively, never through a link
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # gone, or another version's leftovers: take it over
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunError(f"--out {self.path.parent} is in use by another run (pid {holder['pid']} "
                               f"on {holder['host']}, started {holder.get('started', '?')}); wait for "
                               f"it or choose another --out (if that run is gone, delete "
                               f"{self.path})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunError(f"--out {self.path.parent}: cannot take its lock {self.path}")

    def _holder(self) -> dict | None:
        """The lock's holder, or None when the lock is stale. A lock that is not a small regular
        file (a folder, a link, a FIFO that would hang a read) is none of ours: refused."""
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return None  # released meanwhile
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a link" if stat.S_ISLNK(st.st_mode) \
                else "a large file" if stat.S_ISREG(st.st_mode) else "a FIFO, device or socket"
            raise RunError(f"--out {self.path.parent}: its lock {self.path} is {kind}, not a run's "
                           f"lock file; if no run uses this folder, remove it")
        try:
            holder = json.loads(self.path.read_text())
            pid, host = holder["pid"], str(holder["host"])
            if type(pid) is not int or not 0 < pid < 2**31:
                raise ValueError(pid)  # no process has it: os.kill(0 or -1) would mean a group
        except (OSError, ValueError, KeyError, TypeError):
            young = time.time() - st.st_mtime < 10
            return {"pid": "?", "host": "?", "started": "just now"} if young else None
        if host == socket.gethostname() and not _alive(pid):
            return None
        return holder

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def lock(out: Path) -> Lock:
    """Take --out for this run (making the folder if need be): refused while another run holds it."""
    check_writable(out)
    return Lock(out).acquire()


class Interrupt:
    """The first Ctrl-C (SIGINT) or SIGTERM (what `kill`, `timeout` and schedulers send) asks the loop
    to save and stop at the end of the current step; a second one stops at once (the checkpoint on
    disk is then the last one saved)."""

    def __init__(self):
        self.requested = None  # the signal's name, once one came
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        self.restore()
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        print(f"\n{self.requested}: saving a checkpoint at the end of this step ({again} again to quit "
              f"now)", file=sys.stderr)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    @property
    def exit_code(self) -> int:
        return 128 + getattr(signal, self.requested or "SIGINT")


# ── What a run writes at its end ─────────────────────────────────────────────────────────────

def save_adapters(model, directory: Path, base_model: dict, state: dict) -> None:
    """The trained adapters into <out>/adapter (plumbing/adapters.py), or one line saying why not."""
    try:
        adapters.save_adapters(model, directory, base_model=base_model, state=state)
    except OSError as e:
        raise SaveError(f"could not write the adapters to {directory} ({e.strerror or e}); "
                        f"{directory.parent / 'checkpoint.pt'} holds them: --resume evaluates and "
                        f"saves them again") from None


def environment(device) -> dict:
    """What a result was computed with: runs on other torch releases or processors round
    differently, and a small model's training can follow the difference as it would another seed."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None
    if device.type == "cpu" and Path("/proc/cpuinfo").is_file():
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                     .splitlines() if line.startswith("model name")), name)
    return {"torch": torch.__version__, "device": device.type, "device_name": name,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def quiet_stdout() -> None:
    """After standard output was closed under us (a pipe whose reader exited), point it at devnull,
    so that Python's flush at exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


class Window:
    """The loss and tokens since the last log, carried through a checkpoint so that a resumed run
    logs what the uninterrupted one logs."""

    def __init__(self, loss: float = 0.0, steps: int = 0):
        self.loss, self.steps, self.tokens, self.t0 = loss, steps, 0, time.time()

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens

    def reset(self) -> None:
        self.__init__()


def diverged(path: Path, done: int, loss: float) -> str:
    """What to say when the loss of step `done` is not finite. A checkpoint is named as one to go
    back to only if its weights are finite, and the one saved just before is said to be the one
    whose weights gave this loss (resuming it would give the same loss again)."""
    head = f"step {done}: the loss is {loss}; stopping. "
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        finite = all(torch.isfinite(t).all() for t in ckpt["adapters"].values())
    except Exception:  # unreadable or not ours: not a checkpoint to go back to
        ckpt, finite = None, False
    if ckpt is None or not finite:
        return head + f"No checkpoint with finite weights was written ({last_checkpoint(path)})"
    if ckpt["step"] == done - 1:
        return head + (f"{path} holds step {ckpt['step']}, whose weights gave this loss: resuming "
                       f"it would give it again; start over with a lower --lr")
    return head + f"The last checkpoint with finite weights is {path} (step {ckpt['step']})"


def last_checkpoint(path: Path) -> str:
    return f"{path}" + ("" if path.exists() else " (none written yet)")
