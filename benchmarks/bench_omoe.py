"""Time and autograd memory of one adapted layer: plain LoRA, vanilla MoE-LoRA, OMoE reference, OMoE fast.

A LLaMA-7B-shaped linear layer (4096 -> 4096 and 4096 -> 11008), 2048 tokens, rank 16, E in {2, 4, 8},
soft and top-2 routing, forward + backward, float32. The input requires grad (as it does inside a
model whose earlier layers are adapted) and the backward pass gets a fixed random output gradient.

  plain LoRA        OMoELinear with one expert (rank r), i.e. PEFT's LoRA
  vanilla MoE-LoRA  OMoELinear(orth="none"): every expert computed densely, top-k by masking the gates
  OMoE reference    OMoELinear(orth="orthonormal"), impl="reference": Gram–Schmidt on (N, K, D_out)
  OMoE fast         OMoELinear(orth="orthonormal"), impl="fast": Gram matrix + Cholesky coefficients
  normalised fast   OMoELinear(orth="normalized"), impl="fast": each expert scaled to unit length

  time   median over --repeats rounds after a warm-up round, the methods taking turns in each round
         (CUDA events on a GPU, perf_counter on CPU)
  saved  bytes autograd keeps for backward: every tensor it saves, counted once per storage,
         parameters excluded (torch.autograd.graph.saved_tensors_hooks)

    python benchmarks/bench_omoe.py            # the full table (minutes on a laptop CPU)
    python benchmarks/bench_omoe.py --small    # 1024 -> 1024 and 1024 -> 2752, 512 tokens: seconds
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from omoe import OMoELinear  # noqa: E402


def saved_bytes(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.backward(gy)
    return sum(storages.values())


def seconds(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> float:
    """One forward + backward."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        layer(x).backward(gy)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    layer(x).backward(gy)
    return time.perf_counter() - t0


def compare(layers: dict, x: torch.Tensor, gy: torch.Tensor, repeats: int) -> dict:
    """{method: (median seconds, saved bytes)}. The methods take turns in every round, so that a
    machine that slows down or speeds up (other jobs, clocks) affects them alike."""
    times = {method: [] for method in layers}
    for i in range(repeats + 1):  # round 0 warms up (allocator, kernels) and is not counted
        for method, layer in layers.items():
            t = seconds(layer, x, gy)
            if i:
                times[method].append(t)
    return {m: (statistics.median(times[m]), saved_bytes(layers[m], x, gy)) for m in layers}


def make(base: nn.Linear, experts: int, top_k, rank: int, orth: str, impl: str) -> OMoELinear:
    layer = OMoELinear(base, experts=experts, top_k=top_k, rank=rank, alpha=2 * rank, dropout=0.0, orth=orth)
    layer.impl = impl
    with torch.no_grad():  # trained-looking experts: nonzero B, a router that prefers some experts
        layer.lora_B.normal_(std=0.02)
        if layer.router is not None:
            layer.router.weight.normal_(std=0.5 / base.in_features ** 0.5)
    return layer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="quick run: layers 1024->1024 and 1024->2752, 512 tokens")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 2048, 512 with --small)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r of every expert")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], help="numbers of experts E to try")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="layers as INxOUT (default 4096x4096 4096x11008; 1024x1024 1024x2752 with --small)")
    parser.add_argument("--routing", nargs="+", default=["soft", "top2"], choices=["soft", "top2"],
                        help="soft routing over all experts and/or top-2")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--no-reference", action="store_true", help="leave out the (slow) OMoE reference")
    args = parser.parse_args()
    tokens = args.tokens or (512 if args.small else 2048)
    shapes = args.shapes or (["1024x1024", "1024x2752"] if args.small else ["4096x4096", "4096x11008"])
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), "
          f"float32, {tokens} tokens, rank {args.rank}, forward + backward, median of {args.repeats} rounds")
    print("| layer | E | routing | method | time ms | saved MiB | time / vanilla | saved / vanilla | time / LoRA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        d_in, d_out = map(int, shape.split("x"))
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False, device=device).requires_grad_(False)
        x = torch.randn(tokens, d_in, device=device, requires_grad=True)
        gy = torch.randn(tokens, d_out, device=device)
        for experts in args.experts:
            for routing in args.routing:
                top_k = None if routing == "soft" else min(2, experts)
                layers = {"plain LoRA": make(base, 1, None, args.rank, "none", "fast"),
                          "vanilla MoE-LoRA": make(base, experts, top_k, args.rank, "none", "fast"),
                          "OMoE reference": make(base, experts, top_k, args.rank, "orthonormal", "reference"),
                          "OMoE fast": make(base, experts, top_k, args.rank, "orthonormal", "fast"),
                          "normalised fast": make(base, experts, top_k, args.rank, "normalized", "fast")}
                if args.no_reference:
                    del layers["OMoE reference"]
                rows = compare(layers, x, gy, args.repeats)
                del layers
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                t0, b0 = rows["vanilla MoE-LoRA"]
                for method, (t, b) in rows.items():
                    print(f"| {shape} | {experts} | {routing} | {method} | {1000 * t:.1f} | {b / 2**20:.1f} | "
                          f"{t / t0:.2f} | {b / b0:.2f} | {t / rows['plain LoRA'][0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
