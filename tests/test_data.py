"""data.py: tokenizer, LLM-Adapters loading and its errors, the template, training batches, evaluation."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import data
from data import DataError, Example, Tokenizer
from plumbing.base.tokenizer import TokenizerError
from plumbing.base import datafiles
from conftest import SHARED, needs_shared

ROOT = Path(__file__).resolve().parents[1]

INSTRUCTION = ("Please choose the correct answer to the question: Which is heavier?\n\n"
               "Answer1: a feather Answer2: a rock Answer3: a leaf\n\nAnswer format: answer1/answer2/answer3")
CORPUS = [data.PROMPT.format(instruction=INSTRUCTION), data.PROMPT_WITH_INPUT.format(instruction="x", input="y"),
          "the correct answer is answer2 answer1 answer3 solution1 solution2 option1 option2 true false",
          "Please answer the following question with true or false, question: is the sky blue?",
          "The quick brown fox jumps over the lazy dog 0123456789 times.   Spaces  and\ttabs."] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """A BPE sentencepiece model with LLaMA's settings (identity normalisation, whitespace kept, digits
    split, byte fallback, unk 0 / bos 1 / eos 2, no pad), trained in well under a second."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


def ex(answer="answer2", instruction=INSTRUCTION, input="", output=None, task="t") -> Example:
    return Example(instruction, data.response_for(answer) if output is None else output, answer, input,
                   datafiles.parse_candidates(instruction), task)


# ── Tokenizer ──────────────────────────────────────────────────────────────────────────────────

def test_tokenizer_special_ids_and_bos_eos(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 400)  # pad = unk: LLaMA has none
    plain = tok.sp.encode("Which is heavier?")
    assert tok.encode("Which is heavier?") == [1] + plain
    assert tok.encode("Which is heavier?", bos=False, eos=True) == plain + [2]
    assert tok.encode("", bos=True, eos=True) == [1, 2]
    assert tok.decode(tok.encode("Which is heavier?", eos=True)) == "Which is heavier?"


@pytest.mark.parametrize("text", ["café naïve Ω ß", "emoji 😀🚀 and 中文", "  two leading spaces", " one",
                                  "runs   of    spaces", "lines\n\n\nand\ttabs\n", "digits 2024 and 3.14159",
                                  "trailing  ", "### Response:\nthe correct answer is answer1"])
def test_tokenizer_round_trips_tricky_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_byte_fallback_and_digits(tok):
    ids = tok.encode("é😀", bos=False)
    assert all(tok.sp.IsByte(i) for i in ids[1:]) and len(ids) >= 5  # é = 2 bytes, 😀 = 4 bytes
    pieces = tok.sp.id_to_piece(tok.encode("2024", bos=False))
    assert [p.lstrip("▁") for p in pieces if p.lstrip("▁")] == ["2", "0", "2", "4"]  # digits one by one
    assert tok.encode(" x") != tok.encode("x")  # a leading space is text, as in Meta's reference


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"missing\.model: tokenizer not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(TokenizerError, match=r"junk\.model: not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


# ── Loading and its errors ─────────────────────────────────────────────────────────────────────

GOOD = {"instruction": INSTRUCTION, "input": "", "output": "the correct answer is answer1", "answer": "answer1"}


def write(path: Path, text) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


def test_load_file_task_folder_and_folder_of_tasks(tmp_path):
    write(tmp_path / "tasks" / "arc" / "train.json", [GOOD, {**GOOD, "answer": "answer3"}])
    write(tmp_path / "tasks" / "arc" / "test.json", [GOOD])
    write(tmp_path / "tasks" / "obqa" / "test.json", [{**GOOD, "output": None}])  # test needs no output
    write(tmp_path / "commonsense_170k.json", [GOOD])
    assert list(data.load_tasks(tmp_path / "commonsense_170k.json")) == ["commonsense_170k"]
    assert list(data.load_tasks(tmp_path / "tasks" / "arc" / "test.json", "test")) == ["arc"]
    assert list(data.load_tasks(tmp_path / "tasks" / "arc", "test")) == ["arc"]
    tasks = data.load_tasks(tmp_path / "tasks", "test")
    assert list(tasks) == ["arc", "obqa"] and tasks["obqa"][0].task == "obqa"
    train = data.load_tasks(tmp_path / "tasks", "train")["arc"]
    assert [e.answer for e in train] == ["answer1", "answer3"]
    assert train[0].candidates == ["answer1", "answer2", "answer3"] and train[0].input == ""


@pytest.mark.parametrize("content, split, message", [
    ('[{"instruction": "a",\n "output" "b"}]', "train", "bad.json: invalid JSON at line 2 column 11: Expecting ':'"),
    ({"instruction": "a"}, "train", "bad.json: expected a JSON list of records, found an object"),
    ([], "train", "bad.json: no records (empty dataset)"),
    ([GOOD, "text"], "train", "bad.json: record 1 is a string, expected an object"),
    ([GOOD, {**GOOD, "output": None}], "train", "bad.json: record 1 has no 'output' string"),
    ([{"output": "x"}], "train", "bad.json: record 0 has no 'instruction' string"),
    ([{**GOOD, "answer": None}], "test", "bad.json: record 0 has no 'answer' string"),
    ([{**GOOD, "input": 3}], "train", "bad.json: record 0: 'input' is a number, expected a string"),
    ([GOOD, {**GOOD, "answer": "answer7"}], "train",
     "bad.json: record 1: answer 'answer7' is not among its candidates ['answer1', 'answer2', 'answer3']"),
    ([{**GOOD, "instruction": "no format here"}], "test",
     "bad.json: record 0: its instruction does not end with 'Answer format: a/b/...'"),
])
def test_bad_data_is_a_one_line_error_naming_file_record_and_field(tmp_path, content, split, message):
    write(tmp_path / "bad.json", content)
    with pytest.raises(DataError) as e:
        data.load_tasks(tmp_path / "bad.json", split)
    assert message in str(e.value) and "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.json: no such file or directory"):
        data.load_tasks(tmp_path / "nowhere.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no test data \(looked for .*test\.json and .*<task>/test\.json\)"):
        data.load_tasks(tmp_path / "empty", "test")
    (tmp_path / "latin1.json").write_bytes(b'[{"instruction": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin1\.json: cannot read"):
        data.load_tasks(tmp_path / "latin1.json")
    # Training data need not have candidates (the answer is checked only where both are present).
    write(tmp_path / "free.json", [{"instruction": "Say hi.", "output": "hi"}])
    assert data.load_tasks(tmp_path / "free.json")["free"][0].candidates == []


# ── The template ───────────────────────────────────────────────────────────────────────────────

def test_template_without_and_with_input():
    assert data.prompt(Example("Pick one.")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nPick one.\n\n### Response:\n")
    assert data.prompt(Example("Pick one {0}.", input="Some {context}.")) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nPick one {0}.\n\n"
        "### Input:\nSome {context}.\n\n### Response:\n")


# ── Training examples ──────────────────────────────────────────────────────────────────────────

def test_loss_covers_only_the_response_and_eos(tok):
    (item,), counts = data.encode_for_training(tok, [ex("answer2")])
    ids, labels = item["input_ids"], item["labels"]
    assert ids == tok.encode(data.prompt(ex()) + "the correct answer is answer2", eos=True)
    start = labels.count(-100)
    assert labels[:start] == [-100] * start and labels[start:] == ids[start:]
    assert tok.decode(ids[start:]) == "the correct answer is answer2" and labels[-1] == tok.eos_id
    assert tok.decode(ids[:start]) == data.prompt(ex())
    assert counts == {"examples": 1, "kept": 1, "truncated": 0, "dropped": 0}
    (item,), _ = data.encode_for_training(tok, [ex("answer2")], train_on_prompt=True)
    assert item["labels"] == [-100] + ids[1:]  # everything but BOS, which nothing predicts


def test_truncation_keeps_the_answer_cuts_the_prompt_start_and_counts(tok):
    long = ex("answer3", instruction="Background: " + "the lazy dog " * 40 + INSTRUCTION)
    ids, start = data.encode_pair(tok, data.prompt(long), long.output)
    response = ids[start:]
    short = ex("answer1")
    items, counts = data.encode_for_training(tok, [long, short, long], cutoff_len=len(ids) - 50)
    assert counts == {"examples": 3, "kept": 3, "truncated": 2, "dropped": 0}
    assert items[1] == data.encode_for_training(tok, [short])[0][0]  # one that fits is left alone
    cut = items[0]
    assert len(cut["input_ids"]) == len(ids) - 50 and cut["input_ids"][0] == tok.bos_id
    assert cut["input_ids"][-len(response):] == response == cut["labels"][-len(response):]
    assert cut["input_ids"][1:] == ids[51:]  # the start of the prompt went, its end stayed
    assert tok.decode(cut["input_ids"]).endswith(INSTRUCTION + "\n\n### Response:\nthe correct answer is answer3")
    assert cut["labels"].count(-100) == len(cut["labels"]) - len(response)
    just = len(response) + 2  # room for BOS and exactly one prompt token: truncated; one less: dropped
    items, counts = data.encode_for_training(tok, [long], cutoff_len=just)
    assert counts["truncated"] == 1 and items[0]["input_ids"] == [tok.bos_id, ids[start - 1]] + response
    items, counts = data.encode_for_training(tok, [long], cutoff_len=just - 1)
    assert items == [] and counts == {"examples": 1, "kept": 0, "truncated": 0, "dropped": 1}
    with pytest.raises(ValueError, match="cutoff_len must be at least 3"):
        data.encode_for_training(tok, [short], cutoff_len=2)


def test_collate_right_pads_with_mask_and_ignored_labels():
    items = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    tokens, mask, labels = data.collate(items, pad_id=0)
    assert tokens.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[-100, 5, 6], [-100, 7, -100]]


def test_batches_are_deterministic_resumable_and_sharded():
    n, bs = 23, 4  # 5 batches an epoch, 3 examples skipped
    epoch0 = [data.batch_indices(n, bs, seed=7, step=s) for s in range(5)]
    assert len({i for b in epoch0 for i in b}) == 20 and all(len(b) == 4 for b in epoch0)
    assert data.batch_indices(n, bs, seed=7, step=5) != epoch0[0]  # a new epoch, a new order
    assert data.batch_indices(n, bs, seed=8, step=0) != epoch0[0]
    data.epoch_order.cache_clear()
    assert data.batch_indices(n, bs, seed=7, step=3) == epoch0[3]  # resuming at step 3 needs nothing else
    shards = [data.batch_indices(n, bs, seed=7, step=6, rank=r, world_size=2) for r in range(2)]
    assert shards[0] + shards[1] == data.batch_indices(n, bs, seed=7, step=6)
    # A fresh interpreter (as after a restart, with another hash seed) gives the same order.
    code = "import data; print(list(data.epoch_order(23, 7, 1)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert out.strip() == str(list(data.epoch_order(23, 7, 1)))
    with pytest.raises(ValueError, match="batch size 4 is not a multiple of the 3 processes"):
        data.batch_indices(n, bs, seed=7, step=0, world_size=3)
    with pytest.raises(ValueError, match="3 training examples are fewer than one batch of 4"):
        data.batch_indices(3, bs, seed=7, step=0)


# ── Label families (real files) ────────────────────────────────────────────────────────────────

ORIGINAL_REGEX = {"true": r"true|false", "solution": r"solution1|solution2", "option": r"option1|option2",
                  "answer": r"answer1|answer2|answer3|answer4|answer5", "ending": r"ending1|ending2|ending3|ending4"}


def test_candidates_are_parsed_from_the_answer_format_line():
    assert datafiles.parse_candidates(INSTRUCTION) == ["answer1", "answer2", "answer3"]
    assert datafiles.parse_candidates("Is it?\n\nAnswer format: true/false  \n") == ["true", "false"]
    assert datafiles.parse_candidates("Option1: a Option2: b Answer format: option1/option2") == ["option1", "option2"]
    assert datafiles.parse_candidates("Answer format: answer1/answer2 is the format. Go.") == []  # not at the end
    assert datafiles.parse_candidates("Say hi.") == []


def test_extraction_matches_the_original_scripts():
    cands = ["answer1", "answer2", "answer3", "answer4"]
    assert data.extract_label("the correct answer is answer3", cands) == "answer3"
    assert data.extract_label("answer2, no wait, answer1", cands) == "answer2"  # first match wins
    assert data.extract_label("the correct answer is answer5", cands) == "answer5"  # the family, not the options
    assert data.extract_label("The correct answer is Answer1", cands) is None  # case-sensitive
    assert data.extract_label("I am not sure.", cands) is None
    assert data.extract_label("hmm\n### Response:\nanswer1", cands) is None  # only up to a repeated marker
    assert data.extract_label("it is untrue", ["true", "false"]) == "true"  # as re.findall(r'true|false')
    assert data.extract_label("yes or no: yes", ["yes", "no"]) == "yes"  # another family: its own labels
    assert data.label_pattern(["ending1", "ending2", "ending3", "ending4"]) == ORIGINAL_REGEX["ending"]


@needs_shared
def test_every_real_file_loads_and_every_label_family_parses_and_extracts():
    sizes = {"ARC-Challenge": (1119, 1172), "ARC-Easy": (2251, 2376), "boolq": (9427, 3270),
             "openbookqa": (4957, 500), "piqa": (None, 1838), "social_i_qa": (None, 1954), "winogrande": (None, 1267)}
    families = set()
    for split, column in (("train", 0), ("test", 1)):
        for task, examples in data.load_tasks(SHARED, split).items():
            assert len(examples) == sizes[task][column], (task, split)
            for e in examples:
                family = e.candidates[0].rstrip("0123456789")
                families.add(family)
                assert data.label_pattern(e.candidates) == ORIGINAL_REGEX[family], task
                assert e.answer in e.candidates and e.output == data.response_for(e.answer)
                assert data.extract_label(e.output, e.candidates) == e.answer
    assert families == {"answer", "true", "solution", "option"}  # hellaswag (ending) is not kept there


# ── Evaluation on stand-in models ──────────────────────────────────────────────────────────────

class Oracle(torch.nn.Module):
    """A rigged model: after any prefix of one of the `favoured` sequences it puts a large logit on
    that sequence's next token, and a flat one everywhere else. Padding is read off the mask."""

    def __init__(self, favoured: list[list[int]], vocab_size: int):
        super().__init__()
        self.vocab_size, self.seen_training = vocab_size, []
        self.next = {tuple(seq[:t + 1]): seq[t + 1] for seq in favoured for t in range(len(seq) - 1)}
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens, attention_mask=None):
        self.seen_training.append(self.training)
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        for b in range(tokens.shape[0]):
            real = [(t, int(tokens[b, t])) for t in range(tokens.shape[1]) if mask[b, t]]
            for k, (t, _) in enumerate(real):
                favoured = self.next.get(tuple(i for _, i in real[:k + 1]))
                if favoured is not None:
                    logits[b, t, favoured] = 8.0
        return logits


def gold_sequences(tok, examples, pick=lambda e: e.answer):
    return [data.encode_pair(tok, data.prompt(e), data.response_for(pick(e)))[0] for e in examples]


def three_tasks_examples():
    boolq = "Please answer with true or false, question: is the sky blue?\n\nAnswer format: true/false"
    wino = "Fill in the blank: _ is heavy.\n\nOption1: rock Option2: feather Answer format: option1/option2"
    q = lambda i, text: text.replace("?", f" (question {i})?")  # noqa: E731  distinct prompts
    return [ex("answer2", q(1, INSTRUCTION)), ex("answer3", q(2, INSTRUCTION)), ex("answer1", q(3, INSTRUCTION)),
            ex("true", q(4, boolq)), ex("false", q(5, boolq)), ex("option2", wino),
            ex("answer1", q(6, INSTRUCTION) + "/answer4/answer5")]


def test_likelihood_picks_the_rigged_answer_in_any_batch_size(tok):
    examples = three_tasks_examples()
    oracle = Oracle(gold_sequences(tok, examples), tok.vocab_size)
    oracle.train()
    for batch_size in (1, 3, 64):
        result = data.score_task(oracle, tok, examples, "likelihood", batch_size=batch_size)
        assert result == {"accuracy": 1.0, "correct": 7, "n": 7, "chance": pytest.approx((3 / 3 + 3 / 2 + 1 / 5) / 7),
                          "majority": 2 / 7,  # answer1 is the gold label twice
                          "answers": {"answer1": 2, "answer2": 1, "answer3": 1, "true": 1, "false": 1, "option2": 1}}
    assert oracle.training and not any(oracle.seen_training)  # eval inside, training mode given back
    # Rigged towards each first candidate (right only for examples 2, 3 and 6), it follows.
    contrarian = Oracle(gold_sequences(tok, examples, lambda e: e.candidates[0]), tok.vocab_size)
    assert data.score_task(contrarian, tok, examples, batch_size=4)["correct"] == 3


def test_likelihood_counts_eos(tok):
    """When one label's tokens are a prefix of another's (answer1, answer10), a sum without EOS would always
    favour the shorter; with EOS the model's preference decides."""
    e = Example("Pick.\n\nAnswer format: answer1/answer10", "", "answer10", "", ["answer1", "answer10"])
    seq_1, seq_10 = (gold_sequences(tok, [e], lambda _: label)[0] for label in ("answer1", "answer10"))
    assert seq_10[:len(seq_1) - 1] == seq_1[:-1]  # "answer1" is a token prefix of "answer10" (split digits)
    assert data.score_task(Oracle([seq_10], tok.vocab_size), tok, [e])["accuracy"] == 1.0
    e.answer = "answer1"
    assert data.score_task(Oracle([seq_1], tok.vocab_size), tok, [e])["accuracy"] == 1.0


class Canned(torch.nn.Module):
    """Generates a fixed text per prompt (then EOS and junk), checking the left-padding contract."""

    def __init__(self, tok, replies: dict[str, str]):
        super().__init__()
        self.tok, self.replies, self.dummy = tok, replies, torch.nn.Parameter(torch.zeros(()))

    def generate(self, tokens, attention_mask=None, max_new_tokens=32, temperature=0.0, eos_id=None):
        assert attention_mask[:, -1].all() and temperature == 0.0 and eos_id == self.tok.stop_ids == [2]
        rows = []
        for b in range(tokens.shape[0]):
            text = self.tok.decode(tokens[b][attention_mask[b].bool()])
            reply = next(r for key, r in self.replies.items() if key in text)
            after_eos = self.tok.encode("answer1", bos=False)  # must never be read
            rows.append((self.tok.encode(reply, bos=False, eos=True) + after_eos)[:max_new_tokens])
        n = max(map(len, rows))
        return torch.cat([tokens, torch.tensor([r + eos_id * (n - len(r)) for r in rows])], dim=1)


def test_generate_mode_extracts_first_label_and_counts_answers_without_one(tok):
    examples = [ex("answer2", INSTRUCTION.replace("heavier", "heavy")), ex("answer3"),
                ex("answer1", "Short?\n\nAnswer format: answer1/answer2")]
    model = Canned(tok, {"heavy?": "the correct answer is answer2", "heavier?": "I do not know",
                         "Short?": "the correct answer is answer3"})  # "answer1" after EOS must not count
    result = data.score_task(model, tok, examples, "generate", batch_size=2)
    assert result == {"accuracy": 1 / 3, "correct": 1, "n": 3, "chance": pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3),
                      "majority": 1 / 3, "answers": {"answer2": 1, "answer3": 1}, "no_label": 1}
    with pytest.raises(ValueError, match="eval mode must be 'likelihood' or 'generate', got 'beam'"):
        data.score_task(model, tok, examples, "beam")


def test_baselines_chance_and_majority():
    examples = [ex(label) for label in ("answer1", "answer1", "answer1", "answer2")]
    assert data.baselines(examples) == {"chance": pytest.approx(1 / 3), "majority": 3 / 4}
    # The majority label answers every question it is the gold of: its accuracy is the label's share.
    assert data.baselines([ex("answer3")]) == {"chance": pytest.approx(1 / 3), "majority": 1.0}


def test_hold_out_is_seeded_by_task_and_disjoint():
    tasks = {"a": [ex(f"answer{1 + i % 3}", f"Q{i}?\n\nAnswer format: answer1/answer2/answer3") for i in range(20)],
             "b": [ex("answer1", f"R{i}?\n\nAnswer format: answer1/answer2/answer3") for i in range(10)]}
    kept, held = data.hold_out(tasks, 0.2)
    assert {t: len(v) for t, v in held.items()} == {"a": 4, "b": 2}
    for t in tasks:
        assert sorted(map(id, kept[t] + held[t])) == sorted(map(id, tasks[t]))   # a partition of each task
        assert kept[t] == [e for e in tasks[t] if e in kept[t]]                   # in the file's order
    assert data.hold_out(tasks, 0.2) == (kept, held)                              # the same every time
    assert data.hold_out(tasks, 0.2, seed=1)[1] != held
    with pytest.raises(data.DataError, match="task 'a': a validation fraction of 0.01 of its 20 examples leaves "
                                             "no validation"):
        data.hold_out(tasks, 0.01)
    unscorable = {"c": [Example("No format line.", "the correct answer is x", "x")] * 4}
    with pytest.raises(data.DataError, match="task 'c': training example [0-9] has no 'answer' among the candidates"):
        data.hold_out(unscorable, 0.5)


# ── Evaluation on a tiny random model.Transformer ──────────────────────────────────────────────

@pytest.fixture(scope="module")
def tiny(tok):
    model = pytest.importorskip("model", reason="model.py is not importable")
    torch.manual_seed(0)
    net = model.Transformer(model.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                            vocab_size=tok.vocab_size, max_seq_len=512))
    for p in net.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)  # varied logits, so that candidates differ
    return net.eval()


def test_scores_are_log_probabilities_of_response_and_eos_whatever_the_batch(tok, tiny):
    examples = three_tasks_examples()
    batched = data.score_candidates(tiny, tok, examples, batch_size=5)
    for e, row in zip(examples, batched):
        for label, score in zip(e.candidates, row):
            ids, start = data.encode_pair(tok, data.prompt(e), data.response_for(label))
            with torch.no_grad():
                logp = tiny(torch.tensor([ids]))[0, :-1].log_softmax(-1)  # (T-1, V), alone, unpadded
            expected = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
            assert score == pytest.approx(expected, abs=1e-4)


def test_generate_mode_runs_batched_like_one_by_one(tok, tiny):
    examples = three_tasks_examples()
    batched = data.generate_answers(tiny, tok, examples, batch_size=4, max_new_tokens=6)
    assert batched == [data.generate_answers(tiny, tok, [e], max_new_tokens=6)[0] for e in examples]
    results = data.evaluate_tasks(tiny, tok, {"a": examples[:3], "b": examples[3:]}, "generate", max_new_tokens=6)
    assert [r["n"] for r in results.values()] == [3, 4] and all(0 <= r["no_label"] <= r["n"] for r in results.values())
