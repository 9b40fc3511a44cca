"""Fine-tune a LLaMA with OMoE adapters and evaluate it: a plain PyTorch loop.

    python train.py                                    # the embedded default
    python train.py --model /path/to/Llama-2-7b-hf --data commonsense_170k.json \
                    --eval-data dataset/ --experts 2 --device cuda
    torchrun --nproc_per_node 4 train.py ...           # DistributedDataParallel, one process per GPU
    torchrun --nproc_per_node 8 train.py ... --fsdp    # the frozen base sharded over the GPUs (parallel.py)

It reads top-down like a recipe (run, at the end): flags -> device, processes and precision -> config,
tokenizer and data -> the base model -> its evaluation -> experts -> parallel wrapping -> optimizer, or
resume -> the loop -> final evaluation and saving.
"""

import argparse
import math
import os
import platform
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import omoe
import parallel
from checkpoint import (SaveError, append_log, check_out_dir, clear_run, data_fingerprint, load_checkpoint,
                        rng_state, save_checkpoint, set_rng_state, truncate_log, write_json)
from model import ModelArgs, Transformer, check_memory, load_config
from weights import resolve_hf_cache

# Settings that change what a resumed run computes: a checkpoint made with other values is refused.
RESUME_MUST_MATCH = ("model", "data", "experts", "top_k", "rank", "alpha", "dropout", "targets", "lora_targets",
                     "orth", "lora", "aux_loss_coef", "dtype", "batch_size", "lr", "weight_decay", "epochs",
                     "max_steps", "warmup", "schedule", "grad_clip", "cutoff_len", "train_on_prompt",
                     "seed", "train_limit", "val_fraction")
MAX_NEW_TOKENS = 32  # generated per answer in --eval-mode generate


# Two recipes. With --model, the paper's for a 7B LLaMA; without, one sized for the embedded tiny
# LLaMA (assets/), which a laptop CPU fine-tunes in about two minutes. A flag given always wins.
ASSETS = Path(__file__).resolve().parent / "assets"
PAPER = dict(rank=16, alpha=32, dropout=0.05, batch_size=16, micro_batch_size=4, lr=2e-4, epochs=2, warmup=100,
             eval_batch_size=16, log_every=10)
EMBEDDED = dict(model=str(ASSETS / "tiny-llama"), data=str(ASSETS / "world"), rank=8, alpha=16, dropout=0.0,
                batch_size=16, micro_batch_size=16, lr=2e-3, epochs=1, warmup=10, eval_batch_size=64, log_every=50)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" after help that says what None means
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other refusal (the usage is in --help)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)

    def a(flag, help, **kw):
        key = flag[2:].replace("-", "_")
        if key in PAPER:  # the default depends on the recipe: filled in after parsing
            kw["default"] = argparse.SUPPRESS
            help += f" (default: {PAPER[key]} with --model, {EMBEDDED[key]} for the embedded model)"
        p.add_argument(flag, help=help, **kw)
    a("--model", default=None, help="local Hugging Face LLaMA directory (config.json, weights, tokenizer.model or "
                                    "tokenizer.json) or its models--org--name cache folder; "
                                    "without it, the embedded tiny LLaMA of assets/tiny-llama")
    a("--data", default=None, help="training data: an LLM-Adapters JSON file, or a folder of <task>/train.json "
                                   "(without --model: the embedded tasks of assets/world)")
    a("--eval-data", default=None, help="evaluation data: a JSON file or a folder of <task>/test.json "
                                        "(default: the test files beside --data, when it is a folder)")
    a("--val-data", default=None, help="validation data, for choosing settings (the test never is): a JSON file or "
                                       "a folder of <task>/val.json (default: the val files beside --data, when "
                                       "it is a folder holding them)")
    a("--val-fraction", type=float, default=None,
      help="hold out this fraction of each training task as validation, by a fixed seeded draw (for training "
           "data without val files, e.g. commonsense_170k.json); replaces the default --val-data")
    a("--experts", type=int, default=2, help="LoRA experts per adapted layer")
    a("--top-k", type=int, default=None, help="active experts per token (default: all = soft routing)")
    a("--rank", type=int, help="LoRA rank r of each expert")
    a("--alpha", type=float, help="LoRA alpha; experts are scaled by alpha / rank")
    a("--dropout", type=float, help="dropout on the experts' input")
    a("--targets", default=None, help="comma-separated names of the linear layers that get experts "
                                      f"(default: {','.join(omoe.TARGETS)}, less those of --lora-targets)")
    a("--lora-targets", default=None, help="comma-separated names of linear layers that get plain LoRA (one expert of "
                                         "the same rank, no router) beside the experts, e.g. q_proj,k_proj,v_proj,"
                                         "o_proj with --targets gate_proj,up_proj,down_proj as MixLoRA lays them out")
    a("--orth", choices=omoe.ORTH_MODES, default="orthonormal",
      help="Gram-Schmidt across experts: orthonormal (OMoE), orthogonal, normalized (each expert scaled to "
           "unit length, no projections), or none (vanilla MoE-LoRA)")
    a("--lora", action="store_true", help="plain LoRA baseline: one expert, no router (overrides --experts); "
                                          "with --orth normalized, a normalised LoRA")
    a("--aux-loss-coef", type=float, default=0.0, help="weight of the load-balancing loss (top-k routing)")
    a("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    a("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
      help="storage dtype of the frozen base model (adapters stay float32; auto = bfloat16 on CUDA)")
    a("--batch-size", type=int, help="examples per optimizer step (over all processes)")
    a("--micro-batch-size", type=int, help="examples per forward pass (gradient accumulation)")
    a("--lr", type=float, help="peak learning rate of AdamW")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--epochs", type=float, help="passes over the training data")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    a("--warmup", type=int, help="linear warm-up steps")
    a("--schedule", choices=("constant", "cosine", "linear"), default="linear", help="learning-rate decay after warm-up")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    a("--cutoff-len", type=int, default=512, help="longest training example in tokens (see data.py for truncation)")
    a("--train-on-prompt", action="store_true", help="compute the loss on the prompt too, not only the response")
    a("--train-limit", type=int, default=None, help="use only the first N training examples of each task (quick runs)")
    a("--eval-limit", type=int, default=None, help="evaluate on at most N examples per task (quick runs)")
    a("--eval-mode", choices=("likelihood", "generate"), default="likelihood",
      help="likelihood: score each answer label; generate: greedy decoding then the first label found")
    a("--eval-batch-size", type=int, help="examples per evaluation batch")
    a("--skip-base-eval", action="store_true",
      help="do not evaluate the base model first (e.g. when many runs share it)")
    a("--skip-test-eval", action="store_true",
      help="evaluate on validation only, never on the test (e.g. while choosing a setting)")
    a("--eval-every", type=int, default=0, help="also evaluate every N steps, on validation if there is any, "
                                                "else on the test (0 = only before and after)")
    a("--log-every", type=int, help="log loss, each expert's router probability and load (share of tokens "
                                    "routed to it) and expert similarity every N steps")
    a("--save-every", type=int, default=200, help="write a resumable checkpoint every N steps")
    a("--seed", type=int, default=0, help="seed for initialisation, data order and dropout")
    a("--out", default="out", help="folder for logs, checkpoint, adapters and results.json")
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    a("--overwrite", action="store_true",
      help="replace the run in --out (its checkpoint, log, adapters and results), once all input was checked")
    a("--eval-only", action="store_true", help="only evaluate the model with the adapters of --adapter")
    a("--adapter", default=None, help="adapter folder written by a run (<out>/adapter), or a PEFT LoRA adapter "
                                      "folder, for --eval-only")
    a("--grad-checkpoint", action="store_true", help="recompute activations in backward to save memory")
    a("--compile", action="store_true", help="torch.compile the model for training")
    a("--fsdp", action="store_true", help="under torchrun: shard the frozen base over the processes (FSDP2) "
                                          "instead of a whole copy in each (DDP), for bases larger than one GPU")
    args = p.parse_args(argv)
    recipe = EMBEDDED if args.model is None else PAPER
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lora:
        args.experts, args.top_k = 1, None
    args.lora_targets = [t for t in (args.lora_targets or "").split(",") if t]
    args.targets = ([t for t in args.targets.split(",") if t] if args.targets is not None
                    else [t for t in omoe.TARGETS if t not in args.lora_targets])
    validate_args(p, args)
    return p, args


def validate_args(p, args) -> None:
    """Every flag's domain, checked before anything is loaded: a value that cannot work is refused
    now, in one line naming the flag, not after hours of training (or never)."""
    at_least = {"experts": 1, "rank": 1, "batch_size": 1, "micro_batch_size": 1, "cutoff_len": 3, "warmup": 0,
                "eval_batch_size": 1, "eval_every": 0, "log_every": 1, "save_every": 1,
                "top_k": 1, "max_steps": 1, "train_limit": 1, "eval_limit": 1}  # the last four may be absent
    for key, low in at_least.items():
        value = getattr(args, key)
        if value is not None and value < low:
            p.error(f"--{key.replace('_', '-')} {value}: must be at least {low}")
    numbers = {"alpha": (0, False), "lr": (0, False), "epochs": (0, False), "weight_decay": (0, True),
               "grad_clip": (0, True), "aux_loss_coef": (0, True), "dropout": (0, True)}  # (bound, bound allowed)
    for key, (low, inclusive) in numbers.items():
        value = getattr(args, key)
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            p.error(f"--{key.replace('_', '-')} {value}: must be a finite number {'>=' if inclusive else '>'} {low}")
    checks = [
        (args.dropout >= 1, f"--dropout {args.dropout}: must be below 1"),
        (args.top_k is not None and args.top_k > args.experts,
         f"--top-k {args.top_k} must be between 1 and --experts {args.experts}"),
        (args.aux_loss_coef > 0 and args.top_k is None,
         f"--aux-loss-coef {args.aux_loss_coef}: the load-balancing loss needs top-k routing (--top-k); "
         f"with soft routing it would change nothing"),
        (args.batch_size % args.micro_batch_size != 0,
         f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {args.micro_batch_size}"),
        (not 0 <= args.seed < 2**64, f"--seed {args.seed}: must be in [0, 2^64)"),
        (not args.targets, f"--targets {','.join(args.targets)!r}: names no layer"),
        (args.eval_only and not args.adapter, "--eval-only needs --adapter PATH (a folder written by a run)"),
        (args.adapter and not args.eval_only, "--adapter is only used with --eval-only"),
        (args.resume and args.overwrite, "--resume and --overwrite contradict each other: continue the run, or replace it"),
        (args.resume and args.eval_only, "--resume continues training; --eval-only does not train"),
        (args.fsdp and "RANK" not in os.environ, "--fsdp shards the model over processes started by torchrun: "
                                                 "torchrun --nproc_per_node N train.py ... --fsdp"),
        (args.val_fraction is not None and not 0 < args.val_fraction < 1, "--val-fraction must be in (0, 1)"),
        (args.val_fraction is not None and args.val_data is not None, "give --val-data or --val-fraction, not both"),
        (args.val_fraction is not None and args.eval_only, "--val-fraction splits training data: not with --eval-only"),
    ]
    for failed, message in checks:
        if failed:
            p.error(message)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: CUDA is not available here (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda or 'none'})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: the MPS backend is not available here")
    return torch.device(name)


class UsageError(Exception):
    """A problem with the command line or its files: printed as one line, exit code 2."""


class TrainingDiverged(Exception):
    """A NaN or infinite loss: printed as one line, exit code 1, the last good checkpoint kept."""


def lr_lambda(args, total_steps: int):
    def factor(step):  # multiplier of --lr at optimizer step `step` (0-based)
        if step < args.warmup:
            return (step + 1) / (args.warmup + 1)
        progress = (step - args.warmup) / max(1, total_steps - args.warmup)
        if args.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if args.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def check_resumable(ckpt: dict, args, path: Path, fingerprint: str) -> None:
    saved = ckpt["args"]
    differ = [f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {getattr(args, k)!r}"
              for k in RESUME_MUST_MATCH if saved.get(k) != getattr(args, k)]
    if fingerprint != ckpt["data_fingerprint"]:
        differ.append(f"the training data of --data {args.data} have changed (fingerprint "
                      f"{str(ckpt['data_fingerprint'])[:12]}, now {fingerprint[:12]})")
    if differ:
        raise UsageError(f"--resume: {path} was made with other settings: " + "; ".join(differ))


def check_lengths(args, model_args, tokenizer, train_items: list, eval_sets: dict, config: Path) -> None:
    """Refuse sequences longer than the model's context (max_position_embeddings) before any work:
    positions past it were never trained, and a generate-mode prompt that cannot fit would fail only
    after training."""
    limit = model_args.max_seq_len
    longest = max((len(it["input_ids"]) for it in train_items), default=0)
    if longest > limit:
        raise UsageError(f"--cutoff-len {args.cutoff_len}: training examples of up to {longest} tokens exceed "
                         f"max_position_embeddings {limit} of {config}; use --cutoff-len {limit} or less")
    for task, examples in eval_sets.items():
        for i, ex in enumerate(examples):
            text = data.prompt(ex) + max((data.response_for(c) for c in ex.candidates), key=len)
            extra = MAX_NEW_TOKENS if args.eval_mode == "generate" else 0
            if len(text.encode()) + 3 + extra <= limit:
                continue  # a token covers at least one byte: with BOS, EOS and sentencepiece's leading "▁", it fits
            if args.eval_mode == "generate":
                n, what = len(tokenizer.encode(data.prompt(ex))) + extra, f"+ {MAX_NEW_TOKENS} new tokens"
            else:
                n = max(len(data.encode_pair(tokenizer, data.prompt(ex), data.response_for(c))[0])
                        for c in ex.candidates)
                what = "with its longest answer"
            if n > limit:
                raise UsageError(f"evaluation data: task {task!r} record {i} needs {n} tokens ({what}), more than "
                                 f"max_position_embeddings {limit} of {config}")


def check_finite_adapters(model, when: str, device) -> None:
    """Refuse to evaluate or save adapters holding NaN or infinity: their results would mean nothing."""
    state = omoe.adapter_state_dict(model)
    for name, ok in zip(state, parallel.all_finite(list(state.values()), device)):
        if not ok:
            raise TrainingDiverged(f"{when}: adapter weight {name} is not finite (NaN or infinity); stopping "
                                   f"without evaluating or saving it")


class Interrupt:
    """The first Ctrl-C asks the loop to save and stop at the end of the current step; a second one
    stops at once (the checkpoint on disk is then the last one saved)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again to quit now)", file=sys.stderr)


def loss_sum(logits, labels):
    """Summed next-token cross-entropy over the positions whose label is not -100 (the response)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


def evaluate_all(model, tokenizer, eval_sets, args, env) -> dict:
    """Accuracy per task; with several processes each answers its share of the examples."""
    with env.autocast:
        return parallel.evaluate_tasks(model, tokenizer, eval_sets, args.eval_mode, args.eval_batch_size,
                                       MAX_NEW_TOKENS, env.device)


def load_adapter(directory) -> tuple[dict, dict]:
    """The config and weights of --adapter, any fault one line naming it."""
    if not Path(directory).is_dir():
        raise UsageError(f"--adapter {directory}: no such directory (a folder written by a run is expected)")
    try:
        return omoe.load_adapter_files(directory)
    except RecursionError:
        raise UsageError(f"--adapter {directory}: adapter_config.json is nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise UsageError(f"--adapter {directory}: {e}") from None


def print_table(before: dict | None, after: dict, title: str = "test") -> None:
    """Accuracy per task before and after training, beside the two baselines that need no model:
    uniform chance and always answering the most frequent label (see data.baselines)."""
    print(f"\n{title}\n{'task':<16}{'n':>6}{'chance':>9}{'majority':>9}{'before':>9}{'after':>9}")
    for task, r in after.items():
        b = f"{before[task]['accuracy']:9.3f}" if before else f"{'-':>9}"
        extra = f"   (no label in {r['no_label']} answers)" if "no_label" in r else ""
        print(f"{task:<16}{r['n']:>6}{r['chance']:9.3f}{r['majority']:9.3f}{b}{r['accuracy']:9.3f}{extra}")
    mean = {k: sum(r[k] for r in after.values()) / len(after) for k in ("chance", "majority", "accuracy")}
    b = f"{average(before):9.3f}" if before else f"{'-':>9}"
    print(f"{'average':<16}{'':>6}{mean['chance']:9.3f}{mean['majority']:9.3f}{b}{mean['accuracy']:9.3f}")


def average(results: dict | None) -> float | None:
    """The mean accuracy over tasks (tasks weigh alike, as in the published tables), or None."""
    return sum(r["accuracy"] for r in results.values()) / len(results) if results else None


def averages(**results) -> dict:
    return {key: average(r) for key, r in results.items()}


def environment(device: torch.device) -> dict:
    """What a result was computed with: runs on other torch releases or processors differ in rounding,
    and a small model's training can follow the difference as it would another seed."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None
    if device.type == "cpu" and Path("/proc/cpuinfo").is_file():
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    return {"torch": torch.__version__, "device": device.type, "device_name": name,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


VAL_TITLE = "validation (held out of training, for choosing settings; the test is for reporting them)"


def load_validation(args) -> dict:
    """The validation tasks of --val-data, or of the val files beside --data (--val-fraction is applied to
    the training data later): for choosing settings, kept apart from the test."""
    path = args.val_data
    if path is None and args.val_fraction is None and args.data and data.has_split(args.data, "val"):
        path = args.data
    return {t: ex[:args.eval_limit] for t, ex in data.load_tasks(path, "val").items()} if path else {}


def print_diversity(stats: dict) -> None:
    """The router and expert-diversity diagnostics of the last logged step, one row per block."""
    print("\nexperts at the last logged step, mean over each block's adapted layers: the router's mean probability"
          "\nper expert (before top-k), the share of tokens sent to each expert (its load); |cos| is the mean"
          "\n|cosine| between two experts' outputs for one token, before and after Gram-Schmidt (0 = orthogonal):")
    print(f"{'block':<8}{'router prob':<20}{'load':<20}{'|cos| before':>13}{'after':>8}")
    for block, s in omoe.diagnostics_by_block(stats).items():
        prob, load = (" ".join(f"{x:.2f}" for x in s[k]) for k in ("prob", "load"))
        print(f"{block:<8}{prob:<20}{load:<20}{s['cos_before']:13.3f}{s['cos_after']:8.3f}")


# ── the recipe, step by step ──────────────────────────────────────────────────────────────────

@dataclass
class Env:
    """Where and how this process runs."""
    device: torch.device
    rank: int
    world: int             # processes (torchrun); 1 for a plain `python train.py`
    dtype: torch.dtype     # of the frozen base; the adapters are float32
    autocast: object       # lets a low-precision base and float32 adapters meet in a matmul
    out: Path
    replaced: bool         # --overwrite found a run in --out, to be deleted once every input is checked

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
    model_args: ModelArgs
    tokenizer: data.Tokenizer
    eval_sets: dict        # task -> test examples
    val_sets: dict         # task -> validation examples
    train_items: list      # encoded training examples
    fingerprint: str       # of the training data, to refuse resuming on other data
    ckpt_path: Path
    ckpt: dict | None      # the checkpoint to resume
    adapter: tuple | None  # (config, weights) of --adapter for --eval-only


def setup(args) -> Env:
    """Device, processes, precision and --out."""
    rank, world, device = parallel.setup(pick_device(args.device))
    if args.batch_size % (args.micro_batch_size * world):
        raise UsageError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} processes")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    out = Path(args.out)
    replaced = check_out_dir(args, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".writable-{rank}"  # one per process: they check at the same time
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return Env(device, rank, world, dtype, autocast, out, replaced)


def load_inputs(args, env: Env) -> Inputs:
    """The model's config and tokenizer, the data, the checkpoint to resume or the adapter to evaluate."""
    model_dir = resolve_hf_cache(args.model)  # a models--org--name cache folder -> its snapshot
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: no such directory (a Hugging Face LLaMA directory is expected)")
    model_args = load_config(model_dir)
    tokenizer = data.Tokenizer(model_dir)  # its tokenizer.model, else its tokenizer.json
    data.check_tokenizer_fits(tokenizer, model_args.vocab_size, model_dir / "config.json")
    check_memory(model_args, env.dtype, env.device, model_dir / "config.json", env.world if args.fsdp else 1)
    adapter = load_adapter(args.adapter) if args.eval_only else None
    if not args.eval_only:
        with torch.device("meta"):  # the layers --targets names must exist: checked on the model's shapes alone
            try:
                omoe.check_targets(Transformer(model_args), args.targets, args.lora_targets)
            except ValueError as e:
                raise UsageError(f"--targets {','.join(args.targets)}: {e}") from None
    eval_path = args.eval_data or (args.data if args.data and Path(args.data).is_dir() else None)
    if eval_path is None and args.eval_only:
        raise UsageError("--eval-only needs --eval-data (a test JSON file or a folder of <task>/test.json)")
    if eval_path is None:
        env.say("no --eval-data (and --data is not a folder with test files): training without evaluation")
    if args.skip_test_eval:
        eval_path = None
    eval_sets = {t: ex[:args.eval_limit] for t, ex in data.load_tasks(eval_path, "test").items()} if eval_path else {}
    val_sets = load_validation(args)
    train_items, fingerprint, ckpt, ckpt_path = [], "", None, env.out / "checkpoint.pt"
    if not args.eval_only:
        if args.data is None:
            raise UsageError("--data is required for training (or use --eval-only --adapter PATH)")
        train_tasks = data.load_tasks(args.data, "train")
        if args.val_fraction:
            train_tasks, held_out = data.hold_out(train_tasks, args.val_fraction)
            val_sets = {t: ex[:args.eval_limit] for t, ex in held_out.items()}
        train_examples = [ex for task in train_tasks.values() for ex in task[:args.train_limit]]
        fingerprint = data_fingerprint(train_examples)
        if args.resume:
            ckpt = load_checkpoint(ckpt_path)
            check_resumable(ckpt, args, ckpt_path, fingerprint)
        train_items, counts = data.encode_for_training(tokenizer, train_examples, args.cutoff_len,
                                                       args.train_on_prompt)
        env.say(f"training examples: {counts['kept']}; longer than --cutoff-len {args.cutoff_len}: "
                f"{counts['truncated']} had the start of their prompt cut, {counts['dropped']} were left out")
        if len(train_items) < args.batch_size:
            raise UsageError(f"--data: {len(train_items)} usable training examples, fewer than --batch-size "
                             f"{args.batch_size}")
    check_lengths(args, model_args, tokenizer, train_items, eval_sets, model_dir / "config.json")
    return Inputs(model_dir, model_args, tokenizer, eval_sets, val_sets, train_items, fingerprint, ckpt_path,
                  ckpt, adapter)


def experts_of(args, inputs: Inputs) -> dict:
    """The add_experts arguments: those of --adapter, or of the flags."""
    if inputs.adapter:
        return inputs.adapter[0]
    return dict(targets=args.targets, experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
                dropout=args.dropout, orth=args.orth, lora_targets=args.lora_targets)


def load_model(args, env: Env, inputs: Inputs):
    """The base model; under --fsdp already with its experts (see parallel.py), which start at zero:
    until trained, the adapted model computes exactly what the base model does."""
    if args.fsdp:
        return parallel.load_sharded(inputs.model_dir, env.dtype, env.device, args.seed, experts_of(args, inputs))
    return Transformer.from_pretrained(inputs.model_dir, dtype=env.dtype, device=env.device)


def add_experts(args, model, inputs: Inputs) -> None:
    if not args.fsdp:  # under --fsdp they were added before sharding
        torch.manual_seed(args.seed)  # the experts' initialisation depends on the seed alone
        omoe.add_experts(model, **experts_of(args, inputs))


def evaluate_adapter(args, env: Env, inputs: Inputs, model) -> int:
    """--eval-only: the model with the adapters of --adapter, on the test and validation sets."""
    add_experts(args, model, inputs)
    try:
        parallel.load_adapters(model, inputs.adapter[1])
    except (TypeError, ValueError) as e:
        raise UsageError(f"--adapter {args.adapter}: {e}") from None
    results = evaluate_all(model, inputs.tokenizer, inputs.eval_sets, args, env)
    val_results = evaluate_all(model, inputs.tokenizer, inputs.val_sets, args, env)
    if env.main:
        if val_results:
            print_table(None, val_results, VAL_TITLE)
        if results:
            print_table(None, results)
        write_json(env.out / "results.json", {"config": vars(args), "adapter": inputs.adapter[0], "after": results,
                                              "val_after": val_results,
                                              "average": averages(after=results, val_after=val_results),
                                              "environment": environment(env.device)})
    return 0


class Before(NamedTuple):
    """Accuracy per task before training: on the test and on validation (None: not evaluated)."""
    test: dict | None
    val: dict | None


def evaluate_base(args, env: Env, inputs: Inputs, model) -> Before:
    """Test and validation accuracy before training (a resumed run has them in its checkpoint)."""
    if inputs.ckpt is not None:
        return Before(inputs.ckpt["before"], inputs.ckpt.get("val_before"))
    before = val_before = None
    if inputs.eval_sets and not args.skip_base_eval:
        env.say("evaluating the base model ...")
        before = evaluate_all(model, inputs.tokenizer, inputs.eval_sets, args, env)
        env.say("base model accuracy: " + ", ".join(f"{t} {r['accuracy']:.3f}" for t, r in before.items()))
    if inputs.val_sets and not args.skip_base_eval:
        val_before = evaluate_all(model, inputs.tokenizer, inputs.val_sets, args, env)
        env.say("base model validation accuracy: " + ", ".join(f"{t} {r['accuracy']:.3f}"
                                                              for t, r in val_before.items()))
    return Before(before, val_before)


def wrap(args, env: Env, model):
    """The module the loop calls: DDP over several processes (FSDP's sharding is already in `model`),
    compiled with --compile; `model` stays the plain one whose adapters are saved."""
    model.gradient_checkpointing = args.grad_checkpoint
    train_model = parallel.ddp(model, env.device) if env.world > 1 and not args.fsdp else model
    return torch.compile(train_model) if args.compile else train_model


def make_optimizer(args, env: Env, model, inputs: Inputs):
    """AdamW on the adapters, a warm-up then --schedule; resumed from the checkpoint when there is one."""
    steps_per_epoch = len(inputs.train_items) // args.batch_size  # data.batch_indices drops a partial batch
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, total_steps))
    if inputs.ckpt is not None:
        parallel.load_adapters(model, inputs.ckpt["adapters"])
        parallel.load_optimizer_state(model, optimizer, inputs.ckpt["optimizer"])
        scheduler.load_state_dict(inputs.ckpt["scheduler"])
        set_rng_state(inputs.ckpt["rng"], env.rank)
    return optimizer, scheduler, steps_per_epoch, total_steps


def train_step(args, env: Env, inputs: Inputs, model, train_model, step: int, record: bool):
    """One optimizer step's forward and backward passes over this process's share of global batch `step`
    -> (loss, tokens, diagnostics recorder or None). The data position is the step itself."""
    micro_steps = args.batch_size // (args.micro_batch_size * env.world)
    mine = data.batch_indices(len(inputs.train_items), args.batch_size, args.seed, step, env.rank, env.world)
    batches = [data.collate([inputs.train_items[i] for i in mine[m::micro_steps]], inputs.tokenizer.pad_id)
               for m in range(micro_steps)]
    # Normalise by the response tokens of the whole global batch, so that the gradient is the same
    # however the batch is split into micro-batches and processes (DDP and FSDP average over processes).
    n_tokens = parallel.all_sum(sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in batches), env.device)
    step_loss, tokens_seen, recorder = 0.0, 0, None
    for m, (tokens, mask, labels) in enumerate(batches):
        tokens, mask, labels = tokens.to(env.device), mask.to(env.device), labels.to(env.device)
        last = m == micro_steps - 1
        with parallel.gradient_sync(model, train_model, last), env.autocast, \
                (omoe.record_diagnostics(model) if record and last else nullcontext()) as recorder:
            if recorder is not None:
                recorder.mask = mask
            loss = loss_sum(train_model(tokens, mask), labels) / n_tokens
            objective = loss
            if args.aux_loss_coef:
                objective = loss + args.aux_loss_coef * omoe.load_balancing_loss(model) / micro_steps / env.world
            (objective * env.world).backward()
        step_loss += loss.item()  # the language-model loss alone is what we log
        tokens_seen += int(mask.sum())
    parallel.gather_diagnostics(recorder, env.device)  # over every process's last micro-batch
    return parallel.all_sum(step_loss, env.device), tokens_seen, recorder


def save(args, env: Env, inputs: Inputs, model, optimizer, scheduler, done, steps_per_epoch, before: Before) -> None:
    """A resumable checkpoint: the adapters and optimizer state whole (gathered when sharded), on the main process."""
    adapters = parallel.adapter_state(model, keep=env.main)
    optimizer_state = parallel.optimizer_state(optimizer, keep=env.main)
    rng = parallel.rng_states(rng_state())
    if env.main:
        save_checkpoint(inputs.ckpt_path, adapters, optimizer_state, scheduler, done, steps_per_epoch, args,
                        before.test, inputs.fingerprint, before.val, rng)


def train(args, env: Env, inputs: Inputs, model, train_model, optimizer, scheduler, steps_per_epoch, total_steps,
          before: Before) -> tuple[int, dict]:
    """The loop: steps, logs, evaluations during training, checkpoints -> (exit code, last diagnostics)."""
    start_step = inputs.ckpt["step"] if inputs.ckpt else 0
    if inputs.ckpt and env.main:
        truncate_log(env.out / "log.jsonl", start_step)
        print(f"resuming from {inputs.ckpt_path} at step {start_step} of {total_steps}")
    interrupt = Interrupt()
    model.train()
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not env.main)
    t0, tokens_seen, loss_acc, loss_n = time.time(), 0, 0.0, 0
    last_stats = {}  # the diagnostics of the last logged step, printed at the end
    for step in bar:
        done = step + 1
        record = done % args.log_every == 0
        step_loss, tokens, recorder = train_step(args, env, inputs, model, train_model, step, record)
        if not math.isfinite(step_loss):
            path = inputs.ckpt_path
            raise TrainingDiverged(f"step {done}: the loss is {step_loss}; stopping. The last good checkpoint is "
                                   f"{path}" + ("" if path.exists() else " (none written yet)"))
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_acc, loss_n, tokens_seen = loss_acc + step_loss, loss_n + 1, tokens_seen + tokens
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if record and env.main:
            entry = {"step": done, "loss": loss_acc / loss_n, "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": tokens_seen * env.world / (time.time() - t0),  # from this process's share
                     "experts": recorder.summary() if recorder is not None else {}}
            log_step(bar, entry)
            append_log(env.out, entry)
            last_stats = entry["experts"]
        if record:
            t0, tokens_seen, loss_acc, loss_n = time.time(), 0, 0.0, 0
        evaluate = args.eval_every and done % args.eval_every == 0 and done < total_steps and (
            inputs.val_sets or inputs.eval_sets)
        stop = parallel.all_sum(float(interrupt.requested), env.device) > 0
        checkpoint = stop or done % args.save_every == 0 or done == total_steps
        if evaluate or checkpoint:
            check_finite_adapters(model, f"step {done}", env.device)
        if evaluate:
            key, watched = ("val", inputs.val_sets) if inputs.val_sets else ("eval", inputs.eval_sets)
            results = evaluate_all(model, inputs.tokenizer, watched, args, env)
            if env.main:
                append_log(env.out, {"step": done, key: results})
                bar.write(f"step {done}: " + ", ".join(f"{t} {r['accuracy']:.3f}" for t, r in results.items()))
        if checkpoint:
            save(args, env, inputs, model, optimizer, scheduler, done, steps_per_epoch, before)
        if stop:
            env.say(f"\nstopped at step {done}; checkpoint saved to {inputs.ckpt_path}. Continue with the same "
                    f"command and --resume.")
            return 130, last_stats
    bar.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C stops at once
    return 0, last_stats


def log_step(bar, entry: dict) -> None:
    s = omoe.mean_diagnostics(entry["experts"])
    bar.write(f"step {entry['step']}: loss {entry['loss']:.4f}, lr {entry['lr']:.2e}, "
              f"{entry['tokens_per_s']:.0f} tok/s" +
              (f", router p {[round(x, 3) for x in s['prob']]} load {[round(x, 3) for x in s['load']]}, "
               f"expert |cos| before Gram-Schmidt {s['cos_before']:.3f} after {s['cos_after']:.3f}" if s else ""))


def finish(args, env: Env, inputs: Inputs, model, before: Before, last_stats: dict, total_steps: int, seconds: float,
           counts: tuple[int, int]):
    """Evaluate the trained model, save its adapters, print and write the results."""
    after = evaluate_all(model, inputs.tokenizer, inputs.eval_sets, args, env) if inputs.eval_sets else {}
    val_after = evaluate_all(model, inputs.tokenizer, inputs.val_sets, args, env) if inputs.val_sets else {}
    adapters = parallel.adapter_state(model, keep=env.main)
    if not env.main:
        return
    adapter_dir = env.out / "adapter"
    try:
        omoe.save_adapters(model, adapter_dir, base_model=str(inputs.model_dir), state=adapters)
    except OSError as e:
        raise SaveError(f"could not write the adapters to {adapter_dir} ({e.strerror or e}); "
                        f"{inputs.ckpt_path} holds them: --resume evaluates and saves them again") from None
    if val_after:
        print_table(before.val, val_after, VAL_TITLE)
    if after:
        print_table(before.test, after)
    if last_stats:
        print_diversity(last_stats)
    write_json(env.out / "results.json", {"config": vars(args), "trainable_params": counts[0],
                                          "total_params": counts[1], "steps": total_steps, "train_seconds": seconds,
                                          "before": before.test, "after": after, "val_before": before.val,
                                          "val_after": val_after,
                                          "average": averages(before=before.test, after=after, val_before=before.val,
                                                              val_after=val_after),
                                          "environment": environment(env.device)})
    print(f"\nadapters: {adapter_dir}   results: {env.out / 'results.json'}   log: {env.out / 'log.jsonl'}")


def run(args) -> int:
    env = setup(args)                           # device, processes, precision, --out
    inputs = load_inputs(args, env)             # config, tokenizer, data, checkpoint: every input checked
    model = load_model(args, env, inputs)       # the frozen base (sharded under --fsdp)
    if args.eval_only:
        return evaluate_adapter(args, env, inputs, model)
    if env.main:
        clear_run(env.out, env.replaced)        # every input has been checked: only now may --overwrite delete
    before = evaluate_base(args, env, inputs, model)
    add_experts(args, model, inputs)
    counts = omoe.print_trainable_parameters(model) if env.main else None
    train_model = wrap(args, env, model)        # DDP, compile
    optimizer, scheduler, steps_per_epoch, total_steps = make_optimizer(args, env, model, inputs)
    start = time.time()
    code, last_stats = train(args, env, inputs, model, train_model, optimizer, scheduler, steps_per_epoch,
                             total_steps, before)
    if code == 0:
        finish(args, env, inputs, model, before, last_stats, total_steps, time.time() - start, counts)
    return code


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    code, ours = 1, not dist.is_initialized()  # a process group made by run() is closed here
    try:
        code = run(args)
        return code
    except (UsageError, FileNotFoundError, ValueError) as e:  # bad input (DataError, CheckpointError, ...)
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        ckpt = Path(args.out) / "checkpoint.pt"
        kept = f"the last checkpoint written is {ckpt}" if ckpt.exists() else "no checkpoint was written"
        print(f"train.py: interrupted; {kept}", file=sys.stderr)
        return 130
    except (TrainingDiverged, SaveError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Interrupt's handler is ours only while we run
        if dist.is_initialized():
            # After a failure the other processes may be waiting in a collective: torchrun stops them
            # when this one exits, and a barrier here would wait forever.
            if code in (0, 130):
                dist.barrier()
            if ours:
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
