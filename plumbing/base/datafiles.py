"""LLM-Adapters commonsense data on disk: the JSON files read and checked record by record, the
folder layouts they come in, and a seeded validation slice held out of training data.

    a JSON file        [{"instruction": ..., "input": ..., "output": ..., "answer": ...}, ...]
    a task folder      <task>/{train,val,test}.json
    a folder of tasks  <folder>/<task>/{train,val,test}.json   (one layout per folder, never both)

Every refusal is a DataError, one line naming the file, the record and the field.
"""

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from plumbing.base.checks import check_regular_file
from plumbing.base.errors import BadInput


class DataError(BadInput):
    """Bad data files. The message is one line naming the file (and record, and field)."""


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
    check_regular_file(path, DataError)
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
        for key in ("instruction", "input", "output", "answer"):  # JSON allows a lone surrogate
            if isinstance(r.get(key), str) and not _encodable(r[key]):
                raise DataError(f"{where}: {key!r} holds a lone surrogate (\\ud800-\\udfff), which "
                                f"is not text")
        candidates = parse_candidates(r["instruction"])
        if split != "train" and not candidates:
            raise DataError(f"{where}: its instruction does not end with 'Answer format: a/b/...', "
                            f"so there are no candidates to score")
        answer = r.get("answer") or ""
        if split != "train" and answer not in candidates:  # scored against its candidates
            raise DataError(f"{where}: answer {answer!r} is not among its candidates {candidates}")
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
    if path.is_dir() and (path / f"{split}.json").exists():
        nested = sorted(path.glob(f"*/{split}.json"))
        if nested:
            raise DataError(f"{path}: holds both {split}.json and task folders with one "
                            f"({nested[0]}, ...); keep one layout per folder")
        path = path / f"{split}.json"
    if path.exists() and not path.is_dir():
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


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
