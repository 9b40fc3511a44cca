"""Bad input, run as a user would run it: each case goes through train.main and must end with the promised
exit code, one line on stderr naming the flag, file, key or record, and every file that was on disk
before still there, unchanged. Then the faults: a full disk, Ctrl-C in each phase, kill -9 while saving."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plumbing import run_folder
import data
import train
from conftest import QUICK, Payload, call, write_tasks
from plumbing.base.weights import load_safetensors, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
def main(argv) -> int:
    """train.main as the shell sees it: argparse's refusals are SystemExit(2)."""
    return call(train.main, argv)


@pytest.fixture(scope="session")
def world(tiny_model_dir, tmp_path_factory) -> Path:
    """A model, data, and a finished two-step run (checkpoint, log, adapter, results), made once."""
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_model_dir, root / "model")
    write_tasks(root / "data")
    assert main(["--model", root / "model", "--data", root / "data", "--out", root / "run", *QUICK]) == 0
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ── the cases ────────────────────────────────────────────────────────────────────────────────────
# Each: (argv after the base command, setup(tmp) that breaks something, the message, the base command).
# "train": train on tmp/model and tmp/data into tmp/out. "resume": continue the finished run, copied to
# tmp/out. "eval": --eval-only with the finished run's adapter, copied to tmp/adapter.

def edit(path: str, change):
    def setup(tmp):
        p = tmp / path
        p.write_text(json.dumps(change(json.loads(p.read_text()))))
    return setup


def text(path: str, content):
    def setup(tmp):
        (tmp / path).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def config(**changes):
    return edit("model/config.json", lambda d: {k: v for k, v in (d | changes).items() if v is not ...})


def int_weight(tmp):
    state = load_safetensors(tmp / "model" / "model.safetensors")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.int32)
    save_safetensors(state, tmp / "model" / "model.safetensors")


def unsafe_bin(tmp):
    state = load_safetensors(tmp / "model" / "model.safetensors")
    (tmp / "model" / "model.safetensors").unlink()
    torch.save({**state, "evil": Payload(str(tmp / "mark"))}, tmp / "model" / "pytorch_model.bin")


def truncate(path: str, keep: float):
    def setup(tmp):
        raw = (tmp / path).read_bytes()
        (tmp / path).write_bytes(raw[:int(len(raw) * keep)])
    return setup


def flip_tensor_byte(path: str, tensor_of):
    """Flip one bit in the stored bytes of a tensor (found in the file by its contents)."""
    def setup(tmp):
        raw = bytearray((tmp / path).read_bytes())
        at = raw.find(tensor_of(tmp).contiguous().view(torch.uint8).numpy().tobytes())
        assert at >= 0
        raw[at + 3] ^= 0x10
        (tmp / path).write_bytes(bytes(raw))
    return setup


ADAPTER = "adapter/omoe_model.safetensors"


def adapter_state(change):
    def setup(tmp):
        state = load_safetensors(tmp / ADAPTER)
        change(state)
        save_safetensors(state, tmp / ADAPTER)
    return setup


def first(state):
    return sorted(state)[0]


def edit_checkpoint(change):
    def setup(tmp):
        ckpt = torch.load(tmp / "out" / "checkpoint.pt", weights_only=True)
        torch.save(change(ckpt, tmp), tmp / "out" / "checkpoint.pt")
    return setup


def generate_prompt_too_long(tmp):
    """max_position_embeddings that holds every training example but not a test prompt + 32 new tokens."""
    tok = data.Tokenizer(tmp / "model" / "tokenizer.model")
    prompts = [len(tok.encode(data.prompt(ex))) for t in data.load_tasks(tmp / "data", "test").values()
               for ex in t[:2]]
    train_items, _ = data.encode_for_training(
        tok, [ex for t in data.load_tasks(tmp / "data", "train").values() for ex in t], 512)
    limit = max(prompts) + data.MAX_NEW_TOKENS - 1
    assert max(len(it["input_ids"]) for it in train_items) <= limit
    config(max_position_embeddings=limit)(tmp)


def answer_too_long(tmp):
    """max_position_embeddings one token short of the longest test prompt with its longest answer."""
    tok = data.Tokenizer(tmp / "model" / "tokenizer.model")
    longest = max(len(data.encode_pair(tok, data.prompt(ex), data.response_for(c))[0])
                  for t in data.load_tasks(tmp / "data", "test").values() for ex in t[:2] for c in ex.candidates)
    config(max_position_embeddings=longest - 1)(tmp)


def changed_data_run(tmp):
    """A finished run on tmp/data, after which one training record changes."""
    shutil.rmtree(tmp / "out")
    assert main(["--model", tmp / "model", "--data", tmp / "data", "--out", tmp / "out", *QUICK]) == 0
    edit("data/alpha/train.json", lambda d: [{**d[0], "output": d[0]["output"] + "."}, *d[1:]])(tmp)


def nested(depth=100_000):
    return "[" * depth + "]" * depth


def deeply_nested(tmp):
    """A checkpoint whose "before" is 5000 dicts deep (saving it needs a raised recursion limit)."""
    ckpt = torch.load(tmp / "out" / "checkpoint.pt", weights_only=True)
    for _ in range(5000):
        ckpt["before"] = {"task": ckpt["before"]}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        torch.save(ckpt, tmp / "out" / "checkpoint.pt")
    finally:
        sys.setrecursionlimit(limit)


def copy_run_files(*names):
    def setup(tmp):
        (tmp / "out").mkdir()
        for name in names:
            shutil.copy(tmp.parent / "_run" / name, tmp / "out" / name)
    return setup


FLAGS = [
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be a finite number >= 0"),
    (["--grad-clip", "nan"], "--grad-clip nan: must be a finite number >= 0"),
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--max-steps", "-5"], "--max-steps -5: must be at least 1"),
    (["--max-steps", "two"], "argument --max-steps: invalid int value: 'two'"),
    (["--epochs", "0"], "--epochs 0.0: must be a finite number > 0"),
    (["--epochs", "inf"], "--epochs inf: must be a finite number > 0"),
    (["--warmup", "-1"], "--warmup -1: must be at least 0"),
    (["--eval-every", "-2"], "--eval-every -2: must be at least 0"),
    (["--eval-limit", "0"], "--eval-limit 0: must be at least 1"),
    (["--eval-limit", "-1"], "--eval-limit -1: must be at least 1"),
    (["--train-limit", "0"], "--train-limit 0: must be at least 1"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0: must be at least 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--micro-batch-size", "3"], "--batch-size 4 is not a multiple of --micro-batch-size 3"),
    (["--save-every", "0"], "--save-every 0: must be at least 1"),
    (["--log-every", "0"], "--log-every 0: must be at least 1"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--lr", "-0.001"], "--lr -0.001: must be a finite number > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be a finite number >= 0"),
    (["--alpha", "0"], "--alpha 0.0: must be a finite number > 0"),
    (["--alpha", "nan"], "--alpha nan: must be a finite number > 0"),
    (["--dropout", "1"], "--dropout 1.0: must be below 1"),
    (["--dropout", "-0.1"], "--dropout -0.1: must be a finite number >= 0"),
    (["--cutoff-len", "2"], "--cutoff-len 2: must be at least 3"),
    (["--rank", "0"], "--rank 0: must be at least 1"),
    (["--experts", "0"], "--experts 0: must be at least 1"),
    (["--top-k", "3"], "--top-k 3 must be between 1 and --experts 2"),
    (["--top-k", "0"], "--top-k 0: must be at least 1"),
    (["--aux-loss-coef", "0.01"], "--aux-loss-coef 0.01: the load-balancing loss needs top-k routing"),
    (["--aux-loss-coef", "-1", "--top-k", "1"], "--aux-loss-coef -1.0: must be a finite number >= 0"),
    (["--seed", "-1"], "--seed -1: must be in [0, 2^64)"),
    (["--targets", ","], "--targets '': names no layer"),
    (["--targets", "q_proj,qproj"], "target 'qproj' matches no nn.Linear in the model"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--adapter", "{tmp}/adapter"], "--adapter is only used with --eval-only"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
]

CASES = {f"flag {' '.join(argv)}": (argv, None, message, "train") for argv, message in FLAGS} | {
    # data
    "data: malformed JSON": ([], text("data/alpha/train.json", "[{,]"),
                             "{tmp}/data/alpha/train.json: invalid JSON at line 1 column 3"),
    "data: nested too deeply": ([], text("data/alpha/train.json", nested()),
                                "{tmp}/data/alpha/train.json: JSON nested too deeply"),
    "data: an object, not a list": ([], text("data/alpha/train.json", "{}"),
                                    "{tmp}/data/alpha/train.json: expected a JSON list of records, found an object"),
    "data: a record is a number": ([], text("data/beta/train.json", "[1]"),
                                   "{tmp}/data/beta/train.json: record 0 is a number"),
    "data: no output": ([], edit("data/alpha/train.json", lambda d: [d[0], {**d[1], "output": None}]),
                        "{tmp}/data/alpha/train.json: record 1 has no 'output' string"),
    "data: empty": ([], text("data/alpha/train.json", "[]"), "{tmp}/data/alpha/train.json: no records"),
    "data: not UTF-8": ([], text("data/alpha/train.json", b"[\xff\xfe]"), "{tmp}/data/alpha/train.json: cannot read"),
    "data: no such path": (["--data", "{tmp}/nowhere"], None, "{tmp}/nowhere: no such file or directory"),
    "data: answer not a candidate": ([], edit("data/alpha/test.json", lambda d: [{**d[0], "answer": "answer9"}]),
                                     "{tmp}/data/alpha/test.json: record 0: answer 'answer9' is not among"),
    "data: test without answer format": (
        [], edit("data/beta/test.json", lambda d: [{**d[0], "instruction": "Q?"}]),
        "{tmp}/data/beta/test.json: record 0: its instruction does not end with 'Answer format"),
    "data: fewer than a batch": (["--train-limit", "1"], None,
                                 "--data: 2 usable training examples, fewer than --batch-size 4"),
    "data: no such eval data": (["--eval-data", "{tmp}/nowhere"], None, "{tmp}/nowhere: no such file or directory"),
    # model directories
    "model: no such directory": (["--model", "{tmp}/nomodel"], None, "--model {tmp}/nomodel: no such directory"),
    "model: no config.json": ([], lambda tmp: (tmp / "model" / "config.json").unlink(),
                              "{tmp}/model: no config.json in this directory"),
    "config: a JSON list": ([], text("model/config.json", "[1, 2]"),
                            "{tmp}/model/config.json: expected a JSON object of settings, found a JSON list"),
    "config: invalid JSON": ([], text("model/config.json", "{"), "{tmp}/model/config.json: Expecting property name"),
    "config: not UTF-8": ([], text("model/config.json", b'{"hidden_size": "\xff"}'), "{tmp}/model/config.json: 'utf-8' "
                                                                                    "codec can't decode byte 0xff"),
    "config: nested too deeply": ([], text("model/config.json", nested()),
                                  "{tmp}/model/config.json: JSON nested too deeply"),
    "config: size a string": ([], config(hidden_size="32"),
                              "{tmp}/model/config.json: hidden_size=\"32\" must be a positive integer"),
    "config: size a float": ([], config(hidden_size=32.0),
                             "{tmp}/model/config.json: hidden_size=32.0 must be a positive integer"),
    "config: zero heads": ([], config(num_attention_heads=0),
                           "{tmp}/model/config.json: num_attention_heads=0 must be a positive integer"),
    "config: negative layers": ([], config(num_hidden_layers=-2),
                                "{tmp}/model/config.json: num_hidden_layers=-2 must be a positive integer"),
    "config: kv heads a bool": ([], config(num_key_value_heads=True),
                                "{tmp}/model/config.json: num_key_value_heads=true must be a positive integer or null"),
    "config: negative eps": ([], config(rms_norm_eps=-1e-6),
                             "{tmp}/model/config.json: rms_norm_eps=-1e-06 must be a positive finite number"),
    "config: theta a string": ([], config(rope_theta="1e4"),
                               "{tmp}/model/config.json: rope_theta=\"1e4\" must be a positive finite number"),
    "config: tie a string": ([], config(tie_word_embeddings="yes"),
                             "{tmp}/model/config.json: tie_word_embeddings=\"yes\" must be true or false"),
    "config: rope_scaling a list": ([], config(rope_scaling=[1]),
                                    "{tmp}/model/config.json: rope_scaling=[1] must be an object or null"),
    "config: heads not a multiple": ([], config(num_key_value_heads=3),
                                     "{tmp}/model/config.json: num_attention_heads=4 is not a multiple of "
                                     "num_key_value_heads=3"),
    "config: missing key": ([], config(intermediate_size=...),
                            "{tmp}/model/config.json: config is missing intermediate_size"),
    "config: another architecture": ([], config(model_type="gpt2"),
                                     "{tmp}/model/config.json: model_type='gpt2' is not supported"),
    "config: 10^12 layers": ([], config(num_hidden_layers=10**12),
                             "{tmp}/model/config.json: the model it describes has"),
    "config: vocabulary larger than the weights": (
        [], config(vocab_size=4000), "{tmp}/model: tensor shapes do not match config.json: model.embed_tokens.weight"),
    "config: context shorter than the examples": (
        [], config(max_position_embeddings=16),
        "--cutoff-len 512: training examples of up to"),
    "config: generate prompt cannot fit": (["--eval-mode", "generate"], generate_prompt_too_long,
                                           "evaluation data: task 'alpha' record "),
    "config: an answer cannot fit": ([], answer_too_long, "evaluation data: task 'alpha' record ", "eval"),
    "weights: none": ([], lambda tmp: (tmp / "model" / "model.safetensors").unlink(),
                      "{tmp}/model: no weight files"),
    "weights: truncated": ([], truncate("model/model.safetensors", 0.5), "{tmp}/model/model.safetensors: tensor"),
    "weights: integer dtype": ([], int_weight, "{tmp}/model/model.safetensors: tensor 'model.embed_tokens.weight' "
                                               "has dtype torch.int32, but a floating-point weight belongs there"),
    "weights: pickled code": ([], unsafe_bin,
                              "{tmp}/model/pytorch_model.bin: refused by torch.load(weights_only=True)"),
    "tokenizer: missing": ([], lambda tmp: (tmp / "model" / "tokenizer.model").unlink(),
                           "{tmp}/model: tokenizer not found (a sentencepiece tokenizer.model or a "
                           "tokenizer.json is expected)"),
    "tokenizer: not a model": ([], text("model/tokenizer.model", b"\x00garbage"),
                               "{tmp}/model/tokenizer.model: not a sentencepiece model"),
    # --out
    "out: holds a run": ([], copy_run_files("checkpoint.pt", "log.jsonl", "results.json"),
                         "--out {tmp}/out holds a run (checkpoint.pt, log.jsonl, results.json): continue it with "
                         "--resume, replace it with --overwrite"),
    "out: holds a log": ([], copy_run_files("log.jsonl"), "--out {tmp}/out holds a run (log.jsonl)"),
    "out: a file": ([], text("out", "x"), "--out {tmp}/out: exists and is not a folder"),
    "out: resume, no checkpoint": (["--resume"], None, "--resume: no checkpoint at {tmp}/out/checkpoint.pt"),
    "out: overwrite, then bad data": (["--overwrite"], lambda tmp: (copy_run_files("checkpoint.pt", "log.jsonl")(tmp),
                                                                    text("data/alpha/train.json", "[")(tmp)),
                                      "{tmp}/data/alpha/train.json: invalid JSON"),
    "out: overwrite, then bad config": (["--overwrite"], lambda tmp: (copy_run_files("checkpoint.pt")(tmp),
                                                                      config(vocab_size=0)(tmp)),
                                        "{tmp}/model/config.json: vocab_size=0 must be a positive integer"),
    "out: overwrite, then a context too short": (
        ["--overwrite"], lambda tmp: (copy_run_files("checkpoint.pt", "results.json")(tmp),
                                      config(max_position_embeddings=16)(tmp)), "--cutoff-len 512: training examples"),
    # adapters
    "adapter: no such folder": (["--adapter", "{tmp}/none"], None, "--adapter {tmp}/none: no such directory"),
    "adapter: no config": ([], lambda tmp: (tmp / "adapter" / "adapter_config.json").unlink(),
                           "{tmp}/adapter/adapter_config.json not found"),
    "adapter: config invalid JSON": ([], text("adapter/adapter_config.json", "{"),
                                     "{tmp}/adapter/adapter_config.json is not valid JSON"),
    "adapter: config nested too deeply": ([], text("adapter/adapter_config.json", nested()),
                                          "--adapter {tmp}/adapter: {tmp}/adapter/adapter_config.json is nested "
                                          "too deeply"),
    "adapter: NaN weights": ([], adapter_state(lambda s: s[first(s)].fill_(float("nan"))),
                             "--adapter {tmp}/adapter: adapter weight layers.0.mlp.down_proj.lora_A is not finite"),
    "adapter: flipped byte": ([], flip_tensor_byte(ADAPTER, lambda tmp: load_safetensors(tmp / ADAPTER)[
        "layers.1.self_attn.v_proj.lora_B"]), "{tmp}/adapter/omoe_model.safetensors: tensor "
                                              "'layers.1.self_attn.v_proj.lora_B' does not match its sha256 checksum"),
    "adapter: truncated": ([], truncate(ADAPTER, 0.9), "{tmp}/adapter/omoe_model.safetensors: tensor"),
    "adapter: integer weights": ([], adapter_state(lambda s: s.update({first(s): s[first(s)].to(torch.int64)})),
                                 "adapter weight layers.0.mlp.down_proj.lora_A has dtype torch.int64"),
    "adapter: a missing tensor": ([], adapter_state(lambda s: s.pop(first(s))),
                                  "--adapter {tmp}/adapter: adapter weights do not fit this model; missing (1)"),
    "adapter: other rank": ([], edit("adapter/adapter_config.json", lambda d: d | {"rank": 3}),
                            "adapter weights do not fit this model; shape mismatch"),
    # checkpoints
    "checkpoint: truncated": ([], truncate("out/checkpoint.pt", 0.6),
                              "--resume: {tmp}/out/checkpoint.pt cannot be read (truncated, corrupted or not a "
                              "checkpoint): PytorchStreamReader failed"),
    "checkpoint: empty": ([], text("out/checkpoint.pt", b""), "--resume: {tmp}/out/checkpoint.pt cannot be read"),
    "checkpoint: garbage": ([], text("out/checkpoint.pt", b"not a checkpoint"),
                            "--resume: {tmp}/out/checkpoint.pt cannot be read"),
    "checkpoint: flipped byte": ([], flip_tensor_byte("out/checkpoint.pt", lambda tmp: torch.load(
        tmp / "out" / "checkpoint.pt", weights_only=True)["adapters"]["layers.1.self_attn.v_proj.lora_B"]),
        "--resume: {tmp}/out/checkpoint.pt is corrupted: adapters/layers.1.self_attn.v_proj.lora_B does not match"),
    "checkpoint: step edited": ([], edit_checkpoint(lambda c, tmp: c | {"step": 1}),
                                "--resume: {tmp}/out/checkpoint.pt is corrupted: step does not match its checksum"),
    "checkpoint: pickled code": ([], edit_checkpoint(lambda c, tmp: c | {"evil": Payload(str(tmp / "mark"))}),
                                 "--resume: {tmp}/out/checkpoint.pt cannot be read (truncated, corrupted or not a "
                                 "checkpoint): WeightsUnpickler error: Unsupported global"),
    "checkpoint: not a dict": ([], edit_checkpoint(lambda c, tmp: [1, 2]),
                               "--resume: {tmp}/out/checkpoint.pt is not a checkpoint of this train.py"),
    "checkpoint: no checksums": ([], edit_checkpoint(lambda c, tmp: {k: v for k, v in c.items() if k != "checksums"}),
                                 "--resume: {tmp}/out/checkpoint.pt is not a checkpoint of this train.py "
                                 "(no checksums)"),
    "checkpoint: checksums not a dict": ([], edit_checkpoint(lambda c, tmp: c | {"checksums": [1]}),
                                         "--resume: {tmp}/out/checkpoint.pt is not a checkpoint of this train.py "
                                         "(its checksums, args or step have the wrong type)"),
    "checkpoint: nested too deeply": ([], deeply_nested, "--resume: {tmp}/out/checkpoint.pt is not a checkpoint of "
                                                         "this train.py (nested too deeply)"),
    "checkpoint: other rank": (["--rank", "4"], None, "--resume: {tmp}/out/checkpoint.pt was made with other "
                                                      "settings: --rank was 2, now 4"),
    "checkpoint: other train limit": (["--train-limit", "6"], None, "--train-limit was None, now 6"),
    "checkpoint: training data changed": (["--model", "{tmp}/model", "--data", "{tmp}/data"], changed_data_run,
                                          "--resume: {tmp}/out/checkpoint.pt was made with other settings: the "
                                          "training data of --data {tmp}/data have changed"),
}
# torch's advice on refusing a file, which is not for untrusted files: it must never be repeated.
ADVICE = ("weights_only=False", "`weights_only` set to `False`", "add_safe_globals", "Re-running")
BASE = {"data": "train", "model": "train", "config": "train", "weights": "train", "tokenizer": "train",
        "out": "train", "adapter": "eval", "checkpoint": "resume"}


def command(kind: str, tmp: Path, world: Path) -> list:
    if kind == "train":
        return ["--model", tmp / "model", "--data", tmp / "data", "--out", tmp / "out", *QUICK]
    if kind == "resume":
        return ["--model", world / "model", "--data", world / "data", "--out", tmp / "out", *QUICK, "--resume"]
    return ["--model", tmp / "model", "--eval-data", tmp / "data", "--eval-only", "--adapter", tmp / "adapter",
            "--out", tmp / "out", "--eval-limit", "2"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_and_loses_nothing(world, tmp_path, capsys, case):
    argv, setup, message = CASES[case][:3]
    kind = CASES[case][3] if len(CASES[case]) == 4 else BASE[case.split(":")[0]]
    tmp = tmp_path / "case"
    shutil.copytree(world / "model", tmp / "model")
    shutil.copytree(world / "data", tmp / "data")
    shutil.copytree(world / "run", tmp_path / "_run")
    if kind == "resume":
        shutil.copytree(world / "run", tmp / "out")
    if kind == "eval":
        shutil.copytree(world / "run" / "adapter", tmp / "adapter")
    if setup:
        setup(tmp)
    capsys.readouterr()
    before = snapshot(tmp)
    code = main([*command(kind, tmp, world), *(str(a).format(tmp=tmp) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and message.format(tmp=tmp) in err, err
    assert not any(advice in err for advice in ADVICE) and not (tmp / "mark").exists()
    assert snapshot(tmp) == before  # nothing changed, nothing half-written, nothing new


def test_there_are_enough_cases():
    assert len(CASES) >= 60


# ── faults: a full disk, Ctrl-C in every phase, kill -9 while saving ────────────────────────────

def losses(out: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "loss" in e]


def last_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and not any("Traceback" in line for line in err), err
    return err[-1]


def disk_full_after(monkeypatch, n: int):
    """os.fsync succeeds n times, then the disk is full."""
    real, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(28, "No space left on device")
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    disk_full_after(monkeypatch, 2)  # the run's list of files and the checkpoint of step 1 are written
    assert main(["--model", world / "model", "--data", world / "data", "--out", out, *QUICK]) == 1
    assert last_line(capsys) == (f"train.py: error: step 2: could not write {out / 'checkpoint.pt'} (No space left "
                                 f"on device); the previous one is kept")
    assert run_folder.load_checkpoint(out / "checkpoint.pt")["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == [".omoe-files", "checkpoint.pt", "log.jsonl"]  # no .tmp


def test_a_full_disk_while_saving_the_adapters_keeps_the_checkpoint_to_resume(world, tmp_path, monkeypatch, capsys):
    out, argv = tmp_path / "out", ["--model", world / "model", "--data", world / "data", "--out", tmp_path / "out",
                                   *QUICK]
    disk_full_after(monkeypatch, 3)  # the list of files, two checkpoints, then the adapters
    assert main(argv) == 1
    assert last_line(capsys).startswith(f"train.py: error: could not write the adapters to {out / 'adapter'} (No space "
                                        f"left on device); {out / 'checkpoint.pt'} holds them")
    assert not list(out.rglob("*.tmp")) and not (out / "adapter" / "omoe_model.safetensors").exists()
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0  # nothing left to train: evaluates and saves
    assert snapshot(out / "adapter") == snapshot(world / "run" / "adapter")


def test_ctrl_c_during_the_base_evaluation_stops_at_once(world, tmp_path, monkeypatch, capsys):
    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "evaluate_all", interrupted)
    argv = ["--model", world / "model", "--data", world / "data", "--out", tmp_path / "out", *QUICK]
    assert main([a for a in argv if a != "--skip-base-eval"]) == 130
    assert last_line(capsys) == "train.py: interrupted; no checkpoint was written"
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_ctrl_c_during_the_final_evaluation_stops_and_resume_finishes(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--model", world / "model", "--data", world / "data", "--out", out, *QUICK]

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "evaluate_all", interrupted)  # --skip-base-eval: the only call is the final one
    assert main(argv) == 130
    assert last_line(capsys) == f"train.py: interrupted; the last checkpoint written is {out / 'checkpoint.pt'}"
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert losses(out) == losses(world / "run") and snapshot(out / "adapter") == snapshot(world / "run" / "adapter")


def test_a_second_ctrl_c_during_a_save_leaves_a_log_the_resume_repairs(world, tmp_path, monkeypatch, capsys):
    """The first Ctrl-C asks for a checkpoint at the end of step 3; the second arrives while it is being
    written: the checkpoint of step 2 stays, the log already holds step 3, and the resumed run logs
    every step exactly once, with the losses of an uninterrupted run."""
    common = ["--model", world / "model", "--data", world / "data", *QUICK, "--max-steps", "4", "--save-every", "2"]
    assert main([*common, "--out", tmp_path / "full"]) == 0

    class CtrlCAtStep3:
        exit_code = 130

        def __init__(self):
            self.checks = 0

        @property
        def requested(self):
            self.checks += 1
            return "SIGINT" if self.checks >= 3 else None

        def restore(self):
            pass

    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 3:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        real_save(obj, f, *a, **k)
    monkeypatch.setattr(run_folder, "Interrupt", CtrlCAtStep3)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "cut"
    assert main([*common, "--out", out]) == 130
    assert last_line(capsys) == f"train.py: interrupted; the last checkpoint written is {out / 'checkpoint.pt'}"
    assert run_folder.load_checkpoint(out / "checkpoint.pt")["step"] == 2 and not list(out.glob("*.tmp"))
    assert [s for s, _ in losses(out)] == [1, 2, 3]
    monkeypatch.undo()
    assert main([*common, "--out", out, "--resume"]) == 0
    assert losses(out) == losses(tmp_path / "full")  # steps 1..4, once each, bit for bit
    assert snapshot(out / "adapter") == snapshot(tmp_path / "full" / "adapter")


def test_overwrite_replaces_the_run_only_after_every_check(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "run", out)
    (out / "log.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    argv = ["--model", world / "model", "--data", world / "data", "--out", out, *QUICK, "--max-steps", "1"]
    assert main([*argv, "--overwrite"]) == 0
    assert [s for s, _ in losses(out)] == [1]  # the earlier run's log is gone, not appended to
    assert run_folder.load_checkpoint(out / "checkpoint.pt")["step"] == 1


def test_non_finite_adapters_are_neither_evaluated_nor_saved(world, tmp_path, monkeypatch, capsys):
    """Weights that turn infinite while the loss stays finite (here: planted by the optimizer step of
    step 2) stop the run before the checkpoint of step 2, the evaluation, or the adapters are written."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "out"
    assert main(["--model", world / "model", "--data", world / "data", "--out", out, *QUICK]) == 1
    assert last_line(capsys) == ("train.py: error: step 2: adapter weight layers.0.self_attn.q_proj.lora_A "
                                 "is not finite (NaN or infinity); stopping without evaluating or saving it")
    assert run_folder.load_checkpoint(out / "checkpoint.pt")["step"] == 1
    assert sorted(p.name for p in out.iterdir()) == [".omoe-files", "checkpoint.pt", "log.jsonl"]


SAVER = """
import argparse, sys, torch
sys.path.insert(0, {root!r})
import omoe
from plumbing import run_folder
from model import ModelArgs, Transformer
from pathlib import Path
torch.manual_seed(0)
model = omoe.add_experts(Transformer(ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=512,
                                               vocab_size=64)), experts=4, rank=64)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params)
for p in params:
    p.grad = torch.randn_like(p)
optimizer.step()
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
step = 0
while True:
    step += 1
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    checkpoint = {{"adapters": omoe.adapter_state_dict(model), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "rng": [run_folder.rng_state()], "step": step,
                  "args": {{"seed": 0}}, "before": None, "val_before": None, "loss_window": [0.0, 0],
                  "identity": {{"data": "fingerprint"}}}}
    run_folder.save_checkpoint(Path(sys.argv[1]), checkpoint, 10)
    print(step, flush=True)
"""


def temporary(path: Path) -> list[Path]:
    """The temporary files of a save of `path` in progress (a random name beside it)."""
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def test_kill_9_while_saving_leaves_the_old_checkpoint_or_the_new_one(tmp_path):
    """A process saving checkpoints back to back, killed at random points (half of them while a
    temporary file exists, i.e. inside a save): what is left always loads and verifies, and it is the
    last checkpoint reported saved or the one after it."""
    path, rng, mid_save = tmp_path / "checkpoint.pt", random.Random(0), 0
    for round in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SAVER.format(root=str(ROOT)), str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            saved = [int(proc.stdout.readline())]  # one save is complete
            if round % 2:
                deadline = time.time() + 30
                while not temporary(path) and time.time() < deadline:
                    time.sleep(0.0005)
            else:
                time.sleep(rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            saved += [int(line) for line in proc.stdout.read().split()]
        finally:
            proc.kill()
            proc.wait()
        mid_save += bool(temporary(path))
        assert run_folder.load_checkpoint(path)["step"] in (saved[-1], saved[-1] + 1)
        run_folder.clear_run(tmp_path, [])  # what a run does before it writes: the temporary goes
        assert sorted(p.name for p in tmp_path.iterdir()) == [".omoe-files", "checkpoint.pt"]
    assert mid_save >= 1  # the kills did land inside saves
