"""Text in, tensors out: the prompt, training batches, and the two
evaluation protocols.

Reading order: the prompt template -> training examples and batches ->
evaluation (likelihood scoring and generation). Reading and checking the
JSON files, and the tokenizer, are plumbing.

Legend: B batch, T sequence length, V vocabulary, N scored (response)
positions in a batch.
"""

import random
import re
from collections import Counter
from functools import lru_cache

import torch

# Reading the JSON files and checking every record is plumbing; an Example
# is what they hold.
from plumbing.base.datafiles import (
    DataError, Example, hold_out, load_tasks)  # noqa: F401
from plumbing.base.tokenizer import Tokenizer


# ── The prompt ──────────────────────────────────────────────────────────

# The template of the published LoRA / DoRA commonsense results
# (LLM-Adapters' generate_prompt). The originals are indented triple-quoted
# strings, so their prompts carry stray indentation (16 spaces before
# "### Instruction:" and the rest) and a trailing space after "request.";
# these are the same templates without it.
PROMPT = ("Below is an instruction that describes a task. "
          "Write a response that appropriately completes the request."
          "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, "
                     "paired with an input that provides further context. "
                     "Write a response that appropriately completes the "
                     "request.\n\n### Instruction:\n{instruction}\n\n"
                     "### Input:\n{input}\n\n### Response:\n")


def prompt(ex: Example) -> str:
    """The text the model reads before its response."""
    template = PROMPT_WITH_INPUT if ex.input else PROMPT
    return template.format(instruction=ex.instruction, input=ex.input)


def encode_pair(tok: Tokenizer, prompt_text: str,
                response: str) -> tuple[list[int], int]:
    """BOS (if the model uses one) + prompt + response + EOS as one
    sequence, and the index where the response starts.

    The response starts where the encoding of the whole text, as the model
    reads it, stops agreeing with the prompt's own. A token merged across
    the boundary counts as response: a scored token too many, never one
    too few."""
    ids = tok.encode(prompt_text + response, bos=True, eos=True)
    prompt_ids = tok.encode(prompt_text, bos=True)
    start = 0
    while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
        start += 1
    return ids, start


# ── Training examples and batches ───────────────────────────────────────

def encode_for_training(tok: Tokenizer, examples: list[Example],
                        cutoff_len: int = 512, train_on_prompt: bool = False
                        ) -> tuple[list[dict], dict]:
    """Tokenise examples -> ([{"input_ids", "labels"}], the counts of
    "examples", "kept", "truncated" and "dropped").

    Labels are the ids where the loss counts and -100 elsewhere: the
    response and its EOS, or with train_on_prompt the prompt too (never
    BOS: nothing predicts it).

    An example longer than cutoff_len tokens keeps its response and EOS.
    Tokens go from the start of the prompt, after BOS: the template's
    preamble first, then the instruction's beginning, while its end (the
    options, "Answer format:") and "### Response:", closest to the answer,
    survive. An example with no room left for its prompt is dropped. The
    original scripts cut the end instead, silently losing the answer and
    its EOS."""
    if cutoff_len < 3:
        raise ValueError(f"cutoff_len must be at least 3 "
                         f"(BOS, a prompt token, EOS): {cutoff_len}")
    items, truncated, dropped = [], 0, 0
    for ex in examples:
        ids, start = encode_pair(tok, prompt(ex), ex.output)
        # bos is 1 if the ids start with BOS.
        excess, bos = len(ids) - cutoff_len, int(tok.add_bos)
        if excess > 0:
            # The prompt after BOS has start - bos tokens: keep one.
            if excess >= start - bos:
                dropped += 1
                continue
            ids, start = ids[:bos] + ids[bos + excess:], start - excess
            truncated += 1
        labels = ([-100] + ids[1:] if train_on_prompt
                  else [-100] * start + ids[start:])
        items.append({"input_ids": ids, "labels": labels})
    return items, {"examples": len(examples), "kept": len(items),
                   "truncated": truncated, "dropped": dropped}


def collate(items: list[dict], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest item -> tokens (B, T), attention mask
    (B, T), 1 real and 0 padding, and labels (B, T), -100 on padding."""
    T = max(len(it["input_ids"]) for it in items)
    tokens = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        tokens[i, :n], mask[i, :n] = torch.tensor(it["input_ids"]), 1
        labels[i, :n] = torch.tensor(it["labels"])
    return tokens, mask, labels


@lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of n training examples in an epoch, fixed by (seed, epoch)
    alone, so that a resumed run sees the batches an uninterrupted one
    would. `random` hashes a string seed with SHA-512, the same on every
    machine."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(n: int, batch_size: int, seed: int, step: int,
                  rank: int = 0, world_size: int = 1) -> list[int]:
    """The examples of global batch `step` that process `rank` of
    `world_size` trains on.

    The data position is the step: an epoch is n // batch_size batches (a
    partial last batch is skipped), so step -> (epoch, offset), and there
    is nothing else to save. Each process takes its own contiguous slice.
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of "
                         f"the {world_size} processes")
    if n < batch_size:
        raise ValueError(f"{n} training examples are fewer than one batch "
                         f"of {batch_size}")
    epoch, offset = divmod(step, n // batch_size)
    batch = epoch_order(n, seed, epoch)[offset * batch_size:(offset + 1) * batch_size]
    per_rank = batch_size // world_size
    return list(batch[rank * per_rank:(rank + 1) * per_rank])


MAX_NEW_TOKENS = 32  # generated per answer in generate mode


# ── Evaluation ──────────────────────────────────────────────────────────

# The regexes that LLM-Adapters' commonsense_evaluate.py (used for the DoRA
# results too) searches a generated answer with, by label family. They are
# case-sensitive, the first match wins, and the whole family counts even
# where an example has fewer candidates: answer5 on a 4-option ARC question
# is a label, and wrong.
LABEL_PATTERNS = {
    "true": r"true|false", "false": r"true|false",        # boolq
    "solution": r"solution1|solution2",                    # piqa
    "answer": r"answer1|answer2|answer3|answer4|answer5",  # ARC, obqa, siqa
    "ending": r"ending1|ending2|ending3|ending4",          # hellaswag
    "option": r"option1|option2",                          # winogrande
}


def label_pattern(candidates: list[str]) -> str:
    """The original regex of the candidates' family; for another family,
    the candidates."""
    family = re.sub(r"\d+$", "", candidates[0])
    longest_first = sorted(candidates, key=len, reverse=True)
    return LABEL_PATTERNS.get(family) or "|".join(map(re.escape, longest_first))


def extract_label(text: str, candidates: list[str]) -> str | None:
    """The first label found in a generated response, or None, before any
    further "### Response:" (the original reads between the prompt's one
    and the next)."""
    found = re.findall(label_pattern(candidates), text.split("### Response:")[0])
    return found[0] if found else None


def response_for(label: str) -> str:
    """The training target of a label in these datasets; likelihood mode
    scores exactly this."""
    return f"the correct answer is {label}"


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def score_candidates(model, tok: Tokenizer, examples: list[Example],
                     batch_size: int = 16, share: tuple[int, int] = (0, 1)
                     ) -> list[list[float | None]]:
    """The summed log-probability of each candidate's response, "the
    correct answer is <label>" + EOS.

    EOS counts, as in training: a label that is a prefix of another
    ("answer1" of "answer10") gets no free ride. Summed, not averaged: the
    candidates share their prefix, so sums compare like with like. All
    (example, candidate) pairs are batched, longest first to pad little.
    share=(i, n) scores only every n-th batch from the i-th (one process of
    n); the others are None."""
    pairs = [(e, c, *encode_pair(tok, prompt(ex), response_for(label)))
             for e, ex in enumerate(examples)
             for c, label in enumerate(ex.candidates)]
    pairs.sort(key=lambda p: -len(p[2]))
    scores = [[None] * len(ex.candidates) for ex in examples]
    device = _device(model)
    for b in range(share[0] * batch_size, len(pairs), share[1] * batch_size):
        chunk = pairs[b:b + batch_size]
        items = [{"input_ids": ids, "labels": [-100] * start + ids[start:]}
                 for _, _, ids, start in chunk]
        tokens, mask, labels = (t.to(device)
                                for t in collate(items, tok.pad_id))
        logits = model(tokens, mask)  # (B, T, V)
        # Each position is scored on the next token: (B, T-1).
        target = labels[:, 1:]
        scored = target != -100  # (B, T-1)
        # log-softmax over the response positions only: (N, V) instead of
        # the whole (B, T, V).
        logp = logits[:, :-1][scored].float().log_softmax(-1)  # (N, V)
        token_logp = logp.gather(-1, target[scored][:, None])[:, 0]  # (N,)
        # Sum each row's token log-probabilities: (B,).
        row = (torch.arange(len(chunk), device=device)[:, None]
               .expand_as(scored)[scored])  # (N,)
        totals = (torch.zeros(len(chunk), device=device)
                  .index_add_(0, row, token_logp))
        for (e, c, _, _), total in zip(chunk, totals.tolist()):
            scores[e][c] = total
    return scores


@torch.no_grad()
def generate_answers(model, tok: Tokenizer, examples: list[Example],
                     batch_size: int = 16,
                     max_new_tokens: int = MAX_NEW_TOKENS,
                     share=(0, 1)) -> list[str | None]:
    """Greedy continuations of the prompts, in left-padded batches, decoded
    up to the first stop id. share=(i, n) answers only every n-th batch
    from the i-th (one process of n); the other texts are None.

    The original scripts decode with 4-beam search; greedy is the
    deterministic, cheaper choice."""
    texts, device = [None] * len(examples), _device(model)
    for b in range(share[0] * batch_size, len(examples), share[1] * batch_size):
        prompts = [tok.encode(prompt(ex)) for ex in examples[b:b + batch_size]]
        T = max(map(len, prompts))
        # Left-padded, so that every answer follows its prompt: (B, T).
        tokens = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(tokens.to(device), mask.to(device),
                             max_new_tokens=max_new_tokens, temperature=0.0,
                             eos_id=tok.stop_ids)  # (B, T + n)
        for i, row in enumerate(out[:, T:].tolist()):
            end = next((j for j, t in enumerate(row) if t in tok.stop_ids),
                       len(row))
            texts[b + i] = tok.decode(row[:end])
    return texts


def baselines(examples: list[Example]) -> dict:
    """The accuracies to beat, from the gold labels alone.

    "chance" answers uniformly at random (the mean of 1 / number of
    candidates); "majority" always answers the most frequent gold label of
    these examples. Test labels are rarely balanced, so majority is often
    above chance."""
    counts = Counter(ex.answer for ex in examples)
    return {"chance": sum(1 / len(ex.candidates) for ex in examples) / len(examples),
            "majority": max(counts.values()) / len(examples)}


def score_task(model, tok: Tokenizer, examples: list[Example],
               mode: str = "likelihood", batch_size: int = 16,
               max_new_tokens: int = MAX_NEW_TOKENS, shared=None) -> dict:
    """Accuracy on one task: {"accuracy", "correct", "n", "chance",
    "majority"} (see baselines), "answers" (label -> how often the model
    chose it) and, in generate mode, "no_label" (answers in which no label
    was found; they count as wrong). The model chooses the candidate it
    scores highest (likelihood) or the first label in its text (generate).

    shared is plumbing/parallel.py's wrapper of score_candidates and
    generate_answers that deals their batches out between processes; with
    None, this process answers every example. The model is put in eval
    mode (no dropout) and given back in the mode it came in. Gradients are
    off through torch.no_grad rather than inference_mode, whose tensors
    could not be reused in training if a module cached one."""
    if mode not in ("likelihood", "generate"):
        raise ValueError(f"eval mode must be 'likelihood' or 'generate', "
                         f"got {mode!r}")
    for ex in examples:
        if not ex.candidates or ex.answer not in ex.candidates:
            raise DataError(f"task {ex.task!r}: an example without "
                            f"candidates or gold answer cannot be scored")
    # One process answers every batch itself.
    deal = shared or (lambda answer: answer)
    was_training = model.training
    model.eval()
    try:
        if mode == "likelihood":
            scores = deal(score_candidates)(model, tok, examples, batch_size)
            predictions = [ex.candidates[max(range(len(s)), key=s.__getitem__)]
                           for ex, s in zip(examples, scores)]
        else:
            texts = deal(generate_answers)(model, tok, examples, batch_size,
                                           max_new_tokens)
            predictions = [extract_label(t, ex.candidates)
                           for ex, t in zip(examples, texts)]
    finally:
        model.train(was_training)
    if not examples:
        raise ValueError("no examples to evaluate")
    correct = sum(p == ex.answer for p, ex in zip(predictions, examples))
    result = {"accuracy": correct / len(examples), "correct": correct,
              "n": len(examples), **baselines(examples),
              # One label chosen every time is a model that ignores the
              # question: it scores the majority rate at best.
              "answers": dict(Counter(p for p in predictions
                                      if p is not None).most_common())}
    if mode == "generate":
        result["no_label"] = sum(p is None for p in predictions)
    return result


def evaluate_tasks(model, tok: Tokenizer, tasks: dict[str, list[Example]],
                   mode: str = "likelihood", batch_size: int = 16,
                   max_new_tokens: int = MAX_NEW_TOKENS,
                   shared=None) -> dict[str, dict]:
    """score_task on each task on its own -> {task: result}; the published
    tables average these."""
    return {task: score_task(model, tok, examples, mode, batch_size,
                             max_new_tokens, shared)
            for task, examples in tasks.items()}
