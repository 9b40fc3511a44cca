"""Model names as users type them -> a local model directory.

`--model` accepts what transformers accepts:

    --model ./llama-7b                              a local directory, used as it is
    --model ~/.cache/huggingface/hub/models--meta-llama--Llama-2-7b-hf
                                                    a Hugging Face cache folder: its snapshot
    --model meta-llama/Llama-2-7b-hf [--revision R] a hub model id: found in the local cache, or
                                                    downloaded into it (needs huggingface_hub)

A local directory always wins: `org/name` is a hub id only when no such folder exists.

The Hugging Face cache (what huggingface_hub and transformers download into) keeps one folder per
repository, named after its id, with every file stored once and revisions as folders of links:

    <cache>/models--meta-llama--Llama-2-7b-hf/
        refs/main                   text: the commit that branch "main" pointed at when downloaded
                                    (refs/<tag or branch> for the other revisions downloaded)
        snapshots/<commit>/         one folder per commit downloaded, holding links such as
            config.json -> ../../blobs/<hash of its content>
            model-00001-of-00002.safetensors -> ../../blobs/<hash>
        blobs/<hash>                the files' bytes

A snapshot holds only the files someone asked for: transformers sometimes fetches config.json
alone. So a snapshot counts as "there" only when it holds everything a run needs (config.json,
complete weights, a tokenizer); otherwise it is downloaded (or the message says how to fetch it).

huggingface_hub is optional: it is imported only to download.
"""

import json
import os
import re
import shlex
from pathlib import Path
from types import ModuleType

from plumbing.base.errors import BadInput

# Glob patterns of the files a run needs (snapshot_download's allow_patterns). The weights are
# "model*.safetensors" rather than "*.safetensors": save_pretrained names them model.safetensors or
# model-00001-of-00002.safetensors, and some repositories also hold a second copy of the weights
# in another layout (Mistral's consolidated.safetensors), which would double the download.
NEEDED = ("config.json", "generation_config.json",
          "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "model*.safetensors", "model.safetensors.index.json")
# Older repositories hold only PyTorch .bin weights: these are fetched when no safetensors came.
BIN_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
# A shorter NEEDED for the fetch command in messages: "*.json" covers the config, tokenizer and
# index files.
FETCH_PATTERNS = ("*.json", "model*.safetensors", "tokenizer.model")

# The weight files of a model directory, in the order weights.find_weight_files looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")

# A hub id, as huggingface_hub validates it: "name" or "org/name", each part ASCII letters, digits,
# "_", "-" or ".", starting and ending with a letter, digit or "_" (plus the rules in is_hub_id).
HUB_ID = re.compile(r"(\w([\w.-]*\w)?/)?\w([\w.-]*\w)?", re.ASCII)
# A revision as git names a branch or tag (refs/pr/1 included) or a commit: a name, never a path.
REVISION = re.compile(r"[\w.-]+(/[\w.-]+)*", re.ASCII)
COMMIT = re.compile(r"[0-9a-f]{40}")  # a full git commit hash: the names of snapshots/ folders
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as true in HF_HUB_OFFLINE
EXPECTED = "a Hugging Face LLaMA directory or a hub model name such as meta-llama/Llama-2-7b-hf"
# Seconds a request to the Hub may wait for an answer: huggingface_hub's own client waits forever,
# so a proxy that never answers would hang the run.
TIMEOUT = 60


class HubError(BadInput):
    """A model name that cannot be resolved: a one-line message naming it, where it looked, and
    what to do."""


# ── where the caches are ─────────────────────────────────────────────────────────────────────

def cache_dirs() -> list[Path]:
    """The Hugging Face hub caches to look in, in huggingface_hub's order of precedence:
    $HF_HUB_CACHE (or its old name $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub.

    huggingface_hub uses only the first of these that is set; the others are kept (each once) as
    well, so that a model downloaded before a variable was set is still found. The first is where
    downloads go. Read from the environment at each call, unlike huggingface_hub.constants."""
    env = os.environ
    dirs = [_expand(env[var]) for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE") if var in env]
    if "HF_HOME" in env:
        dirs.append(_expand(env["HF_HOME"]) / "hub")
    if "XDG_CACHE_HOME" in env:
        dirs.append(_expand(env["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    dirs.append(_expand("~") / ".cache" / "huggingface" / "hub")
    unique = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _expand(value: str) -> Path:
    """A path from an environment variable, with ~ and $VARS expanded as huggingface_hub does."""
    return Path(os.path.expandvars(os.path.expanduser(value)))


def _offline_setting() -> str | None:
    """The setting that turns downloads off, such as "HF_HUB_OFFLINE=1"; None when they are on."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var)
        if value:  # huggingface_hub reads the first of the two that is set and not empty
            return f"{var}={value}" if value.upper() in TRUE_VALUES else None
    return None


# ── the public entry point ───────────────────────────────────────────────────────────────────

def resolve_model(name: str | os.PathLike, revision: str | None = None,
                  download: bool = True) -> Path:
    """A model as the user named it -> a local directory holding config.json (and weights,
    tokenizer). Raises HubError with a one-line message when there is none.

    `name` is a local directory (returned as it is), a cache folder models--org--name (its
    snapshot for `revision`), or a hub id "org/name": its snapshot in one of cache_dirs() when
    complete, else downloaded with huggingface_hub (unless download=False, HF_HUB_OFFLINE is set
    or huggingface_hub is not installed: then the message gives the command that fetches it).
    `revision` is a branch, a tag or a commit hash; None means "main"."""
    name = os.fspath(name)
    if revision is not None:
        check_revision(revision)
    path = Path(name)
    if path.is_dir():  # a local directory wins over a hub id of the same name
        return _local_folder(path, name, revision)
    if path.exists() or not is_hub_id(name):
        raise HubError(f"--model {name}: no such directory ({EXPECTED} is expected)")

    caches = cache_dirs()
    found, notes = _look_in_caches(name, revision, caches)
    if found is not None:
        return found
    where = "looked in " + ", ".join(str(d) for d in caches) + "".join(f"; {n}" for n in notes)
    hub = _import_hub()
    offline = _offline_setting()
    if download and hub is not None and offline is None:
        try:
            return _download(hub, name, revision, caches[0])
        except LookupError as e:
            raise HubError(f"--model {name}: not in the local Hugging Face cache ({where}) "
                           f"and the download failed: {e}; fetch it with: "
                           f"{_fetch_command(name, revision, True)}") from None
    why = f" and {offline} turns downloads off" if download and offline else \
        " and huggingface_hub, which downloads it, is not installed" if download and hub is None else ""
    raise HubError(f"--model {name}: not in the local Hugging Face cache ({where}){why}; "
                   f"fetch it with: {_fetch_command(name, revision, hub is not None)}")


def _local_folder(path: Path, name: str, revision: str | None) -> Path:
    """An existing directory: a cache folder models--org--name -> its snapshot; any other folder
    as it is (it has no revisions to choose from)."""
    if path.name.startswith("models--") and (path / "snapshots").is_dir():
        try:
            return _snapshot(path, revision)
        except LookupError as e:
            raise HubError(f"--model {name}: {e}") from None
    if revision is not None:
        raise HubError(f"--model {name}: a local folder has no revisions; drop --revision "
                       f"{revision}, or name a hub model or a models--org--name cache folder")
    return path


def check_revision(revision: str) -> None:
    """--revision is looked up under refs/ and sent to the Hub: it must be a name, never a path."""
    if not REVISION.fullmatch(revision) or ".." in revision or len(revision) > 255:
        raise HubError(f"--revision {revision!r}: not a branch, tag or commit name")


def is_hub_id(name: str) -> bool:
    """Whether `name` is a hub model id, by the rules of huggingface_hub's validate_repo_id."""
    return (HUB_ID.fullmatch(name) is not None
            and all(len(part) <= 96 for part in name.split("/"))
            and "--" not in name and ".." not in name and not name.endswith(".git"))


# ── the local cache ──────────────────────────────────────────────────────────────────────────

def _look_in_caches(repo_id: str, revision: str | None,
                    caches: list[Path]) -> tuple[Path | None, list[str]]:
    """The first complete snapshot of `repo_id` at `revision` in `caches`, or None; and, for each
    cache that has the repository but no usable snapshot, a note saying why."""
    notes = []
    for cache in caches:
        folder = cache / ("models--" + repo_id.replace("/", "--"))
        if not folder.is_dir():
            continue
        try:
            snapshot = _snapshot(folder, revision)
        except LookupError as e:
            notes.append(str(e))
            continue
        missing = _missing(snapshot)
        if not missing:
            return snapshot, notes
        notes.append(f"{snapshot} lacks {' and '.join(missing)}")
    return None, notes


def _snapshot(folder: Path, revision: str | None) -> Path:
    """The snapshot of cache folder `folder` that `revision` names: refs/<revision> (default
    refs/main) holds its commit, or a commit hash names snapshots/<hash> directly; with no
    revision given and no refs/main, the only snapshot there is. Raises LookupError saying why
    there is none."""
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        raise LookupError(f"{folder} has no snapshots")
    ref = folder / "refs" / (revision or "main")
    if ref.is_file():  # check_revision keeps it inside refs/
        commit = ref.read_text().strip()
        if not commit or not (snapshots / commit).is_dir():
            raise LookupError(f"{ref} names snapshot {commit!r}, which is not in {snapshots}")
        return snapshots / commit
    if revision is not None:
        if COMMIT.fullmatch(revision) and (snapshots / revision).is_dir():
            return snapshots / revision
        raise LookupError(f"{folder} has no revision {revision!r}")
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return found[0]
    if not found:
        raise LookupError(f"{folder} has no snapshots")
    raise LookupError(f"{folder} has no refs/main and {len(found)} snapshots; choose one with "
                      f"--revision <commit> (the folder names in {snapshots})")


def _missing(snapshot: Path) -> list[str]:
    """What a run needs that `snapshot` lacks; empty when it is complete."""
    missing = []
    if not (snapshot / "config.json").is_file():
        missing.append("config.json")
    weights = _missing_weights(snapshot)
    if weights is not None:
        missing.append(weights)
    if not any((snapshot / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.model or tokenizer.json)")
    return missing


def _missing_weights(snapshot: Path) -> str | None:
    """None when `snapshot` holds complete weights, else what is missing. As in
    weights.find_weight_files, the first of WEIGHT_FILES present is the one used, so it decides."""
    for name in WEIGHT_FILES:
        if not (snapshot / name).is_file():
            continue
        if not name.endswith(".index.json"):
            return None
        shards = _shards(snapshot / name)
        if shards is None:
            return f"a readable {name}"
        absent = [s for s in shards if not (snapshot / s).is_file()]
        if absent:  # an interrupted download leaves some shards behind
            return f"{len(absent)} of the {len(shards)} shards {name} lists ({', '.join(absent)})"
        return None
    return "a weight file"


def _shards(index: Path) -> list[str] | None:
    """The shard file names an index lists ({"weight_map": {tensor: shard}}), or None when it is
    not a readable index (the model loader then says precisely what is wrong)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    if not all(isinstance(shard, str) for shard in weight_map.values()):
        return None
    return sorted(set(weight_map.values()))


# ── downloading ──────────────────────────────────────────────────────────────────────────────

def _import_hub() -> ModuleType | None:
    """The huggingface_hub module, or None when it is not installed (it is optional)."""
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def _download(hub: ModuleType, repo_id: str, revision: str | None, cache_dir: Path) -> Path:
    """Download the files of `repo_id` a run needs into `cache_dir` (the cache looked in first,
    so the next run finds them there) and return the snapshot. Raises LookupError with a
    one-line reason.

    Only NEEDED is asked for, so only safetensors weights. A repository with only PyTorch .bin
    weights shows itself by delivering no weight file: a second call then also asks for
    BIN_WEIGHTS (the files already fetched are not fetched again). This costs nothing in the
    common case, unlike asking the Hub for the repository's file list first, and keeps every
    error coming from snapshot_download, which turns network failures into its own errors."""
    restore = _time_limit(hub)
    try:
        folder = Path(hub.snapshot_download(repo_id=repo_id, revision=revision,
                                            cache_dir=cache_dir, allow_patterns=list(NEEDED),
                                            etag_timeout=TIMEOUT))
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            folder = Path(hub.snapshot_download(repo_id=repo_id, revision=revision,
                                                cache_dir=cache_dir, etag_timeout=TIMEOUT,
                                                allow_patterns=list(NEEDED + BIN_WEIGHTS)))
    except Exception as e:  # the network library's errors vary with huggingface_hub's version
        raise LookupError(_hub_failure(e, repo_id, revision)) from None
    finally:
        restore()
    missing = _missing(folder)
    if missing:
        raise LookupError(f"{folder} lacks {' and '.join(missing)}")
    return folder


def _time_limit(hub: ModuleType):
    """Make every request of huggingface_hub's client wait at most TIMEOUT for an answer (it waits
    forever by default); returns what puts its default back. Versions without a client factory
    (before 1.0) have their own timeouts."""
    try:
        from huggingface_hub.utils import _http
        default = _http.default_client_factory
    except (ImportError, AttributeError):
        return lambda: None

    def client():
        c = default()
        c.timeout = TIMEOUT
        return c
    hub.set_client_factory(client)
    return lambda: hub.set_client_factory(default)


def _hub_failure(e: Exception, repo_id: str, revision: str | None) -> str:
    """One line saying why a download failed (huggingface_hub's messages span several lines)."""
    from huggingface_hub import errors

    login = "log in with: hf auth login (huggingface-cli login with older huggingface_hub)"
    if isinstance(e, errors.GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return (f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id}, "
                f"then {login}")
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"no repository {repo_id} on the Hub (if it is private, {login})"
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{repo_id} has no revision {repr(revision or 'main')} on the Hub"
    network = type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
    if network or isinstance(e, (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        # snapshot_download raises LocalEntryNotFoundError from the network error it met.
        return f"cannot reach the Hub ({_one_line(e.__cause__ or e)})"
    return _one_line(e)


def _one_line(e: BaseException) -> str:
    """An exception's type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _fetch_command(repo_id: str, revision: str | None, hub_installed: bool) -> str:
    """The shell command that downloads `repo_id` into the cache, for messages."""
    words = ["hf", "download", repo_id]
    for pattern in FETCH_PATTERNS:
        words += ["--include", pattern]  # the hf command takes one pattern per --include
    if revision is not None:
        words += ["--revision", revision]
    command = shlex.join(words)
    return command if hub_installed else f"pip install huggingface_hub && {command}"
