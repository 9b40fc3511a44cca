"""Training throughput of LoRA, vanilla MoE-LoRA and OMoE at wider shapes than the embedded model's.

    python benchmarks/bench_throughput.py                 # both shapes, on CUDA if there is one, else the CPU
    python benchmarks/bench_throughput.py --quick         # the 1024-wide shape only, 2 timed steps

One process per method (so that each peak memory is its own): a random LLaMA of the shape, the method's
adapters, one warm-up step and then the median of the timed steps. Writes study/throughput.json, which
the README's throughput tables come from.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import omoe  # noqa: E402
from plumbing.gate import experts_of  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

THROUGHPUT_METHODS = {"LoRA r=16": ["--lora", "--rank", "16", "--alpha", "32"],
                      "MoE-LoRA soft, 2 experts": ["--experts", "2", "--orth", "none", "--rank", "16", "--alpha", "32"],
                      "OMoE 2 experts": ["--experts", "2", "--rank", "16", "--alpha", "32"]}
SHAPES = {  # name -> (ModelArgs fields, batch, tokens per row)
    "LLaMA-7B width, 2 layers": (dict(dim=4096, n_layers=2, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                                      vocab_size=32000), 1, 256),
    "1024 wide, 4 layers": (dict(dim=1024, n_layers=4, n_heads=16, n_kv_heads=16, hidden_dim=2752,
                                 vocab_size=32000), 2, 128),
}


def throughput_worker(spec: dict) -> None:
    """Time `steps` training steps (after one warm-up step) and print tokens/s as JSON."""
    import train
    torch.manual_seed(0)
    _, args = train.parse_args(spec["flags"])
    fields, batch, length = SHAPES[spec["shape"]]
    device = torch.device(spec["device"])
    with device:
        model = Transformer(ModelArgs(**fields, max_seq_len=length))
    if device.type == "cuda":
        model.to(torch.bfloat16)  # the frozen base in bfloat16, as train.py stores it on CUDA
    omoe.add_experts(model, **experts_of(args))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, fields["vocab_size"], (batch, length + 1), device=device)
    # As train.py: the float32 adapters meet the bfloat16 base under autocast on CUDA; float32 on the CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    times = []
    for step in range(spec["steps"] + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print(json.dumps({"tokens_per_s": batch * length / statistics.median(times[1:]), "peak_gpu_mib": peak_gpu,
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


def throughput(shape: str, steps: int, device: str, log) -> dict:
    out = {}
    for name, flags in THROUGHPUT_METHODS.items():
        spec = json.dumps({"flags": flags, "shape": shape, "steps": steps, "device": device})
        log(f"throughput: {name}, {shape}, {device}")
        proc = subprocess.Popen([sys.executable, __file__, "--worker", spec], stdout=subprocess.PIPE,
                                cwd=ROOT, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"bench_throughput.py: error: the throughput run of {name} failed")
        out[name] = {**json.loads(stdout), "peak_rss_mib": usage.ru_maxrss / 1024}
    return out



def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the 1024-wide shape only, 2 timed steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to measure")
    p.add_argument("--out", default=str(ROOT / "study" / "throughput.json"), help="the JSON file to write")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return throughput_worker(json.loads(args.worker))
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    shapes = ["1024 wide, 4 layers"] if args.quick else list(SHAPES)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    result = {s: throughput(s, 2 if args.quick else 3, args.device, log) for s in shapes}
    Path(args.out).write_text(json.dumps({"device": device_name, **result}, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
