"""Every door (train.py, evaluate.py and its alias train.py --eval-only, generate.py) goes through one
gate: the same bad input gets the same refusal at every door, one line, exit 2, every file as it was.

The matrix crosses the doors with the classes of bad input (missing, wrong kind, wrong shape, non-finite,
too long, special file, symbolic link, not UTF-8): a new door added to DOORS inherits every case. Then a
test for each cause the gate closes, door by door."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import generate
import train
from conftest import QUICK, call, records, write_tasks
from plumbing import gate, run_folder
from plumbing.base import files
from plumbing.base.weights import load_safetensors, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "adapter/omoe_model.safetensors"


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory) -> Path:
    """A model, data, and a finished two-step run whose adapter the other doors read, made once."""
    root = tmp_path_factory.mktemp("doors")
    shutil.copytree(tiny_model_dir, root / "model")
    write_tasks(root / "data")
    assert call(train.main, ["--model", root / "model", "--data", root / "data", "--out", root / "run",
                             *QUICK]) == 0
    return root


@pytest.fixture
def tmp(world, tmp_path) -> Path:
    """A copy to break: tmp/model, tmp/data, tmp/adapter; tmp/out is where a door writes."""
    for name in ("model", "data"):
        shutil.copytree(world / name, tmp_path / name)
    shutil.copytree(world / "run" / "adapter", tmp_path / "adapter")
    (tmp_path / "outside").mkdir()
    return tmp_path


# Each door: its main, its name in messages, and its command on tmp/ (the base named, so that a broken
# tmp/model is the one read).
DOORS = {
    "train": (train.main, "train.py",
              lambda t: ["--model", t / "model", "--data", t / "data", "--out", t / "out", *QUICK]),
    "evaluate": (evaluate.main, "evaluate.py",
                 lambda t: ["--adapter", t / "adapter", "--model", t / "model", "--eval-data", t / "data",
                            "--out", t / "out", "--eval-limit", "2"]),
    "eval-only": (train.main, "train.py",
                  lambda t: ["--eval-only", "--adapter", t / "adapter", "--model", t / "model", "--eval-data",
                             t / "data", "--out", t / "out", "--eval-limit", "2"]),
    "generate": (generate.main, "generate.py",
                 lambda t: ["--adapter", t / "adapter", "--model", t / "model", "--max-new-tokens", "4",
                            "Is it?"]),
}
EVERY = tuple(DOORS)
READS_ADAPTERS = ("evaluate", "eval-only", "generate")
WRITES = ("train", "evaluate", "eval-only")


def config(**changes):
    def setup(tmp):
        path = tmp / "model" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return setup


def raw(path: str, content: bytes):
    def setup(tmp):
        (tmp / path).write_bytes(content)
    return setup


def fifo(path: str):
    def setup(tmp):
        (tmp / path).unlink()
        os.mkfifo(tmp / path)
    return setup


def adapter_weight(value):
    def setup(tmp):
        state = load_safetensors(tmp / ADAPTER)
        name = sorted(state)[0]
        state[name] = value(state[name])
        save_safetensors(state, tmp / ADAPTER)
    return setup


def lock_link(tmp):  # a link planted in --out where the lock goes: never written through
    (tmp / "out").mkdir()
    (tmp / "outside" / "target").write_text("someone else's file\n")
    os.symlink(tmp / "outside" / "target", tmp / "out" / ".omoe-lock")


def prompts_link(tmp):  # --file, a link to a FIFO: a read would wait forever
    os.mkfifo(tmp / "outside" / "pipe")
    os.symlink(tmp / "outside" / "pipe", tmp / "prompts.txt")


# (input class, what is broken, the doors that read it, setup, extra argv by door, the message)
CASES = [
    ("missing", "config.json", EVERY, lambda t: (t / "model" / "config.json").unlink(), {},
     "{tmp}/model: no config.json in this directory"),
    ("missing", "adapter weights", READS_ADAPTERS, lambda t: (t / ADAPTER).unlink(), {},
     "--adapter {tmp}/adapter: "),
    ("wrong kind", "config.json", EVERY, raw("model/config.json", b"[1, 2]"), {},
     "{tmp}/model/config.json: expected a JSON object of settings, found a JSON list"),
    ("wrong kind", "adapter config", READS_ADAPTERS,
     lambda t: (t / "adapter/adapter_config.json").write_text(json.dumps(
         {**json.loads((t / "adapter/adapter_config.json").read_text()), "rank": "2"})), {},
     "--adapter {tmp}/adapter: {tmp}/adapter/adapter_config.json: rank must be an integer >= 1, got '2'"),
    ("wrong kind", "adapter weights", READS_ADAPTERS, adapter_weight(lambda t: t.to(torch.int32)), {},
     "not a floating-point dtype"),
    ("wrong shape", "config.json", EVERY, config(vocab_size=4000), {},
     "{tmp}/model: tensor shapes do not match config.json: model.embed_tokens.weight"),
    ("wrong shape", "adapter weights", READS_ADAPTERS, adapter_weight(lambda t: torch.cat([t, t], -1)), {},
     "--adapter {tmp}/adapter: adapter weights do not fit this model; shape mismatch"),
    ("non-finite", "config.json", EVERY, config(rms_norm_eps=float("nan")), {},
     "{tmp}/model/config.json: rms_norm_eps=NaN must be a positive finite number"),
    ("non-finite", "adapter weights", READS_ADAPTERS,
     adapter_weight(lambda t: t.clone().fill_(float("nan"))), {}, "is not finite (it holds NaN or infinity)"),
    ("too long", "context", ("train",), config(max_position_embeddings=16), {},
     "--cutoff-len 512: training examples of up to"),
    ("too long", "context", ("evaluate", "eval-only"), config(max_position_embeddings=16), {},
     "evaluation data: task 'alpha' record 0 (test) needs"),
    ("too long", "context", ("generate",), config(max_position_embeddings=16), {},
     "prompt 1: "),
    ("too long", "answer", ("generate",), None, {"generate": ["--max-new-tokens", "100000"]},
     "--max-new-tokens 100000: no prompt fits beside it in max_position_embeddings"),
    ("special file", "config.json", EVERY, fifo("model/config.json"), {},
     "{tmp}/model/config.json: not a regular file"),
    ("special file", "adapter weights", READS_ADAPTERS, fifo(ADAPTER), {},
     "{tmp}/adapter/omoe_model.safetensors: not a regular file"),
    ("special file", "data", ("train", "evaluate", "eval-only"), fifo("data/alpha/test.json"), {},
     "{tmp}/data/alpha/test.json: not a regular file"),
    ("symbolic link", "--out's lock", WRITES, lock_link, {},
     "--out {tmp}/out: its lock {tmp}/out/.omoe-lock is a link, not a run's lock file"),
    ("symbolic link", "--file", ("generate",), prompts_link, {"generate": ["--file", "{tmp}/prompts.txt"]},
     "--file {tmp}/prompts.txt: not a regular file"),
    ("not UTF-8", "config.json", EVERY, raw("model/config.json", b'{"hidden_size": "\xff"}'), {},
     "{tmp}/model/config.json: 'utf-8' codec can't decode byte 0xff"),
    ("not UTF-8", "data", ("train", "evaluate", "eval-only"), raw("data/alpha/test.json", b"[\xff\xfe]"), {},
     "{tmp}/data/alpha/test.json: cannot read"),
    ("not UTF-8", "prompt", ("generate",), None, {"generate": ["caf\udce9"]},
     "prompt 2: not UTF-8 text (byte 0xe9 at character 3"),
]
MATRIX = {f"{cls}: {what} at {door}": (door, setup, more.get(door, []), message)
          for cls, what, doors, setup, more, message in CASES for door in doors}
CLASSES = ("missing", "wrong kind", "wrong shape", "non-finite", "too long", "special file", "symbolic link",
           "not UTF-8")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def refused(capsys, tmp: Path, door: str, argv: list, message: str) -> str:
    """Run `door`: exit 2, one line on stderr (nothing on stdout) naming `message`, no file changed."""
    main, prog, _ = DOORS[door]
    capsys.readouterr()
    before = snapshot(tmp)
    code = call(main, argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert message.format(tmp=tmp) in err, err
    assert out == "", out  # a refusal prints nothing before it
    assert snapshot(tmp) == before
    return err


def test_every_door_meets_every_class_of_bad_input():
    for door in DOORS:
        assert {cls for cls, _, doors, *_ in CASES if door in doors} == set(CLASSES), door


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input_is_refused_alike_at_every_door(tmp, capsys, case):
    door, setup, more, message = MATRIX[case]
    if setup is not None:
        setup(tmp)
    refused(capsys, tmp, door, [*DOORS[door][2](tmp), *(str(a).format(tmp=tmp) for a in more)], message)


# ── the causes, one by one ────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("argv, message", [
    (["--temperature", "1e-45"], "--temperature 1e-45: must be 0 (greedy) or a finite number of at least 0.001"),
    (["--seed", str(2**64)], f"--seed {2**64}: must be in [0, 2^64)"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
])
def test_generate_checks_its_numbers_as_train_does(tmp, capsys, argv, message):
    refused(capsys, tmp, "generate", [*DOORS["generate"][2](tmp), *argv], message)


def test_generate_refuses_an_adapter_of_another_model(tmp, capsys, tiny_model_dir):
    """An adapter of a wider model, or with an unknown target layer: one line, before any weight."""
    config = tmp / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "targets": ["w_in"]}))
    refused(capsys, tmp, "generate", DOORS["generate"][2](tmp), "target 'w_in' matches no nn.Linear")


def test_generate_refuses_a_tokenizer_larger_than_the_model(tmp, capsys):
    path = tmp / "model" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "vocab_size": 64}))
    refused(capsys, tmp, "generate", DOORS["generate"][2](tmp), "this tokenizer is not the model's")


def test_generate_refuses_a_latin1_line_on_standard_input(tmp):
    proc = subprocess.run([sys.executable, "generate.py", "--adapter", tmp / "adapter", "--model", tmp / "model",
                           "--max-new-tokens", "2"], input=b"caf\xe9\n", cwd=ROOT, capture_output=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8"))
    assert proc.returncode == 2 and proc.stderr.decode().count("\n") == 1, proc.stderr
    assert proc.stderr.decode().startswith("generate.py: error: standard input: not UTF-8 text (byte 0xe9")


def test_train_with_a_model_and_no_data_is_one_line(tmp, capsys):
    refused(capsys, tmp, "train", ["--model", tmp / "model", "--out", tmp / "out"],
            "--data is needed with --model")


def test_a_refusal_prints_nothing_before_it(tmp, capsys):
    """No "training without evaluation" before the data are found missing."""
    refused(capsys, tmp, "train", ["--model", tmp / "model", "--data", tmp / "wrld", "--out", tmp / "out"],
            "{tmp}/wrld: no such file or directory")


@pytest.mark.parametrize("door", READS_ADAPTERS)
def test_adapter_pointed_at_a_run_folder_suggests_its_adapter(world, tmp, capsys, door):
    argv = [a if a != tmp / "adapter" else world / "run" for a in DOORS[door][2](tmp)]
    refused(capsys, tmp, door, argv, f"--adapter {world / 'run'}: a run's folder, not its adapter folder; "
                                     f"did you mean {world / 'run' / 'adapter'}?")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "2e3"], "--lr 2000.0: must be at most 1 (AdamW would move every weight by about the learning rate "
                      "at each step); did you mean 2e-3?"),
    (["--lr", "1e38"], "--lr 1e+38: must be at most 1"),
    (["--alpha", "1e39"], "--alpha 1e+39: outside what float32 training can hold"),
    (["--lr", "1e-45"], "--lr 1e-45: outside what float32 training can hold"),
    (["--lr", "0.5", "--weight-decay", "2"], "--weight-decay 2.0 with --lr 0.5: each step would multiply the "
                                             "adapters' weights by 1 - lr x weight_decay = 0"),
])
def test_numbers_are_checked_against_float32_training(tmp, capsys, argv, message):
    refused(capsys, tmp, "train", [*DOORS["train"][2](tmp), *argv], message)


# ── evaluation: its own door, the adapter's base, the lock and its file ──────────────────────────

def test_evaluate_takes_the_base_the_adapters_record_from_another_folder(world, tmp, capsys, monkeypatch):
    """No --model: the adapter's record names the base, resolved, so it works from any folder; the
    alias and evaluate.py give the same results."""
    monkeypatch.chdir(tmp / "outside")
    common = ["--adapter", world / "run" / "adapter", "--eval-data", world / "data", "--eval-limit", "2"]
    assert call(evaluate.main, [*common, "--out", tmp / "a"]) == 0
    assert call(train.main, ["--eval-only", *common, "--out", tmp / "b"]) == 0
    a, b = (json.loads((tmp / o / "eval-data.json").read_text()) for o in ("a", "b"))
    assert a["after"] == b["after"] == json.loads((world / "run" / "results.json").read_text())["after"]
    assert a["base"]["base_model_name_or_path"] == str((world / "model").resolve())


def test_two_evaluations_into_one_out_the_second_refuses(world, tmp, capsys):
    argv = ["--adapter", world / "run" / "adapter", "--eval-data", world / "data", "--out", tmp / "out",
            "--eval-limit", "2"]
    assert call(evaluate.main, argv) == 0
    refused(capsys, tmp, "evaluate", argv, "holds eval-data.json from an earlier evaluation")


def test_an_evaluation_into_a_folder_in_use_is_refused(world, tmp, capsys):
    (tmp / "out").mkdir()
    held = run_folder.Lock(tmp / "out").acquire()  # this process, alive: the folder is in use
    try:
        refused(capsys, tmp, "evaluate", DOORS["evaluate"][2](tmp), f"--out {tmp / 'out'} is in use by another run")
    finally:
        held.release()


def test_the_result_file_is_created_exclusively(tmp, monkeypatch):
    """Another evaluation that writes the same file between the check and the write: refused, and its
    file kept as it was."""
    real = gate.load_evaluation

    def racing(args, env):
        inputs = real(args, env)
        inputs.results.write_text("the other evaluation's\n")
        return inputs
    monkeypatch.setattr(gate, "load_evaluation", racing)
    assert call(evaluate.main, DOORS["evaluate"][2](tmp)) == 2
    assert (tmp / "out" / "eval-data.json").read_text() == "the other evaluation's\n"


# ── one identity ────────────────────────────────────────────────────────────────────────────────

def test_the_embedded_model_is_recorded_by_name(tmp_path):
    assert call(train.main, ["--out", tmp_path / "run", "--max-steps", "1", "--train-limit", "16",
                             "--eval-limit", "1", "--skip-base-eval"]) == 0
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "assets/tiny-llama"
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert config["identity"] == checkpoint["identity"] and set(config["identity"]) == {
        "base", "tokenizer", "data", "evaluation"}
    assert gate.recorded_base({"base_model": "assets/tiny-llama"}) == str(ROOT / "assets" / "tiny-llama")
    # evaluate.py with no --model and no --eval-data: the embedded model, on its own tasks
    assert call(evaluate.main, ["--adapter", tmp_path / "run" / "adapter", "--out", tmp_path / "run",
                                "--eval-limit", "1"]) == 0
    assert set(json.loads((tmp_path / "run" / "eval-world.json").read_text())["after"]) == set(
        json.loads((tmp_path / "run" / "results.json").read_text())["after"])


def test_resume_refuses_another_tokenizer(world, tmp, capsys):
    shutil.copytree(world / "run", tmp / "out")
    (tmp / "tok").mkdir()
    shutil.copy(tmp / "model" / "tokenizer.model", tmp / "tok" / "tokenizer.model")
    refused(capsys, tmp, "train", [*DOORS["train"][2](tmp), "--resume", "--tokenizer", tmp / "tok"],
            f"--tokenizer was None, now '{tmp / 'tok'}'")


def test_resume_refuses_another_base(world, tmp, capsys):
    """Another config of the base: the identity's fingerprint of the base tells them apart."""
    shutil.copytree(world / "run", tmp / "out")
    path = tmp / "model" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rms_norm_eps": 1e-5}))
    refused(capsys, tmp, "train", ["--model", tmp / "model", "--data", world / "data", "--out", tmp / "out",
                                   *QUICK, "--resume"],
            f"the base model's config or weight files differ from {(world / 'model').resolve()}'s")


def test_resuming_a_finished_run_changes_nothing(world, tmp, capsys):
    shutil.copytree(world / "run", tmp / "out")
    before = snapshot(tmp / "out")
    argv = ["--model", world / "model", "--data", world / "data", "--out", tmp / "out", *QUICK, "--resume"]
    assert call(train.main, argv) == 0
    assert "holds a complete run (step 2 of 2, and its results.json): nothing to resume" in capsys.readouterr().out
    assert snapshot(tmp / "out") == before


def test_resume_with_a_test_task_added_evaluates_the_base_again(world, tmp, capsys):
    """The checkpoint's evaluation before training was on other examples: it is made again, not trusted."""
    shutil.copytree(world / "run", tmp / "out")
    (tmp / "out" / "results.json").unlink()  # stopped after its last checkpoint
    (tmp / "data" / "gamma").mkdir()
    (tmp / "data" / "gamma" / "test.json").write_text(json.dumps(records(4, "answer", seed=3)))
    argv = ["--model", world / "model", "--data", world / "data", "--eval-data", tmp / "data", "--out",
            tmp / "out", *[a for a in QUICK if a != "--skip-base-eval"], "--resume"]
    assert call(train.main, argv) == 0, capsys.readouterr().err
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert set(results["before"]) == set(results["after"]) == {"alpha", "beta", "gamma"}


# ── files: one way to create them ────────────────────────────────────────────────────────────────

def test_planted_links_in_out_are_never_written_through(world, tmp, capsys):
    """A shared runs folder: the list of files and the result file planted as links to someone else's
    files. The evaluation writes its own files in --out, and the targets stay as they were."""
    (tmp / "out").mkdir()
    for name in (".omoe-files", "eval-data.json"):
        (tmp / "outside" / name).write_text("someone else's\n")
        os.symlink(tmp / "outside" / name, tmp / "out" / name)
    refused(capsys, tmp, "evaluate", DOORS["evaluate"][2](tmp), "holds eval-data.json from an earlier evaluation")
    (tmp / "out" / "eval-data.json").unlink()
    assert call(evaluate.main, DOORS["evaluate"][2](tmp)) == 0
    assert all((tmp / "outside" / n).read_text() == "someone else's\n" for n in (".omoe-files", "eval-data.json"))
    assert not (tmp / "out" / ".omoe-files").is_symlink()


def test_the_adapter_folder_follows_the_umask(world):
    mode = (world / "run" / "adapter").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


def test_a_revision_is_a_name_never_a_path(tmp, capsys):
    secret = tmp / "outside" / "secret"
    secret.write_text("a token\n")
    err = refused(capsys, tmp, "generate", [*DOORS["generate"][2](tmp), "--revision", secret],
                  f"--revision '{secret}': not a branch, tag or commit name")
    assert "a token" not in err


# ── the lock ────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("kind", ["folder", "fifo", "large pid"])
def test_a_lock_that_is_not_ours_is_refused_in_one_line(tmp, capsys, kind):
    (tmp / "out").mkdir()
    lock = tmp / "out" / ".omoe-lock"
    if kind == "folder":
        lock.mkdir()
        message = "is a folder, not a run's lock file"
    elif kind == "fifo":
        os.mkfifo(lock)
        message = "is a FIFO, device or socket, not a run's lock file"
    else:  # a pid too large for C: no process has it; an old lock is stale and taken over
        lock.write_text(json.dumps({"pid": 2**70, "host": "here"}))
        os.utime(lock, (0, 0))
        assert call(train.main, DOORS["train"][2](tmp)) == 0
        return
    refused(capsys, tmp, "train", DOORS["train"][2](tmp), message)


# ── checks in the right place ────────────────────────────────────────────────────────────────────

def test_the_length_check_is_per_file(tmp, capsys):
    """A too-long test record beside a val.json of the same task is not hidden by it."""
    (tmp / "data" / "alpha" / "val.json").write_text((tmp / "data" / "alpha" / "test.json").read_text())
    test = json.loads((tmp / "data" / "alpha" / "test.json").read_text())
    test[1]["instruction"] = "word " * 600 + test[1]["instruction"]
    (tmp / "data" / "alpha" / "test.json").write_text(json.dumps(test))
    refused(capsys, tmp, "train", DOORS["train"][2](tmp), "evaluation data: task 'alpha' record 1 (test) needs")


def test_a_diverged_loss_names_no_checkpoint_as_good_that_gave_it(tmp, capsys, monkeypatch):
    real = train.loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        return real(logits, labels) * (float("nan") if calls["n"] > 4 else 1.0)  # step 3
    monkeypatch.setattr(train, "loss_sum", poisoned)
    assert call(train.main, [*DOORS["train"][2](tmp)[:-4], "--max-steps", "4", "--save-every", "1"]) == 1
    err = capsys.readouterr().err
    assert f"step 3: the loss is nan; stopping. {tmp / 'out' / 'checkpoint.pt'} holds step 2, whose weights " \
           "gave this loss" in err and "good" not in err


def test_a_unigram_tokenizer_without_an_unknown_token_is_refused(tmp, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = [("<s>", 0.0), ("</s>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz ▁"]
    tk = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=None))
    tk.save(str(tmp / "tokenizer.json"))
    refused(capsys, tmp, "train", [*DOORS["train"][2](tmp), "--tokenizer", tmp / "tokenizer.json"],
            f"{tmp / 'tokenizer.json'}: its Unigram model's unknown token None is not in its vocabulary")


def test_the_base_is_recorded_so_that_it_is_found_from_anywhere(tmp_path, monkeypatch):
    """A hub id with the commit found (not "main", which moves), a folder resolved (not as typed)."""
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert gate.base_record("org/name", None, snapshot) == {"base_model_name_or_path": "org/name",
                                                            "revision": "a" * 40}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama").mkdir()
    assert gate.base_record("./llama", None, Path("./llama")) == {
        "base_model_name_or_path": str((tmp_path / "llama").resolve()), "revision": None}


def test_a_file_created_exclusively_without_hard_links(tmp_path, monkeypatch):
    """A file system without hard links: the name is claimed exclusively, then the file moved over it."""
    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(files.os, "link", no_links)
    files.write_file(tmp_path / "a.json", lambda f: f.write(b"1"), replace=False)
    assert (tmp_path / "a.json").read_bytes() == b"1"
    with pytest.raises(FileExistsError):
        files.write_file(tmp_path / "a.json", lambda f: f.write(b"2"), replace=False)
    assert (tmp_path / "a.json").read_bytes() == b"1" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_planted_fifo_is_never_read_as_the_folders_list_or_log(world, tmp, capsys):
    """A FIFO would make a read wait forever: the list of files is then none of ours, and a log that
    is not a file is refused before a resume cuts it back."""
    (tmp / "out").mkdir()
    os.mkfifo(tmp / "out" / ".omoe-files")
    assert call(evaluate.main, DOORS["evaluate"][2](tmp)) == 0
    shutil.copytree(world / "run", tmp / "again")
    (tmp / "again" / "log.jsonl").unlink()
    os.mkfifo(tmp / "again" / "log.jsonl")
    refused(capsys, tmp, "train", ["--model", world / "model", "--data", world / "data", "--out", tmp / "again",
                                   *QUICK, "--resume"], f"{tmp / 'again' / 'log.jsonl'}: not a regular file")
