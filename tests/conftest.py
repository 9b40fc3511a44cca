"""Shared test fixtures: a sentencepiece tokenizer and a tiny random LLaMA directory, built offline."""

import io
import json
import os
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from model import ModelArgs, Transformer
from plumbing.base.weights import save_safetensors

SHARED = Path(__file__).resolve().parents[2] / "shared" / "commonsense"
# The tests that read the real commonsense test sets, beside the repository; a fresh clone skips them.
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/commonsense is not present (a fresh clone)")

# Under pytest-xdist (`-n 2`) each worker takes one core: one thread each, for the workers and the train.py,
# torchrun and notebook processes they start (two threads per process on two shared cores run several times
# slower than one).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Text with the shapes the tokenizer will meet: the prompt template, every label family, digits, spaces.
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nPlease choose the correct answer to the question: Which is heavier?\n\n"
    "Answer1: a feather Answer2: a rock\n\nAnswer format: answer1/answer2/answer3/answer4/answer5",
    "### Response:\nthe correct answer is answer2 solution1 solution2 option1 option2 ending1 ending4 true false",
    "Please answer the following question with true or false, question: is the sky blue?",
    "The quick brown fox jumps over the lazy dog 0123456789 times.   Spaces  and\ttabs.",
] * 20


class Payload:
    """Unpickling this runs `leave_mark`: what a hostile .bin or checkpoint file would do. Tests that
    torch.load must refuse it check that the mark file was never written."""

    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return leave_mark, (self.mark,)


def leave_mark(path):
    Path(path).write_text("pickled code ran")


def train_tokenizer(path: Path, vocab_size: int = 400) -> Path:
    """A BPE model with LLaMA's normalisation settings (identity, no whitespace folding, split digits,
    byte fallback), trained in well under a second."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def write_tiny_model(directory: Path, vocab_size: int, seed: int = 0, **overrides) -> Path:
    """A random LLaMA in the Hugging Face layout (config.json, model.safetensors, tokenizer.model)."""
    directory.mkdir(parents=True, exist_ok=True)
    args = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=vocab_size,
                max_seq_len=512) | overrides
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**args))
    for name, p in model.named_parameters():  # nn.Linear's default init is too small to give varied logits
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    config = {"model_type": "llama", "hidden_size": args["dim"], "num_hidden_layers": args["n_layers"],
              "num_attention_heads": args["n_heads"], "num_key_value_heads": args["n_kv_heads"],
              "intermediate_size": args["hidden_dim"], "vocab_size": vocab_size, "rms_norm_eps": 1e-6,
              "max_position_embeddings": args["max_seq_len"],
              "tie_word_embeddings": args.get("tie_embeddings", False)}
    (directory / "config.json").write_text(json.dumps(config))
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config["tie_word_embeddings"])}  # as tied checkpoints are stored
    save_safetensors(state, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    train_tokenizer(directory / "tokenizer.model")
    vocab = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).vocab_size()
    return write_tiny_model(directory, vocab)


def records(n: int, kind: str = "answer", seed: int = 0) -> list[dict]:
    """n LLM-Adapters records of one label family, with a learnable rule (the answer is in the question)."""
    g = torch.Generator().manual_seed(seed)
    labels = {"answer": ["answer1", "answer2", "answer3"], "true": ["true", "false"],
              "option": ["option1", "option2"]}[kind]
    out = []
    for i in range(n):
        answer = labels[int(torch.randint(len(labels), (1,), generator=g))]
        out.append({"instruction": f"Please choose: the rule says {answer} for item {i}.\n\n"
                                   f"Answer format: {'/'.join(labels)}",
                    "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    return out


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """A folder of two tasks laid out like the real benchmarks: <task>/train.json, <task>/test.json."""
    for task, kind in (("alpha", "answer"), ("beta", "true")):
        (tmp_path / "tasks" / task).mkdir(parents=True)
        (tmp_path / "tasks" / task / "train.json").write_text(json.dumps(records(48, kind, seed=1)))
        (tmp_path / "tasks" / task / "test.json").write_text(json.dumps(records(12, kind, seed=2)))
    return tmp_path / "tasks"


# What the tests of bad inputs, faults and doors share: a finished small run's data, and a door's main
# called as the shell calls it.
QUICK = ["--batch-size", "4", "--micro-batch-size", "2", "--rank", "2", "--warmup", "1", "--eval-limit", "2",
         "--log-every", "1", "--skip-base-eval", "--max-steps", "2", "--save-every", "1"]


def write_tasks(directory: Path) -> Path:
    """Two small tasks, <task>/{train,test}.json, in `directory`."""
    for task, kind in (("alpha", "answer"), ("beta", "true")):
        (directory / task).mkdir(parents=True)
        (directory / task / "train.json").write_text(json.dumps(records(8, kind, seed=1)))
        (directory / task / "test.json").write_text(json.dumps(records(4, kind, seed=2)))
    return directory


def call(main, argv) -> int:
    """A door's main as the shell sees it: argparse's refusals are SystemExit(2)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
