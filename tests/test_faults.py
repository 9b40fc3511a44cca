"""Round 3 of "nothing lost, nothing silently wrong": the classes of fault tests/test_bad_inputs.py did not
name. A run owns its folder (a lock; --overwrite deletes only what the project wrote, after every check, never
among the inputs); every file read is checked (adapter configs key by key, weights for duplicate names and
non-finite values, one data layout per folder, evaluation data before training); faults of the operating
system are one line (a full disk while logging, names too long, a closed pipe, SIGTERM); resume is about the
run, not the text of its command line; nothing hangs (launcher variables without a launcher, FIFOs).

Every refusal: its exit code, one line on stderr naming the culprit, and the files as they were."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import QUICK, call, write_tasks
from plumbing import run_folder
from plumbing.base import files
from plumbing.base.weights import load_safetensors, save_safetensors

ROOT = Path(__file__).resolve().parents[1]


def main(argv) -> int:
    return call(train.main, argv)


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(tiny_model_dir, root / "model")
    write_tasks(root / "data")
    assert main(["--model", root / "model", "--data", root / "data", "--out", root / "run", *QUICK]) == 0
    return root


@pytest.fixture
def tmp(world, tmp_path) -> Path:
    """A copy of the world to break: tmp/model, tmp/data, tmp/run (a finished run)."""
    for name in ("model", "data", "run"):
        shutil.copytree(world / name, tmp_path / name, symlinks=True)
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def refused(capsys, tmp: Path, argv, message: str, code: int = 2) -> str:
    """Run train.py; it must exit with `code`, say one line containing `message`, and change no file."""
    capsys.readouterr()
    before = snapshot(tmp)
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and message in err, err
    assert snapshot(tmp) == before
    return err


def train_argv(tmp: Path, out="out", *more):
    return ["--model", tmp / "model", "--data", tmp / "data", "--out", tmp / out, *QUICK, *more]


# ── A run owns its folder ───────────────────────────────────────────────────────────────────────

def test_a_second_run_into_a_folder_in_use_is_refused(tmp, capsys):
    held = run_folder.Lock(tmp / "run").acquire()  # this process, alive: the folder is in use
    try:
        refused(capsys, tmp, train_argv(tmp, "run", "--overwrite"),
                f"--out {tmp / 'run'} is in use by another run (pid {os.getpid()} on ")
    finally:
        held.release()


def test_a_stale_lock_is_taken_over(tmp, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp / "fresh").mkdir()
    (tmp / "fresh" / run_folder.LOCK).write_text(json.dumps({"pid": int(gone.stdout), "host": os.uname().nodename}))
    assert main(train_argv(tmp, "fresh")) == 0
    assert not (tmp / "fresh" / run_folder.LOCK).exists()  # released at the end


def test_two_runs_started_together_one_runs_one_is_refused(tmp):
    argv = [sys.executable, "train.py", *map(str, train_argv(tmp, "both")), "--max-steps", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)[1]
    assert loser.count("\n") == 1 and f"--out {tmp / 'both'} " in loser
    log = [json.loads(line) for line in (tmp / "both" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3]  # one run's log, not two interleaved


def test_overwrite_checks_the_adapters_memory_before_deleting(tmp, capsys):
    """A --rank whose adapters and AdamW state cannot fit: refused, the old run intact."""
    err = refused(capsys, tmp, train_argv(tmp, "run", "--overwrite", "--rank", 10**8),
                  f"{tmp / 'model' / 'config.json'}: the model it describes has ")
    assert "GiB for the adapters and their optimizer state, more than the " in err


@pytest.mark.parametrize("where, flag", [("data", "--data"), ("model", "--model"), ("data/alpha", "--data"),
                                         (".", "--model")])
def test_overwrite_never_deletes_among_the_inputs(tmp, capsys, where, flag):
    relation = {"data": "is", "model": "is", "data/alpha": "lies inside", ".": "holds"}[where]
    refused(capsys, tmp, ["--model", tmp / "model", "--data", tmp / "data", "--out", tmp / where, *QUICK,
                          "--overwrite"],
            f"--overwrite: --out {tmp / where} {relation} {flag} ")


def test_overwrite_deletes_only_what_the_project_wrote(tmp):
    (tmp / "run" / "notes.txt").write_text("mine")
    (tmp / "run" / "plots").mkdir()
    (tmp / "run" / "plots" / "a.png").write_bytes(b"png")
    assert main(train_argv(tmp, "run", "--overwrite", "--seed", "1")) == 0
    assert (tmp / "run" / "notes.txt").read_text() == "mine" and (tmp / "run" / "plots" / "a.png").exists()
    assert json.loads((tmp / "run" / "results.json").read_text())["config"]["seed"] == 1


def test_overwrite_removes_a_linked_adapter_folder_not_its_target(tmp):
    target = tmp / "elsewhere"
    shutil.move(tmp / "run" / "adapter", target)
    (tmp / "run" / "adapter").symlink_to(target)
    kept = snapshot(target)
    assert main(train_argv(tmp, "run", "--overwrite")) == 0
    assert snapshot(target) == kept and not (tmp / "run" / "adapter").is_symlink()
    assert (tmp / "run" / "adapter" / "omoe_model.safetensors").is_file()


# ── Every file read is checked ─────────────────────────────────────────────────────────────────

def set_weight(tmp, change):
    path = tmp / "model" / "model.safetensors"
    state = load_safetensors(path)
    change(state)
    save_safetensors(state, path)


def test_non_finite_base_weights_are_refused_at_load(tmp, capsys):
    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    set_weight(tmp, poison)
    refused(capsys, tmp, train_argv(tmp),
            f"{tmp / 'model' / 'model.safetensors'}: tensor 'model.layers.1.mlp.up_proj.weight' holds NaN or "
            f"infinity")


def test_two_names_for_one_weight_are_refused(tmp, capsys):
    def duplicate(state):
        state["layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].clone()
    set_weight(tmp, duplicate)
    refused(capsys, tmp, train_argv(tmp),
            "tensors 'model.layers.0.mlp.up_proj.weight' and 'layers.0.mlp.up_proj.weight' are two names for one "
            "weight")


ADAPTER_CASES = {
    "alpha NaN": ({"alpha": float("nan")}, "alpha must be a finite number > 0, got nan"),
    "alpha 0": ({"alpha": 0}, "alpha must be a finite number > 0, got 0"),
    "rank a string": ({"rank": "2"}, "rank must be an integer >= 1, got '2'"),
    "rank true": ({"rank": True}, "rank must be an integer >= 1, got True"),
    "targets of numbers": ({"targets": [5]}, "targets must be a list of layer names, got [5]"),
    "targets a string": ({"targets": "q_proj"}, "targets must be a list of layer names, got 'q_proj'"),
    "a device": ({"device": "meta"}, "unknown key 'device'"),
    "dropout a string": ({"dropout": "0.1"}, "dropout must be a number in [0, 1), got '0.1'"),
    "orth unknown": ({"orth": "qr"}, "orth must be one of 'orthonormal', 'orthogonal', 'normalized', 'none'"),
    "top_k above experts": ({"top_k": 9}, "top_k must be None (soft routing) or an integer in 1..experts=2"),
    "format 1.0": ({"format_version": 1.0}, "format_version 1.0 is not 1"),
    "base model a number": ({"base_model_name_or_path": 3}, "base_model_name_or_path must be a path or null"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_adapter_config_is_checked_key_by_key(tmp, capsys, case):
    change, message = ADAPTER_CASES[case]
    path = tmp / "run" / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    refused(capsys, tmp, ["--model", tmp / "model", "--eval-data", tmp / "data", "--eval-only", "--adapter",
                          tmp / "run" / "adapter", "--out", tmp / "eval", "--eval-limit", "2"],
            f"--adapter {tmp / 'run' / 'adapter'}: {path}: {message}")


def test_a_data_folder_of_two_layouts_is_refused(tmp, capsys):
    shutil.copy(tmp / "data" / "alpha" / "train.json", tmp / "data" / "train.json")
    refused(capsys, tmp, train_argv(tmp),
            f"{tmp / 'data'}: holds both train.json and task folders with one ({tmp / 'data' / 'alpha' / 'train.json'}"
            f", ...); keep one layout per folder")


def test_evaluation_data_are_checked_before_training(tmp, capsys):
    path = tmp / "data" / "beta" / "test.json"
    rows = json.loads(path.read_text())
    rows[2]["answer"] = ""
    path.write_text(json.dumps(rows))
    refused(capsys, tmp, train_argv(tmp), f"{path}: record 2: answer '' is not among its candidates")
    assert not (tmp / "out" / "checkpoint.pt").exists()


def test_a_lone_surrogate_in_the_data_is_refused(tmp, capsys):
    path = tmp / "data" / "alpha" / "train.json"
    path.write_text(path.read_text().replace("Please choose", "Please \\ud800choose", 1))
    refused(capsys, tmp, train_argv(tmp), f"{path}: record 0: 'instruction' holds a lone surrogate")


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": "1e4"}, 'rope_theta="1e4" must be a positive finite number'),
    ({"rope_theta": 10 ** 400}, "rope_theta=1000000000000"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, 'rope_scaling: factor="2" must be a positive finite'),
    ({"rope_scaling": {"rope_type": "linear", "factor": 10 ** 400}}, "rope_scaling: factor=1000000000000"),
    ({"rope_scaling": {"rope_type": ["linear"], "factor": 2}}, "rope_scaling of type ['linear'] is not supported"),
])
def test_rope_settings_of_the_wrong_kind_are_one_line(tmp, capsys, change, message):
    path = tmp / "model" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    refused(capsys, tmp, train_argv(tmp), f"{path}: {message}")


def test_a_wordlevel_tokenizer_without_an_unknown_token_is_refused(tmp, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(300)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    (tmp / "model" / "tokenizer.model").unlink()
    tk.save(str(tmp / "model" / "tokenizer.json"))
    refused(capsys, tmp, train_argv(tmp),
            f"{tmp / 'model' / 'tokenizer.json'}: its WordLevel model's unknown token '<unk>' is not in its vocabulary")


# ── Faults of the operating system: one line, what was there kept ─────────────────────────────

def test_a_full_disk_while_appending_to_the_log(tmp, capsys, monkeypatch):
    real = files.append_line

    def full(path, line):
        if str(path).endswith("log.jsonl"):
            raise OSError(28, "No space left on device")
        return real(path, line)
    monkeypatch.setattr(files, "append_line", full)
    assert main(train_argv(tmp, "full")) == 1
    err = capsys.readouterr().err.strip().splitlines()  # after the progress bar's lines
    assert err[-1] == (f"train.py: error: could not append to {tmp / 'full' / 'log.jsonl'} (No space left on "
                       f"device); the lines written before are kept") and "Traceback" not in "".join(err)


def test_a_name_longer_than_the_file_system_allows(tmp, capsys):
    refused(capsys, tmp, train_argv(tmp, "x" * 300), f"--out {tmp / ('x' * 300)}: cannot use it (File name too long)")


def test_standard_output_closed_by_its_reader(tmp):
    """`python train.py | head -1`: the reader exits after a line; the run stops, saying so on stderr."""
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, train_argv(tmp, "piped", "--max-steps", "50"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    lines = [line for line in err.splitlines() if "error" in line or "Traceback" in line]
    assert lines == [f"train.py: error: standard output was closed (its reader exited); stopped; the last "
                     f"checkpoint written is {tmp / 'piped' / 'checkpoint.pt'}" + (" (none written yet)" if not
                     (tmp / "piped" / "checkpoint.pt").exists() else "")], err


def test_sigterm_saves_and_says_how_to_resume(tmp):
    out = tmp / "term"
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, train_argv(tmp, "term", "--max-steps", "100000",
                                                                              "--save-every", "100000"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"stopped after step {step} (SIGTERM); checkpoint saved to {out / 'checkpoint.pt'}, which holds step " \
           f"{step}. Continue with the same command and --resume." in stdout


# ── Resume is about the run, not the text ───────────────────────────────────────────────────────

def test_resume_with_the_model_named_by_another_path(world, tmp, monkeypatch):
    shutil.copytree(world / "run", tmp / "again")  # made with world/model and world/data
    monkeypatch.chdir(world)
    assert main(["--model", "model", "--data", "./data", "--out", tmp / "again", *QUICK, "--max-steps", 3,
                 "--resume"]) == 2  # --max-steps differs: the run is another one
    assert main(["--model", Path("model"), "--data", "data/../data", "--out", tmp / "again", *QUICK, "--resume"]) == 0


def test_resume_a_checkpoint_of_an_earlier_version(tmp):
    """Made before --lora-targets and --val-fraction existed, and when one expert "orthonormal" meant plain LoRA:
    it resumes, since those flags' defaults (and the meaning kept) reproduce it."""
    shutil.rmtree(tmp / "run")
    assert main(train_argv(tmp, "old", "--lora", "--max-steps", "3", "--save-every", "2")) == 0
    path = tmp / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    old = {k: v for k, v in ckpt["args"].items() if k not in ("lora_targets", "val_fraction")}
    ckpt = {**ckpt, "args": {**old, "orth": "orthonormal"}, "step": 2}
    ckpt.pop("format")
    ckpt.pop("loss_window")
    ckpt["checksums"] = run_folder.checksums(ckpt)
    torch.save(ckpt, path)
    assert main(train_argv(tmp, "old", "--lora", "--max-steps", "3", "--save-every", "2", "--resume")) == 0


def test_a_malformed_log_is_cut_back_on_resume(world, tmp):
    shutil.copytree(world / "run", tmp / "again")
    (tmp / "again" / "results.json").unlink()  # stopped after its last checkpoint, before its results
    with open(tmp / "again" / "log.jsonl", "a") as f:
        f.write('{"step": "three", "loss": 1}\n{"step": 3}\n')
    assert main(["--model", world / "model", "--data", world / "data", "--out", tmp / "again", *QUICK,
                 "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp / "again" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ── Nothing hangs ─────────────────────────────────────────────────────────────────────────────

def test_launcher_variables_without_a_launcher_are_refused_at_once(tmp):
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555",
               OMP_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.run([sys.executable, "train.py", *map(str, train_argv(tmp))], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and time.time() - start < 60, proc.stderr
    assert proc.stderr.count("\n") == 1 and "RANK and WORLD_SIZE are set, but this process was not started by " \
                                               "torchrun" in proc.stderr


@pytest.mark.parametrize("where", ["data/alpha/train.json", "data/beta/test.json", "model/config.json"])
def test_a_fifo_where_a_file_should_be_is_refused(tmp, capsys, where):
    (tmp / where).unlink()
    os.mkfifo(tmp / where)
    refused(capsys, tmp, train_argv(tmp), f"{tmp / where}: not a regular file")

