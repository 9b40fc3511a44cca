"""Text in, tensors out: commonsense data, training batches and evaluation (the tokenizer is tokenizer.py).

Reading order: loading LLM-Adapters JSON -> the prompt template -> training examples
and batches -> evaluation (likelihood scoring and generation).

Legend: B = batch, T = sequence length, V = vocabulary, N = scored (response) positions in a batch.
"""

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from tokenizer import Tokenizer, check_tokenizer_fits  # noqa: F401  (data.Tokenizer is the tokenizer)


class DataError(ValueError):
    """Bad data files. The message is one line naming the file (and record, and field)."""


# ── Loading LLM-Adapters JSON ──────────────────────────────────────────────────────────────────

@dataclass
class Example:
    instruction: str
    output: str = ""       # the training target, "the correct answer is <label>" ("" if absent)
    answer: str = ""       # the gold label, e.g. "answer2" ("" if absent)
    input: str = ""
    candidates: list[str] = field(default_factory=list)  # labels from "Answer format: a/b/c"
    task: str = ""


# Training needs the text to learn; evaluation (validation or test) needs the gold label (its candidates
# are checked apart).
REQUIRED = {"train": ("instruction", "output"), "val": ("instruction", "answer"), "test": ("instruction", "answer")}
ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


def parse_candidates(instruction: str) -> list[str]:
    """"... Answer format: answer1/answer2/answer3" -> ["answer1", "answer2", "answer3"] ([] if absent)."""
    match = ANSWER_FORMAT.search(instruction)
    return [c for c in match.group(1).split("/") if c] if match else []


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def read_records(path: Path, split: str = "train", task: str = "") -> list[Example]:
    """One LLM-Adapters file (a JSON list of records) -> examples, or a DataError naming what is wrong."""
    if split not in REQUIRED:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a list of records") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {_json_type(records)}")
    if not records:
        raise DataError(f"{path}: no records (empty dataset)")
    examples = []
    for i, r in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(r, dict):
            raise DataError(f"{where} is {_json_type(r)}, expected an object with 'instruction', 'output', 'answer'")
        for key in REQUIRED[split]:
            if not isinstance(r.get(key), str):
                raise DataError(f"{where} has no {key!r} string")
        for key in ("input", "output", "answer"):  # optional ones may be absent or null, nothing else
            if r.get(key) is not None and not isinstance(r[key], str):
                raise DataError(f"{where}: {key!r} is {_json_type(r[key])}, expected a string")
        candidates = parse_candidates(r["instruction"])
        if split != "train" and not candidates:
            raise DataError(f"{where}: its instruction does not end with 'Answer format: a/b/...', "
                            f"so there are no candidates to score")
        answer = r.get("answer") or ""
        if candidates and answer and answer not in candidates:
            raise DataError(f"{where}: answer {answer!r} is not among its candidates {candidates}")
        examples.append(Example(r["instruction"], r.get("output") or "", answer, r.get("input") or "",
                                candidates, task))
    return examples


def load_tasks(path, split: str = "train") -> dict[str, list[Example]]:
    """LLM-Adapters data -> {task name: examples}.

    path is one JSON file (one task, named after its folder if the file is train/val/test.json,
    else after the file, e.g. commonsense_170k), a task folder holding <split>.json, or a folder
    of tasks laid out as <task>/<split>.json. For split "train" every record needs 'instruction'
    and 'output'; for "val" and "test", 'instruction' and 'answer' and an 'Answer format:' line."""
    path = Path(path)
    if path.is_dir() and (path / f"{split}.json").is_file():
        path = path / f"{split}.json"
    if path.is_file():
        task = path.parent.name if path.stem in REQUIRED else path.stem
        return {task: read_records(path, split, task)}
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = sorted(path.glob(f"*/{split}.json"))
    if not files:
        raise DataError(f"{path}: no {split} data (looked for {path / split}.json and {path}/<task>/{split}.json)")
    return {f.parent.name: read_records(f, split, f.parent.name) for f in files}


def has_split(path, split: str) -> bool:
    """Whether load_tasks(path, split) finds files: <path>/<split>.json or <path>/<task>/<split>.json."""
    path = Path(path)
    return path.is_dir() and ((path / f"{split}.json").is_file() or any(path.glob(f"*/{split}.json")))


def hold_out(tasks: dict[str, list[Example]], fraction: float,
             seed: int = 0) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Training tasks -> (what is left to train on, a held-out validation slice of each task).

    The slice is round(fraction * n) examples of each task drawn by a seeded shuffle of its indices
    (fixed by the seed and the task name alone, so every run with other training seeds holds out the
    same examples); both parts keep the file's order. Each held-out example must be scorable: an
    'answer' among the candidates of its 'Answer format:' line."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    kept, held = {}, {}
    for task, examples in tasks.items():
        order = list(range(len(examples)))
        random.Random(f"validation:{seed}:{task}").shuffle(order)
        chosen = set(order[:round(fraction * len(examples))])
        if not chosen or len(chosen) == len(examples):
            raise DataError(f"task {task!r}: a validation fraction of {fraction} of its {len(examples)} examples "
                            f"leaves {'no validation' if not chosen else 'nothing to train on'}")
        for i in sorted(chosen):
            if not examples[i].candidates or examples[i].answer not in examples[i].candidates:
                raise DataError(f"task {task!r}: training example {i} has no 'answer' among the candidates of an "
                                f"'Answer format:' line, so it cannot be held out for validation")
        kept[task] = [ex for i, ex in enumerate(examples) if i not in chosen]
        held[task] = [ex for i, ex in enumerate(examples) if i in chosen]
    return kept, held


# ── The prompt ─────────────────────────────────────────────────────────────────────────────────

# The template of the published LoRA / DoRA commonsense results (LLM-Adapters' generate_prompt).
# The originals are indented triple-quoted strings, so their prompts carry stray indentation
# (16 spaces before "### Instruction:" and the rest) and a trailing space after "request.";
# these are the same templates without it.
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def prompt(ex: Example) -> str:
    """The text the model reads before its response."""
    template = PROMPT_WITH_INPUT if ex.input else PROMPT
    return template.format(instruction=ex.instruction, input=ex.input)


def encode_pair(tok: Tokenizer, prompt_text: str, response: str) -> tuple[list[int], int]:
    """BOS (if the model uses one) + prompt + response + EOS as one sequence, and the index where the
    response starts.

    The text is encoded in one piece, as the model reads it at generation time; the response
    starts where that encoding stops agreeing with the prompt's own. If sentencepiece merges
    across the boundary, the merged token counts as response (a scored token too many, never
    one too few)."""
    ids = tok.encode(prompt_text + response, bos=True, eos=True)
    prompt_ids = tok.encode(prompt_text, bos=True)
    start = 0
    while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
        start += 1
    return ids, start


# ── Training examples and batches ──────────────────────────────────────────────────────────────

def encode_for_training(tok: Tokenizer, examples: list[Example], cutoff_len: int = 512,
                        train_on_prompt: bool = False) -> tuple[list[dict], dict]:
    """Tokenise examples -> ([{"input_ids", "labels"}], counts {"examples", "kept", "truncated", "dropped"}).

    Labels are the input ids where the loss counts and -100 elsewhere: the response and its EOS,
    or, with train_on_prompt, the prompt too (BOS is never a target: nothing predicts it).

    Truncation policy, for sequences longer than cutoff_len tokens: the response and its EOS are
    never cut. Tokens are removed from the start of the prompt, right after BOS: the template's
    fixed preamble goes first, then the beginning of the instruction, while its end (the options
    and "Answer format:") and "### Response:", the text closest to the answer, survive. An
    example whose response leaves no room for any prompt token is dropped. Both are counted, for
    the caller to report. (The original scripts cut the end instead, silently losing the answer
    and its EOS.)"""
    if cutoff_len < 3:
        raise ValueError(f"cutoff_len must be at least 3 (BOS, a prompt token, EOS), got {cutoff_len}")
    items, truncated, dropped = [], 0, 0
    for ex in examples:
        ids, start = encode_pair(tok, prompt(ex), ex.output)
        excess, bos = len(ids) - cutoff_len, int(tok.add_bos)  # bos: 1 if ids start with BOS, else 0
        if excess > 0:
            if excess >= start - bos:  # the prompt after BOS has start - bos tokens; keep at least one
                dropped += 1
                continue
            ids, start = ids[:bos] + ids[bos + excess:], start - excess
            truncated += 1
        labels = [-100] + ids[1:] if train_on_prompt else [-100] * start + ids[start:]
        items.append({"input_ids": ids, "labels": labels})
    return items, {"examples": len(examples), "kept": len(items), "truncated": truncated, "dropped": dropped}


def collate(items: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest item -> tokens (B, T), attention mask (B, T) (1 real, 0 padding),
    labels (B, T) (-100 on padding)."""
    T = max(len(it["input_ids"]) for it in items)
    tokens = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        tokens[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(it["input_ids"]), 1, torch.tensor(it["labels"])
    return tokens, mask, labels


@lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of n training examples in an epoch: a permutation fixed by (seed, epoch) alone, so a
    resumed run sees exactly the batches an uninterrupted one would. (A string seed is hashed with
    SHA-512 by `random`, the same on every machine and Python run.)"""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """The examples of global batch number `step` that process `rank` of `world_size` trains on.

    The data position is the step: an epoch is n // batch_size batches (the last partial batch is
    skipped), so step -> (epoch, offset) with no other state to save. Each process takes its own
    contiguous batch_size / world_size slice of the global batch, as DistributedDataParallel expects."""
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {world_size} processes")
    if n < batch_size:
        raise ValueError(f"{n} training examples are fewer than one batch of {batch_size}")
    epoch, offset = divmod(step, n // batch_size)
    batch = epoch_order(n, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]
    per_rank = batch_size // world_size
    return list(batch[rank * per_rank:(rank + 1) * per_rank])


# ── Evaluation ─────────────────────────────────────────────────────────────────────────────────

# The regex LLM-Adapters' commonsense_evaluate.py (also used for the DoRA results) searches a generated
# answer with, by label family: case-sensitive, first match wins, the whole family even where an
# example has fewer candidates (answer5 on a 4-option ARC question is "a label", and wrong).
LABEL_PATTERNS = {
    "true": r"true|false", "false": r"true|false",           # boolq
    "solution": r"solution1|solution2",                       # piqa
    "answer": r"answer1|answer2|answer3|answer4|answer5",     # ARC-Easy, ARC-Challenge, openbookqa, social_i_qa
    "ending": r"ending1|ending2|ending3|ending4",             # hellaswag
    "option": r"option1|option2",                             # winogrande
}


def label_pattern(candidates: list[str]) -> str:
    """The original regex of the candidates' family; for another family, the candidates themselves."""
    family = re.sub(r"\d+$", "", candidates[0])
    return LABEL_PATTERNS.get(family) or "|".join(map(re.escape, sorted(candidates, key=len, reverse=True)))


def extract_label(text: str, candidates: list[str]) -> str | None:
    """The first label found in a generated response (None if there is none).

    The original decodes prompt + generation and keeps what lies between the prompt's
    "### Response:" and any further one; on the generated text alone that is the part before
    its first "### Response:"."""
    found = re.findall(label_pattern(candidates), text.split("### Response:")[0])
    return found[0] if found else None


def response_for(label: str) -> str:
    """The training target of a label in these datasets; likelihood mode scores exactly this text."""
    return f"the correct answer is {label}"


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def score_candidates(model, tok: Tokenizer, examples: list[Example], batch_size: int = 16,
                     share: tuple[int, int] = (0, 1)) -> list[list[float | None]]:
    """Summed log-probability of each candidate's response "the correct answer is <label>" + EOS.

    EOS counts, as in training, so the response must end after the label: a label that is a prefix
    of another (say "answer1" of "answer10") gets no free ride. Summed, not averaged: the candidates
    share their prefix, so only the label tokens and EOS differ and sums compare like with like.
    All (example, candidate) pairs are batched together, longest first to pad little. share=(i, n):
    only every n-th batch from the i-th is scored (one process of n), the other scores are None."""
    pairs = [(e, c, *encode_pair(tok, prompt(ex), response_for(label)))
             for e, ex in enumerate(examples) for c, label in enumerate(ex.candidates)]
    pairs.sort(key=lambda p: -len(p[2]))
    scores = [[None] * len(ex.candidates) for ex in examples]
    device = _device(model)
    for b in range(share[0] * batch_size, len(pairs), share[1] * batch_size):
        chunk = pairs[b:b + batch_size]
        items = [{"input_ids": ids, "labels": [-100] * start + ids[start:]} for _, _, ids, start in chunk]
        tokens, mask, labels = (t.to(device) for t in collate(items, tok.pad_id))
        logits = model(tokens, mask)                                   # (B, T, V)
        target = labels[:, 1:]                                         # (B, T-1): the next token
        scored = target != -100                                        # (B, T-1)
        # log-softmax over the response positions only: (N, V) instead of the whole (B, T, V).
        logp = logits[:, :-1][scored].float().log_softmax(-1)          # (N, V)
        token_logp = logp.gather(-1, target[scored][:, None])[:, 0]    # (N,)
        row = torch.arange(len(chunk), device=device)[:, None].expand_as(scored)[scored]  # (N,)
        totals = torch.zeros(len(chunk), device=device).index_add_(0, row, token_logp)   # (B,)
        for (e, c, _, _), total in zip(chunk, totals.tolist()):
            scores[e][c] = total
    return scores


@torch.no_grad()
def generate_answers(model, tok: Tokenizer, examples: list[Example], batch_size: int = 16,
                     max_new_tokens: int = 32, share: tuple[int, int] = (0, 1)) -> list[str | None]:
    """Greedy continuations of the prompts (left-padded batches), decoded up to the first stop id;
    share=(i, n): only every n-th batch from the i-th (one process of n), the other texts None.

    The original scripts decode with 4-beam search; greedy is the deterministic, cheaper choice."""
    texts, device = [None] * len(examples), _device(model)
    for b in range(share[0] * batch_size, len(examples), share[1] * batch_size):
        prompts = [tok.encode(prompt(ex)) for ex in examples[b:b + batch_size]]
        T = max(map(len, prompts))
        tokens = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts])    # (B, T), left-padded
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])    # (B, T)
        out = model.generate(tokens.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                             temperature=0.0, eos_id=tok.stop_ids)                   # (B, T + n)
        for i, row in enumerate(out[:, T:].tolist()):
            end = next((j for j, t in enumerate(row) if t in tok.stop_ids), len(row))  # the first stop id
            texts[b + i] = tok.decode(row[:end])
    return texts


def baselines(examples: list[Example]) -> dict:
    """The accuracies to beat, from the gold labels alone: "chance", answering uniformly at random
    (the mean of 1 / number of candidates), and "majority", always answering the most frequent gold
    label of these examples. Test labels are rarely balanced, so majority is often well above chance."""
    counts = Counter(ex.answer for ex in examples)
    return {"chance": sum(1 / len(ex.candidates) for ex in examples) / len(examples),
            "majority": max(counts.values()) / len(examples)}


def evaluate(model, tok: Tokenizer, examples: list[Example], mode: str = "likelihood", batch_size: int = 16,
             max_new_tokens: int = 32) -> dict:
    """Accuracy on one task -> {"accuracy", "correct", "n", "chance", "majority"} (see baselines), "answers"
    (label -> how often the model chose it), plus "no_label" in generate mode (answers in which no label was found; they count as wrong)."""
    return score(examples, predict(model, tok, examples, mode, batch_size, max_new_tokens), mode)


def predict(model, tok: Tokenizer, examples: list[Example], mode: str = "likelihood", batch_size: int = 16,
            max_new_tokens: int = 32) -> list[str | None]:
    """The model's answer label for each example (None: no label found in a generated answer)."""
    return labels(examples, answer(model, tok, examples, mode, batch_size, max_new_tokens), mode)


def answer(model, tok: Tokenizer, examples: list[Example], mode: str = "likelihood", batch_size: int = 16,
           max_new_tokens: int = 32, share: tuple[int, int] = (0, 1)) -> list:
    """What the model says to each example: its candidates' scores (likelihood) or its text (generate);
    share=(i, n) answers one process's batches of n (parallel.py), None elsewhere.

    The model is put in eval mode (no dropout) and given back in the mode it came in. Gradients are
    off through torch.no_grad rather than inference_mode, whose tensors could not be reused in
    training if a module cached one."""
    if mode not in ("likelihood", "generate"):
        raise ValueError(f"eval mode must be 'likelihood' or 'generate', got {mode!r}")
    for ex in examples:
        if not ex.candidates or ex.answer not in ex.candidates:
            raise DataError(f"task {ex.task!r}: an example without candidates or gold answer cannot be scored")
    was_training = model.training
    model.eval()
    try:
        if mode == "likelihood":
            return score_candidates(model, tok, examples, batch_size, share)
        return generate_answers(model, tok, examples, batch_size, max_new_tokens, share)
    finally:
        model.train(was_training)


def labels(examples: list[Example], answers: list, mode: str = "likelihood") -> list[str | None]:
    """answer()'s scores or texts -> the label each example chose (None: no label in the text)."""
    if mode == "likelihood":
        return [ex.candidates[max(range(len(s)), key=s.__getitem__)] for ex, s in zip(examples, answers)]
    return [extract_label(t, ex.candidates) for ex, t in zip(examples, answers)]


def score(examples: list[Example], predictions: list[str | None], mode: str = "likelihood") -> dict:
    """The result of evaluate() from the predictions of predict()."""
    if not examples:
        raise ValueError("no examples to evaluate")
    correct = sum(p == ex.answer for p, ex in zip(predictions, examples))
    result = {"accuracy": correct / len(examples), "correct": correct, "n": len(examples), **baselines(examples),
              # how often each label was answered: one label answered every time is a model that ignores
              # the question (it then scores the majority rate at best)
              "answers": dict(Counter(p for p in predictions if p is not None).most_common())}
    if mode == "generate":
        result["no_label"] = sum(p is None for p in predictions)
    return result


def evaluate_tasks(model, tok: Tokenizer, tasks: dict[str, list[Example]], mode: str = "likelihood",
                   batch_size: int = 16, max_new_tokens: int = 32) -> dict[str, dict]:
    """evaluate() on each task on its own -> {task: result}; the published tables average these."""
    return {task: evaluate(model, tok, examples, mode, batch_size, max_new_tokens)
            for task, examples in tasks.items()}
