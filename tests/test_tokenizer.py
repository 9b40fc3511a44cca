"""tokenizer.py: tokenizer.json models against transformers' AutoTokenizer, special tokens from the shipped
files, the fit with the model, and train.py on a model that ships only a tokenizer.json."""

import json
import sys

import pytest
import torch
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

import train
from conftest import train_tokenizer, write_tiny_model
from plumbing.base.tokenizer import Tokenizer, TokenizerError, check_tokenizer_fits

transformers = pytest.importorskip("transformers")

# Llama-3's pre-tokenizer split (its tokenizer.json), then GPT-2's byte-level alphabet. SmolLM2's tokenizer.json
# splits digits one by one, then uses GPT-2's byte-level regex. Both are byte-level BPE.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\nWhich is heavier?\n\nAnswer format: answer1/answer2\n\n### Response:\n"
          "the correct answer is answer2", "Numbers 2024 and 3.14159, 1000000 times.", "  two   spaces\tand tabs",
          "emoji 😀🚀 and 中文的句子 and café naïve"] * 20
TEXTS = ["Which is heavier?", " one leading space", "   three leading spaces", "runs   of    spaces  ",
         "lines\n\n\nand\ttabs\n", "digits 2024 and 1234567 and 3.14159", "emoji 😀🚀", "中文的句子 CJK",
         "a special <|eot_id|> in the text", "<|endoftext|> at the start",
         "### Response:\nthe correct answer is answer1"]

# The two conventions of byte-level BPE models: Llama-3 (special tokens after the vocabulary, BOS added by
# the post-processor, instruct EOS <|eot_id|> with three stop ids) and SmolLM2 (<|endoftext|> = id 0 is
# bos, eos and unk, and no BOS is added).
STYLES = {
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>"], first=False,
                   config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                           "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                           "model_max_length": 131072}),
    "smollm2": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"], first=True,
                    config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                            "add_prefix_space": False, "tokenizer_class": "PreTrainedTokenizerFast",
                            "clean_up_tokenization_spaces": False, "model_max_length": 8192}),
}


def byte_level_bpe(directory, style: str, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer.json offline, with the files a model of this style ships beside it."""
    s = STYLES[style]
    directory.mkdir(parents=True, exist_ok=True)
    tk = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "llama3"))  # Llama-3's: whole words first
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)] if style == "llama3" else
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       special_tokens=s["special"] if s["first"] else [],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if not s["first"]:
        tk.add_special_tokens(s["special"])
    if style == "llama3":
        bos = tk.token_to_id("<|begin_of_text|>")
        tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                          special_tokens=[("<|begin_of_text|>", bos)])
        generation = {"bos_token_id": bos, "eos_token_id": [tk.token_to_id(t) for t in s["special"][1:3]]}
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        generation = {"bos_token_id": 0, "eos_token_id": 0}
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(s["config"]))
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


@pytest.mark.parametrize("style", STYLES)
def test_tokenizer_json_matches_transformers(tmp_path, style):
    directory = byte_level_bpe(tmp_path, style)
    ours = Tokenizer(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.file == directory / "tokenizer.json" and ours.sp is None
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.add_bos == (style == "llama3")
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), text  # with the model's BOS (or none)
        assert ours.encode(text, bos=False) == hf.encode(text, add_special_tokens=False), text
        ids = ours.encode(text, eos=True)
        assert ids[-1] == ours.eos_id
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert all(ours.encode(t, bos=False) == raw.encode(t, add_special_tokens=False).ids for t in TEXTS)
    # Special tokens written in the text are the special ids, as in transformers.
    assert ours.tk.token_to_id("<|eot_id|>") in ours.encode("a <|eot_id|> b", bos=False)
    assert ours.decode(ours.encode(" one leading space")) == " one leading space"


def test_special_tokens_from_the_shipped_files(tmp_path):
    llama3 = Tokenizer(byte_level_bpe(tmp_path / "llama3", "llama3"))
    ids = {t: llama3.tk.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}
    assert llama3.encode("x")[0] == ids["<|begin_of_text|>"] == llama3.bos_id
    assert llama3.eos_id == ids["<|eot_id|>"]  # tokenizer_config.json's eos_token ends each response
    assert llama3.stop_ids == sorted([ids["<|end_of_text|>"], ids["<|eot_id|>"]])  # + generation_config.json's
    assert llama3.pad_id == llama3.eos_id  # no pad token, no unknown token: EOS (masked out anyway)
    smol = Tokenizer(byte_level_bpe(tmp_path / "smol", "smollm2"))
    assert (smol.add_bos, smol.eos_id, smol.stop_ids, smol.pad_id) == (False, 0, [0], 0)
    assert smol.encode("x", bos=True) == smol.encode("x", bos=False)
    # add_bos_token in tokenizer_config.json wins over the post-processor, either way.
    config = json.loads((tmp_path / "smol" / "tokenizer_config.json").read_text())
    (tmp_path / "smol" / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert Tokenizer(tmp_path / "smol").encode("x") == [0] + smol.encode("x")
    config = json.loads((tmp_path / "llama3" / "tokenizer_config.json").read_text())
    (tmp_path / "llama3" / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert Tokenizer(tmp_path / "llama3" / "tokenizer.json").encode("x") == llama3.encode("x", bos=False)
    # config.json's eos_token_id list is read too, and a file given directly reads the files beside it.
    (tmp_path / "llama3" / "config.json").write_text(json.dumps({"eos_token_id": [ids["<|begin_of_text|>"]]}))
    assert ids["<|begin_of_text|>"] in Tokenizer(tmp_path / "llama3" / "tokenizer.json").stop_ids


def test_directory_prefers_a_sentencepiece_tokenizer_model(tmp_path):
    byte_level_bpe(tmp_path, "llama3")
    (tmp_path / "tokenizer.model").write_text("tiktoken's format, as in Llama-3's original/ folder")
    assert Tokenizer(tmp_path).file == tmp_path / "tokenizer.json"
    train_tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: bos_token '<\|begin_of_text\|>' is not a "
                                             r"token of .*tokenizer\.model"):
        Tokenizer(tmp_path)  # the files beside it describe another tokenizer
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "add_bos_token": True}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer(tmp_path)
    assert tok.file == tmp_path / "tokenizer.model" and tok.tk is None
    assert (tok.add_bos, tok.bos_id, tok.eos_id, tok.stop_ids, tok.pad_id) == (True, 1, 2, [2], 0)


def test_hf_cache_folder_resolves_to_its_snapshot(tmp_path):
    cache = tmp_path / "models--org--tiny"
    snapshot = byte_level_bpe(cache / "snapshots" / "abc123", "smollm2")
    (cache / "snapshots" / "old456").mkdir()
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")
    assert Tokenizer(cache).file == snapshot / "tokenizer.json"
    (cache / "refs" / "main").write_text("fff999")
    with pytest.raises(ValueError, match=r"refs/main names snapshot 'fff999', which is not in .*snapshots"):
        Tokenizer(cache)
    (cache / "refs" / "main").unlink()
    with pytest.raises(ValueError, match=r"models--org--tiny has no refs/main and 2 snapshots"):
        Tokenizer(cache)


def test_tokenizer_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(TokenizerError, match=f"{tmp_path}: tokenizer not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a tokenizer\.json"):
        Tokenizer(tmp_path)
    byte_level_bpe(tmp_path, "smollm2")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token '</s>' is not a token of "
                                             r".*tokenizer\.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: cannot read \(Expecting value"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    (tmp_path / "generation_config.json").write_text("[]")
    with pytest.raises(TokenizerError, match=r"generation_config\.json: expected a JSON object"):
        Tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: no end-of-sequence token \(no eos_token in "
                                             r"tokenizer_config\.json"):
        Tokenizer(tmp_path)


def test_a_tokenizer_json_without_the_tokenizers_library_names_it(tmp_path, monkeypatch):
    """tokenizers is optional: a model with a tokenizer.json says it is needed, in one line; a sentencepiece
    model (the embedded one) needs only sentencepiece."""
    byte_level_bpe(tmp_path / "json", "smollm2")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed: import fails
    with pytest.raises(TokenizerError) as e:
        Tokenizer(tmp_path / "json")
    assert str(e.value) == (f"{tmp_path / 'json' / 'tokenizer.json'}: a tokenizer.json needs the tokenizers "
                            f"library: pip install tokenizers")
    assert Tokenizer(train.ASSETS / "tiny-llama").encode("Babal") != []


def test_tokenizer_must_fit_the_model(tmp_path):
    tok = Tokenizer(byte_level_bpe(tmp_path, "llama3"))
    check_tokenizer_fits(tok, tok.vocab_size, tmp_path / "config.json")
    check_tokenizer_fits(tok, tok.vocab_size + 60, tmp_path / "config.json")  # padded embeddings: fine
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'tokenizer.json'} has {tok.vocab_size} tokens but "
                                             f"{tmp_path / 'config.json'} has vocab_size {tok.vocab_size - 1}"):
        check_tokenizer_fits(tok, tok.vocab_size - 1, tmp_path / "config.json")
    tok.stop_ids = [*tok.stop_ids, tok.vocab_size + 5]  # say, config.json's eos_token_id of another model
    with pytest.raises(TokenizerError, match=f"tokenizer.json: its stop id {tok.vocab_size + 5} is not a token "
                                             f"\\({tok.vocab_size} tokens; .*config.json has vocab_size"):
        check_tokenizer_fits(tok, tok.vocab_size + 60, tmp_path / "config.json")


def test_train_on_a_model_with_only_a_tokenizer_json(tmp_path, task_dir, capsys):
    """Given as the Hugging Face cache folder a download leaves (models--org--name, refs/main -> a snapshot)."""
    cache = tmp_path / "hub" / "models--org--tiny"
    model_dir = byte_level_bpe(cache / "snapshots" / "c0ffee", "llama3")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("c0ffee")
    tok = Tokenizer(model_dir)
    write_tiny_model(model_dir, tok.vocab_size + 8)  # a model vocabulary larger than the tokenizer's
    assert not (model_dir / "tokenizer.model").exists()
    argv = ["--model", cache, "--data", task_dir, "--out", tmp_path / "out", "--max-steps", 2,
            "--batch-size", 4, "--micro-batch-size", 4, "--train-limit", 8, "--eval-limit", 3, "--rank", 2]
    assert train.main([str(a) for a in argv]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["after"]) == {"alpha", "beta"} and results["steps"] == 2
    # The same directory with a model vocabulary too small for the tokenizer stops before any work.
    write_tiny_model(model_dir, tok.vocab_size - 1)
    argv[1], argv[5] = model_dir, tmp_path / "out2"
    assert train.main([str(a) for a in argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train.py: error: {model_dir / 'tokenizer.json'} has {tok.vocab_size} tokens but {model_dir / 'config.json'} "
        f"has vocab_size {tok.vocab_size - 1}: this tokenizer is not the model's")
    assert not (tmp_path / "out2" / "results.json").exists()


def test_training_and_generation_with_a_tokenizer_without_bos(tmp_path):
    """SmolLM2 adds no BOS: truncation cuts from the very start of the prompt; answers end at any stop id."""
    import data
    tok = Tokenizer(byte_level_bpe(tmp_path, "smollm2"))
    ex = data.Example("Which is heavier? " * 20 + "\n\nAnswer format: answer1/answer2", data.response_for("answer2"),
                      "answer2", "", ["answer1", "answer2"])
    (item,), counts = data.encode_for_training(tok, [ex], cutoff_len=40)
    assert counts["truncated"] == 1 and len(item["input_ids"]) == 40
    full = tok.encode(data.prompt(ex) + ex.output, eos=True)
    assert item["input_ids"] == full[-40:]  # no BOS to keep: the cut is the first tokens of the prompt
    scored = [i for i, label in zip(item["input_ids"], item["labels"]) if label != -100]
    assert tok.decode(scored).strip() == data.response_for("answer2") and scored[-1] == tok.eos_id

    class Replies(torch.nn.Module):  # answers "answer1", a second stop id, then junk
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def generate(self, tokens, attention_mask=None, max_new_tokens=32, temperature=0.0, eos_id=None):
            assert eos_id == tok.stop_ids == [0, 99]
            reply = tok.encode("the correct answer is answer1", bos=False) + [99] + tok.encode("answer2", bos=False)
            return torch.cat([tokens, torch.tensor([reply] * tokens.shape[0])], dim=1)

    tok.stop_ids = [0, 99]  # as with Llama-3 instruct's several eos_token_id
    assert data.generate_answers(Replies(), tok, [ex]) == ["the correct answer is answer1"]
