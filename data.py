"""Text in, tensors out: the LLaMA tokenizer, commonsense data, training batches and evaluation.

Reading order: Tokenizer -> loading LLM-Adapters JSON -> the prompt template -> training examples
and batches -> evaluation (likelihood scoring and generation).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """Bad data or tokenizer files; the message names the file (and record, and field)."""


# ── Tokenizer ──────────────────────────────────────────────────────────────────────────────────

class Tokenizer:
    """LLaMA's sentencepiece tokenizer, used exactly as Meta's reference code uses it.

    encode is plain sentencepiece `encode` with BOS prepended: the ids LLaMA was trained on,
    including its handling of leading spaces, runs of whitespace, newlines, digits (split one
    by one) and byte fallback. NOTE: recent `transformers` releases tokenize LLaMA differently
    around leading spaces and whitespace runs (their "legacy=False" handling), so their ids can
    differ from these; the model was trained on these.

    LLaMA has no padding token. Batches are padded with `pad_id` = the unknown token (id 0), as
    alpaca-lora does; padded positions are masked out of attention and of the loss, so the id
    never matters, it only has to be a valid embedding row.
    """

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer model not found (a sentencepiece tokenizer.model is expected)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


# ── Loading LLM-Adapters JSON ──────────────────────────────────────────────────────────────────

@dataclass
class Example:
    instruction: str
    output: str            # the training target, "the correct answer is <label>"
    answer: str            # the label, e.g. "answer2"
    input: str = ""
    candidates: list = field(default_factory=list)  # labels from "Answer format: a/b/c"
    task: str = ""


ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


def parse_candidates(instruction: str) -> list[str]:
    """"... Answer format: answer1/answer2/answer3" -> ["answer1", "answer2", "answer3"] ([] if absent)."""
    match = ANSWER_FORMAT.search(instruction.strip())
    return match.group(1).split("/") if match else []


def read_records(path: Path, task: str, need_output: bool) -> list[Example]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records (empty dataset)")
    examples = []
    for i, r in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(r, dict):
            raise DataError(f"{where} is not a JSON object")
        for key in ("instruction", "answer") + (("output",) if need_output else ()):
            if not isinstance(r.get(key), str):
                raise DataError(f"{where} has no {key!r} string")
        candidates = parse_candidates(r["instruction"])
        if not need_output and not candidates:
            raise DataError(f"{where}: no 'Answer format: ...' at the end of its instruction, so it cannot be scored")
        if candidates and r["answer"] not in candidates:
            raise DataError(f"{where}: answer {r['answer']!r} is not among its candidates {candidates}")
        examples.append(Example(r["instruction"], r.get("output", ""), r["answer"], r.get("input") or "",
                                candidates, task))
    return examples


def load_tasks(path, split: str = "train") -> dict[str, list[Example]]:
    """One JSON file (one task, named after the file or its folder), or a folder of <task>/<split>.json.

    split "train" needs every record's 'output'; "test" needs candidates to score."""
    path = Path(path)
    need_output = split == "train"
    if path.is_file():
        task = path.parent.name if path.stem in ("train", "test") else path.stem
        return {task: read_records(path, task, need_output)}
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = sorted(path.glob(f"*/{split}.json"))
    if not files:
        raise DataError(f"{path}: no {split} data (looked for {path}/<task>/{split}.json)")
    return {f.parent.name: read_records(f, f.parent.name, need_output) for f in files}


# ── The prompt ─────────────────────────────────────────────────────────────────────────────────

def prompt(ex: Example) -> str:
    """The template of the published LoRA / DoRA commonsense results (LLM-Adapters' generate_prompt).

    The original strings carry stray indentation (the template is an indented triple-quoted
    string); this is the same template without it."""
    if ex.input:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{ex.instruction}\n\n### Input:\n{ex.input}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes "
            f"the request.\n\n### Instruction:\n{ex.instruction}\n\n### Response:\n")


def encode_pair(tok: Tokenizer, prompt_text: str, response: str) -> tuple[list[int], int]:
    """BOS + prompt + response + EOS as one sequence, and where the response starts.

    The text is encoded in one piece, as the model reads it; the response starts where that
    encoding stops agreeing with the prompt's own (sentencepiece may merge across the boundary)."""
    ids = tok.encode(prompt_text + response, bos=True, eos=True)
    prompt_ids = tok.encode(prompt_text, bos=True)
    start = 0
    while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
        start += 1
    return ids, start


# ── Training examples and batches ──────────────────────────────────────────────────────────────

def encode_for_training(tok: Tokenizer, examples: list[Example], cutoff_len: int = 512,
                        train_on_prompt: bool = False) -> tuple[list[dict], int]:
    """Tokenise examples -> ([{"input_ids", "labels"}], number dropped for being too long).

    Labels are the input ids where the loss counts and -100 elsewhere: on the response and its EOS
    only, unless train_on_prompt. Truncation policy: an example longer than cutoff_len tokens is
    dropped, not cut. Cutting the end would remove the answer (the model would learn to stop
    mid-sentence), and cutting the prompt would teach an answer to a question it cannot see.
    The caller reports how many were dropped."""
    encoded, dropped = [], 0
    for ex in examples:
        ids, start = encode_pair(tok, prompt(ex), ex.output)
        if len(ids) > cutoff_len:
            dropped += 1
            continue
        labels = list(ids) if train_on_prompt else [-100] * start + ids[start:]
        encoded.append({"input_ids": ids, "labels": labels})
    return encoded, dropped


def collate(items: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest item -> tokens (B, T), attention mask (B, T), labels (B, T)."""
    T = max(len(it["input_ids"]) for it in items)
    tokens = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        tokens[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(it["input_ids"]), 1, torch.tensor(it["labels"])
    return tokens, mask, labels


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n training examples in an epoch: a permutation fixed by (seed, epoch), so that
    a resumed run sees exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ── Evaluation ─────────────────────────────────────────────────────────────────────────────────

# The labels the original commonsense evaluation searches for, by answer family: it takes the first
# match of the whole family (e.g. answer1..answer5 for every multiple-choice set), case-sensitively.
LABEL_FAMILIES = {
    "true": ["true", "false"], "false": ["true", "false"],
    "solution": ["solution1", "solution2"],
    "answer": [f"answer{i}" for i in range(1, 6)],
    "option": ["option1", "option2"],
    "ending": [f"ending{i}" for i in range(1, 5)],
}


def extract_label(text: str, candidates: list[str]) -> str | None:
    """The first label of the candidates' family found in a generated answer, None if there is none."""
    family = LABEL_FAMILIES.get(re.sub(r"\d+$", "", candidates[0]), candidates)
    found = re.findall("|".join(map(re.escape, sorted(family, key=len, reverse=True))), text.strip())
    return found[0] if found else None


def response_for(label: str) -> str:
    return f"the correct answer is {label}"


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def score_candidates(model, tok: Tokenizer, examples: list[Example], batch_size: int = 16) -> list[list[float]]:
    """Log-probability of each candidate's full response "the correct answer is <label>" + EOS.

    The EOS counts, so a label that is a prefix of another (say "answer1" of "answer10") is not
    favoured. Summed, not averaged: every candidate shares the same prefix, so only the label
    tokens differ and sums compare like with like."""
    pairs = [(e, i, *encode_pair(tok, prompt(ex), response_for(c)))
             for e, ex in enumerate(examples) for i, c in enumerate(ex.candidates)]
    scores = [[0.0] * len(ex.candidates) for ex in examples]
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        items = [{"input_ids": ids, "labels": [-100] * start + ids[start:]} for _, _, ids, start in chunk]
        tokens, mask, labels = (t.to(_device(model)) for t in collate(items, tok.pad_id))
        logp = F.log_softmax(model(tokens, mask)[:, :-1].float(), dim=-1)        # (B, T-1, V)
        target = labels[:, 1:]                                                  # (B, T-1): next tokens
        token_logp = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]    # (B, T-1)
        totals = (token_logp * (target != -100)).sum(-1).tolist()               # (B,)
        for (e, i, _, _), total in zip(chunk, totals):
            scores[e][i] = total
    return scores


@torch.no_grad()
def generate_answers(model, tok: Tokenizer, examples: list[Example], batch_size: int = 16,
                     max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of the prompts (left-padded batches), decoded up to EOS."""
    texts = []
    for b in range(0, len(examples), batch_size):
        prompts = [tok.encode(prompt(ex)) for ex in examples[b:b + batch_size]]
        T = max(map(len, prompts))
        tokens = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(tokens.to(_device(model)), mask.to(_device(model)), max_new_tokens=max_new_tokens,
                             eos_id=tok.eos_id)
        for row in out[:, T:].tolist():
            texts.append(tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row))
    return texts


def evaluate(model, tok: Tokenizer, examples: list[Example], mode: str = "likelihood", batch_size: int = 16,
             max_new_tokens: int = 32) -> dict:
    """Accuracy on one task -> {"accuracy", "correct", "n", "chance", "no_label" (generate mode)}."""
    was_training = model.training
    model.eval()
    try:
        if mode == "likelihood":
            scores = score_candidates(model, tok, examples, batch_size)
            predictions = [ex.candidates[max(range(len(s)), key=s.__getitem__)] for ex, s in zip(examples, scores)]
        elif mode == "generate":
            texts = generate_answers(model, tok, examples, batch_size, max_new_tokens)
            predictions = [extract_label(t, ex.candidates) for ex, t in zip(examples, texts)]
        else:
            raise ValueError(f"eval mode must be 'likelihood' or 'generate', got {mode!r}")
    finally:
        model.train(was_training)
    correct = sum(p == ex.answer for p, ex in zip(predictions, examples))
    result = {"accuracy": correct / len(examples), "correct": correct, "n": len(examples),
              "chance": sum(1 / len(ex.candidates) for ex in examples) / len(examples)}
    if mode == "generate":
        result["no_label"] = sum(p is None for p in predictions)
    return result
