"""generate.py: the fine-tuned model answers as the model with its adapters computes, streamed as it
comes, from the command line, a file or standard input; the base model by name, also a hub id; PEFT
folders; one-line refusals. And nucleus sampling keeps to the nucleus."""

import io
import json
import shutil
import sys

import pytest
import torch

import data
import generate
import omoe
import train
from model import Transformer, sample
from plumbing import adapters
from plumbing.base.tokenizer import Tokenizer

QUICK = ["--batch-size", "8", "--micro-batch-size", "4", "--warmup", "2", "--lr", "1e-2", "--rank", "4",
         "--eval-limit", "2", "--log-every", "1", "--skip-base-eval"]
QUESTION = "Please choose: the rule says answer2 for item 3."


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A short run's folder on the tiny model: its adapters record the model as their base."""
    out = tmp_path_factory.mktemp("run")
    tasks = out / "tasks" / "alpha"
    tasks.mkdir(parents=True)
    from conftest import records
    (tasks / "train.json").write_text(json.dumps(records(32, seed=1)))
    (tasks / "test.json").write_text(json.dumps(records(4, seed=2)))
    assert train.main([str(a) for a in ["--model", tiny_model_dir, "--data", out / "tasks", "--out", out / "run",
                                        "--max-steps", 6, "--experts", 3, "--top-k", 2, *QUICK]]) == 0
    return out / "run"


def expected_answer(model_dir, adapter_dir, text, max_new=12, raw=False):
    """The greedy answer computed directly: the base, add_experts, load_adapters, Transformer.generate."""
    model = Transformer.from_pretrained(model_dir)
    if adapter_dir is not None:
        config, state = adapters.load_adapter_files(adapter_dir)
        adapters.load_adapters(omoe.add_experts(model, **config), state)
    tok = Tokenizer(model_dir)
    ids = tok.encode(text if raw else data.prompt(data.Example(instruction=text)))
    out = model.eval().generate(torch.tensor([ids]), max_new_tokens=max_new, eos_id=tok.stop_ids)[0, len(ids):]
    return tok.decode([t for t in out.tolist() if t not in tok.stop_ids])


def ask(capsys, *argv):
    code = generate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_answers_as_the_adapted_model_computes_and_streams(trained, tiny_model_dir, capsys, monkeypatch):
    pieces = []
    real = Transformer.generate

    def spy(self, *a, on_token=None, **k):  # each new token reaches the caller as it is made
        if on_token is None:
            return real(self, *a, **k)

        def seen(token):
            pieces.append(capsys.readouterr().out)  # what was printed before this token
            on_token(token)
        return real(self, *a, on_token=seen, **k)
    monkeypatch.setattr(Transformer, "generate", spy)
    code, out, err = ask(capsys, "--adapter", trained / "adapter", "--max-new-tokens", 12, QUESTION)
    assert code == 0 and err == ""
    printed = "".join(pieces) + out
    assert printed == expected_answer(tiny_model_dir, trained / "adapter", QUESTION) + "\n"
    assert len(pieces) > 2  # streamed: printing began before generation ended


def test_base_model_alone_and_raw_prompts(trained, tiny_model_dir, capsys):
    code, out, _ = ask(capsys, "--adapter", trained / "adapter", "--no-adapter", "--max-new-tokens", 12, QUESTION)
    assert code == 0 and out == expected_answer(tiny_model_dir, None, QUESTION) + "\n"
    code, out, _ = ask(capsys, "--adapter", trained / "adapter", "--raw", "--max-new-tokens", 12, "the rule says")
    assert out == expected_answer(tiny_model_dir, trained / "adapter", "the rule says", raw=True) + "\n"


def test_prompts_from_a_file_and_from_standard_input(trained, tiny_model_dir, tmp_path, capsys, monkeypatch):
    file = tmp_path / "prompts.txt"
    file.write_text(f"{QUESTION}\n\nPlease choose: the rule says answer3 for item 9.\n")
    code, out, _ = ask(capsys, "--adapter", trained / "adapter", "--max-new-tokens", 12, "--file", file)
    expected = [expected_answer(tiny_model_dir, trained / "adapter", q)
                for q in (QUESTION, "Please choose: the rule says answer3 for item 9.")]
    assert code == 0 and out.splitlines() == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n"))  # not a terminal: read to the end
    code, out, _ = ask(capsys, "--adapter", trained / "adapter", "--max-new-tokens", 12)
    assert code == 0 and out.splitlines() == expected[:1]


def test_the_loop_says_how_to_leave_it(trained, tiny_model_dir, capsys, monkeypatch):
    """At a terminal the loop says how to leave it, and "exit" does: the question after it is not asked."""
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    typed = iter([QUESTION, "exit", "never asked"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    code, out, err = ask(capsys, "--adapter", trained / "adapter", "--max-new-tokens", 12)
    assert code == 0 and err == generate.LOOP_HINT + "\n" and "Ctrl-D" in err
    assert out.splitlines() == [expected_answer(tiny_model_dir, trained / "adapter", QUESTION)]
    assert next(typed) == "never asked"


def test_the_embedded_model_says_what_it_can_answer(capsys):
    """Asked with the embedded tiny model, generate.py says (on stderr) which questions it answers."""
    code, out, err = ask(capsys, "--model", generate.EMBEDDED, "--no-adapter", "--max-new-tokens", 4, "hello")
    assert code == 0 and err == generate.EMBEDDED_HINT + "\n" and "its six tasks" in err
    assert out.count("\n") == 1


def test_a_peft_folder_and_a_base_named_by_hub_id(trained, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A plain LoRA run saves PEFT's files; its base, recorded as a hub id, is found in a local cache."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lora = omoe.add_experts(Transformer.from_pretrained(tiny_model_dir), ["q_proj", "v_proj"], experts=1, rank=2)
    with torch.no_grad():
        for p in omoe.adapter_state_dict(lora).values():
            p.normal_(std=0.3)
    adapters.save_adapters(lora, tmp_path / "peft", base_model="org/tiny")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    code, out, _ = ask(capsys, "--adapter", tmp_path / "peft", "--max-new-tokens", 12, QUESTION)
    assert code == 0 and out == expected_answer(tiny_model_dir, tmp_path / "peft", QUESTION) + "\n"


def test_refusals_are_one_line(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, message in [
        (["--adapter", tmp_path / "nowhere", "x"],
         f"generate.py: error: --adapter {tmp_path / 'nowhere'}: no such directory"),
        (["--adapter", tmp_path / "nowhere", "--no-adapter", "x"],
         "generate.py: error: --model is needed with --no-adapter and no adapter folder"),
        (["--adapter", trained / "adapter", "--file", tmp_path / "none.txt"],
         f"generate.py: error: --file {tmp_path / 'none.txt'}: cannot read it (No such file or directory)"),
        (["--model", "no/such-model", "--adapter", trained / "adapter", "x"],
         "generate.py: error: --model no/such-model: not in the local Hugging Face cache"),
    ]:
        code, _, err = ask(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith(message), err
    with pytest.raises(SystemExit) as exit:
        generate.main(["--top-p", "0", "x"])
    assert exit.value.code == 2 and capsys.readouterr().err == "generate.py: error: --top-p 0.0: must be in (0, 1]\n"


def test_nucleus_sampling_keeps_to_the_nucleus():
    logits = torch.tensor([[2.0, 1.3, 0.2, -1.0]]).log_softmax(-1).expand(4000, -1)  # p ≈ .6, .3, .09, .03
    torch.manual_seed(0)
    counts = torch.bincount(sample(logits, top_p=0.5), minlength=4)
    assert counts.tolist() == [4000, 0, 0, 0]  # the likeliest token alone reaches 0.5
    counts = torch.bincount(sample(logits, top_p=0.8), minlength=4)
    assert counts[2:].sum() == 0 and 0.6 < counts[0] / 4000 < 0.73  # renormalised over the two: ~2/3
    counts = torch.bincount(sample(logits, top_p=1.0), minlength=4)
    assert counts[3] > 0  # everything can be drawn
