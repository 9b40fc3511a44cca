"""Fine-tune a LLaMA with OMoE adapters and evaluate it: a plain PyTorch loop.

    # The embedded tiny LLaMA, on a laptop CPU:
    python train.py
    # A 7B LLaMA on the paper's data:
    python train.py --model meta-llama/Llama-2-7b-hf \\
        --data commonsense_170k.json --eval-data dataset/ \\
        --experts 2 --device cuda
    # Several GPUs, a whole copy on each (DDP):
    torchrun --nproc_per_node 4 train.py ...
    # The frozen base sharded over them (FSDP):
    torchrun --nproc_per_node 8 train.py ... --fsdp

Reading order: the two recipes -> the Run dataclass and run(), the whole
recipe on one screen -> the model and its experts -> the optimizer and
its schedule -> one training step and the loop -> saving and evaluation.
What makes it robust (every input checked before any work, the run folder,
several processes, the command line) lives in plumbing/ and is one line
here.
"""
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
import evaluate
import omoe
from model import Transformer
from plumbing import cli, parallel, run_folder
from plumbing.diagnostics import (diagnostics_by_block, mean_diagnostics,
                                  record_diagnostics)
from plumbing.base.errors import TrainingDiverged
from plumbing.gate import Env, Inputs, experts_of, load_inputs, setup

# Two recipes. With --model, the paper's for a 7B LLaMA. Without it, one
# sized for the embedded tiny LLaMA (assets/), which a laptop CPU fine-tunes
# in about two minutes. A flag given always wins.
ASSETS = Path(__file__).resolve().parent / "assets"
PAPER = dict(rank=16, alpha=32, dropout=0.05, batch_size=16,
             micro_batch_size=4, lr=2e-4, epochs=2, warmup=100,
             eval_batch_size=16, log_every=10)
EMBEDDED = dict(model=str(ASSETS / "tiny-llama"), data=str(ASSETS / "world"),
                rank=8, alpha=16, dropout=0.0, batch_size=16,
                micro_batch_size=16, lr=2e-3, epochs=1, warmup=10,
                eval_batch_size=64, log_every=50)


def parse_args(argv=None):
    return cli.parse_args(argv, PAPER, EMBEDDED)


@dataclass
class Run:
    """What the steps of one run share, once the model, its experts and the
    optimizer exist."""
    args: object             # the flags, with the recipe's defaults filled in
    env: Env                 # device, processes, precision, the run folder
    inputs: Inputs           # tokenizer, data and checkpoint, all checked
    model: torch.nn.Module   # the plain model: its adapters are what we save
    train_model: object      # what the loop calls: `model`, DDP or compiled
    optimizer: object
    scheduler: object
    total_steps: int
    before: dict             # the base accuracies: {"test": ..., "val": ...}


def run(args) -> int:
    # Device, processes, precision; the --out folder is locked.
    env = setup(args)
    try:
        # Config, tokenizer, data and checkpoint, all checked.
        inputs = load_inputs(args, env)
        # A resumed run that is already complete has nothing to do.
        if inputs.finished:
            return 0
        # The frozen base, sharded under --fsdp.
        model = load_model(args, env, inputs)
        # Every input is checked, so --overwrite may delete the old run now.
        if env.main:
            run_folder.clear_run(env.out, env.replaced)
        before = evaluate_base(args, env, inputs, model)
        add_adapters(args, model)
        counts = cli.print_trainable_parameters(model) if env.main else None
        train_model = wrap(args, env, model)
        optimizer, scheduler, total_steps = make_optimizer(args, env, model,
                                                           inputs)
        r = Run(args, env, inputs, model, train_model, optimizer, scheduler,
                total_steps, before)
        start = time.time()
        code, stats = train(r)
        if code == 0:
            finish(r, stats, time.time() - start, counts)
        return code
    finally:
        if env.lock:
            env.lock.release()


# ── The model and its experts ─────────────────────────────────────────────

def load_model(args, env: Env, inputs: Inputs):
    """The base model; under --fsdp already with its experts (see
    plumbing/parallel.py). The experts start at zero: until trained, the
    adapted model computes exactly what the base model does."""
    if args.fsdp:
        return parallel.load_sharded(inputs.model_dir, env.dtype, env.device,
                                     args.seed, experts_of(args))
    return Transformer.from_pretrained(inputs.model_dir, dtype=env.dtype,
                                       device=env.device)


def add_adapters(args, model) -> None:
    # Under --fsdp the experts were added before sharding.
    if not args.fsdp:
        # The experts' initialisation depends on the seed alone.
        torch.manual_seed(args.seed)
        omoe.add_experts(model, **experts_of(args))


def wrap(args, env: Env, model):
    """The module the loop calls: DDP over several processes (FSDP's
    sharding is already in `model`), compiled with --compile; `model` stays
    the plain one whose adapters are saved."""
    model.gradient_checkpointing = args.grad_checkpoint
    train_model = (parallel.ddp(model, env.device)
                   if env.world > 1 and not args.fsdp else model)
    return torch.compile(train_model) if args.compile else train_model


# ── The optimizer and its schedule ────────────────────────────────────────

def warmup_steps(args, total_steps: int, say=print) -> int:
    """--warmup, or a tenth of a run shorter than it, said in one line. A
    warm-up that never ends would train the whole run below the learning
    rate asked for."""
    if args.warmup < total_steps:
        return args.warmup
    steps = math.ceil(total_steps / 10)
    say(f"--warmup {args.warmup} is not shorter than the run's "
        f"{total_steps} steps: warming up over {steps} (a tenth of them) "
        f"instead")
    return steps


def lr_lambda(warmup: int, schedule: str, total_steps: int):
    # The multiplier of --lr at optimizer step `step`, counted from 0.
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def make_optimizer(args, env: Env, model, inputs: Inputs):
    """AdamW on the adapters, a warm-up then --schedule; resumed from the
    checkpoint if any."""
    # A partial last batch is dropped.
    steps_per_epoch = len(inputs.train_items) // args.batch_size
    total_steps = args.max_steps or max(
        1, math.ceil(args.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr,
        weight_decay=args.weight_decay)
    warmup = warmup_steps(args, total_steps, env.say)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup, args.schedule, total_steps))
    if inputs.ckpt is not None:
        parallel.load_adapters(model, inputs.ckpt["adapters"])
        parallel.load_optimizer_state(model, optimizer,
                                      inputs.ckpt["optimizer"])
        scheduler.load_state_dict(inputs.ckpt["scheduler"])
        run_folder.set_rng_state(inputs.ckpt["rng"], env.rank)
    return optimizer, scheduler, total_steps


# ── One training step, and the loop ───────────────────────────────────────

def loss_sum(logits, labels):
    """Summed next-token cross-entropy over the positions whose label is not
    -100 (the response)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
        ignore_index=-100, reduction="sum")


def train_step(r: Run, step: int, record: bool):
    """Forward and backward over this process's share of global batch
    `step`, in micro-batches; the data position is the step itself.
    Returns (loss, tokens, diagnostics recorder or None)."""
    args, env, items = r.args, r.env, r.inputs.train_items
    micro = args.batch_size // (args.micro_batch_size * env.world)
    mine = data.batch_indices(len(items), args.batch_size, args.seed, step,
                              env.rank, env.world)
    pad = r.inputs.tokenizer.pad_id
    batches = [data.collate([items[i] for i in mine[m::micro]], pad)
               for m in range(micro)]
    # Normalise by the response tokens of the whole global batch, so that
    # the gradient is the same however the batch is split into micro-batches
    # and processes (DDP and FSDP average them).
    n = sum(int((labels[:, 1:] != -100).sum()) for *_, labels in batches)
    n = parallel.all_sum(n, env.device)
    step_loss, tokens_seen, recorder = 0.0, 0, None
    for m, (tokens, mask, labels) in enumerate(batches):
        tokens, mask, labels = (t.to(env.device)
                                for t in (tokens, mask, labels))
        last = m == micro - 1
        watch = (record_diagnostics(r.model) if record and last
                 else nullcontext())
        # Processes average their gradients after the last micro-batch only.
        with parallel.gradient_sync(r.model, r.train_model, last):
            with env.autocast, watch as recorder:
                if recorder is not None:
                    recorder.mask = mask
                loss = loss_sum(r.train_model(tokens, mask), labels) / n
                # The balance loss, like the loss, is a mean over
                # micro-batches and processes.
                balance = (omoe.load_balancing_loss(r.model)
                           if args.aux_loss_coef else 0.0)
                objective = (loss
                             + args.aux_loss_coef * balance / micro / env.world)
            (objective * env.world).backward()
        # We log the language-model loss alone.
        step_loss += loss.item()
        tokens_seen += int(mask.sum())
    # The diagnostics of every process's last micro-batch.
    parallel.gather_diagnostics(recorder, env.device)
    return parallel.all_sum(step_loss, env.device), tokens_seen, recorder


def train(r: Run) -> tuple[int, dict]:
    """The loop: steps, logs, evaluations during training, checkpoints.
    Returns (exit code, last diagnostics)."""
    args, env, ckpt = r.args, r.env, r.inputs.ckpt
    start_step = ckpt["step"] if ckpt else 0
    # The losses and tokens since the last log.
    window = run_folder.Window(*(ckpt or {}).get("loss_window", (0.0, 0)))
    if ckpt and env.main:
        run_folder.truncate_log(env.out / "log.jsonl", start_step)
        print(f"resuming from {r.inputs.ckpt_path} at step {start_step} "
              f"of {r.total_steps}")
    # On Ctrl-C or SIGTERM, save at the end of the step, then stop.
    interrupt = run_folder.Interrupt()
    r.model.train()
    bar = tqdm(range(start_step, r.total_steps), initial=start_step,
               total=r.total_steps, disable=not env.main)
    stats = {}
    try:
        for step in bar:
            done = step + 1
            record = done % args.log_every == 0
            loss, tokens, recorder = train_step(r, step, record)
            # The error says which checkpoint, if any, holds finite weights.
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    run_folder.diverged(r.inputs.ckpt_path, done, loss))
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(r.model.parameters(),
                                               args.grad_clip)
            r.optimizer.step()
            r.scheduler.step()
            r.optimizer.zero_grad(set_to_none=True)
            window.add(loss, tokens)
            bar.set_postfix(loss=f"{loss:.4f}")
            if record:
                stats = log_step(r, bar, window, done, recorder)
            if (args.eval_every and done % args.eval_every == 0
                    and done < r.total_steps):
                evaluate_during(r, bar, done)
            stop = parallel.all_sum(float(bool(interrupt.requested)),
                                    env.device) > 0
            if stop or done % args.save_every == 0 or done == r.total_steps:
                save(r, done, window)
            if stop:
                # The bar counts a step only once the loop moves past it.
                bar.n = done
                bar.close()
                why = interrupt.requested or "another process"
                env.say(f"\nstopped after step {done} ({why}); checkpoint "
                        f"saved to {r.inputs.ckpt_path}, which holds step "
                        f"{done}. Continue with the same command and "
                        f"--resume.")
                return interrupt.exit_code, stats
    finally:
        interrupt.restore()
    bar.close()
    return 0, stats


def log_step(r: Run, bar, window, done: int, recorder) -> dict:
    stats = recorder.summary() if recorder is not None else {}
    if r.env.main:
        entry = {"step": done, "loss": window.loss / window.steps,
                 "lr": r.scheduler.get_last_lr()[0],
                 "tokens_per_s": (window.tokens * r.env.world
                                  / (time.time() - window.t0)),
                 "experts": stats}
        bar.write(cli.log_line(entry, mean_diagnostics(stats)))
        run_folder.append_log(r.env.out, entry)
    window.reset()
    return stats


# ── Saving and evaluation ─────────────────────────────────────────────────

def save(r: Run, done: int, window) -> None:
    """A resumable checkpoint after step `done`: everything a resumed run
    needs. The plumbing adds checksums of every entry and writes it
    atomically: an interrupt leaves the old file or the new one, never half
    of one."""
    env = r.env
    parallel.check_finite_adapters(r.model, f"step {done}", env.device)
    checkpoint = {
        # The adapters whole, also when sharded.
        "adapters": parallel.adapter_state(r.model, keep=env.main),
        "optimizer": parallel.optimizer_state(r.optimizer, keep=env.main),
        "scheduler": r.scheduler.state_dict(),
        # Every process's random state, by rank.
        "rng": parallel.rng_states(run_folder.rng_state()),
        "step": done,
        # Compared on --resume.
        "args": vars(r.args),
        # The base model's accuracies, not evaluated again on resume.
        "before": r.before["test"], "val_before": r.before["val"],
        # The next log's average.
        "loss_window": [window.loss, window.steps],
        # The base model, tokenizer and data.
        "identity": r.inputs.identity,
    }
    if env.main:
        run_folder.save_checkpoint(
            r.inputs.ckpt_path, checkpoint,
            len(r.inputs.train_items) // r.args.batch_size)


def evaluate_all(model, tokenizer, tasks, args, env: Env) -> dict:
    """Accuracy per task; with several processes each answers its share of
    the examples."""
    with env.autocast:
        return data.evaluate_tasks(model, tokenizer, tasks, args.eval_mode,
                                   args.eval_batch_size,
                                   shared=parallel.shared_answers(env.device))


def evaluate_base(args, env: Env, inputs: Inputs, model) -> dict:
    """Test and validation accuracy before training. A resumed run has them
    in its checkpoint, unless its evaluation data or settings changed: the
    gate then takes them out."""
    if inputs.ckpt is not None and "before" in inputs.ckpt:
        return {"test": inputs.ckpt["before"],
                "val": inputs.ckpt.get("val_before")}
    if args.skip_base_eval:
        return {"test": None, "val": None}
    before = {"test": None, "val": None}
    for key, tasks, title in (
            ("test", inputs.eval_sets, "base model accuracy"),
            ("val", inputs.val_sets, "base model validation accuracy")):
        if tasks:
            if key == "test":
                env.say("evaluating the base model ...")
            before[key] = evaluate_all(model, inputs.tokenizer, tasks, args,
                                       env)
            env.say(f"{title}: " + cli.accuracies(before[key]))
    return before


def evaluate_during(r: Run, bar, done: int) -> None:
    """--eval-every: validation if there is any, else the test, logged."""
    env, inputs = r.env, r.inputs
    parallel.check_finite_adapters(r.model, f"step {done}", env.device)
    key, tasks = (("val", inputs.val_sets) if inputs.val_sets
                  else ("eval", inputs.eval_sets))
    if not tasks:
        return
    results = evaluate_all(r.model, inputs.tokenizer, tasks, r.args, env)
    if env.main:
        run_folder.append_log(env.out, {"step": done, key: results})
        bar.write(f"step {done}: " + cli.accuracies(results))


def finish(r: Run, stats: dict, seconds: float, counts) -> None:
    """Evaluate the trained model, save its adapters, print and write the
    results."""
    args, env, inputs, before = r.args, r.env, r.inputs, r.before
    started = cli.announce(env.say, "evaluating the fine-tuned model ...",
                           inputs.eval_sets or inputs.val_sets)
    after, val_after = (
        {} if not t else evaluate_all(r.model, inputs.tokenizer, t, args, env)
        for t in (inputs.eval_sets, inputs.val_sets))
    # The times of training, of this evaluation and of the whole run.
    timing = cli.times(seconds, started)
    adapters = parallel.adapter_state(r.model, keep=env.main)
    if not env.main:
        return
    run_folder.save_adapters(r.model, env.out / "adapter", inputs.base,
                             adapters)
    if val_after:
        cli.print_table(before["val"], val_after, cli.VAL_TITLE)
    if after:
        cli.print_table(before["test"], after)
    if stats:
        cli.print_diversity(diagnostics_by_block(stats))
    run_folder.write_json(env.out / "results.json", {
        "config": vars(args), "trainable_params": counts[0],
        "total_params": counts[1],
        "steps": r.total_steps, **timing,
        "before": before["test"], "after": after,
        "val_before": before["val"], "val_after": val_after,
        "average": {k: cli.average(x)
                    for k, x in (("before", before["test"]), ("after", after),
                                 ("val_before", before["val"]),
                                 ("val_after", val_after))},
        "environment": run_folder.environment(env.device)})
    print(f"\n{cli.times_line(timing)}")
    print(f"adapters: {env.out / 'adapter'}   "
          f"results: {env.out / 'results.json'}   "
          f"log: {env.out / 'log.jsonl'}")


def main(argv=None) -> int:
    _, args = parse_args(argv)
    # Refusals print one line and exit 2, failures exit 1, Ctrl-C exits 130.
    # --eval-only is evaluate.py's run.
    return cli.run_command(evaluate.run if args.eval_only else run, args)


if __name__ == "__main__":
    sys.exit(main())
