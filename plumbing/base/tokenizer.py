"""Text <-> ids with the model's own tokenizer files: a sentencepiece tokenizer.model or a tokenizer.json,
and the special tokens the model ships with.

Reading order: Tokenizer -> finding the file and its special tokens -> the check that it fits the model.
"""

import json
from pathlib import Path

import sentencepiece as spm

from plumbing.base.errors import BadInput
from plumbing.base import hub


class TokenizerError(BadInput):
    """Bad or missing tokenizer files. The message is one line naming the file (and key)."""


class Tokenizer:
    """The model's own tokenizer: a sentencepiece tokenizer.model (LLaMA-1/2, Mistral, TinyLlama) or a
    tokenizer.json (Llama-3, SmolLM2, ...), given as the file or as the model directory.

    A directory uses tokenizer.model when it is a sentencepiece model, else tokenizer.json, through
    the `tokenizers` library these files are written for. Either way encode is the plain
    encoding with the model's beginning-of-sequence prefix: the ids the model was trained on.
    Sentencepiece is used exactly as Meta's reference code uses it: leading spaces, runs of
    whitespace, newlines, digits (one by one) and byte fallback as LLaMA saw them. NOTE: recent
    `transformers` releases tokenize LLaMA's tokenizer.model differently around leading spaces and
    whitespace runs (their "legacy=False" handling), so their ids can differ from these; the model
    was trained on these. A tokenizer.json encodes as transformers does, special tokens written
    in the text (say "<|eot_id|>") included.

    Special tokens come from the files the model ships: tokenizer_config.json and
    special_tokens_map.json (bos/eos/pad/unk_token, add_bos_token), then the tokenizer itself,
    then config.json and generation_config.json (bos/eos_token_id). `add_bos` is whether the
    model expects a BOS (Llama-3 adds <|begin_of_text|>, SmolLM2 none); `eos_id` ends every
    training response; `stop_ids` are all the ids that end generation (eos_id plus every
    eos_token_id of config.json and generation_config.json: Llama-3 instruct has three).

    Padding: LLaMA has no padding token. Batches are padded with `pad_id` = the pad token if
    the model has one, else the unknown token (id 0 in LLaMA), as alpaca-lora and LLM-Adapters
    do, else EOS (Llama-3 has neither); padded positions are masked out of attention and of the
    loss, so the id never matters, it only has to be a valid embedding row. (Padding with EOS
    everywhere would work as well, but would make "is this EOS real?" depend on the mask.)
    """

    def __init__(self, path):
        path = hub.resolve_model(path) if Path(path).is_dir() else Path(path)  # a cache folder: its snapshot
        directory, self.file = (path, _tokenizer_file(path)) if path.is_dir() else (path.parent, path)
        if not self.file.is_file():
            raise TokenizerError(f"{path}: tokenizer not found (a sentencepiece tokenizer.model or a "
                                 f"tokenizer.json is expected)")
        self.sp = self.tk = None
        if self.file.suffix == ".json":
            self.tk = _load_tokenizer_json(self.file)
            vocab = self.tk.get_vocab(with_added_tokens=True)
            self.vocab_size, lookup = max(vocab.values()) + 1, vocab.get
            plain, full = (self.tk.encode("a", add_special_tokens=s).ids for s in (False, True))
            prefix = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []
            own = {"bos": prefix[0]} if len(prefix) == 1 else {}  # the BOS its post-processor prepends
            adds_bos = bool(own)
        else:
            self.sp = _load_sentencepiece(self.file)
            self.vocab_size = self.sp.vocab_size()
            pieces = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
            lookup = pieces.get
            own = {k: i for k, i in (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()), ("pad", self.sp.pad_id()),
                                     ("unk", self.sp.unk_id())) if i >= 0}
            adds_bos = True  # Meta's reference code prepends BOS (sentencepiece itself never does)
        shipped = _special_tokens(directory)
        ids = dict(own)
        for kind, token in shipped["tokens"].items():  # what the model's files name wins over the tokenizer's own
            ids[kind] = lookup(token)
            if ids[kind] is None:
                raise TokenizerError(f"{shipped['source'][kind]}: {kind}_token {token!r} is not a token of {self.file}")
        self.bos_id = ids.get("bos", shipped["ids"]["bos"])
        self.add_bos = shipped.get("add_bos", adds_bos) and self.bos_id is not None
        self.eos_id = ids.get("eos", next(iter(shipped["ids"]["eos"]), None))
        if self.eos_id is None:
            raise TokenizerError(f"{self.file}: no end-of-sequence token (no eos_token in tokenizer_config.json or "
                                 f"special_tokens_map.json, no eos_token_id in config.json or generation_config.json)")
        self.stop_ids = sorted({self.eos_id, *shipped["ids"]["eos"]})
        self.pad_id = next(i for i in (ids.get("pad"), ids.get("unk"), self.eos_id) if i is not None)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Text -> ids; bos=True prepends the model's BOS if it uses one, eos=True appends eos_id."""
        ids = self.sp.encode(text) if self.sp else self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * (bos and self.add_bos) + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Ids -> text; BOS, EOS, padding and other special tokens decode to nothing."""
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.sp else self.tk.decode(ids, skip_special_tokens=True)


def _tokenizer_file(directory: Path) -> Path:
    """tokenizer.model if it is a sentencepiece model (Llama-3's original/ one is tiktoken's), else tokenizer.json."""
    sp_file, json_file = directory / "tokenizer.model", directory / "tokenizer.json"
    if sp_file.is_file():
        if not json_file.is_file():
            return sp_file  # whatever it is: the error, if any, names it
        try:
            _load_sentencepiece(sp_file)
            return sp_file
        except TokenizerError:
            pass
    return json_file


def _load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
    return sp


def _load_tokenizer_json(path: Path):
    """A tokenizer.json, through the `tokenizers` library, which is optional: the embedded model and
    every sentencepiece model (LLaMA-1/2, Mistral, TinyLlama) need only sentencepiece."""
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"{path}: a tokenizer.json needs the tokenizers library: "
                             f"pip install tokenizers") from None
    try:
        tk = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
    model = json.loads(tk.to_str()).get("model", {})
    kind = model.get("type")
    if not _has_unknown_token(model):
        unk = model.get("unk_id") if kind == "Unigram" else model.get("unk_token")
        raise TokenizerError(f"{path}: its {kind} model's unknown token {unk!r} is not in its vocabulary, "
                             f"so a word outside it could not be encoded")
    try:  # whatever the model type: text outside the vocabulary must encode, not raise mid-run
        tk.encode(UNSEEN)
    except Exception as e:
        raise TokenizerError(f"{path}: cannot encode text outside its vocabulary "
                             f"({str(e).splitlines()[0]})") from None
    return tk


# Characters hardly any vocabulary holds: a tokenizer must encode them (as bytes or its unknown token).
UNSEEN = "\u2603 \U0001f600 \u0f3a \U000e0041 \x7f"


def _has_unknown_token(model: dict) -> bool:
    """Whether a tokenizer.json model can encode a word outside its vocabulary: WordLevel, WordPiece
    and Unigram (without byte fallback) through their unknown token, which must be in the vocabulary;
    BPE through bytes, or through its unknown token if it names one."""
    kind, vocab = model.get("type"), model.get("vocab") or {}
    if kind == "Unigram":
        unk = model.get("unk_id")
        return model.get("byte_fallback") is True or (type(unk) is int and 0 <= unk < len(vocab))
    if kind in ("WordLevel", "WordPiece") or (kind == "BPE" and model.get("unk_token") is not None):
        return isinstance(vocab, dict) and model.get("unk_token") in vocab
    return True


def _special_tokens(directory: Path) -> dict:
    """What the model's JSON files say: {"tokens": {kind: text}, "source": {kind: file},
    "ids": {"bos": id or None, "eos": [ids]}, "add_bos": bool (if a file says)}."""
    def read(name):
        path = directory / name
        try:
            value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read ({e})") from None
        if not isinstance(value, dict):
            raise TokenizerError(f"{path}: expected a JSON object, found {type(value).__name__}")
        return value

    out = {"tokens": {}, "source": {}, "ids": {"bos": None, "eos": []}}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        d = read(name)
        for kind in ("bos", "eos", "pad", "unk"):
            token = d.get(f"{kind}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and kind not in out["tokens"]:
                out["tokens"][kind], out["source"][kind] = token, directory / name
        if isinstance(d.get("add_bos_token"), bool):
            out.setdefault("add_bos", d["add_bos_token"])
    for name in ("config.json", "generation_config.json"):
        d = read(name)
        eos = d.get("eos_token_id")
        out["ids"]["eos"] += [i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
        if isinstance(d.get("bos_token_id"), int) and out["ids"]["bos"] is None:
            out["ids"]["bos"] = d["bos_token_id"]
    return out


def check_tokenizer_fits(tok: Tokenizer, vocab_size: int, config_file) -> None:
    """Before any work: every id the tokenizer can produce, and every special id, must be a row of the
    model's embeddings. A larger model vocabulary (embeddings padded to a multiple of 64) is fine."""
    if tok.vocab_size > vocab_size:
        raise TokenizerError(f"{tok.file} has {tok.vocab_size} tokens but {config_file} has vocab_size "
                             f"{vocab_size}: this tokenizer is not the model's")
    special = {"bos": [tok.bos_id] if tok.add_bos else [], "eos": [tok.eos_id], "stop": tok.stop_ids,
               "pad": [tok.pad_id]}
    for kind, ids in special.items():
        for i in ids:
            if not 0 <= i < min(tok.vocab_size, vocab_size):
                raise TokenizerError(f"{tok.file}: its {kind} id {i} is not a token ({tok.vocab_size} tokens; "
                                     f"{config_file} has vocab_size {vocab_size})")
