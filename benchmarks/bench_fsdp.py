"""A base sharded with FSDP (--fsdp): peak memory per process while loading, and step time, for N = 1, 2, 4.

    python benchmarks/bench_fsdp.py                  # a random LLaMA-7B-wide checkpoint of 4 blocks, float32
    python benchmarks/bench_fsdp.py --procs 1 2 --layers 2 --train-procs 1

The checkpoint (dim 4096, 11008-wide MLP, 32000 tokens; 4 blocks: 1.07 B parameters, 4.3 GB in float32)
is written once into --work. Each N is one torchrun launch (gloo, one thread per process) of this file's
worker, which
  1. notes its resident memory once torch is imported and the process group made (the start-up),
  2. loads the checkpoint with parallel.load_sharded, with OMoE-2 experts (r = 16) on all seven projections,
     and notes its peak resident memory (getrusage: the peak over its life),
  3. for N in --train-procs, times --steps training steps (after one warm-up), each one sequence of
     --seq tokens per process, and notes the peak again (training also holds gathered tensors whole:
     the root, i.e. embeddings and lm_head, a quarter of this 4-block model, and a block or two).
Printed per N: the peak while loading as a ratio to the checkpoint's size, absolute and above the start-up,
beside the target 1/N + 0.15, and the median step time per process (on a machine with fewer cores than N,
the processes share them: the step time then says little).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelArgs, Transformer  # noqa: E402
from plumbing.base.weights import save_safetensors  # noqa: E402


def write_checkpoint(directory: Path, layers: int) -> int:
    """A random LLaMA-7B-wide model of `layers` blocks in the Hugging Face layout -> its size in bytes."""
    config = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "tie_word_embeddings": False}
    weights = directory / "model.safetensors"
    if not weights.exists() or json.loads((directory / "config.json").read_text()) != config:
        directory.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Transformer(ModelArgs.from_hf_config(config)).state_dict().items()}
        g = torch.Generator().manual_seed(0)
        state = {(k if k.startswith("lm_head") else "model." + k): torch.randn(s, generator=g) * 0.02
                 for k, s in shapes.items()}
        save_safetensors(state, weights, checksums=False)
        (directory / "config.json").write_text(json.dumps(config))
    return weights.stat().st_size


def rss() -> int:
    """Resident memory of this process now, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def worker(args) -> None:
    import torch.distributed as dist

    from plumbing import parallel
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    start_up = rss()
    t = time.perf_counter()
    model = parallel.load_sharded(Path(args.work), torch.float32, torch.device("cpu"), seed=0,
                                  experts=dict(experts=2, rank=16, alpha=32, dropout=0.0))
    load_s, load_peak = time.perf_counter() - t, peak_rss()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(32000, (1, args.seq), generator=torch.Generator().manual_seed(rank))
    times = []
    for _ in range(args.steps + 1 if args.train else 0):  # the first is a warm-up
        t = time.perf_counter()
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        times.append(time.perf_counter() - t)
    report = {"rank": rank, "start_up": start_up, "load_peak": load_peak, "load_s": load_s,
              "train_peak": peak_rss() if times else None, "step_s": statistics.median(times[1:]) if times else None}
    Path(args.report).with_suffix(f".{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/omoe-bench-fsdp", help="folder for the random checkpoint")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--train-procs", type=int, nargs="*", default=[1, 2],
                   help="the N that also train (4 processes training this model need about 22 GB)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    size = write_checkpoint(Path(args.work), args.layers)
    print(f"checkpoint: {args.layers} blocks of LLaMA-7B width, {size / 2**30:.2f} GiB (float32); "
          f"peak resident memory per process while loading, as a share of it")
    print(f"{'N':>3}{'peak':>8}{'above start-up':>16}{'target 1/N+0.15':>17}{'load s':>8}{'train peak':>12}"
          f"{'step s':>8}")
    for n in args.procs:
        report = Path(args.work) / f"report-{n}"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                        __file__, "--worker", "--work", args.work,
                        "--steps", str(args.steps), "--seq", str(args.seq), "--report", str(report),
                        *(["--train"] if n in args.train_procs else [])],
                       check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
        ranks = [json.loads(report.with_suffix(f".{r}.json").read_text()) for r in range(n)]
        worst = max(ranks, key=lambda r: r["load_peak"])
        trained = ranks[0]["step_s"] is not None
        train = (f"{max(r['train_peak'] for r in ranks) / size:12.3f}{max(r['step_s'] for r in ranks):8.2f}"
                 if trained else f"{'-':>12}{'-':>8}")
        print(f"{n:>3}{worst['load_peak'] / size:8.3f}{(worst['load_peak'] - worst['start_up']) / size:16.3f}"
              f"{1 / n + 0.15:17.3f}{max(r['load_s'] for r in ranks):8.1f}{train}")


if __name__ == "__main__":
    main()
