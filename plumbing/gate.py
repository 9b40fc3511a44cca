"""The input gate every door shares: training (train.py), evaluation (evaluate.py, or train.py
--eval-only) and generation (generate.py), and the notebooks' loading helpers. The base model, its
tokenizer, the adapters and the data are read and checked here, by the same functions for every door,
before a weight is loaded: a fault is one line (BadInput) before any work, so nothing is lost to a bad
flag found hours later. Nothing is printed before the last check has passed.
"""
import hashlib
import math
import os
import random
import stat
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
from data import MAX_NEW_TOKENS
from model import Transformer, load_config
from plumbing import adapters, cli, parallel, run_folder
from plumbing.base import config, datafiles, files, hub
from plumbing.base.checks import check_regular_file
from plumbing.base.errors import BadInput
from plumbing.base.tokenizer import Tokenizer, check_tokenizer_fits
from plumbing.base.weights import checkpoint_names, open_weights

ROOT = Path(__file__).resolve().parents[1]
# The embedded model is recorded by this name, so that its adapters work from another clone.
EMBEDDED, EMBEDDED_DATA = "assets/tiny-llama", "assets/world"


@dataclass
class Env:
    """Where and how this process runs."""
    device: torch.device
    rank: int
    world: int             # processes (torchrun); 1 for a plain `python train.py`
    dtype: torch.dtype     # of the frozen base; the adapters are float32
    autocast: object       # lets a low-precision base and float32 adapters meet in a matmul
    out: Path
    replaced: list         # what --overwrite replaces, once every input is checked
    lock: object = None    # the run folder's lock, held while the run runs

    @property
    def main(self) -> bool:  # the process that prints and writes files
        return self.rank == 0

    def say(self, *a, **k):
        if self.main:
            print(*a, **k)


@dataclass
class Inputs:
    """Everything read from disk before the model: all of it checked before any weight is loaded."""
    model_dir: Path
    model_args: object     # model.ModelArgs
    tokenizer: Tokenizer
    eval_sets: dict        # task -> test examples
    val_sets: dict         # task -> validation examples
    train_items: list      # encoded training examples
    fingerprint: str       # of the training data, to refuse resuming on other data
    ckpt_path: Path
    ckpt: dict | None      # the checkpoint to resume
    adapter: tuple | None  # (config, weights) of --adapter for an evaluation
    base: dict             # the base as the adapters record it (base_record), with the identity
    identity: dict         # what the run is: base, tokenizer, data, evaluation (run_identity)
    results: Path          # results.json, or eval-<data>.json for an evaluation
    notes: list = field(default_factory=list)  # what to say once every check has passed
    finished: bool = False  # a resumed run whose checkpoint is its last step


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() \
            else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise BadInput(f"--device cuda: CUDA is not available here (torch {torch.__version__}, {build})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise BadInput("--device mps: the MPS backend is not available here")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[name]


def setup(args, training: bool = True) -> Env:
    """Device, processes, precision, and --out: locked for this run or evaluation (nothing deleted
    yet). An evaluation writes its own file beside a run, so it needs no --resume or --overwrite."""
    if training and args.data is None:  # the paper's recipe names no default data
        raise BadInput("--data is needed with --model (a JSON file of training records, or a "
                       "folder of <task>/train.json)")
    rank, world, device = parallel.setup(pick_device(args.device))
    if training and args.batch_size % (args.micro_batch_size * world):
        raise BadInput(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                       f"{args.micro_batch_size} x {world} processes")
    dtype = pick_dtype(args.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    out = Path(args.out)
    if training:
        run_folder.check_out_dir(args, out)  # the refusals first, before the folder is made
    lock = run_folder.lock(out) if rank == 0 else None
    try:
        replaced = run_folder.check_out_dir(args, out) if training else []  # a run may have begun
        run_folder.check_writable(out, rank)
    except BaseException:
        if lock:
            lock.release()
        raise
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return Env(device, rank, world, dtype, autocast, out, replaced, lock)


# ── What every door reads: the base, its tokenizer, the adapters ─────────────────────────────────

@dataclass
class Base:
    """The base model as found and checked: its folder, config and tokenizer, and its record."""
    model_dir: Path
    model_args: object     # model.ModelArgs
    tokenizer: Tokenizer
    record: dict           # what an adapter records as its base (base_record)


def load_base(name, revision, tokenizer, flag: str = "--model") -> Base:
    """The base model named by `name` (a folder, a cache folder, a hub id): its config.json and its
    tokenizer (--tokenizer, else its own), checked against each other. No weight is read."""
    name = str(name)
    try:
        model_dir = hub.resolve_model(name, revision)
    except BadInput as e:
        raise BadInput(str(e).replace("--model ", f"{flag} ", 1)) from None
    model_args = load_config(model_dir)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise BadInput(f"--tokenizer {tokenizer}: no such file or directory")
    tok = Tokenizer(tokenizer or model_dir)
    check_tokenizer_fits(tok, model_args.vocab_size, model_dir / "config.json")
    return Base(model_dir, model_args, tok, base_record(name, revision, model_dir))


def check_weights(model_dir: Path, model_args) -> None:
    """The weight files' names, shapes and dtypes against config.json, from their headers (on the
    meta device: no memory), so that a mismatch is refused before any work, not after it. Called
    once the model's size was checked (config.check_memory): a config of 10^12 layers would take
    hours to build even on the meta device."""
    with torch.device("meta"):
        model = Transformer(model_args)
    with open_weights(model_dir) as reader:
        checkpoint_names(model.state_dict(), reader, model_dir, model_args.tie_embeddings)


def base_record(name: str, revision, model_dir: Path) -> dict:
    """The base as an adapter records it, so that it is found from another folder and another clone:
    the embedded model by name, a hub id with its revision (the commit found), a folder resolved."""
    if model_dir.resolve() == (ROOT / EMBEDDED).resolve():
        return {"base_model_name_or_path": EMBEDDED, "revision": None}
    if hub.is_hub_id(name) and not Path(name).exists():
        commit = model_dir.name if model_dir.parent.name == "snapshots" else revision
        return {"base_model_name_or_path": name, "revision": commit}
    return {"base_model_name_or_path": str(model_dir.resolve()), "revision": revision}


def recorded_base(record: dict) -> str | None:
    """Where an adapter's recorded base is: the embedded model's name means this clone's copy."""
    name = record.get("base_model")
    return str(ROOT / EMBEDDED) if name == EMBEDDED else name


def read_adapter_record(directory) -> dict:
    """--adapter's adapter_config.json, checked; a run's folder instead of its adapter folder is
    named with the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "not a folder" if directory.exists() else "no such directory"
        raise BadInput(f"--adapter {directory}: {what} (a folder written by a run is expected)")
    if not (directory / adapters.ADAPTER_CONFIG).exists() and \
            (directory / "adapter" / adapters.ADAPTER_CONFIG).is_file():
        raise BadInput(f"--adapter {directory}: a run's folder, not its adapter folder; did you mean "
                       f"{directory / 'adapter'}?")
    try:
        return adapters.read_adapter_config(directory)
    except BadInput as e:
        raise BadInput(f"--adapter {directory}: {e}") from None


def load_adapter(directory) -> tuple[dict, dict]:
    """The layout and weights of --adapter, any fault one line naming it."""
    read_adapter_record(directory)
    try:
        return adapters.load_adapter_files(directory)
    except BadInput as e:
        raise BadInput(f"--adapter {directory}: {e}") from None


def base_of_adapter(args) -> Base:
    """The base an evaluation or generation uses: --model, else the one the adapters record."""
    record = read_adapter_record(args.adapter)
    if args.model is not None:
        return load_base(args.model, args.revision, args.tokenizer)
    name = recorded_base(record)
    if name is None:
        raise BadInput(f"--model: the adapters of {args.adapter} do not say which model they were "
                       f"trained on; name it")
    revision = args.revision if args.revision is not None else record.get("revision")
    return load_base(name, revision, args.tokenizer,
                     flag=f"--adapter {args.adapter}: its base model")


def check_adapter_fits(base: Base, adapter: tuple, directory) -> int:
    """The adapters' layout and weights against the base (on the meta device: no memory)."""
    return count_adapters(base.model_args, adapter[0], f"--adapter {directory}", adapter[1])


# ── The doors' inputs ───────────────────────────────────────────────────────────────────────────

def load_inputs(args, env: Env) -> Inputs:
    """Training: the base's config and tokenizer, the data, the checkpoint to resume; and whether it
    all fits in memory. (An evaluation through train.py --eval-only is load_evaluation's.)"""
    base = load_base(args.model, args.revision, args.tokenizer)
    model_args, tokenizer, model_dir = base.model_args, base.tokenizer, base.model_dir
    run_folder.check_apart(env.out, {"--model": model_dir, "--data": args.data, "--tokenizer":
                                     args.tokenizer, "--eval-data": args.eval_data,
                                     "--val-data": args.val_data}, overwrite=args.overwrite)
    shards = env.world if args.fsdp else 1
    config.check_memory(model_args, env.dtype, env.device, model_dir / "config.json", shards)
    check_weights(model_dir, model_args)
    trainable = count_adapters(model_args, experts_of(args), f"--targets {','.join(args.targets)}")
    # float32 weights, their gradients and AdamW's two moments
    config.check_memory(model_args, env.dtype, env.device, model_dir / "config.json", shards,
                        extra=trainable * 16)
    notes = []
    eval_path = args.eval_data or (args.data if Path(args.data).is_dir() else None)
    if eval_path is None:
        notes.append("no --eval-data (and --data is not a folder with test files): training "
                     "without evaluation")
    eval_sets = limit(data.load_tasks(eval_path, "test"), args) if eval_path and not \
        args.skip_test_eval else {}
    val_sets = load_validation(args)
    train_tasks = data.load_tasks(args.data, "train")
    if args.val_fraction:
        train_tasks, held_out = data.hold_out(train_tasks, args.val_fraction)
        val_sets = limit(held_out, args)
    examples = [ex for task in train_tasks.values() for ex in task[:args.train_limit]]
    fingerprint = run_folder.data_fingerprint(examples)
    identity = run_identity(args, base, fingerprint, eval_sets, val_sets)
    ckpt, ckpt_path = None, env.out / "checkpoint.pt"
    if args.resume:
        ckpt = run_folder.load_checkpoint(ckpt_path)
        run_folder.check_resumable(ckpt, args, ckpt_path, identity, cli.defaults(),
                                    cli.must_match())
    train_items, counts = data.encode_for_training(tokenizer, examples, args.cutoff_len,
                                                   args.train_on_prompt)
    if len(train_items) < args.batch_size:
        raise BadInput(f"--data: {len(train_items)} usable training examples, fewer than "
                       f"--batch-size {args.batch_size}")
    check_lengths(args, model_args, tokenizer, train_items, {"test": eval_sets, "val": val_sets},
                  model_dir / "config.json")
    notes.append(f"training examples: {counts['kept']}; longer than --cutoff-len "
                 f"{args.cutoff_len}: {counts['truncated']} had the start of their prompt cut, "
                 f"{counts['dropped']} were left out")
    inputs = Inputs(model_dir, model_args, tokenizer, eval_sets, val_sets, train_items, fingerprint,
                    ckpt_path, ckpt, None, {**base.record, "identity": identity}, identity,
                    env.out / "results.json", notes)
    if ckpt is not None:
        resumed(args, env, inputs)
    for note in inputs.notes:
        env.say(note)
    return inputs


def resumed(args, env: Env, inputs: Inputs) -> None:
    """What a resume recomputes instead of trusting the checkpoint's copy: the evaluation before
    training, when the evaluation data or settings are not those it was made with; and whether the
    run is already complete (then nothing is done)."""
    ckpt = inputs.ckpt
    log = env.out / "log.jsonl"
    if log.exists() or log.is_symlink():  # a resume cuts it back: it must be a file to read
        check_regular_file(log, run_folder.RunError)
    if ckpt.get("identity", {}).get("evaluation") != inputs.identity["evaluation"]:
        ckpt.pop("before")
        ckpt.pop("val_before", None)
    steps = len(inputs.train_items) // args.batch_size
    total = args.max_steps or max(1, math.ceil(args.epochs * steps))
    if ckpt["step"] >= total and (env.out / "results.json").is_file():
        inputs.finished = True
        inputs.notes = [f"{env.out} holds a complete run (step {ckpt['step']} of {total}, and "
                        f"its results.json): nothing to resume, nothing changed"]


def run_identity(args, base: Base, fingerprint: str, eval_sets: dict, val_sets: dict) -> dict:
    """What a run is, beyond its flags: the base (where, which revision, a fingerprint of its config
    and weight files), the tokenizer's file, the training data and the evaluation's examples and
    scoring. Written into the checkpoint and compared on --resume; the adapters record the base."""
    examples = [ex for sets in (eval_sets, val_sets) for task in sets.values() for ex in task]
    tasks = [[k, len(v)] for sets in (eval_sets, val_sets) for k, v in sets.items()]
    evaluation = run_folder.data_fingerprint(examples) + f":{args.eval_mode}:{tasks}"
    return {"base": {**base.record, "fingerprint": base_fingerprint(base.model_dir)},
            "tokenizer": file_fingerprint(base.tokenizer.file), "data": fingerprint,
            "evaluation": evaluation}


def base_fingerprint(model_dir: Path) -> str:
    """SHA-256 of config.json and of the weight files' names and sizes (hashing the weights
    themselves would read gigabytes): another model or revision has another fingerprint."""
    files = sorted(p for p in model_dir.iterdir() if p.name == "config.json" or p.suffix in
                   (".safetensors", ".bin") or p.name.endswith(".index.json"))
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    h.update((model_dir / "config.json").read_bytes())
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_evaluation(args, env: Env) -> Inputs:
    """An evaluation (evaluate.py, train.py --eval-only): the adapters of --adapter and their base
    (--model, else the one they record), the test and validation data, the file of the results."""
    base = base_of_adapter(args)
    model_args, tokenizer, model_dir = base.model_args, base.tokenizer, base.model_dir
    adapter = load_adapter(args.adapter)
    shards = env.world if getattr(args, "fsdp", False) else 1
    config.check_memory(model_args, env.dtype, env.device, model_dir / "config.json", shards)
    check_weights(model_dir, model_args)
    trainable = check_adapter_fits(base, adapter, args.adapter)
    config.check_memory(model_args, env.dtype, env.device, model_dir / "config.json", shards,
                        extra=trainable * 4)
    eval_path = args.eval_data or (args.data if args.data and Path(args.data).is_dir() else None)
    if eval_path is None and model_dir.resolve() == (ROOT / EMBEDDED).resolve():
        eval_path = str(ROOT / EMBEDDED_DATA)  # the embedded model's own tasks
    if eval_path is None:
        raise BadInput("--eval-data: needed (a test JSON file or a folder of <task>/test.json)")
    eval_sets = {} if args.skip_test_eval else limit(data.load_tasks(eval_path, "test"), args)
    val_sets = load_validation(args)
    check_lengths(args, model_args, tokenizer, [], {"test": eval_sets, "val": val_sets},
                  model_dir / "config.json")
    results = env.out / f"eval-{results_name(eval_path)}.json"
    if (results.exists() or results.is_symlink()) and not args.overwrite:
        raise BadInput(f"--out {env.out} holds {results.name} from an earlier evaluation: replace "
                       f"it with --overwrite (that file only), or choose another --out")
    return Inputs(model_dir, model_args, tokenizer, eval_sets, val_sets, [], "", env.out /
                  "checkpoint.pt", None, adapter, base.record, {}, results)


def results_name(eval_path) -> str:
    """The data's name, as data.load_tasks names a task: dataset/ARC-Easy/test.json -> ARC-Easy."""
    where = Path(eval_path)
    name = where.parent.name if where.stem in ("train", "val", "test") else where.stem
    return files.check_name("--eval-data", name or "data", "name for eval-<data>.json")


# ── Generation: the base, the adapters, and each prompt ─────────────────────────────────────────

MIN_TEMPERATURE = 1e-3  # below it sampling is greedy anyway, and logits / temperature overflow


def check_generation_flags(args) -> None:
    """generate.py's numbers, before anything is read."""
    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    t = args.temperature
    if not math.isfinite(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
        raise BadInput(f"--temperature {t}: must be 0 (greedy) or a finite number of at least "
                       f"{MIN_TEMPERATURE:g}")
    cli.check_float32("--temperature", t)
    if not 0 < args.top_p <= 1:
        raise BadInput(f"--top-p {args.top_p}: must be in (0, 1]")
    if not 0 <= args.seed < 2**64:
        raise BadInput(f"--seed {args.seed}: must be in [0, 2^64)")


def load_generation(args) -> tuple[Base, tuple | None, torch.device, torch.dtype]:
    """generate.py's inputs: the base (--model, else the adapters' record), the adapters (unless
    --no-adapter), all checked against each other as an evaluation checks them."""
    has_record = (Path(args.adapter) / adapters.ADAPTER_CONFIG).is_file()
    if args.no_adapter and not has_record:
        if args.model is None:
            raise BadInput("--model is needed with --no-adapter and no adapter folder")
        base = load_base(args.model, args.revision, args.tokenizer)
    else:
        base = base_of_adapter(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    config.check_memory(base.model_args, dtype, device, base.model_dir / "config.json")
    check_weights(base.model_dir, base.model_args)
    adapter = None
    if not args.no_adapter:
        adapter = load_adapter(args.adapter)
        check_adapter_fits(base, adapter, args.adapter)
    if args.max_new_tokens + 2 > base.model_args.max_seq_len and not dynamic_rope(base):
        raise BadInput(f"--max-new-tokens {args.max_new_tokens}: no prompt fits beside it in "
                       f"max_position_embeddings {base.model_args.max_seq_len} of "
                       f"{base.model_dir / 'config.json'}")
    return base, adapter, device, dtype


def dynamic_rope(base: Base) -> bool:
    return (base.model_args.rope_scaling or {}).get("rope_type") == "dynamic"  # runs past it


def prompt_ids(base: Base, text: str, where: str, args) -> list[int]:
    """One prompt's tokens (through the training template unless --raw), checked: UTF-8 text (a
    Latin-1 byte reaches Python as a lone surrogate) that fits the context with its answer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text[e.start]
        shown = f"byte 0x{ord(byte) - 0xDC00:02x}" if 0xDC80 <= ord(byte) <= 0xDCFF else repr(byte)
        raise BadInput(f"{where}: not UTF-8 text ({shown} at character {e.start}; a Latin-1 file "
                       f"or terminal?)") from None
    prompt = text if args.raw else data.prompt(data.Example(instruction=text))
    ids = base.tokenizer.encode(prompt)
    limit = base.model_args.max_seq_len
    if len(ids) + args.max_new_tokens > limit and not dynamic_rope(base):
        raise BadInput(f"{where}: {len(ids)} tokens and --max-new-tokens {args.max_new_tokens} "
                       f"exceed max_position_embeddings {limit} of "
                       f"{base.model_dir / 'config.json'}")
    return ids


def read_prompts(path) -> list[tuple[str, str]]:
    """--file's prompts, one per line, each with where it came from."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would make the read wait forever
            raise BadInput(f"--file {path}: not a regular file (a FIFO, device or socket cannot "
                           f"be read as one)")
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BadInput(f"--file {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                       f"{e.start}; a Latin-1 file?)") from None
    except OSError as e:
        raise BadInput(f"--file {path}: cannot read it ({e.strerror or e})") from None
    return [(f"--file {path} line {i + 1}", line.strip()) for i, line in enumerate(lines)
            if line.strip()]


def limit(tasks: dict, args) -> dict:
    return {t: ex[:args.eval_limit] for t, ex in tasks.items()}


def experts_of(args) -> dict:
    """The add_experts arguments of the flags: each has the flag of its name."""
    return {k: getattr(args, k) for k in adapters.LAYOUT_KEYS}


def count_adapters(model_args, experts: dict, flag: str, state: dict | None = None) -> int:
    """The adapters' parameters, counted from their shapes on a meta-device base (no memory, and
    no adapters built: the run builds them once); bad targets, and adapter weights (state) that do
    not fit them, refused."""
    with torch.device("meta"):
        model = Transformer(model_args)
    try:
        shapes = adapters.expected_shapes(model, **experts)
        if state is not None:
            adapters.check_state_fits(shapes, state)
    except ValueError as e:
        raise BadInput(f"{flag}: {e}") from None
    return sum(math.prod(shape) for shape in shapes.values())


def load_validation(args) -> dict:
    """The validation tasks of --val-data, or of the val files beside --data (--val-fraction is
    applied to the training data later): for choosing settings, kept apart from the test."""
    path = args.val_data
    if path is None and args.val_fraction is None and args.data and datafiles.has_split(args.data, "val"):
        path = args.data
    return limit(data.load_tasks(path, "val"), args) if path else {}


def check_lengths(args, model_args, tokenizer, train_items: list, splits: dict, where: Path):
    """Refuse sequences longer than the model's context (max_position_embeddings) before any work:
    positions past it were never trained, and a generated answer that cannot fit would fail only
    after training. Each file is checked on its own (splits: {"test": tasks, "val": tasks}), so a
    test record is never hidden behind a validation task of the same name."""
    limit = model_args.max_seq_len
    longest = max((len(it["input_ids"]) for it in train_items), default=0)
    if longest > limit:
        raise BadInput(f"--cutoff-len {args.cutoff_len}: training examples of up to {longest} tokens "
                       f"exceed max_position_embeddings {limit} of {where}; use --cutoff-len "
                       f"{limit} or less")
    for split, tasks in splits.items():
        for task, examples in tasks.items():
            for i, ex in enumerate(examples):
                n, what = example_length(args.eval_mode, tokenizer, ex, limit)
                if n > limit:
                    raise BadInput(f"evaluation data: task {task!r} record {i} ({split}) needs {n} "
                                   f"tokens ({what}), more than max_position_embeddings {limit} of "
                                   f"{where}")


def example_length(mode: str, tokenizer, ex, limit: int) -> tuple[int, str]:
    """The tokens one evaluation example needs, and what they are; 0 when it surely fits."""
    extra = MAX_NEW_TOKENS if mode == "generate" else 0
    text = data.prompt(ex) + max((data.response_for(c) for c in ex.candidates), key=len)
    if len(text.encode()) + 3 + extra <= limit:
        return 0, ""  # a token covers a byte or more: with BOS, EOS and a leading "▁", it fits
    if mode == "generate":
        return len(tokenizer.encode(data.prompt(ex))) + extra, f"+ {MAX_NEW_TOKENS} new tokens"
    n = max(len(data.encode_pair(tokenizer, data.prompt(ex), data.response_for(c))[0])
            for c in ex.candidates)
    return n, "with its longest answer"
