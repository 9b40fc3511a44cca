"""plumbing/base/hub.py: model names -> local directories, through caches built in tmp_path.

No test touches the network or the real ~/.cache: every test starts with the cache variables
unset, HOME in tmp_path and HF_HUB_OFFLINE=1; the download tests replace
huggingface_hub.snapshot_download with a fake that writes into the tmp cache."""

import json
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

from plumbing.base import hub
from plumbing.base.hub import NEEDED, HubError, cache_dirs, resolve_model

MAIN = "a" * 40  # commits: the names of snapshots/ folders
OTHER = "b" * 40
THIRD = "c" * 40
COMPLETE = {"config.json": "{}", "model.safetensors": "weights", "tokenizer.model": "sp"}
FETCH = ("hf download org/name --include '*.json' --include 'model*.safetensors' "
         "--include tokenizer.model")
LOGIN = "log in with: hf auth login (huggingface-cli login with older huggingface_hub)"


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No cache variables, a HOME of our own, downloads off, and tmp_path as the working dir."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def add_snapshot(cache: Path, commit: str = MAIN, ref: str | None = "main",
                 files: dict | None = None, repo: str = "models--org--name") -> Path:
    """A snapshot laid out as huggingface_hub leaves it: links to blobs/, refs/<ref> -> commit."""
    folder = cache / repo
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for name, text in (COMPLETE if files is None else files).items():
        blob = folder / "blobs" / f"{commit}-{name}"
        blob.write_text(text)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    if ref is not None:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


def default_cache(tmp_path: Path) -> Path:
    return tmp_path / "home" / ".cache" / "huggingface" / "hub"


# ── cache_dirs ───────────────────────────────────────────────────────────────────────────────

def test_cache_dirs_default_is_under_home(tmp_path):
    assert cache_dirs() == [default_cache(tmp_path)]


def test_cache_dirs_in_precedence_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "b"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "d"))
    assert cache_dirs() == [tmp_path / "a", tmp_path / "b", tmp_path / "c" / "hub",
                            tmp_path / "d" / "huggingface" / "hub", default_cache(tmp_path)]


def test_cache_dirs_expand_home_and_drop_repeats(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", "~/hf")
    monkeypatch.setenv("HF_HUB_CACHE", "$HOME/hf/hub")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/.cache")
    assert cache_dirs() == [tmp_path / "home" / "hf" / "hub", default_cache(tmp_path)]


# ── found in a local cache ───────────────────────────────────────────────────────────────────

def test_found_through_hf_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub1"))
    snapshot = add_snapshot(tmp_path / "hub1")
    assert resolve_model("org/name") == snapshot


def test_found_through_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    snapshot = add_snapshot(tmp_path / "hfhome" / "hub")
    assert resolve_model("org/name") == snapshot


def test_found_through_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    snapshot = add_snapshot(tmp_path / "xdg" / "huggingface" / "hub")
    assert resolve_model("org/name") == snapshot


def test_found_in_the_default_location(tmp_path):
    snapshot = add_snapshot(default_cache(tmp_path))
    assert resolve_model("org/name") == snapshot


def test_a_name_without_org_is_a_hub_id(tmp_path):
    snapshot = add_snapshot(default_cache(tmp_path), repo="models--gpt2")
    assert resolve_model("gpt2") == snapshot


def test_hf_hub_cache_wins_over_hf_home_and_hf_home_over_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub1"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    first = add_snapshot(tmp_path / "hub1", commit=MAIN)
    second = add_snapshot(tmp_path / "hfhome" / "hub", commit=OTHER)
    add_snapshot(default_cache(tmp_path), commit=THIRD)
    assert resolve_model("org/name") == first
    monkeypatch.delenv("HF_HUB_CACHE")
    assert resolve_model("org/name") == second


def test_an_incomplete_snapshot_in_the_first_cache_gives_way_to_a_complete_one(tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub1"))
    add_snapshot(tmp_path / "hub1", files={"config.json": "{}"})
    snapshot = add_snapshot(default_cache(tmp_path), commit=OTHER)
    assert resolve_model("org/name") == snapshot


def test_revisions_branch_tag_and_commit(tmp_path):
    cache = default_cache(tmp_path)
    main = add_snapshot(cache, commit=MAIN, ref="main")
    v2 = add_snapshot(cache, commit=OTHER, ref="v2")
    pr = add_snapshot(cache, commit=THIRD, ref="refs/pr/1")
    assert resolve_model("org/name") == main
    assert resolve_model("org/name", revision="main") == main
    assert resolve_model("org/name", revision="v2") == v2
    assert resolve_model("org/name", revision="refs/pr/1") == pr
    assert resolve_model("org/name", revision=OTHER) == v2  # a commit hash names its snapshot


def test_a_missing_revision_names_the_folder_and_the_fetch_command(tmp_path):
    cache = default_cache(tmp_path)
    add_snapshot(cache)
    with pytest.raises(HubError) as e:
        resolve_model("org/name", revision="v3")
    assert str(e.value) == (
        f"--model org/name: not in the local Hugging Face cache (looked in {cache}; "
        f"{cache / 'models--org--name'} has no revision 'v3') and HF_HUB_OFFLINE=1 turns "
        f"downloads off; fetch it with: {FETCH} --revision v3")


def test_a_snapshot_with_config_only_is_not_used(tmp_path, monkeypatch):
    hub1, hub2 = tmp_path / "hub1", tmp_path / "hfhome" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub1))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    snapshot = add_snapshot(hub1, files={"config.json": "{}"})  # as transformers may leave it
    with pytest.raises(HubError) as e:
        resolve_model("org/name")
    assert str(e.value) == (
        f"--model org/name: not in the local Hugging Face cache (looked in {hub1}, {hub2}, "
        f"{default_cache(tmp_path)}; {snapshot} lacks a weight file and a tokenizer "
        f"(tokenizer.model or tokenizer.json)) and HF_HUB_OFFLINE=1 turns downloads off; "
        f"fetch it with: {FETCH}")


def test_a_sharded_index_with_a_missing_shard_is_incomplete(tmp_path):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    files = {"config.json": "{}", "tokenizer.json": "{}",
             "model.safetensors.index.json": json.dumps(index),
             "model-00001-of-00002.safetensors": "shard 1"}
    snapshot = add_snapshot(default_cache(tmp_path), files=files)
    with pytest.raises(HubError) as e:
        resolve_model("org/name")
    assert str(e.value) == (
        f"--model org/name: not in the local Hugging Face cache (looked in "
        f"{default_cache(tmp_path)}; {snapshot} lacks 1 of the 2 shards "
        f"model.safetensors.index.json lists (model-00002-of-00002.safetensors)) and "
        f"HF_HUB_OFFLINE=1 turns downloads off; fetch it with: {FETCH}")
    (snapshot / "model-00002-of-00002.safetensors").write_text("shard 2")
    assert resolve_model("org/name") == snapshot


def test_a_link_to_a_deleted_blob_is_a_missing_file(tmp_path):
    snapshot = add_snapshot(default_cache(tmp_path))
    (snapshot / "model.safetensors").resolve().unlink()
    with pytest.raises(HubError) as e:
        resolve_model("org/name", download=False)
    assert str(e.value) == (
        f"--model org/name: not in the local Hugging Face cache (looked in "
        f"{default_cache(tmp_path)}; {snapshot} lacks a weight file); fetch it with: {FETCH}")


def test_pytorch_bin_weights_count_as_weights(tmp_path):
    files = {"config.json": "{}", "tokenizer.model": "sp", "pytorch_model.bin": "weights"}
    snapshot = add_snapshot(default_cache(tmp_path), files=files)
    assert resolve_model("org/name") == snapshot


def test_transformers_offline_turns_downloads_off_too(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    with pytest.raises(HubError) as e:
        resolve_model("org/name")
    assert str(e.value) == (
        f"--model org/name: not in the local Hugging Face cache (looked in "
        f"{default_cache(tmp_path)}) and TRANSFORMERS_OFFLINE=yes turns downloads off; "
        f"fetch it with: {FETCH}")


# ── local directories ────────────────────────────────────────────────────────────────────────

def test_a_local_directory_wins_over_a_hub_id(tmp_path):
    add_snapshot(default_cache(tmp_path))
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model("org/name") == Path("org/name")
    assert resolve_model(tmp_path / "org" / "name") == tmp_path / "org" / "name"


def test_a_local_directory_has_no_revisions(tmp_path):
    (tmp_path / "llama").mkdir()
    with pytest.raises(HubError) as e:
        resolve_model("llama", revision="v2")
    assert str(e.value) == ("--model llama: a local folder has no revisions; drop --revision v2, "
                            "or name a hub model or a models--org--name cache folder")


def test_a_cache_folder_given_directly_resolves_to_its_snapshot(tmp_path):
    main = add_snapshot(tmp_path, commit=MAIN, ref="main")
    other = add_snapshot(tmp_path, commit=OTHER, ref=None)
    folder = tmp_path / "models--org--name"
    assert resolve_model(folder) == main
    assert resolve_model(str(folder), revision=OTHER) == other


def test_a_cache_folder_with_one_snapshot_and_no_ref_uses_it(tmp_path):
    snapshot = add_snapshot(tmp_path, ref=None, files={"config.json": "{}"})
    # Given directly, a folder is not checked for completeness: the loader names what is missing.
    assert resolve_model(tmp_path / "models--org--name") == snapshot


def test_a_cache_folder_with_several_snapshots_and_no_ref_is_an_error(tmp_path):
    add_snapshot(tmp_path, commit=MAIN, ref=None)
    add_snapshot(tmp_path, commit=OTHER, ref=None)
    folder = tmp_path / "models--org--name"
    with pytest.raises(HubError) as e:
        resolve_model(folder)
    assert str(e.value) == (f"--model {folder}: {folder} has no refs/main and 2 snapshots; "
                            f"choose one with --revision <commit> (the folder names in "
                            f"{folder / 'snapshots'})")


def test_a_cache_folder_whose_ref_names_a_missing_snapshot_is_an_error(tmp_path):
    add_snapshot(tmp_path)
    folder = tmp_path / "models--org--name"
    (folder / "refs" / "main").write_text(OTHER)
    with pytest.raises(HubError) as e:
        resolve_model(folder)
    assert str(e.value) == (f"--model {folder}: {folder / 'refs' / 'main'} names snapshot "
                            f"'{OTHER}', which is not in {folder / 'snapshots'}")


def test_a_cache_folder_without_the_revision_is_an_error(tmp_path):
    add_snapshot(tmp_path)
    folder = tmp_path / "models--org--name"
    with pytest.raises(HubError) as e:
        resolve_model(folder, revision="v2")
    assert str(e.value) == f"--model {folder}: {folder} has no revision 'v2'"
    with pytest.raises(HubError) as e:  # refs/../refs/main: a revision cannot leave refs/
        resolve_model(folder, revision="../refs/main")
    assert str(e.value) == "--revision '../refs/main': not a branch, tag or commit name"


@pytest.mark.parametrize("name", ["./missing", "a/b/c", "/no/such/dir", "org/-name", "a--b",
                                  "org/name.git", "spaces in/name"])
def test_neither_a_directory_nor_a_hub_id(name):
    with pytest.raises(HubError) as e:
        resolve_model(name)
    assert str(e.value) == (f"--model {name}: no such directory (a Hugging Face LLaMA directory "
                            "or a hub model name such as meta-llama/Llama-2-7b-hf is expected)")


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HubError) as e:
        resolve_model("config.json")
    assert str(e.value) == ("--model config.json: no such directory (a Hugging Face LLaMA "
                            "directory or a hub model name such as meta-llama/Llama-2-7b-hf is "
                            "expected)")


# ── downloading (snapshot_download replaced by a fake) ───────────────────────────────────────

def test_needed_patterns_cover_the_run_files_and_nothing_else():
    def wanted(f: str) -> bool:
        return any(fnmatch(f, pattern) for pattern in NEEDED)

    for f in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "model.safetensors",
              "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        assert wanted(f), f
    for f in ("pytorch_model.bin", "consolidated.safetensors", "original/consolidated.00.pth",
              "README.md", "flax_model.msgpack"):
        assert not wanted(f), f


FETCH = ("hf download org/name --include '*.json' --include 'model*.safetensors' "
         "--include tokenizer.model")


class FakeHub:
    """snapshot_download as far as resolve_model sees it: records each call, then writes the
    repository's files that match allow_patterns into cache_dir/models--org--name/snapshots/."""

    def __init__(self, repo_files: dict, error: Exception | None = None):
        self.repo_files, self.error, self.calls, self.timeouts = repo_files, error, [], []

    def __call__(self, repo_id, **kwargs):
        from huggingface_hub.utils import _http
        # How long the call and the client's requests may wait for an answer (made, never sent).
        self.timeouts.append((kwargs.pop("etag_timeout", None), _http.get_session().timeout.read))
        self.calls.append(dict(repo_id=repo_id, **kwargs))
        if self.error is not None:
            raise self.error
        folder = Path(kwargs["cache_dir"]) / ("models--" + repo_id.replace("/", "--"))
        snapshot = folder / "snapshots" / MAIN
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, text in self.repo_files.items():
            if any(fnmatch(name, p) for p in kwargs["allow_patterns"]):
                (snapshot / name).write_text(text)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / (kwargs["revision"] or "main")).write_text(MAIN)
        return str(snapshot)


@pytest.fixture
def install_fake(monkeypatch):
    """Downloads on, and a function that puts a FakeHub in place of snapshot_download."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def install(repo_files: dict, error: Exception | None = None) -> FakeHub:
        fake = FakeHub(repo_files, error)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
        return fake

    return install


def test_download_asks_only_for_the_needed_files(tmp_path, monkeypatch, install_fake):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub1"))
    repo = {**COMPLETE, "README.md": "", "pytorch_model.bin": "old", "consolidated.safetensors": ""}
    fake = install_fake(repo)
    snapshot = tmp_path / "hub1" / "models--org--name" / "snapshots" / MAIN
    assert resolve_model("org/name", revision="v2") == snapshot
    assert fake.calls == [dict(repo_id="org/name", revision="v2", cache_dir=tmp_path / "hub1",
                               allow_patterns=list(NEEDED))]
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(COMPLETE)
    assert resolve_model("org/name", revision="v2") == snapshot  # now found in the cache
    assert len(fake.calls) == 1


def test_an_incomplete_cached_snapshot_is_downloaded_again(tmp_path, install_fake):
    add_snapshot(default_cache(tmp_path), files={"config.json": "{}"})
    fake = install_fake(COMPLETE)
    assert resolve_model("org/name") == default_cache(tmp_path) / "models--org--name" / \
        "snapshots" / MAIN
    assert fake.calls == [dict(repo_id="org/name", revision=None, cache_dir=default_cache(tmp_path),
                               allow_patterns=list(NEEDED))]


def test_a_repository_with_bin_weights_only_gets_them_on_a_second_call(tmp_path, install_fake):
    repo = {"config.json": "{}", "tokenizer.model": "sp", "pytorch_model.bin.index.json":
            json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00001.bin"}}),
            "pytorch_model-00001-of-00001.bin": "weights", "training_args.bin": "not weights"}
    fake = install_fake(repo)
    snapshot = resolve_model("org/name")
    assert snapshot == default_cache(tmp_path) / "models--org--name" / "snapshots" / MAIN
    call = dict(repo_id="org/name", revision=None, cache_dir=default_cache(tmp_path))
    assert fake.calls == [{**call, "allow_patterns": list(NEEDED)},
                          {**call, "allow_patterns": [*NEEDED, "pytorch_model*.bin",
                                                      "pytorch_model.bin.index.json"]}]
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(set(repo) - {"training_args.bin"})


def test_a_download_without_weights_is_an_error(tmp_path, install_fake):
    install_fake({"config.json": "{}", "tokenizer.json": "{}", "model.ckpt": "other format"})
    snapshot = default_cache(tmp_path) / "models--org--name" / "snapshots" / MAIN
    with pytest.raises(HubError) as e:
        resolve_model("org/name")
    assert str(e.value) == (f"--model org/name: not in the local Hugging Face cache (looked in "
                            f"{default_cache(tmp_path)}) and the download failed: {snapshot} "
                            f"lacks a weight file; fetch it with: {FETCH}")


def test_hf_hub_offline_0_allows_downloads(tmp_path, monkeypatch, install_fake):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    fake = install_fake(COMPLETE)
    assert resolve_model("org/name") == default_cache(tmp_path) / "models--org--name" / \
        "snapshots" / MAIN
    assert len(fake.calls) == 1


def test_download_false_never_downloads(tmp_path, install_fake):
    fake = install_fake(COMPLETE)
    with pytest.raises(HubError) as e:
        resolve_model("org/name", revision="v2", download=False)
    assert str(e.value) == (f"--model org/name: not in the local Hugging Face cache (looked in "
                            f"{default_cache(tmp_path)}); fetch it with: {FETCH} --revision v2")
    assert fake.calls == []


@pytest.mark.parametrize("error, status, message, reason", [
    ("GatedRepoError", 403, "403 Client Error.\n\nCannot access gated repo for url ...",
     f"org/name is gated: accept its licence at https://huggingface.co/org/name, then {LOGIN}"),
    ("RepositoryNotFoundError", 404, "404 Client Error.\n\nRepository Not Found for url ...",
     f"no repository org/name on the Hub (if it is private, {LOGIN})"),
    ("RevisionNotFoundError", 404, "404 Client Error.\n\nRevision Not Found for url ...",
     "org/name has no revision 'v2' on the Hub"),
    ("HfHubHTTPError", 500, "500 Server Error: Internal Server Error\n\nfor url ...",
     "HfHubHTTPError: 500 Server Error: Internal Server Error"),
], ids=["gated", "no repository", "no revision", "server error"])
def test_hub_http_errors_become_one_line_messages(tmp_path, install_fake, error, status, message,
                                                  reason):
    errors = pytest.importorskip("huggingface_hub.errors")
    httpx = pytest.importorskip("httpx2")  # the HTTP library of the installed huggingface_hub
    request = httpx.Request("GET", "https://huggingface.co/api/models/org/name/revision/v2")
    response = httpx.Response(status, request=request)  # huggingface_hub's HTTP errors need one
    install_fake({}, error=getattr(errors, error)(message, response=response))
    with pytest.raises(HubError) as e:
        resolve_model("org/name", revision="v2")
    assert str(e.value) == (f"--model org/name: not in the local Hugging Face cache (looked in "
                            f"{default_cache(tmp_path)}) and the download failed: {reason}; fetch "
                            f"it with: {FETCH} --revision v2")


def test_no_connection_becomes_a_one_line_message(tmp_path, install_fake):
    errors = pytest.importorskip("huggingface_hub.errors")
    # What snapshot_download raises when it cannot reach the Hub and the files are not cached:
    # LocalEntryNotFoundError, from the network error it met.
    cause = ConnectionError("[Errno -3] Temporary failure in name resolution")
    error = errors.LocalEntryNotFoundError(f"Got: ConnectionError: {cause}\nAn error happened "
                                           "while trying to locate the files on the Hub")
    error.__cause__ = cause
    install_fake({}, error=error)
    with pytest.raises(HubError) as e:
        resolve_model("org/name")
    assert str(e.value) == (f"--model org/name: not in the local Hugging Face cache (looked in "
                            f"{default_cache(tmp_path)}) and the download failed: cannot reach "
                            "the Hub (ConnectionError: [Errno -3] Temporary failure in name "
                            f"resolution); fetch it with: {FETCH}")


def test_an_unreachable_hub_is_one_line_naming_the_model_and_the_fetch_command(tmp_path, install_fake):
    """No network at all: the HTTP library's own error, never a traceback."""
    httpx = pytest.importorskip("httpx2")
    install_fake({}, error=httpx.ConnectError("[Errno 101] Network is unreachable"))
    with pytest.raises(HubError) as e:
        resolve_model("org/name")
    assert str(e.value) == (f"--model org/name: not in the local Hugging Face cache (looked in "
                            f"{default_cache(tmp_path)}) and the download failed: cannot reach "
                            "the Hub (ConnectError: [Errno 101] Network is unreachable); fetch it "
                            f"with: {FETCH}")


def test_hub_requests_have_a_time_limit(tmp_path, install_fake):
    """huggingface_hub's client waits forever by default: a proxy that never answers would hang."""
    from huggingface_hub.utils import _http
    fake = install_fake(COMPLETE)
    resolve_model("org/name")
    assert fake.timeouts == [(hub.TIMEOUT, hub.TIMEOUT)]
    assert _http.get_session().timeout.read is None  # put back as it was, for the rest of the process


def test_without_huggingface_hub_the_message_says_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` fails
    with pytest.raises(HubError) as e:
        resolve_model("org/name")
    assert str(e.value) == (f"--model org/name: not in the local Hugging Face cache (looked in "
                            f"{default_cache(tmp_path)}) and huggingface_hub, which downloads it, is not "
                            f"installed; fetch it with: pip install huggingface_hub && {FETCH}")
    snapshot = add_snapshot(default_cache(tmp_path))
    assert resolve_model("org/name") == snapshot  # a model in the cache needs no huggingface_hub
