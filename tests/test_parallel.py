"""train.py under torchrun on the CPU (gloo), with 2 and 3 processes: DDP and FSDP give the single
process's losses, adapters, evaluation results and files; an FSDP run stopped and resumed, by as many
processes or by more, gives the uninterrupted run. Each process count is one torchrun launch calling
train.main for every configuration in turn (starting processes is most of the cost); `torchrun train.py`
itself, which makes and closes its process group, runs in gpu_check's dry run (tests/test_gpu_check.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import records, train_tokenizer, write_tiny_model
from plumbing import adapters

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max-steps", "4", "--batch-size", "12", "--micro-batch-size", "2", "--warmup", "1", "--lr", "1e-3",
          "--rank", "4", "--dropout", "0", "--eval-limit", "7", "--log-every", "1", "--save-every", "100"]
OMOE = ["--experts", "3", "--top-k", "2", "--grad-checkpoint", "--val-fraction", "0.2"]  # top-2 of 3, validation
LORA = ["--lora", "--eval-mode", "generate"]   # on a model with tied embeddings; eval generates answers
AUX = ["--experts", "3", "--top-k", "1", "--aux-loss-coef", "0.1"]

LAUNCHER = """
import json, shutil, sys
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
import torch.distributed as dist
import train
from test_train import StopAfter  # Ctrl-C "arrives" during step n, in every process
from plumbing import adapters, run_folder

jobs, real, codes = json.load(open(sys.argv[1])), run_folder.Interrupt, []
dist.init_process_group("gloo")  # one process group for every job: train.main uses it, and leaves it open
for job in jobs:
    if "copy" in job:
        if dist.get_rank() == 0:
            shutil.copytree(*job["copy"])
        dist.barrier()
        continue
    run_folder.Interrupt = StopAfter(job["stop_after"]) if job.get("stop_after") else real
    codes.append(train.main(job["argv"]))
if dist.get_rank() == 0:
    json.dump(codes, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Two tiny models (one with tied embeddings), two tasks, and the single-process reference runs."""
    root = tmp_path_factory.mktemp("parallel")
    tok = train_tokenizer(root / "tokenizer.model")
    vocab = 400
    for name, tied in (("model", False), ("tied", True)):
        (root / name).mkdir()
        (root / name / "tokenizer.model").write_bytes(tok.read_bytes())
        write_tiny_model(root / name, vocab, seed=3, tie_embeddings=tied)
    for task, kind in (("alpha", "answer"), ("beta", "true")):
        (root / "data" / task).mkdir(parents=True)
        (root / "data" / task / "train.json").write_text(json.dumps(records(48, kind, seed=1)))
        (root / "data" / task / "test.json").write_text(json.dumps(records(12, kind, seed=2)))
    for name, model, extra in (("omoe", "model", OMOE), ("lora", "tied", LORA)):
        assert train.main(argv(root, model, name, extra)) == 0
    return root


def argv(root: Path, model: str, out: str, extra: list) -> list[str]:
    return ["--model", str(root / model), "--data", str(root / "data"), "--out", str(root / out), *COMMON, *extra]


def torchrun(root: Path, nproc: int, jobs: list[dict]) -> list[int]:
    (root / "launcher.py").write_text(LAUNCHER.format(root=str(ROOT)))
    (root / f"jobs-{nproc}.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(root / "launcher.py"), str(root / f"jobs-{nproc}.json"),
                           str(root / f"codes-{nproc}.json")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # --standalone: a free port
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / f"codes-{nproc}.json").read_text())


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


def diagnostics(out: Path) -> list[dict]:
    return [e["experts"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "experts" in e]


def assert_same_run(a: Path, b: Path) -> None:
    """b gives a's losses, adapters, evaluation results, and files of the same shapes."""
    assert losses(b) == pytest.approx(losses(a), rel=1e-5)
    config_a, weights_a = adapters.load_adapter_files(a / "adapter")
    config_b, weights_b = adapters.load_adapter_files(b / "adapter")
    assert config_a == config_b and weights_a.keys() == weights_b.keys()
    for k in weights_a:
        torch.testing.assert_close(weights_b[k], weights_a[k], rtol=1e-5, atol=1e-6, msg=k)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for key in ("before", "after", "val_before", "val_after", "trainable_params", "total_params", "steps"):
        assert rb[key] == ra[key], key
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
    for i, s in ca["optimizer"]["state"].items():  # whole tensors, not one process's shard
        assert {k: v.shape for k, v in s.items()} == {k: v.shape for k, v in cb["optimizer"]["state"][i].items()}


def test_two_processes_ddp_and_fsdp_equal_one(world):
    drop = ["--dropout", "0.1"]  # each process draws its own dropout masks: a resume restores each one's
    codes = torchrun(world, 2, [
        {"argv": argv(world, "model", "fsdp2-omoe", [*OMOE, "--fsdp"])},
        {"argv": argv(world, "tied", "fsdp2-lora", [*LORA, "--fsdp"])},
        {"argv": argv(world, "model", "ddp2-omoe", OMOE)},
        {"argv": argv(world, "model", "fsdp2-cut", [*OMOE, "--fsdp"]), "stop_after": 3},
        {"copy": [str(world / "fsdp2-cut"), str(world / "fsdp3-resumed")]},  # resumed by 3 processes below
        {"argv": argv(world, "model", "fsdp2-cut", [*OMOE, "--fsdp", "--resume"])},
        {"argv": argv(world, "model", "fsdp2-aux", [*AUX, "--fsdp"])},
        {"argv": argv(world, "model", "ddp2-aux", AUX)},
        {"argv": ["--model", str(world / "model"), "--eval-data", str(world / "data"), "--eval-limit", "7",
                  "--eval-only", "--adapter", str(world / "omoe" / "adapter"), "--out", str(world / "fsdp2-eval"),
                  "--fsdp"]},
        {"argv": argv(world, "model", "fsdp2-drop", [*OMOE, *drop, "--fsdp"])},
        {"argv": argv(world, "model", "fsdp2-drop-cut", [*OMOE, *drop, "--fsdp"]), "stop_after": 3},
        {"argv": argv(world, "model", "fsdp2-drop-cut", [*OMOE, *drop, "--fsdp", "--resume"])},
    ])
    assert codes == [0, 0, 0, 130, 0, 0, 0, 0, 0, 130, 0]
    assert_same_run(world / "omoe", world / "fsdp2-omoe")
    assert_same_run(world / "lora", world / "fsdp2-lora")
    assert_same_run(world / "omoe", world / "ddp2-omoe")
    assert_same_run(world / "omoe", world / "fsdp2-cut")  # stopped at step 3, resumed: the uninterrupted run
    assert_same_run(world / "fsdp2-drop", world / "fsdp2-drop-cut")  # with dropout too
    # The diagnostics are summed over the processes' last micro-batches: the same for DDP and FSDP.
    for a, b in zip(*(diagnostics(world / run) for run in ("ddp2-omoe", "fsdp2-omoe"))):
        assert a.keys() == b.keys() and all(a[k]["tokens"] == b[k]["tokens"] for k in a)
        assert all(a[k][x] == pytest.approx(b[k][x], rel=1e-4) for k in a for x in ("load", "prob", "cos_before"))
    # The balance loss is computed on each process's micro-batches (as in every MoE trainer), so its value
    # depends on how the batch is split: FSDP matches DDP, which splits it the same way.
    assert_same_run(world / "ddp2-aux", world / "fsdp2-aux")
    evaluated = json.loads(next((world / "fsdp2-eval").glob("eval-*.json")).read_text())["after"]
    assert evaluated == json.loads((world / "omoe" / "results.json").read_text())["after"]  # --eval-only, sharded


def test_three_processes_fsdp_equals_one(world):
    if not (world / "fsdp3-resumed").exists():
        pytest.skip("needs the checkpoint that test_two_processes_ddp_and_fsdp_equal_one leaves")
    codes = torchrun(world, 3, [
        {"argv": argv(world, "model", "fsdp3-omoe", [*OMOE, "--fsdp"])},
        {"argv": argv(world, "tied", "fsdp3-lora", [*LORA, "--fsdp"])},
        {"argv": argv(world, "model", "fsdp3-resumed", [*OMOE, "--fsdp", "--resume"])},
    ])
    assert codes == [0, 0, 0]
    assert_same_run(world / "omoe", world / "fsdp3-omoe")
    assert_same_run(world / "lora", world / "fsdp3-lora")
    assert_same_run(world / "omoe", world / "fsdp3-resumed")  # saved by 2 processes, resumed by 3


def test_fsdp_needs_torchrun(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:  # refused with the other flags, before anything is read
        train.main(["--fsdp", "--out", str(tmp_path), "--max-steps", "1"])
    assert exit.value.code == 2 and capsys.readouterr().err.strip() == (
        "train.py: error: --fsdp shards the model over processes started by torchrun: "
        "torchrun --nproc_per_node N train.py ... --fsdp")
