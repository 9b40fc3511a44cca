"""Everything a run reads, checked before any work: the device and processes, the model's config and
tokenizer, the data, the adapters to evaluate and the checkpoint to resume. A fault in any of them is
one line (BadInput) before a weight is loaded, so nothing is lost to a bad flag found hours later.
"""
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import omoe
from data import MAX_NEW_TOKENS
from model import Transformer, load_config
from plumbing.base import config, datafiles, hub
from plumbing import adapters, cli, parallel, run_folder
from plumbing.base.errors import BadInput
from plumbing.base.tokenizer import Tokenizer, check_tokenizer_fits


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
    adapter: tuple | None  # (config, weights) of --adapter for --eval-only
    model_name: str        # what the adapters record as their base: a hub id, or the folder
    results: Path          # results.json, or eval-<data>.json for --eval-only


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() \
            else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device cuda: CUDA is not available here (torch {torch.__version__}, "
                       f"built with CUDA {torch.version.cuda or 'none'})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise BadInput("--device mps: the MPS backend is not available here")
    return torch.device(name)


def setup(args) -> Env:
    """Device, processes, precision, and --out (locked for this run; nothing deleted yet)."""
    rank, world, device = parallel.setup(pick_device(args.device))
    if args.batch_size % (args.micro_batch_size * world):
        raise BadInput(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                       f"{args.micro_batch_size} x {world} processes")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    out = Path(args.out)
    run_folder.check_out_dir(args, out)  # the refusals first, before the folder is made
    lock = run_folder.lock(out) if rank == 0 and not args.eval_only else None
    try:
        replaced = run_folder.check_out_dir(args, out)  # again under the lock: a run may have begun
        run_folder.check_writable(out, rank)
    except BaseException:
        if lock:
            lock.release()
        raise
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return Env(device, rank, world, dtype, autocast, out, replaced, lock)


def load_inputs(args, env: Env) -> Inputs:
    """The model's config and tokenizer, the data, the checkpoint to resume or the adapter to
    evaluate; and whether it all fits in memory."""
    model_dir = hub.resolve_model(args.model, args.revision)
    model_args = load_config(model_dir)
    tokenizer = load_tokenizer(args.tokenizer, model_dir)
    check_tokenizer_fits(tokenizer, model_args.vocab_size, model_dir / "config.json")
    run_folder.check_apart(env.out, {"--model": model_dir, "--data": args.data, "--tokenizer":
                                     args.tokenizer, "--eval-data": args.eval_data,
                                     "--val-data": args.val_data, "--adapter": args.adapter},
                           overwrite=args.overwrite and not args.eval_only)
    shards = env.world if args.fsdp else 1
    config.check_memory(model_args, env.dtype, env.device, model_dir / "config.json", shards)
    adapter = load_adapter(args.adapter) if args.eval_only else None
    experts = adapter[0] if adapter else experts_of(args)
    flag = f"--adapter {args.adapter}" if adapter else f"--targets {','.join(args.targets)}"
    trainable = count_adapters(model_args, experts, flag, adapter[1] if adapter else None)
    bytes_per = 4 if args.eval_only else 16  # float32 weights; training: + gradients and AdamW's 2
    config.check_memory(model_args, env.dtype, env.device, model_dir / "config.json", shards,
                        extra=trainable * bytes_per)
    eval_path = args.eval_data or (args.data if args.data and Path(args.data).is_dir() else None)
    if eval_path is None and args.eval_only:
        raise BadInput("--eval-only needs --eval-data (a test JSON file or a folder of "
                       "<task>/test.json)")
    if eval_path is None:
        env.say("no --eval-data (and --data is not a folder with test files): training without "
                "evaluation")
    eval_sets = limit(data.load_tasks(eval_path, "test"), args) if eval_path and not \
        args.skip_test_eval else {}
    val_sets = load_validation(args)
    train_items, fingerprint, ckpt, ckpt_path = [], "", None, env.out / "checkpoint.pt"
    if not args.eval_only:
        train_tasks = data.load_tasks(args.data, "train")
        if args.val_fraction:
            train_tasks, held_out = data.hold_out(train_tasks, args.val_fraction)
            val_sets = limit(held_out, args)
        examples = [ex for task in train_tasks.values() for ex in task[:args.train_limit]]
        fingerprint = run_folder.data_fingerprint(examples)
        if args.resume:
            ckpt = run_folder.load_checkpoint(ckpt_path)
            run_folder.check_resumable(ckpt, args, ckpt_path, fingerprint, cli.defaults())
        train_items, counts = data.encode_for_training(tokenizer, examples, args.cutoff_len,
                                                       args.train_on_prompt)
        env.say(f"training examples: {counts['kept']}; longer than --cutoff-len {args.cutoff_len}: "
                f"{counts['truncated']} had the start of their prompt cut, {counts['dropped']} were "
                f"left out")
        if len(train_items) < args.batch_size:
            raise BadInput(f"--data: {len(train_items)} usable training examples, fewer than "
                           f"--batch-size {args.batch_size}")
    check_lengths(args, model_args, tokenizer, train_items, {**eval_sets, **val_sets},
                  model_dir / "config.json")
    results = env.out / "results.json"
    if args.eval_only:
        where = Path(eval_path)  # named as data.load_tasks names a task: dataset/ARC-Easy/test.json -> ARC-Easy
        results = env.out / f"eval-{where.parent.name if where.stem in ('train', 'val', 'test') else where.stem}.json"
        if results.exists() and not args.overwrite:
            raise BadInput(f"--out {env.out} holds {results.name} from an earlier evaluation: replace "
                           f"it with --overwrite (that file only), or choose another --out")
    name = args.model if hub.is_hub_id(args.model) and not Path(args.model).exists() else str(model_dir)
    return Inputs(model_dir, model_args, tokenizer, eval_sets, val_sets, train_items, fingerprint,
                  ckpt_path, ckpt, adapter, name, results)


def limit(tasks: dict, args) -> dict:
    return {t: ex[:args.eval_limit] for t, ex in tasks.items()}


def experts_of(args) -> dict:
    """The add_experts arguments of the flags."""
    return dict(targets=args.targets, experts=args.experts, top_k=args.top_k, rank=args.rank,
                alpha=args.alpha, dropout=args.dropout, orth=args.orth, lora_targets=args.lora_targets)


def count_adapters(model_args, experts: dict, flag: str, state: dict | None = None) -> int:
    """The adapters' parameters, counted on the meta device (no memory); bad targets, and adapter
    weights (state) that do not fit them, refused."""
    with torch.device("meta"):
        model = Transformer(model_args)
        try:
            omoe.add_experts(model, **experts)
            if state is not None:
                adapters.check_adapter_state(model, state)
        except ValueError as e:
            raise BadInput(f"{flag}: {e}") from None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_tokenizer(path, model_dir: Path) -> Tokenizer:
    """--tokenizer (a file, or a folder holding one), else the model folder's own."""
    if path is not None and not Path(path).exists():
        raise BadInput(f"--tokenizer {path}: no such file or directory")
    return Tokenizer(path or model_dir)


def load_validation(args) -> dict:
    """The validation tasks of --val-data, or of the val files beside --data (--val-fraction is
    applied to the training data later): for choosing settings, kept apart from the test."""
    path = args.val_data
    if path is None and args.val_fraction is None and args.data and datafiles.has_split(args.data, "val"):
        path = args.data
    return limit(data.load_tasks(path, "val"), args) if path else {}


def load_adapter(directory) -> tuple[dict, dict]:
    """The config and weights of --adapter, any fault one line naming it."""
    if not Path(directory).is_dir():
        raise BadInput(f"--adapter {directory}: no such directory (a folder written by a run is "
                       f"expected)")
    try:
        return adapters.load_adapter_files(directory)
    except BadInput as e:
        raise BadInput(f"--adapter {directory}: {e}") from None


def check_lengths(args, model_args, tokenizer, train_items: list, eval_sets: dict, where: Path):
    """Refuse sequences longer than the model's context (max_position_embeddings) before any work:
    positions past it were never trained, and a generated answer that cannot fit would fail only
    after training."""
    limit = model_args.max_seq_len
    longest = max((len(it["input_ids"]) for it in train_items), default=0)
    if longest > limit:
        raise BadInput(f"--cutoff-len {args.cutoff_len}: training examples of up to {longest} tokens "
                       f"exceed max_position_embeddings {limit} of {where}; use --cutoff-len "
                       f"{limit} or less")
    extra = MAX_NEW_TOKENS if args.eval_mode == "generate" else 0
    for task, examples in eval_sets.items():
        for i, ex in enumerate(examples):
            text = data.prompt(ex) + max((data.response_for(c) for c in ex.candidates), key=len)
            if len(text.encode()) + 3 + extra <= limit:
                continue  # a token covers a byte or more: with BOS, EOS and a leading "▁", it fits
            if args.eval_mode == "generate":
                n, what = len(tokenizer.encode(data.prompt(ex))) + extra, f"+ {MAX_NEW_TOKENS} new tokens"
            else:
                n = max(len(data.encode_pair(tokenizer, data.prompt(ex), data.response_for(c))[0])
                        for c in ex.candidates)
                what = "with its longest answer"
            if n > limit:
                raise BadInput(f"evaluation data: task {task!r} record {i} needs {n} tokens ({what}), "
                               f"more than max_position_embeddings {limit} of {where}")


def warmup_steps(args, total_steps: int, say=print) -> int:
    """--warmup, or a tenth of a run shorter than it (said in one line): a warm-up that never ends
    would train the whole run below the learning rate asked for."""
    if args.warmup < total_steps:
        return args.warmup
    steps = math.ceil(total_steps / 10)
    say(f"--warmup {args.warmup} is not shorter than the run's {total_steps} steps: warming up over "
        f"{steps} (a tenth of them) instead")
    return steps
