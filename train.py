"""Fine-tune a LLaMA with OMoE adapters and evaluate it: a plain PyTorch loop.

    python train.py                                      # the embedded tiny LLaMA, on a laptop CPU
    python train.py --model meta-llama/Llama-2-7b-hf --data commonsense_170k.json \\
                    --eval-data dataset/ --experts 2 --device cuda
    torchrun --nproc_per_node 4 train.py ...             # several GPUs, a whole copy on each (DDP)
    torchrun --nproc_per_node 8 train.py ... --fsdp      # the frozen base sharded over them (FSDP)

Reading order: the two recipes -> run(), the whole recipe in a dozen lines -> the model and its
experts -> the optimizer and its schedule -> one training step -> the loop -> evaluation and saving.
What makes it robust (every input checked before any work, the run folder, several processes, the
command line) lives in plumbing/ and is one line here.
"""
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import data
import evaluate
import omoe
from model import Transformer
from plumbing import cli, parallel, run_folder
from plumbing.diagnostics import diagnostics_by_block, mean_diagnostics, record_diagnostics
from plumbing.base.errors import TrainingDiverged
from plumbing.gate import Env, Inputs, experts_of, load_inputs, setup, warmup_steps

# Two recipes. With --model, the paper's for a 7B LLaMA; without, one sized for the embedded tiny
# LLaMA (assets/), which a laptop CPU fine-tunes in about two minutes. A flag given always wins.
ASSETS = Path(__file__).resolve().parent / "assets"
PAPER = dict(rank=16, alpha=32, dropout=0.05, batch_size=16, micro_batch_size=4, lr=2e-4, epochs=2,
             warmup=100, eval_batch_size=16, log_every=10)
EMBEDDED = dict(model=str(ASSETS / "tiny-llama"), data=str(ASSETS / "world"), rank=8, alpha=16,
                dropout=0.0, batch_size=16, micro_batch_size=16, lr=2e-3, epochs=1, warmup=10,
                eval_batch_size=64, log_every=50)


def parse_args(argv=None):
    return cli.parse_args(argv, PAPER, EMBEDDED)


def run(args) -> int:
    env = setup(args)                            # device, processes, precision; --out locked
    try:
        inputs = load_inputs(args, env)          # config, tokenizer, data, checkpoint: all checked
        if inputs.finished:                      # a resumed run that is already complete
            return 0
        model = load_model(args, env, inputs)    # the frozen base (sharded under --fsdp)
        if env.main:
            run_folder.clear_run(env.out, env.replaced)  # all checked: --overwrite may delete now
        before = evaluate_base(args, env, inputs, model)
        add_adapters(args, model)
        counts = cli.print_trainable_parameters(model) if env.main else None
        train_model = wrap(args, env, model)     # DDP, compile
        optimizer, scheduler, total_steps = make_optimizer(args, env, model, inputs)
        start = time.time()
        code, stats = train(args, env, inputs, model, train_model, optimizer, scheduler,
                            total_steps, before)
        if code == 0:
            seconds = time.time() - start
            finish(args, env, inputs, model, before, stats, total_steps, seconds, counts)
        return code
    finally:
        if env.lock:
            env.lock.release()


# ── The model and its experts ───────────────────────────────────────────────────────────────────

def load_model(args, env: Env, inputs: Inputs):
    """The base model; under --fsdp already with its experts (see plumbing/parallel.py). The experts
    start at zero: until trained, the adapted model computes exactly what the base model does."""
    if args.fsdp:
        return parallel.load_sharded(inputs.model_dir, env.dtype, env.device, args.seed,
                                     experts_of(args))
    return Transformer.from_pretrained(inputs.model_dir, dtype=env.dtype, device=env.device)


def add_adapters(args, model) -> None:
    if not args.fsdp:  # under --fsdp they were added before sharding
        torch.manual_seed(args.seed)  # the experts' initialisation depends on the seed alone
        omoe.add_experts(model, **experts_of(args))


def wrap(args, env: Env, model):
    """The module the loop calls: DDP over several processes (FSDP's sharding is already in
    `model`), compiled with --compile; `model` stays the plain one whose adapters are saved."""
    model.gradient_checkpointing = args.grad_checkpoint
    train_model = parallel.ddp(model, env.device) if env.world > 1 and not args.fsdp else model
    return torch.compile(train_model) if args.compile else train_model


# ── The optimizer and its schedule ──────────────────────────────────────────────────────────────

def lr_lambda(warmup: int, schedule: str, total_steps: int):
    def factor(step):  # multiplier of --lr at optimizer step `step` (0-based)
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
    """AdamW on the adapters, a warm-up then --schedule; resumed from the checkpoint if any."""
    steps_per_epoch = len(inputs.train_items) // args.batch_size  # a partial last batch is dropped
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    warmup = warmup_steps(args, total_steps, env.say)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, args.schedule,
                                                                       total_steps))
    if inputs.ckpt is not None:
        parallel.load_adapters(model, inputs.ckpt["adapters"])
        parallel.load_optimizer_state(model, optimizer, inputs.ckpt["optimizer"])
        scheduler.load_state_dict(inputs.ckpt["scheduler"])
        run_folder.set_rng_state(inputs.ckpt["rng"], env.rank)
    return optimizer, scheduler, total_steps


# ── One training step, and the loop ─────────────────────────────────────────────────────────────

def loss_sum(logits, labels):
    """Summed next-token cross-entropy over the positions whose label is not -100 (the response)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             labels[:, 1:].flatten(), ignore_index=-100,
                                             reduction="sum")


def train_step(args, env: Env, inputs: Inputs, model, train_model, step: int, record: bool):
    """Forward and backward over this process's share of global batch `step` (the data position is
    the step itself), in micro-batches -> (loss, tokens, diagnostics recorder or None)."""
    micro = args.batch_size // (args.micro_batch_size * env.world)
    mine = data.batch_indices(len(inputs.train_items), args.batch_size, args.seed, step, env.rank,
                              env.world)
    pad = inputs.tokenizer.pad_id
    batches = [data.collate([inputs.train_items[i] for i in mine[m::micro]], pad)
               for m in range(micro)]
    # Normalise by the response tokens of the whole global batch, so that the gradient is the same
    # however the batch is split into micro-batches and processes (DDP and FSDP average them).
    n = sum(int((labels[:, 1:] != -100).sum()) for *_, labels in batches)
    n = parallel.all_sum(n, env.device)
    step_loss, tokens_seen, recorder = 0.0, 0, None
    for m, (tokens, mask, labels) in enumerate(batches):
        tokens, mask, labels = tokens.to(env.device), mask.to(env.device), labels.to(env.device)
        last = m == micro - 1
        watch = record_diagnostics(model) if record and last else nullcontext()
        with parallel.gradient_sync(model, train_model, last):  # across processes: the last only
            with env.autocast, watch as recorder:  # the forward and the loss; backward outside
                if recorder is not None:
                    recorder.mask = mask
                loss = loss_sum(train_model(tokens, mask), labels) / n
                objective = loss + args.aux_loss_coef * omoe.load_balancing_loss(model) / micro \
                    / env.world if args.aux_loss_coef else loss
            (objective * env.world).backward()
        step_loss += loss.item()  # the language-model loss alone is what we log
        tokens_seen += int(mask.sum())
    parallel.gather_diagnostics(recorder, env.device)  # over every process's last micro-batch
    return parallel.all_sum(step_loss, env.device), tokens_seen, recorder


def train(args, env: Env, inputs: Inputs, model, train_model, optimizer, scheduler, total_steps,
          before) -> tuple[int, dict]:
    """The loop: steps, logs, evaluations during training, checkpoints -> (exit code, last
    diagnostics)."""
    ckpt = inputs.ckpt
    start_step = ckpt["step"] if ckpt else 0
    window = run_folder.Window(*(ckpt or {}).get("loss_window", (0.0, 0)))  # since the last log
    if ckpt and env.main:
        run_folder.truncate_log(env.out / "log.jsonl", start_step)
        print(f"resuming from {inputs.ckpt_path} at step {start_step} of {total_steps}")
    interrupt = run_folder.Interrupt()  # Ctrl-C or SIGTERM: save at the end of the step, then stop
    model.train()
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
               disable=not env.main)
    stats = {}
    try:
        for step in bar:
            done = step + 1
            record = done % args.log_every == 0
            loss, tokens, recorder = train_step(args, env, inputs, model, train_model, step, record)
            if not math.isfinite(loss):  # and which checkpoint, if any, holds finite weights
                raise TrainingDiverged(run_folder.diverged(inputs.ckpt_path, done, loss))
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window.add(loss, tokens)
            bar.set_postfix(loss=f"{loss:.4f}")
            if record:
                stats = log_step(env, bar, window, done, scheduler, recorder)
            if args.eval_every and done % args.eval_every == 0 and done < total_steps:
                evaluate_during(args, env, inputs, model, bar, done)
            stop = parallel.all_sum(float(bool(interrupt.requested)), env.device) > 0
            if stop or done % args.save_every == 0 or done == total_steps:
                save(args, env, inputs, model, optimizer, scheduler, done, before, window)
            if stop:
                bar.n = done  # the bar counts the step it is in only once the loop moves on
                bar.close()
                why = interrupt.requested or "another process"
                env.say(f"\nstopped after step {done} ({why}); checkpoint saved to "
                        f"{inputs.ckpt_path}, which holds step {done}. Continue with the same "
                        f"command and --resume.")
                return interrupt.exit_code, stats
    finally:
        interrupt.restore()
    bar.close()
    return 0, stats


def log_step(env: Env, bar, window, done: int, scheduler, recorder) -> dict:
    stats = recorder.summary() if recorder is not None else {}
    if env.main:
        entry = {"step": done, "loss": window.loss / window.steps, "lr": scheduler.get_last_lr()[0],
                 "tokens_per_s": window.tokens * env.world / (time.time() - window.t0),
                 "experts": stats}
        bar.write(cli.log_line(entry, mean_diagnostics(stats)))
        run_folder.append_log(env.out, entry)
    window.reset()
    return stats


def save(args, env: Env, inputs: Inputs, model, optimizer, scheduler, done, before, window) -> None:
    """A resumable checkpoint: the adapters and optimizer state whole (gathered when sharded)."""
    parallel.check_finite_adapters(model, f"step {done}", env.device)
    adapters = parallel.adapter_state(model, keep=env.main)
    optimizer_state = parallel.optimizer_state(optimizer, keep=env.main)
    rng = parallel.rng_states(run_folder.rng_state())
    if env.main:
        run_folder.save_checkpoint(inputs.ckpt_path, adapters, optimizer_state, scheduler, done,
                                   len(inputs.train_items) // args.batch_size, args, before["test"],
                                   inputs.identity, before["val"], rng,
                                   (window.loss, window.steps))


# ── Evaluation and saving ───────────────────────────────────────────────────────────────────────

def evaluate_all(model, tokenizer, tasks, args, env: Env) -> dict:
    """Accuracy per task; with several processes each answers its share of the examples."""
    with env.autocast:
        return data.evaluate_tasks(model, tokenizer, tasks, args.eval_mode, args.eval_batch_size,
                                   shared=parallel.shared_answers(env.device))


def evaluate_base(args, env: Env, inputs: Inputs, model) -> dict:
    """Test and validation accuracy before training (a resumed run has them in its checkpoint,
    unless its evaluation data or settings changed: the gate then takes them out)."""
    if inputs.ckpt is not None and "before" in inputs.ckpt:
        return {"test": inputs.ckpt["before"], "val": inputs.ckpt.get("val_before")}
    if args.skip_base_eval:
        return {"test": None, "val": None}
    before = {"test": None, "val": None}
    for key, tasks, title in (("test", inputs.eval_sets, "base model accuracy"),
                              ("val", inputs.val_sets, "base model validation accuracy")):
        if tasks:
            if key == "test":
                env.say("evaluating the base model ...")
            before[key] = evaluate_all(model, inputs.tokenizer, tasks, args, env)
            env.say(f"{title}: " + cli.accuracies(before[key]))
    return before


def evaluate_during(args, env: Env, inputs: Inputs, model, bar, done: int) -> None:
    """--eval-every: validation if there is any, else the test, logged."""
    parallel.check_finite_adapters(model, f"step {done}", env.device)
    key, tasks = ("val", inputs.val_sets) if inputs.val_sets else ("eval", inputs.eval_sets)
    if not tasks:
        return
    results = evaluate_all(model, inputs.tokenizer, tasks, args, env)
    if env.main:
        run_folder.append_log(env.out, {"step": done, key: results})
        bar.write(f"step {done}: " + cli.accuracies(results))


def finish(args, env: Env, inputs: Inputs, model, before, stats, total_steps, seconds, counts):
    """Evaluate the trained model, save its adapters, print and write the results."""
    started = cli.announce(env.say, "evaluating the fine-tuned model ...", inputs.eval_sets or
                           inputs.val_sets)
    after, val_after = ({} if not t else evaluate_all(model, inputs.tokenizer, t, args, env)
                        for t in (inputs.eval_sets, inputs.val_sets))
    timing = cli.times(seconds, started)  # training, this evaluation, the whole run
    adapters = parallel.adapter_state(model, keep=env.main)
    if not env.main:
        return
    run_folder.save_adapters(model, env.out / "adapter", inputs.base, adapters)
    if val_after:
        cli.print_table(before["val"], val_after, cli.VAL_TITLE)
    if after:
        cli.print_table(before["test"], after)
    if stats:
        cli.print_diversity(diagnostics_by_block(stats))
    run_folder.write_json(env.out / "results.json", {
        "config": vars(args), "trainable_params": counts[0], "total_params": counts[1],
        "steps": total_steps, **timing, "before": before["test"], "after": after,
        "val_before": before["val"], "val_after": val_after,
        "average": {k: cli.average(r) for k, r in (("before", before["test"]), ("after", after),
                                                   ("val_before", before["val"]),
                                                   ("val_after", val_after))},
        "environment": run_folder.environment(env.device)})
    print(f"\n{cli.times_line(timing)}")
    print(f"adapters: {env.out / 'adapter'}   results: {env.out / 'results.json'}   "
          f"log: {env.out / 'log.jsonl'}")


def main(argv=None) -> int:
    _, args = parse_args(argv)
    # refusals: one line, exit 2; failures: exit 1; Ctrl-C: 130. --eval-only is evaluate.py's run.
    return cli.run_command(evaluate.run if args.eval_only else run, args)


if __name__ == "__main__":
    sys.exit(main())
