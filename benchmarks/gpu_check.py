"""One prepared check of the CUDA path: is it correct, and how fast is it? At most 8 minutes on one H100/H200.

On the GPU machine, from the repository root (torch there is preinstalled with CUDA: never reinstall it;
the other packages of requirements-dev.txt are preinstalled there too, and nothing is downloaded):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --copy-to "$OUT"

(--copy-to: a folder that also gets a copy of the report, for machines whose files come back from one
folder only; leave it out elsewhere. On a machine with network and no packages yet: install a CUDA torch
first, then `pip install -r requirements-dev.txt`.)

It writes benchmarks/results/gpu-<device>-<date>.md and prints the same. Stages, each in its own process
with its own timeout, so one that fails or hangs is reported and the others still run; the whole run
keeps to --budget seconds and skips what no longer fits (the last stages matter least):

  env             device, torch, CUDA, bf16 support
  parity          model.py against transformers on the same random weights: fp32 to 1e-4 (relative to the
                  largest logit), bf16 no worse than twice transformers' own bf16 error (both against fp32)
  omoe            OMoE fast against reference, output and all gradients: fp32 to 1e-4, bf16 autocast to 2e-2
  train           `train.py --device cuda` on the embedded default, accuracies beside the CPU run's
                  (benchmarks/results/cpu-default.json, a committed CPU run of the same command)
  speed           LLaMA-7B-shaped 4-layer slice, bf16 base, batch 4 x 512, all seven projections: tokens/s
                  and peak memory of LoRA r16, vanilla MoE-LoRA and OMoE (2 soft; top-2 of 8) as ratios to
                  LoRA, CUDA events after warm-up, the frozen base's forward+backward as the floor
  full-7b         the full 32-layer LLaMA-7B shape with gradient checkpointing, OMoE-2 and LoRA: fits? step time
  resume          an interrupted and resumed CUDA run against the uninterrupted one, loss by loss
  torchrun        `torchrun --nproc_per_node 1 train.py`, DDP and --fsdp (nccl), against the single-process run
  compile         train.py --compile against eager (float32 base), losses and final adapters
  speed-compiled  the speed stage with every block torch.compile'd

    python benchmarks/gpu_check.py --dry-run   # every stage on tiny CPU shapes, about 2 minutes on one CPU
                                               # thread (tests/test_gpu_check.py)
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

STAGES = {}  # name -> (function, timeout in seconds on the GPU)


def stage(name, timeout):
    def register(f):
        STAGES[name] = (f, timeout)
        return f
    return register


def say(line=""):
    """A report line, sent to the parent as it is made (so a stage that times out keeps what it had)."""
    print("LINE " + line, flush=True)


def rel(a, b) -> float:
    """Largest absolute difference relative to the largest entry of b."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class Ctx:
    def __init__(self, dry: bool, tmp: Path):
        self.dry, self.tmp = dry, tmp
        self.device = torch.device("cpu" if dry else "cuda")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def train_cli(ctx, *flags) -> list[str]:
    """train.py's command line on the embedded default; the dry run makes it tiny."""
    tiny = ["--max-steps", "2", "--train-limit", "4", "--eval-limit", "4"] if ctx.dry else []
    return [sys.executable, str(ROOT / "train.py"), "--device", ctx.device.type, *tiny, *map(str, flags)]


def run_train(ctx, argv, out: Path, timeout=None) -> dict:
    proc = subprocess.run(argv + ["--out", str(out)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:3])}... exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
    log = [json.loads(line) for line in lines]
    return {"losses": [e["loss"] for e in log if "loss" in e],
            "results": json.loads((out / "results.json").read_text())}


# ------------------------------------------------------------------------------------------ stages

@stage("env", 60)
def env(ctx):
    import transformers
    say(f"- python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"transformers {transformers.__version__}")
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        say(f"- device: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
            f"{p.multi_processor_count} SMs; bf16 supported: {torch.cuda.is_bf16_supported()}")
        say(f"- cuDNN {torch.backends.cudnn.version()}, NCCL available: {torch.distributed.is_nccl_available()}")
    else:
        say(f"- device: CPU ({os.cpu_count()} cores; dry run)")


@stage("parity", 120)
def parity(ctx):
    """Our Transformer against transformers' LlamaForCausalLM, same random weights, same tokens."""
    import transformers
    from model import Transformer
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128) if ctx.dry else \
        dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)
    config = transformers.LlamaConfig(**size, max_position_embeddings=512, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(ctx.tmp / "hf")
    tokens = torch.randint(0, config.vocab_size, (2, 32 if ctx.dry else 256), device=ctx.device)
    logits = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            hf = hf.to(device=ctx.device, dtype=dtype)
            logits["hf", dtype] = hf(input_ids=tokens).logits.float()
            ours = Transformer.from_pretrained(ctx.tmp / "hf", dtype=dtype, device=ctx.device).eval()
            logits["ours", dtype] = ours(tokens).float()
            del ours
    fp32 = rel(logits["ours", torch.float32], logits["hf", torch.float32])
    ours16 = rel(logits["ours", torch.bfloat16], logits["hf", torch.float32])
    hf16 = rel(logits["hf", torch.bfloat16], logits["hf", torch.float32])
    say(f"- {size['num_hidden_layers']} layers, dim {size['hidden_size']}, GQA {size['num_attention_heads']}/"
        f"{size['num_key_value_heads']}, {tokens.numel()} tokens; error = max |difference| / max |logit|")
    say(f"- fp32, ours vs transformers: {fp32:.2e} (tolerance 1e-4): {'ok' if fp32 <= 1e-4 else 'FAIL'}")
    say(f"- bf16 vs fp32: ours {ours16:.2e}, transformers {hf16:.2e} (tolerance: ours <= 2 x transformers' "
        f"+ 1e-3): {'ok' if ours16 <= 2 * hf16 + 1e-3 else 'FAIL'}")
    if fp32 > 1e-4 or ours16 > 2 * hf16 + 1e-3:
        raise AssertionError("parity outside its tolerance")


@stage("omoe", 90)
def omoe_layer(ctx):
    """OMoE's fast path against the readable reference on this device: output and every gradient."""
    import torch.nn as nn
    from omoe import ORTH_MODES, OMoELinear
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    d_in, d_out, n = (32, 48, 64) if ctx.dry else (1024, 2752, 2048)
    worst = {"fp32": 0.0, "bf16": 0.0}
    say(f"- layer {d_in} -> {d_out}, {n} tokens, rank 16; worst relative error over output and the gradients "
        f"of input, A, B, router")
    say("| orth | experts | top-k | fp32 | bf16 autocast |")
    say("|---|---|---|---|---|")
    for orth in ORTH_MODES:
        for experts, top_k in ((2, None), (4, None), (8, 2), (6, None)):
            torch.manual_seed(0)
            base = nn.Linear(d_in, d_out, bias=False, device=ctx.device)
            m = OMoELinear(base, experts=experts, top_k=top_k, rank=16, alpha=32, dropout=0.0, orth=orth)
            with torch.no_grad():
                m.lora_B.normal_(std=0.02)
                m.router.weight.normal_(std=d_in ** -0.5)
            x = torch.randn(n, d_in, device=ctx.device, requires_grad=True)
            gy = torch.randn(n, d_out, device=ctx.device)
            row = []
            for name, cast in (("fp32", None), ("bf16", torch.bfloat16)):
                got = {}
                for impl in ("reference", "fast"):
                    m.impl = impl
                    with torch.autocast(ctx.device.type, dtype=cast, enabled=cast is not None):
                        y = m(x)
                    got[impl] = [y, *torch.autograd.grad(y, [x, m.lora_A, m.lora_B, m.router.weight], gy.to(y.dtype))]
                err = max(rel(f, r) for f, r in zip(got["fast"], got["reference"]))
                worst[name] = max(worst[name], err)
                row.append(f"{err:.1e}")
            say(f"| {orth} | {experts} | {top_k or 'soft'} | {' | '.join(row)} |")
    ok = worst["fp32"] <= 1e-4 and worst["bf16"] <= 2e-2
    say(f"- worst: fp32 {worst['fp32']:.1e} (tolerance 1e-4), bf16 {worst['bf16']:.1e} (tolerance 2e-2): "
        f"{'ok' if ok else 'FAIL'}")
    if not ok:
        raise AssertionError("fast and reference differ beyond tolerance")


@stage("train", 180)
def train_default(ctx):
    """python train.py --device cuda: the embedded default end to end."""
    t0 = time.time()
    r = run_train(ctx, train_cli(ctx), ctx.tmp / "default")["results"]
    cpu = json.loads((ROOT / "benchmarks" / "results" / "cpu-default.json").read_text())
    say(f"- `python train.py --device {ctx.device.type}`: {r['steps']} steps, {r['train_seconds']:.1f} s of "
        f"training ({time.time() - t0:.0f} s in all); CPU: {cpu['steps']} steps, {cpu['train_seconds']:.1f} s "
        f"({cpu['device']})")
    say(f"| task | CPU before | CPU after | {ctx.device.type} before | {ctx.device.type} after |")
    say("|---|---|---|---|---|")
    for task, after in r["after"].items():
        c = cpu["after"].get(task, {}).get("accuracy", float("nan"))
        cb = cpu["before"].get(task, {}).get("accuracy", float("nan"))
        say(f"| {task} | {cb:.3f} | {c:.3f} | {r['before'][task]['accuracy']:.3f} | {after['accuracy']:.3f} |")
    mean = statistics.mean(a["accuracy"] for a in r["after"].values())
    cpu_mean = statistics.mean(a["accuracy"] for a in cpu["after"].values())
    say(f"- mean accuracy after training: {ctx.device.type} {mean:.3f}, CPU {cpu_mean:.3f} (bf16 base on CUDA, "
        f"float32 on the CPU: close, not equal)")
    if not ctx.dry and abs(mean - cpu_mean) > 0.05:
        raise AssertionError(f"mean accuracy {mean:.3f} is more than 0.05 from the CPU run's {cpu_mean:.3f}")


def slice_args(ctx, layers):
    from model import ModelArgs
    if ctx.dry:
        return ModelArgs(dim=64, n_layers=min(layers, 3), n_heads=4, n_kv_heads=4, vocab_size=256, hidden_dim=172)
    return ModelArgs(dim=4096, n_layers=layers, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008)


METHODS = {  # name -> add_experts arguments (None: the frozen base alone, the floor)
    "frozen base (floor)": None,
    "LoRA r16": dict(experts=1),
    "vanilla MoE-LoRA, 2 soft": dict(experts=2, orth="none"),
    "OMoE, 2 soft": dict(experts=2),
    "vanilla MoE-LoRA, top-2 of 8": dict(experts=8, top_k=2, orth="none"),
    "OMoE, top-2 of 8": dict(experts=8, top_k=2),
}


def remove_experts(model):
    import omoe
    for name, m in list(model.named_modules()):
        if isinstance(m, omoe.OMoELinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, m.base_layer)


def measure_step(ctx, model, method, steps, batch, length, compiled=False) -> tuple[float, float]:
    """Median seconds of one training step (forward, backward, AdamW) and peak allocated GiB."""
    import omoe
    remove_experts(model)
    torch.manual_seed(0)
    if method is not None:
        omoe.add_experts(model, rank=16, alpha=32, dropout=0.05, **method)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:  # gradients flow back to the embeddings' output, as they do to the first adapted layer
        model.requires_grad_(False)
        opt = None
    hook = model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_()) if method is None else None
    blocks = list(model.layers)
    if compiled:
        torch._dynamo.reset()  # a fresh cache per method: never the recompile limit's silent fallback to eager
        for b in blocks:
            b.compile()  # regional compilation: the blocks are alike, so one block's graph serves them all
    tokens = torch.randint(0, model.args.vocab_size, (batch, length), device=ctx.device)
    mask = torch.ones_like(tokens)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda")
    times = []
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):  # 3 warm-up steps
        if ctx.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with autocast:
            logits = model(tokens, mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if ctx.device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            t = start.elapsed_time(end) / 1000
        else:
            t = time.perf_counter() - t0
        if i >= 3:
            times.append(t)
    if hook is not None:
        hook.remove()
    if compiled:
        for b in blocks:
            b._compiled_call_impl = None  # undo nn.Module.compile
    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else float("nan")
    del opt, logits, loss
    return statistics.median(times), peak


def gib(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"  # NaN on the CPU: no allocator statistics


def speed(ctx, compiled):
    from model import Transformer
    args = slice_args(ctx, layers=4)
    batch, length, steps = (2, 16, 2) if ctx.dry else (4, 512, 10)
    torch.set_default_dtype(torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    with torch.device(ctx.device):
        model = Transformer(args)
    torch.set_default_dtype(torch.float32)
    say(f"- dim {args.dim}, hidden {args.hidden_dim}, {args.n_heads} heads, {args.n_layers} layers, vocab "
        f"{args.vocab_size}; {'bf16' if ctx.device.type == 'cuda' else 'fp32'} base, batch {batch} x {length}, "
        f"all seven projections, rank 16; median of {steps} steps after 3 warm-up steps"
        + ("; every block torch.compile'd" if compiled else ""))
    say("| method | step ms | tokens/s | tokens/s vs LoRA | peak GiB | peak vs LoRA |")
    say("|---|---|---|---|---|---|")
    lora = None
    order = list(METHODS) if not compiled else ["LoRA r16", "OMoE, 2 soft", "vanilla MoE-LoRA, 2 soft",
                                                "OMoE, top-2 of 8", "vanilla MoE-LoRA, top-2 of 8",
                                                "frozen base (floor)"]
    for name in order[:2] if ctx.dry and compiled else order:  # the dry run: Dynamo traces take a while
        t, peak = measure_step(ctx, model, METHODS[name], steps, batch, length, compiled)
        if name == "LoRA r16":
            lora = (t, peak)
        ratio = (f"{lora[0] / t:.2f} | {gib(peak)} | {peak / lora[1]:.2f}" if lora else f"- | {gib(peak)} | -")
        say(f"| {name} | {1000 * t:.1f} | {batch * length / t:,.0f} | {ratio} |")


@stage("speed", 150)
def speed_eager(ctx):
    speed(ctx, compiled=False)


@stage("full-7b", 150)
def full_7b(ctx):
    """The whole LLaMA-7B shape (32 layers) with gradient checkpointing, batch 4 x 512: does it fit?"""
    from model import Transformer
    args = slice_args(ctx, layers=32)
    batch, length, steps = (2, 16, 2) if ctx.dry else (4, 512, 3)
    torch.set_default_dtype(torch.bfloat16 if ctx.device.type == "cuda" else torch.float32)
    with torch.device(ctx.device):
        model = Transformer(args)
    torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing = True
    model.train()
    say(f"- {args.n_layers} layers, dim {args.dim}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
        f"parameters, gradient checkpointing, batch {batch} x {length}, median of {steps} steps after 3 warm-up")
    say("| method | fits | step s | tokens/s | peak GiB |")
    say("|---|---|---|---|---|")
    for name in ("OMoE, 2 soft", "LoRA r16"):
        try:
            t, peak = measure_step(ctx, model, METHODS[name], steps, batch, length)
            say(f"| {name} | yes | {t:.3f} | {batch * length / t:,.0f} | {gib(peak)} |")
        except torch.OutOfMemoryError:
            say(f"| {name} | no (out of memory) | | | |")
            torch.cuda.empty_cache()


class StopAfter:
    """Stands in for plumbing.run_folder.Interrupt: Ctrl-C "arrives" during step n (as in
    tests/test_train.py)."""
    exit_code = 130

    def __init__(self, n):
        self.checks, self.n = 0, n

    def __call__(self):
        return self

    @property
    def requested(self):
        self.checks += 1
        return "SIGINT" if self.checks >= self.n else None

    def restore(self):
        pass


SHORT = ["--max-steps", "8", "--train-limit", "64", "--eval-limit", "8", "--log-every", "1", "--skip-base-eval",
         "--schedule", "cosine"]


def in_process_train(ctx, flags, out):
    import train
    argv = ["--device", ctx.device.type, *SHORT, *flags, "--out", str(out)]
    if ctx.dry:
        argv += ["--train-limit", "8", "--batch-size", "4", "--micro-batch-size", "4", "--eval-limit", "2"]
    return train.main(argv)


def logged_losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]


@stage("resume", 120)
def resume(ctx):
    from plumbing import run_folder
    if in_process_train(ctx, [], ctx.tmp / "full") != 0:
        raise RuntimeError("the uninterrupted run failed")
    real = run_folder.Interrupt
    run_folder.Interrupt = StopAfter(3)
    code = in_process_train(ctx, [], ctx.tmp / "cut")
    run_folder.Interrupt = real
    if code != 130:
        raise RuntimeError(f"the interrupted run exited {code}, not 130")
    if in_process_train(ctx, ["--resume"], ctx.tmp / "cut") != 0:
        raise RuntimeError("the resumed run failed")
    full, cut = logged_losses(ctx.tmp / "full"), logged_losses(ctx.tmp / "cut")
    diff = max(abs(a - b) for a, b in zip(full, cut))
    say(f"- 8 steps, interrupted after 3 and resumed: {len(cut)} losses, largest difference from the "
        f"uninterrupted run {diff:.2e}{' (bit-identical)' if full == cut else ''}")
    if len(full) != len(cut) or diff > 1e-5 * max(full):
        raise AssertionError("the resumed run does not reproduce the uninterrupted one")


@stage("torchrun", 150)
def torchrun(ctx):
    flags = SHORT if not ctx.dry else SHORT + ["--train-limit", "8", "--batch-size", "4", "--micro-batch-size", "4"]
    argv = train_cli(ctx, *flags)
    single = run_train(ctx, argv, ctx.tmp / "single")["losses"]
    ddp_argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *argv[1:]]
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    for name, extra in (("DDP", []), ("FSDP", ["--fsdp"])):
        losses = run_train(ctx, ddp_argv + extra, ctx.tmp / name)["losses"]
        diff = max(abs(a - b) for a, b in zip(single, losses))
        say(f"- `torchrun --standalone --nproc_per_node 1 train.py --device {ctx.device.type} ...{' '.join(extra)}` "
            f"({name}, {backend}): {len(losses)} losses, largest difference from the single-process run {diff:.2e}")
        if len(losses) != len(single) or diff > 1e-5 * max(single):
            raise AssertionError(f"{name} with one process differs from the single-process run")


@stage("compile", 240)
def compile_train(ctx):
    """train.py --compile against eager, float32 base so that the two can agree closely."""
    if ctx.dry:  # tests/test_train.py traces --compile itself; the dry run checks this stage's own code
        torch.compile = lambda model, **kw: model
    flags = ["--dtype", "float32", "--max-steps", "4" if ctx.dry else "16", "--log-every", "2" if ctx.dry else "4"]
    t0 = time.time()
    if in_process_train(ctx, flags, ctx.tmp / "eager") != 0:
        raise RuntimeError("the eager run failed")
    t1 = time.time()
    if in_process_train(ctx, flags + ["--compile"], ctx.tmp / "compiled") != 0:
        raise RuntimeError("the compiled run failed")
    t2 = time.time()
    eager, compiled = logged_losses(ctx.tmp / "eager"), logged_losses(ctx.tmp / "compiled")
    diff = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
    from plumbing import adapters
    a, b = (adapters.load_adapter_files(ctx.tmp / run / "adapter")[1] for run in ("eager", "compiled"))
    weights = max(rel(b[k], a[k]) for k in a)
    say(f"- {flags[3]} steps, float32 base: logged losses (means of {flags[5]} steps) differ by at most "
        f"{diff:.1e} (relative), "
        f"the trained adapters by {weights:.1e} (max |difference| / max |weight|); eager {t1 - t0:.0f} s, "
        f"compiled {t2 - t1:.0f} s including compilation")
    if len(eager) != len(compiled) or diff > 1e-3 or weights > 1e-2:
        raise AssertionError("compiled and eager training differ beyond 1e-3 (losses) or 1e-2 (weights)")


@stage("speed-compiled", 300)
def speed_compiled(ctx):
    if ctx.dry:  # nn.Module.compile calls torch.compile: as in compile_train, only this stage's code is checked
        torch.compile = lambda model, **kw: model
    speed(ctx, compiled=True)


# ------------------------------------------------------------------------------------------ driver

def run_stage(name, dry, tmp) -> None:
    """In the child process: run one stage, its lines on stdout, an exception as exit code 1."""
    ctx = Ctx(dry, Path(tmp))
    try:
        STAGES[name][0](ctx)
    except Exception:
        print("LINE - **FAILED**: " + traceback.format_exc().strip().splitlines()[-1], flush=True)
        print(traceback.format_exc(), file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every stage on tiny CPU shapes (no GPU needed)")
    p.add_argument("--budget", type=float, default=470, help="seconds for the whole run; stages that no longer "
                                                             "fit are skipped")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in order")
    p.add_argument("--report-dir", default=str(ROOT / "benchmarks" / "results"), help="where the report goes")
    p.add_argument("--copy-to", default=None, help="a folder that also gets a copy of the report")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        return run_stage(args.stage, args.dry_run, args.tmp)
    names = [s for s in args.stages.split(",") if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("CUDA is not available here: run with --dry-run to check the stages on the CPU")
    device = "cpu-dry-run" if args.dry_run else torch.cuda.get_device_name(0).replace(" ", "-").replace("/", "-")
    date = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# GPU check: {device}, {date:%Y-%m-%d %H:%M} UTC", "",
             f"`python benchmarks/gpu_check.py{' --dry-run' if args.dry_run else ''}` (benchmarks/gpu_check.py "
             f"says what each stage checks); git {git_revision()}", ""]
    print("\n".join(lines), flush=True)
    deadline, failed = time.time() + args.budget, []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if args.dry_run else {})
    for name in names:
        left = deadline - time.time()
        # The stage timeouts are sized for the GPU; a dry run on a busy CPU keeps only the whole budget.
        timeout = left if args.dry_run else min(STAGES[name][1], left)
        head = f"## {name}"
        if timeout < 20:
            section = [head, "", f"- skipped: {left:.0f} s of the {args.budget:.0f} s budget left", ""]
            failed.append(name)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                section, ok, took = child(name, args.dry_run, tmp, timeout, env)
            if not ok:
                failed.append(name)
            section = [f"{head} ({'ok' if ok else 'FAILED'}, {took:.0f} s)", "", *section, ""]
        print("\n".join(section), flush=True)
        lines += section
    lines.append(f"**{len(names) - len(failed)} of {len(names)} stages passed**"
                 + (f"; not passed: {', '.join(failed)}" if failed else ""))
    print(lines[-1])
    report = Path(args.report_dir) / f"gpu-{device}-{date:%Y-%m-%d}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(report, Path(args.copy_to) / report.name)
    print(f"\nreport: {report}")
    return 1 if failed else 0


def child(name, dry, tmp, timeout, env):
    """Run a stage in its own process; its LINE output, whether it passed, and how long it took."""
    cmd = [sys.executable, __file__, "--stage", name, "--tmp", tmp] + (["--dry-run"] if dry else [])
    t0 = time.time()
    # A session of its own, so that a timeout also ends the train.py and torchrun processes it started.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        ok = proc.returncode == 0
        extra = [] if ok or "**FAILED**" in out else [f"- **FAILED**: exit code {proc.returncode}"]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        ok, extra = False, [f"- **FAILED**: timed out after {timeout:.0f} s (the lines above are what it had)"]
    lines = [line[5:] for line in out.splitlines() if line.startswith("LINE ")] + extra
    if not ok and err.strip():
        lines += ["", "```", *err.strip().splitlines()[-12:], "```"]
    return lines, ok, time.time() - t0


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
