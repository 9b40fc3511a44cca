"""train.py end to end on a tiny random model: a run, resume, divergence, and bad input (several processes:
test_parallel.py)."""

import functools
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import omoe
import train
from conftest import SHARED, needs_shared, records
from model import Transformer
from plumbing.base.weights import load_safetensors
from plumbing import adapters, run_folder

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--batch-size", "8", "--micro-batch-size", "4", "--warmup", "2", "--lr", "1e-3", "--rank", "4",
         "--eval-limit", "6", "--log-every", "1"]


def run(*argv) -> int:
    return train.main([str(a) for a in argv])


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]


def test_short_run_trains_saves_and_reloads(tiny_model_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    started = time.time()
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", out, "--max-steps", 6, *QUICK) == 0
    results = json.loads((out / "results.json").read_text())
    # The run says when it evaluates the trained model, and how long each part took.
    printed = capsys.readouterr().out.splitlines()
    assert printed.index("evaluating the fine-tuned model ...") < printed.index("test")
    assert 0 < results["train_seconds"] and 0 < results["eval_seconds"]
    assert results["train_seconds"] + results["eval_seconds"] < results["run_seconds"] <= time.time() - started
    assert printed[-2].startswith("time: training ") and "evaluating the fine-tuned model" in printed[-2]
    assert set(results["before"]) == set(results["after"]) == {"alpha", "beta"}
    assert results["config"]["experts"] == 2 and results["steps"] == 6
    steps = losses(out)
    assert len(steps) == 6 and steps[-1] < steps[0]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    layer = log[0]["experts"]["layers.0.self_attn.q_proj"]
    assert len(layer["prob"]) == 2 and 0 <= layer["cos_after"] < 0.05  # OMoE: orthogonal after Gram–Schmidt

    # The saved adapters, loaded into a fresh model, give the trained model's outputs and accuracy.
    config, state = adapters.load_adapter_files(out / "adapter")
    fresh = omoe.add_experts(Transformer.from_pretrained(tiny_model_dir), **config)
    adapters.load_adapters(fresh, state)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in ckpt["adapters"].items():
        assert torch.equal(state[k], v), k
    assert run("--model", tiny_model_dir, "--eval-data", task_dir, "--out", tmp_path / "eval", "--eval-only",
               "--adapter", out / "adapter", "--eval-limit", 6) == 0
    again = json.loads(next((tmp_path / "eval").glob("eval-*.json")).read_text())["after"]
    assert {t: r["accuracy"] for t, r in again.items()} == {t: r["accuracy"] for t, r in results["after"].items()}


class StopAfter:
    """Stands in for run_folder.Interrupt: Ctrl-C "arrives" during step `n`."""

    def __init__(self, n):
        self.checks = 0
        self.n = n

    def __call__(self):
        return self

    @property
    def requested(self):
        self.checks += 1
        return "SIGINT" if self.checks >= self.n else None

    exit_code = 130

    def restore(self):
        pass


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    common = ["--model", tiny_model_dir, "--data", task_dir, "--max-steps", 8, "--schedule", "cosine", *QUICK]
    assert run(*common, "--out", tmp_path / "full") == 0
    monkeypatch.setattr(run_folder, "Interrupt", StopAfter(3))
    assert run(*common, "--out", tmp_path / "cut") == 130  # interrupted: saved at step 3
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    assert run(*common, "--out", tmp_path / "cut", "--resume") == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exactly, on the CPU
    a = load_safetensors(tmp_path / "full" / "adapter" / adapters.OMOE_WEIGHTS)
    b = load_safetensors(tmp_path / "cut" / "adapter" / adapters.OMOE_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tiny_model_dir, task_dir, tmp_path, capsys):
    common = ["--model", tiny_model_dir, "--data", task_dir, "--max-steps", 2, "--out", tmp_path, *QUICK]
    assert run(*common) == 0
    assert run(*[a if a != "4" else "8" for a in common], "--resume") == 2  # --rank 4 -> 8 (and micro-batch)
    err = capsys.readouterr().err
    assert "--resume:" in err and "--rank was 4, now 8" in err


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_model_dir, task_dir, tmp_path, monkeypatch,
                                                               capsys):
    real = train.loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        return real(logits, labels) * (float("nan") if calls["n"] > 8 else 1.0)  # step 5 (2 micro-batches a step)

    monkeypatch.setattr(train, "loss_sum", poisoned)
    code = run("--model", tiny_model_dir, "--data", task_dir, "--out", tmp_path, "--max-steps", 8,
               "--save-every", 2, *QUICK)
    err = capsys.readouterr().err
    assert code == 1 and "step 5: the loss is nan" in err and str(tmp_path / "checkpoint.pt") in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "adapter").exists()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD = {"instruction": "Q?\n\nAnswer format: answer1/answer2", "input": "", "output": "the correct answer is answer1",
        "answer": "answer1"}


@pytest.mark.parametrize("case, message", [
    ("malformed", "bad.json: invalid JSON at line 1 column 3: Expecting property name"),
    ("missing field", "bad.json: record 1 has no 'output' string"),
    ("not a candidate", "bad.json: record 0: answer 'answer7' is not among its candidates ['answer1', 'answer2']"),
    ("empty", "bad.json: no records (empty dataset)"),
    ("no such data", "nowhere.json: no such file or directory"),
    ("top-k", "--top-k 3 must be between 1 and --experts 2"),
    ("eval-only", "adapter_config.json not found: "),
    ("out", "--out"),
    ("cuda", "--device cuda: CUDA is not available"),
    ("no model", "missing-model: no such directory"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, case, message):
    bad = tmp_path / "bad.json"
    data = {"malformed": "[{,]", "missing field": json.dumps([GOOD, {**GOOD, "output": None}]),
            "not a candidate": json.dumps([{**GOOD, "answer": "answer7"}]), "empty": "[]"}
    if case in data:
        write(bad, data[case])
    argv = ["--model", tiny_model_dir, "--data", bad, "--out", tmp_path / "out"]
    argv += {"no such data": ["--data", tmp_path / "nowhere.json"], "top-k": ["--top-k", 3],
             "eval-only": ["--eval-only", "--adapter", tmp_path],
             "out": ["--out", write(tmp_path / "file", "x") / "sub"],
             "cuda": ["--device", "cuda"], "no model": ["--model", tmp_path / "missing-model"]}.get(case, [])
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if case == "top-k":  # argparse's own usage errors
        with pytest.raises(SystemExit) as e:
            run(*argv)
        code = e.value.code
    else:
        code = run(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert not (tmp_path / "out" / "checkpoint.pt").exists() and not (tmp_path / "out" / "results.json").exists()


def test_usage_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nope"), "--model", str(tmp_path),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"train.py: error: {tmp_path}: no config.json in this directory"]


@needs_shared
def test_real_commonsense_files_end_to_end(tiny_model_dir, tmp_path):
    """A few steps on real ARC-Easy training records, then both eval modes on a subset of every test file."""
    out = tmp_path / "real"
    assert run("--model", tiny_model_dir, "--data", SHARED / "ARC-Easy" / "train.json", "--eval-data", SHARED,
               "--out", out, "--max-steps", 2, "--train-limit", 32, "--cutoff-len", 384, *QUICK[:-4],
               "--eval-limit", 3) == 0
    after = json.loads((out / "results.json").read_text())["after"]
    assert set(after) == {p.name for p in SHARED.iterdir() if (p / "test.json").is_file()}
    assert all(r["n"] == 3 for r in after.values())
    assert run("--model", tiny_model_dir, "--eval-data", SHARED, "--out", tmp_path / "gen", "--eval-only",
               "--adapter", out / "adapter", "--eval-mode", "generate", "--eval-limit", 2) == 0
    gen = json.loads((tmp_path / "gen" / "eval-commonsense.json").read_text())["after"]
    assert all(0 <= r["no_label"] <= r["n"] == 2 for r in gen.values())


@pytest.mark.parametrize("cuda, build", [(None, "a CPU-only build"), ("12.8", "built with CUDA 12.8")])
def test_missing_cuda_names_the_torch_build(monkeypatch, cuda, build):
    """A CPU-only torch is called that; a CUDA build that finds no GPU names its CUDA."""
    from plumbing.base.errors import BadInput
    from plumbing.gate import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    with pytest.raises(BadInput, match=rf"--device cuda: CUDA is not available here \(torch .*, {build}\)$"):
        pick_device("cuda")


@pytest.mark.parametrize("flags, expected", [
    (["--lora"], {"experts": 1, "top_k": None, "orth": "none"}),
    (["--orth", "none"], {"experts": 2, "top_k": None, "orth": "none"}),
    (["--orth", "normalised"], {"experts": 2, "top_k": None, "orth": "normalized"}),  # either spelling
    (["--experts", "4", "--top-k", "2", "--aux-loss-coef", "0.01", "--orth", "orthogonal"],
     {"experts": 4, "top_k": 2, "orth": "orthogonal"}),
])
def test_baselines_run_from_the_same_command(tiny_model_dir, task_dir, tmp_path, flags, expected):
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", tmp_path, "--max-steps", 3, *QUICK, *flags) == 0
    config, _ = adapters.load_adapter_files(tmp_path / "adapter")
    assert {k: config[k] for k in expected} == expected
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written.get("peft_type") == ("LORA" if "--lora" in flags else None)  # plain LoRA: PEFT's files
    assert all(map(torch.isfinite, map(torch.tensor, losses(tmp_path))))


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_model_dir, task_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--data", task_dir, "--max-steps", 3, *QUICK]
    assert run(*common, "--out", tmp_path / "plain") == 0
    assert run(*common, "--out", tmp_path / "recompute", "--grad-checkpoint") == 0
    assert losses(tmp_path / "recompute") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, task_dir, tmp_path):
    """A real SIGINT in the middle of training: the step finishes, a checkpoint is saved, exit code 130."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train.py", "--model", str(tiny_model_dir), "--data", str(task_dir),
                             "--out", str(out), "--max-steps", "100000", "--save-every", "100000", *QUICK],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)  # training has started once the first step is logged
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "checkpoint saved to" in stdout
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 1 and not list(out.glob("*.tmp"))


def test_base_model_is_evaluated_before_the_experts_are_added(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    adapted = []
    evaluate_all = train.evaluate_all

    def spy(model, *args):
        adapted.append(any(isinstance(m, omoe.OMoELinear) for m in model.modules()))
        return evaluate_all(model, *args)
    monkeypatch.setattr(train, "evaluate_all", spy)
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", tmp_path, "--max-steps", 1, *QUICK) == 0
    assert adapted == [False, True]  # before: the base model itself; after: with its experts


def test_lora_with_orth_normalized_trains_a_normalised_lora(tiny_model_dir, task_dir, tmp_path):
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", tmp_path, "--max-steps", 2, "--lora",
               "--orth", "normalized", *QUICK) == 0
    config, state = adapters.load_adapter_files(tmp_path / "adapter")
    assert config["experts"] == 1 and config["orth"] == "normalized"
    assert not any(k.endswith("router.weight") for k in state)
    fresh = omoe.add_experts(Transformer.from_pretrained(tiny_model_dir), **config)
    assert all(m.orth == "normalized" and m.router is None for m in fresh.modules() if isinstance(m, omoe.OMoELinear))


def test_compile_trains_to_the_eager_losses(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """--compile against eager, step by step. The aot_eager backend traces what inductor would compile
    (Dynamo's graph, AOTAutograd's backward) without inductor's code generation, which takes minutes on
    a small CPU; benchmarks/gpu_check.py runs the default backend on CUDA."""
    common = ["--model", tiny_model_dir, "--data", task_dir, "--max-steps", 3, "--skip-base-eval", *QUICK]
    assert run(*common, "--out", tmp_path / "eager") == 0
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    assert run(*common, "--out", tmp_path / "compiled", "--compile") == 0
    assert len(losses(tmp_path / "compiled")) == 3
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)


def test_validation_is_evaluated_apart_from_the_test(tiny_model_dir, task_dir, tmp_path, capsys):
    """Val files beside --data are evaluated and recorded apart from the test; --eval-every watches them;
    --skip-test-eval leaves the test unseen; --val-fraction holds a seeded slice of training out instead."""
    for task, kind in (("alpha", "answer"), ("beta", "true")):
        (task_dir / task / "val.json").write_text(json.dumps(records(10, kind, seed=3)))
    out = tmp_path / "val"
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", out, "--max-steps", 4, "--eval-every", 2,
               *QUICK) == 0
    printed = capsys.readouterr().out
    assert "\nvalidation (held out of training" in printed and "\ntest\n" in printed
    assert "chance majority   before    after" in printed
    results = json.loads((out / "results.json").read_text())
    assert {t: r["n"] for t, r in results["val_after"].items()} == {"alpha": 6, "beta": 6}  # --eval-limit 6
    assert {t: r["n"] for t, r in results["after"].items()} == {"alpha": 6, "beta": 6}
    assert set(results["val_before"]) == {"alpha", "beta"} and "majority" in results["after"]["alpha"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "val" in e] == [2] and not any("eval" in e for e in log)

    out = tmp_path / "val-only"
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", out, "--max-steps", 2, "--skip-test-eval",
               "--skip-base-eval", *QUICK) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["after"] == {} and set(results["val_after"]) == {"alpha", "beta"}

    one_file = task_dir / "alpha" / "train.json"
    out = tmp_path / "fraction"
    assert run("--model", tiny_model_dir, "--data", one_file, "--out", out, "--max-steps", 2, "--val-fraction", 0.25,
               "--skip-base-eval", *QUICK[:-4]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["val_after"]["alpha"]["n"] == 12 and results["after"] == {}  # 12 of the 48 training records
    assert "training examples: 36;" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
    (["--val-fraction", "0.1", "--val-data", "x"], "give --val-data or --val-fraction, not both"),
])
def test_validation_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_lora_targets_layout_and_default_targets():
    _, args = train.parse_args(["--lora-targets", "q_proj,k_proj,v_proj,o_proj"])
    assert args.targets == ["gate_proj", "up_proj", "down_proj"]  # the other projections get the experts
    assert args.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    _, args = train.parse_args([])
    assert args.targets == list(omoe.TARGETS) and args.lora_targets == []


def test_experts_beside_plain_lora_train_save_and_reload(tiny_model_dir, task_dir, tmp_path):
    out = tmp_path / "layout"
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", out, "--max-steps", 2,
               "--lora-targets", "q_proj,v_proj", "--skip-base-eval", *QUICK) == 0
    config, state = adapters.load_adapter_files(out / "adapter")
    assert config["lora_targets"] == ["q_proj", "v_proj"] and "q_proj" not in config["targets"]
    assert not any(k.endswith("q_proj.router.weight") for k in state) and any("up_proj.router" in k for k in state)
    assert run("--model", tiny_model_dir, "--eval-data", task_dir, "--out", tmp_path / "eval", "--eval-only",
               "--adapter", out / "adapter", "--eval-limit", 6) == 0
    again = json.loads(next((tmp_path / "eval").glob("eval-*.json")).read_text())["after"]
    after = json.loads((out / "results.json").read_text())["after"]
    assert {t: r["accuracy"] for t, r in again.items()} == {t: r["accuracy"] for t, r in after.items()}


def test_backward_runs_outside_autocast(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """A bf16 base under autocast: the forward and the loss run inside it, backward outside."""
    seen, real = [], torch.Tensor.backward

    def backward(self, *a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", tmp_path, "--max-steps", 2,
               "--dtype", "bfloat16", "--skip-base-eval", *QUICK) == 0
    assert seen and not any(seen)


def test_a_bug_is_a_traceback_not_a_refusal(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """Only the project's refusals (BadInput) become "bad input, exit 2": any other error inside,
    a ValueError included, is a bug and keeps its traceback."""
    def broken(*a, **k):
        raise ValueError("an internal bug")
    monkeypatch.setattr(train, "lr_lambda", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        run("--model", tiny_model_dir, "--data", task_dir, "--out", tmp_path / "a", "--max-steps", 1, *QUICK)
    assert run("--model", tiny_model_dir, "--data", tmp_path / "nowhere", "--out", tmp_path / "b",
               *QUICK) == 2  # a refusal


def test_diagnostics_count_each_token_once_under_gradient_checkpointing(tiny_model_dir, task_dir, tmp_path):
    """Recomputing the forward in backward must not count the recorded tokens twice."""
    common = ["--model", tiny_model_dir, "--data", task_dir, "--max-steps", 2, "--experts", 3, "--top-k", 2,
              "--skip-base-eval", *QUICK]
    assert run(*common, "--out", tmp_path / "plain") == 0
    assert run(*common, "--out", tmp_path / "recompute", "--grad-checkpoint") == 0

    def experts(out):
        return [e["experts"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "experts" in e]
    plain, recompute = experts(tmp_path / "plain"), experts(tmp_path / "recompute")
    assert plain and [{k: v["tokens"] for k, v in s.items()} for s in plain] == \
        [{k: v["tokens"] for k, v in s.items()} for s in recompute]


def test_a_log_window_across_an_interruption_averages_the_same_steps(tiny_model_dir, task_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """Logging every 3 steps, stopped after step 4 and resumed: the entry of step 6 averages steps 4-6, as
    the uninterrupted run's does, and the message names the step the checkpoint holds."""
    common = ["--model", tiny_model_dir, "--data", task_dir, "--max-steps", 8, *QUICK, "--log-every", 3]
    assert run(*common, "--out", tmp_path / "full") == 0
    monkeypatch.setattr(run_folder, "Interrupt", StopAfter(4))
    assert run(*common, "--out", tmp_path / "cut") == 130
    assert f"stopped after step 4 (SIGINT); checkpoint saved to {tmp_path / 'cut' / 'checkpoint.pt'}, which " \
           f"holds step 4" in capsys.readouterr().out
    monkeypatch.undo()
    assert run(*common, "--out", tmp_path / "cut", "--resume") == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 2


def test_a_warmup_longer_than_the_run_is_scaled_and_said(tiny_model_dir, task_dir, tmp_path, capsys):
    """With --model the paper's recipe warms up over 100 steps; a 5-step run warms up over one step and says
    so, and reaches the learning rate asked for (the log says which rate each step ran at)."""
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", tmp_path, "--max-steps", 5, "--lr", "1e-3",
               "--batch-size", 8, "--micro-batch-size", 4, "--rank", 4, "--eval-limit", 2, "--log-every", 1,
               "--skip-base-eval") == 0
    out = capsys.readouterr().out
    assert "--warmup 100 is not shorter than the run's 5 steps: warming up over 1 (a tenth of them) instead" in out
    rates = [e["lr"] for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in e]
    assert max(rates) == pytest.approx(1e-3)


def test_an_evaluation_goes_beside_the_run_and_touches_none_of_its_files(tiny_model_dir, task_dir, tmp_path, capsys):
    """--eval-only into the run's own folder (as `python train.py --eval-only --adapter out/adapter` does after
    the Quick start): no --overwrite needed, its results in eval-<data>.json, every file of the run as it was;
    the same evaluation again is refused unless --overwrite, which replaces that file alone."""
    out = tmp_path / "out"
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", out, "--max-steps", 2, *QUICK) == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".omoe-files"}
    evaluate = ["--model", tiny_model_dir, "--data", task_dir, "--eval-only", "--adapter", out / "adapter",
                "--out", out, "--eval-limit", 4]
    assert run(*evaluate) == 0
    assert {p: p.read_bytes() for p in files} == files
    assert "eval-tasks.json" in json.loads((out / ".omoe-files").read_text())  # the folder's list of its files
    results = json.loads((out / "eval-tasks.json").read_text())
    assert results["average"]["after"] == pytest.approx(
        sum(r["accuracy"] for r in results["after"].values()) / len(results["after"]))
    assert f"results: {out / 'eval-tasks.json'}" in capsys.readouterr().out
    assert run(*evaluate) == 2 and "--overwrite (that file only)" in capsys.readouterr().err
    assert run(*evaluate, "--overwrite") == 0 and {p: p.read_bytes() for p in files} == files


def test_a_tokenizer_outside_the_model_folder(tiny_model_dir, task_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (tmp_path / "tok").mkdir()
    shutil.move(model / "tokenizer.model", tmp_path / "tok" / "tokenizer.model")
    common = ["--model", model, "--data", task_dir, "--max-steps", 1, *QUICK]
    assert run(*common, "--out", tmp_path / "a") == 2  # no tokenizer in the model's folder
    assert "tokenizer not found" in capsys.readouterr().err
    assert run(*common, "--out", tmp_path / "b", "--tokenizer", tmp_path / "tok" / "tokenizer.model") == 0
    assert run(*common, "--out", tmp_path / "c", "--tokenizer", tmp_path / "tok") == 0  # or its folder
    assert run(*common, "--out", tmp_path / "d", "--tokenizer", tmp_path / "none") == 2
    assert capsys.readouterr().err.endswith(f"--tokenizer {tmp_path / 'none'}: no such file or directory\n")


def test_a_run_builds_its_adapters_once(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    """The doors check memory and adapter files against the adapters' shapes, not a second build:
    add_experts runs once per training run and once per evaluation."""
    calls, real = [], omoe.add_experts

    def add_experts(model, *a, **k):
        calls.append(model.layers[0].self_attn.q_proj.weight.device.type)
        return real(model, *a, **k)
    monkeypatch.setattr(omoe, "add_experts", add_experts)
    out = tmp_path / "run"
    assert run("--model", tiny_model_dir, "--data", task_dir, "--out", out, *QUICK) == 0
    assert calls == ["cpu"]
    assert run("--model", tiny_model_dir, "--eval-data", task_dir, "--out", tmp_path / "eval",
               "--eval-only", "--adapter", out / "adapter", "--eval-limit", 2) == 0
    assert calls == ["cpu", "cpu"]
