"""train.py's command line: the flags in groups, each value's domain checked before anything is
loaded, and the tables a run prints. A bad value is one line naming the flag, exit code 2.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from plumbing import adapters, parallel, run_folder
from plumbing.base.errors import BadInput, RunFailed

# Flags whose default depends on the recipe (train.PAPER with --model, train.EMBEDDED without).
RECIPE_KEYS = ("rank", "alpha", "dropout", "batch_size", "micro_batch_size", "lr", "epochs", "warmup",
               "eval_batch_size", "log_every")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # omoe.TARGETS
ORTH_MODES = ("orthonormal", "orthogonal", "normalized", "none")                        # omoe.ORTH_MODES
STARTED = time.time()  # when the command line was parsed: the run's start, for its "whole run" time


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" or "(default: False)" after help
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other refusal (the usage is in --help)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(paper: dict, embedded: dict) -> ArgumentParser:
    p = ArgumentParser(prog="train.py", formatter_class=HelpFormatter,
                       description="Fine-tune a LLaMA with OMoE adapters and evaluate it.")
    group = None
    p.must_match = []  # the settings a resumed run must keep: they change what it computes

    def a(flag, help, must_match=False, **kw):
        """One flag, declared once: its default (or the recipe's), its help, and whether --resume
        must find it unchanged (always so for an adapter's layout, adapters.LAYOUT_KEYS)."""
        key = flag[2:].replace("-", "_")
        if key in RECIPE_KEYS:  # filled in after parsing, from the recipe
            kw["default"] = argparse.SUPPRESS
            help += f" (default: {paper[key]} with --model, {embedded[key]} for the embedded model)"
        if must_match or key in adapters.LAYOUT_KEYS:
            p.must_match.append(key)
        group.add_argument(flag, help=help, **kw)

    group = p.add_argument_group("model and data")
    a("--model", must_match=True, default=None, help="a local Hugging Face LLaMA directory, its "
      "models--org--name cache folder, or a hub id such as meta-llama/Llama-2-7b-hf (found in the "
      "local Hugging Face cache, else downloaded); without it, the embedded tiny LLaMA of assets/tiny-llama")
    a("--revision", must_match=True, default=None, help="with a hub id: the branch, tag or commit (default: main)")
    a("--tokenizer", must_match=True, default=None, help="a tokenizer.model, tokenizer.json or folder holding one, "
      "when the model's folder has none")
    a("--data", must_match=True, default=None, help="training data: an LLM-Adapters JSON file, or a folder of "
      "<task>/train.json (without --model: the embedded tasks of assets/world)")
    a("--eval-data", default=None, help="evaluation data: a JSON file or a folder of <task>/test.json "
      "(default: the test files beside --data, when it is a folder)")
    a("--val-data", default=None, help="validation data, for choosing settings (the test never is): a "
      "JSON file or a folder of <task>/val.json (default: the val files beside --data, if any)")
    a("--val-fraction", must_match=True, type=float, default=None, help="hold out this fraction of each training task "
      "as validation, by a fixed seeded draw (for data without val files); replaces --val-data")
    a("--train-limit", must_match=True, type=int, default=None, help="use only the first N training "
      "examples of each task")
    a("--cutoff-len", must_match=True, type=int, default=512, help="longest training example in tokens (data.py "
      "says how longer ones are truncated)")
    a("--train-on-prompt", must_match=True, action="store_true", help="compute the loss on the prompt too, not only "
      "the response")

    group = p.add_argument_group("method")
    a("--experts", type=int, default=2, help="LoRA experts per adapted layer")
    a("--top-k", type=int, default=None, help="active experts per token (default: all, soft routing)")
    a("--orth", choices=ORTH_MODES, type=orth_mode, default=None, help="what happens to the active "
      "experts' outputs: orthonormal (OMoE, the default with several experts), orthogonal, normalized "
      "(unit length, no projections; normalised is the same), or none (vanilla MoE-LoRA; the default "
      "with --lora)")
    a("--lora", must_match=True, action="store_true", help="plain LoRA baseline: one expert, no router (overrides "
      "--experts); with --orth normalized, a normalised LoRA")
    a("--rank", type=int, help="LoRA rank r of each expert")
    a("--alpha", type=float, help="LoRA alpha; experts are scaled by alpha / rank")
    a("--dropout", type=float, help="dropout on the experts' input")
    a("--targets", default=None, help="comma-separated names of the linear layers that get experts "
      f"(default: {','.join(TARGETS)}, less those of --lora-targets)")
    a("--lora-targets", default=None, help="comma-separated names of linear layers that get plain "
      "LoRA beside the experts, e.g. q_proj,k_proj,v_proj,o_proj with --targets "
      "gate_proj,up_proj,down_proj as MixLoRA lays them out")
    a("--aux-loss-coef", must_match=True, type=float, default=0.0, help="weight of the load-balancing loss (top-k)")

    group = p.add_argument_group("optimisation")
    a("--batch-size", must_match=True, type=int, help="examples per optimizer step (over all processes)")
    a("--micro-batch-size", type=int, help="examples per forward pass (gradient accumulation)")
    a("--lr", must_match=True, type=float, help="peak learning rate of AdamW")
    a("--weight-decay", must_match=True, type=float, default=0.0, help="AdamW weight decay")
    a("--epochs", must_match=True, type=float, help="passes over the training data")
    a("--max-steps", must_match=True, type=int, default=None, help="stop after this many optimizer steps (overrides "
      "--epochs)")
    a("--warmup", must_match=True, type=int, help="linear warm-up steps (a run shorter than this warms up over a "
      "tenth of its steps, and says so)")
    a("--schedule", must_match=True, choices=("constant", "cosine", "linear"), default="linear",
      help="learning-rate decay after warm-up")
    a("--grad-clip", must_match=True, type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    a("--seed", must_match=True, type=int, default=0, help="seed for initialisation, data order and dropout")

    group = p.add_argument_group("evaluation")
    a("--eval-mode", choices=("likelihood", "generate"), default="likelihood", help="likelihood: "
      "score each answer label; generate: greedy decoding, then the first label found")
    a("--eval-batch-size", type=int, help="examples per evaluation batch")
    a("--eval-limit", type=int, default=None, help="evaluate on at most N examples per task")
    a("--eval-every", type=int, default=0, help="also evaluate every N steps, on validation if there "
      "is any, else on the test (0 = only before and after)")
    a("--skip-base-eval", action="store_true", help="do not evaluate the base model first")
    a("--skip-test-eval", action="store_true", help="evaluate on validation only, never on the test "
      "(while choosing a setting)")
    a("--eval-only", action="store_true", help="only evaluate the adapters of --adapter, as "
      "evaluate.py does (their base is the one they record, unless --model): the results go to "
      "<out>/eval-<data>.json, beside a run's own files, which are left as they are")
    a("--adapter", default=None, help="with --eval-only: an adapter folder written by a run "
      "(<out>/adapter) or a PEFT LoRA adapter folder (default: out/adapter)")

    group = p.add_argument_group("run folder")
    a("--out", default="out", help="folder for the log, checkpoint, adapters and results.json")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    a("--overwrite", action="store_true", help="replace the run in --out (the files it wrote), once "
      "every input was checked")
    a("--save-every", type=int, default=200, help="write a resumable checkpoint every N steps")
    a("--log-every", type=int, help="log the loss, each expert's router probability and load (share "
      "of tokens routed to it) and the experts' similarity every N steps")

    group = p.add_argument_group("speed and scale")
    a("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    a("--dtype", must_match=True, choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="storage "
      "dtype of the frozen base (adapters stay float32; auto = bfloat16 on CUDA)")
    a("--grad-checkpoint", action="store_true", help="recompute activations in backward: less memory")
    a("--compile", action="store_true", help="torch.compile the model for training")
    a("--fsdp", action="store_true", help="under torchrun: shard the frozen base over the processes "
      "(FSDP2) instead of a whole copy in each (DDP), for bases larger than one GPU")
    return p


def orth_mode(value: str) -> str:
    """--orth's value, with the British spelling of normalized taken as the same mode: runs, configs
    and results record the one spelling, normalized."""
    return "normalized" if value == "normalised" else value


def parse_eval_args(argv):
    """evaluate.py's flags: those of train.py that an evaluation reads, with the same defaults."""
    p = ArgumentParser(prog="evaluate.py", formatter_class=HelpFormatter,
                       description="Evaluate adapters trained by train.py (or a PEFT LoRA).")
    p.add_argument("--adapter", default="out/adapter", help="the adapter folder a run wrote")
    p.add_argument("--model", default=None, help="the base model (default: the one the adapters "
                   "were trained on): a folder, a cache folder or a hub id")
    p.add_argument("--revision", default=None, help="with a hub id: the branch, tag or commit")
    p.add_argument("--tokenizer", default=None, help="a tokenizer outside the model's folder")
    p.add_argument("--eval-data", default=None, help="test data: a JSON file or a folder of "
                   "<task>/test.json (default: the embedded tasks, for the embedded model)")
    p.add_argument("--val-data", default=None, help="validation data: a JSON file or a folder of "
                   "<task>/val.json")
    p.add_argument("--eval-mode", choices=("likelihood", "generate"), default="likelihood",
                   help="likelihood: score each answer label; generate: greedy decoding")
    p.add_argument("--eval-batch-size", type=int, default=16, help="examples per batch")
    p.add_argument("--eval-limit", type=int, default=None, help="at most N examples per task")
    p.add_argument("--skip-test-eval", action="store_true", help="validation only")
    p.add_argument("--out", default="out", help="the folder of eval-<data>.json (beside a run)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier eval-<data>.json "
                   "(that file only)")
    p.add_argument("--seed", type=int, default=0, help="seed (evaluation draws nothing at random)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="of the base (auto: bfloat16 on CUDA)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the base")
    p.set_defaults(eval_only=True, data=None, val_fraction=None)
    args = p.parse_args(argv)
    for flag, low in (("--eval-batch-size", 1), ("--eval-limit", 1)):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < low:
            p.error(f"{flag} {value}: must be at least {low}")
    if not 0 <= args.seed < 2**64:
        p.error(f"--seed {args.seed}: must be in [0, 2^64)")
    if args.fsdp and "RANK" not in os.environ:
        p.error("--fsdp shards the model over processes started by torchrun")
    return args


def must_match() -> tuple:
    """The flags a resumed run must keep, in the order --help lists them."""
    return tuple(build_parser(dict.fromkeys(RECIPE_KEYS), dict.fromkeys(RECIPE_KEYS)).must_match)


def defaults() -> dict:
    """Every flag's default that does not depend on the recipe, as parse_args stores it."""
    p = build_parser(dict.fromkeys(RECIPE_KEYS), dict.fromkeys(RECIPE_KEYS))
    found = {a.dest: a.default for a in p._actions if a.default is not argparse.SUPPRESS}
    return {**found, "lora_targets": [], "help": None}


def parse_args(argv, paper: dict, embedded: dict):
    """The flags -> args, with the recipe's defaults filled in and every value checked."""
    global STARTED
    STARTED = time.time()
    p = build_parser(paper, embedded)
    args = p.parse_args(argv)
    if args.revision is not None and args.model is None and not args.eval_only:
        p.error("--revision needs --model (a hub id such as meta-llama/Llama-2-7b-hf)")
    recipe = embedded if args.model is None else paper
    for key in RECIPE_KEYS:
        if getattr(args, key, None) is None:
            setattr(args, key, recipe[key])
    if args.model is None:
        # An evaluation takes its base from the adapters' record (plumbing/gate.py), as generate.py.
        args.model = None if args.eval_only else embedded["model"]
        args.data = args.data or embedded["data"]
    if args.eval_only:
        args.adapter = args.adapter or "out/adapter"  # evaluate.py's default
    if args.lora:
        args.experts, args.top_k = 1, None
    args.orth = args.orth or ("orthonormal" if args.experts > 1 else "none")
    args.lora_targets = [t for t in (args.lora_targets or "").split(",") if t]
    args.targets = ([t for t in args.targets.split(",") if t] if args.targets is not None
                    else [t for t in TARGETS if t not in args.lora_targets])
    try:
        check(args)
    except BadInput as e:
        p.error(str(e))
    return p, args


def check(args) -> None:
    """Every flag's domain, before anything is loaded: a value that cannot work is refused now, in
    one line naming the flag, not after hours of training (or never)."""
    at_least = {"experts": 1, "rank": 1, "batch_size": 1, "micro_batch_size": 1, "cutoff_len": 3,
                "warmup": 0, "eval_batch_size": 1, "eval_every": 0, "log_every": 1, "save_every": 1,
                "top_k": 1, "max_steps": 1, "train_limit": 1, "eval_limit": 1}  # the last four: or None
    for key, low in at_least.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise BadInput(f"--{key.replace('_', '-')} {value}: must be at least {low}")
    numbers = {"alpha": (0, False), "lr": (0, False), "epochs": (0, False), "weight_decay": (0, True),
               "grad_clip": (0, True), "aux_loss_coef": (0, True), "dropout": (0, True)}  # inclusive?
    for key, (low, inclusive) in numbers.items():
        value = getattr(args, key)
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise BadInput(f"--{key.replace('_', '-')} {value}: must be a finite number "
                           f"{'>=' if inclusive else '>'} {low}")
        check_float32(f"--{key.replace('_', '-')}", value)
    check_learning_rate(args.lr, args.weight_decay)
    for failed, message in contradictions(args):
        if failed:
            raise BadInput(message)


# Training computes in float32: a flag's value must be a float32 number, and not round to 0 there.
FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38


def check_float32(flag: str, value: float) -> None:
    if value > FLOAT32_MAX or 0 < value < FLOAT32_TINY:
        raise BadInput(f"{flag} {value}: outside what float32 training can hold (a number between "
                       f"{FLOAT32_TINY:.2e} and {FLOAT32_MAX:.2e}, or 0 where 0 is allowed)")


def check_learning_rate(lr: float, weight_decay: float) -> None:
    """AdamW moves each weight by about lr per step: above 1 it diverges at once (2e3 is a typo of
    2e-3 that the float parser accepts), and a decay of lr x weight_decay >= 1 zeroes the weights."""
    if lr > 1:
        mantissa, exponent = f"{lr:e}".split("e")
        typo = f"; did you mean {float(mantissa):g}e-{int(exponent)}?" if int(exponent) > 0 else ""
        raise BadInput(f"--lr {lr}: must be at most 1 (AdamW would move every weight by about the "
                       f"learning rate at each step){typo}")
    if lr * weight_decay >= 1:
        raise BadInput(f"--weight-decay {weight_decay} with --lr {lr}: each step would multiply "
                       f"the adapters' weights by 1 - lr x weight_decay = {1 - lr * weight_decay:g}")


def contradictions(args) -> list[tuple[bool, str]]:
    return [
        (args.dropout >= 1, f"--dropout {args.dropout}: must be below 1"),
        (args.top_k is not None and args.top_k > args.experts,
         f"--top-k {args.top_k} must be between 1 and --experts {args.experts}"),
        (args.aux_loss_coef > 0 and args.top_k is None,
         f"--aux-loss-coef {args.aux_loss_coef}: the load-balancing loss needs top-k routing "
         f"(--top-k); with soft routing it would change nothing"),
        (args.batch_size % args.micro_batch_size != 0,
         f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size "
         f"{args.micro_batch_size}"),
        (not 0 <= args.seed < 2**64, f"--seed {args.seed}: must be in [0, 2^64)"),
        (not args.targets, f"--targets {','.join(args.targets)!r}: names no layer"),
        (args.adapter and not args.eval_only, "--adapter is only used with --eval-only"),
        (args.resume and args.overwrite, "--resume and --overwrite contradict each other: continue "
                                         "the run, or replace it"),
        (args.resume and args.eval_only, "--resume continues training; --eval-only does not train"),
        (args.fsdp and "RANK" not in os.environ, "--fsdp shards the model over processes started by "
                                                 "torchrun: torchrun --nproc_per_node N train.py ... --fsdp"),
        (args.val_fraction is not None and not 0 < args.val_fraction < 1,
         "--val-fraction must be in (0, 1)"),
        (args.val_fraction is not None and args.val_data is not None,
         "give --val-data or --val-fraction, not both"),
        (args.val_fraction is not None and args.eval_only,
         "--val-fraction splits training data: not with --eval-only"),
    ]


# ── What a run prints ───────────────────────────────────────────────────────────────────────────

VAL_TITLE = "validation (held out of training, for choosing settings; the test is for reporting them)"


def average(results: dict | None) -> float | None:
    """The mean accuracy over tasks (tasks weigh alike, as in the published tables), or None."""
    return sum(r["accuracy"] for r in results.values()) / len(results) if results else None


def print_trainable_parameters(model) -> tuple[int, int]:
    """PEFT's line: the trainable parameters (the adapters) beside all of them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")
    return trainable, total


def print_table(before: dict | None, after: dict, title: str = "test") -> None:
    """Accuracy per task before and after training, beside the two baselines that need no model:
    uniform chance and always answering the most frequent label (data.baselines), and their means."""
    print(f"\n{title}\n{'task':<16}{'n':>6}{'chance':>9}{'majority':>9}{'before':>9}{'after':>9}")
    for task, r in after.items():
        b = f"{before[task]['accuracy']:9.3f}" if before else f"{'-':>9}"
        extra = f"   (no label in {r['no_label']} answers)" if "no_label" in r else ""
        print(f"{task:<16}{r['n']:>6}{r['chance']:9.3f}{r['majority']:9.3f}{b}{r['accuracy']:9.3f}"
              f"{extra}")
    mean = {k: sum(r[k] for r in after.values()) / len(after) for k in ("chance", "majority")}
    b = f"{average(before):9.3f}" if before else f"{'-':>9}"
    print(f"{'average':<16}{'':>6}{mean['chance']:9.3f}{mean['majority']:9.3f}{b}{average(after):9.3f}")


def print_diversity(by_block: dict) -> None:
    """The router and expert-diversity diagnostics of the last logged step, one row per block."""
    print("\nexperts at the last logged step, mean over each block's adapted layers: the router's mean "
          "probability\nper expert (before top-k), the share of tokens sent to each expert (its load); "
          "|cos| is the mean\n|cosine| between two experts' outputs for one token, before and after "
          "Gram-Schmidt (0 = orthogonal):")
    print(f"{'block':<8}{'router prob':<20}{'load':<20}{'|cos| before':>13}{'after':>8}")
    for block, s in by_block.items():
        prob, load = (" ".join(f"{x:.2f}" for x in s[k]) for k in ("prob", "load"))
        print(f"{block:<8}{prob:<20}{load:<20}{s['cos_before']:13.3f}{s['cos_after']:8.3f}")


def log_line(entry: dict, means: dict) -> str:
    """One logged step: its loss, learning rate and speed, and the experts' diagnostics."""
    return (f"step {entry['step']}: loss {entry['loss']:.4f}, lr {entry['lr']:.2e}, "
            f"{entry['tokens_per_s']:.0f} tok/s" +
            (f", router p {[round(x, 3) for x in means['prob']]} load "
             f"{[round(x, 3) for x in means['load']]}, expert |cos| before Gram-Schmidt "
             f"{means['cos_before']:.3f} after {means['cos_after']:.3f}" if means else ""))


def announce(say, line: str, when=True) -> float:
    """Say what the run starts doing where it would otherwise be silent for a while -> the time."""
    if when:
        say(line)
    return time.time()


def times(train_seconds: float, eval_started: float) -> dict:
    """How long the training, the fine-tuned model's evaluation and the whole command took, in
    seconds: kept in results.json and printed at the end of the run."""
    now = time.time()
    return {"train_seconds": train_seconds, "eval_seconds": now - eval_started,
            "run_seconds": now - STARTED}


def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


def times_line(t: dict) -> str:
    return (f"time: training {duration(t['train_seconds'])}, evaluating the fine-tuned model "
            f"{duration(t['eval_seconds'])}; the whole run {duration(t['run_seconds'])}")


def accuracies(results: dict) -> str:
    return ", ".join(f"{t} {r['accuracy']:.3f}" for t, r in results.items())


def run_command(run, args, prog: str = "train.py") -> int:
    """run(args) as a command: a refusal (BadInput) is one line and exit code 2, a failure that keeps
    what it had (RunFailed) one line and 1, Ctrl-C 130; anything else is a bug and shows its
    traceback. A process group that run() made is closed here."""
    code, ours = 1, not dist.is_initialized()
    checkpoint = Path(getattr(args, "out", "out")) / "checkpoint.pt"
    if prog != "train.py":  # no run folder: nothing to say about checkpoints
        checkpoint = None
    try:
        code = run(args)
        return code
    except BadInput as e:  # a flag, file or record that cannot be used: nothing was lost
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # a diverged loss, a file that could not be written
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = "" if checkpoint is None else f"; the last checkpoint written is {checkpoint}" \
            if checkpoint.exists() else "; no checkpoint was written"
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        run_folder.quiet_stdout()
        kept = "" if checkpoint is None else \
            f"; the last checkpoint written is {run_folder.last_checkpoint(checkpoint)}"
        print(f"{prog}: error: standard output was closed (its reader exited); stopped{kept}",
              file=sys.stderr)
        return 1
    finally:
        parallel.teardown(code, ours)
