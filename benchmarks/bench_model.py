"""model.py against transformers.LlamaForCausalLM: forward time, and peak memory while loading.

    python benchmarks/bench_model.py [--threads N] [--runs 7]

1. Forward time, fp32 on the CPU, both models holding the same random weights: the median of
   several runs each (interleaved, so that load from other processes hits both alike) and the
   ratio model.py / transformers (target <= 1.0).
2. Peak resident memory (VmHWM) of a fresh Python process running Transformer.from_pretrained on a
   LLaMA-7B-wide, 2-layer random fp32 checkpoint, divided by the checkpoint's size on disk
   (target <= 1.2). Reported raw and net of an idle `import torch, model` process.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from plumbing.base.weights import save_safetensors  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


def hf_config(dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size):
    return transformers.LlamaConfig(hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                    num_key_value_heads=n_kv_heads, intermediate_size=hidden_dim,
                                    vocab_size=vocab_size, max_position_embeddings=4096)


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_forward(name, config, batch, seq_len, runs):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.device("meta"):
        ours = Transformer(ModelArgs.from_hf_config(config.to_dict()))
    ours.to_empty(device="cpu").tie_weights()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    ours.eval()
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens, use_cache=False).logits).abs().max().item()
        t_ours, t_hf = [], []
        for _ in range(runs):  # interleaved
            t_ours.append(seconds(lambda: ours(tokens)))
            t_hf.append(seconds(lambda: hf(tokens, use_cache=False)))
    t_ours, t_hf = statistics.median(t_ours), statistics.median(t_hf)
    print(f"{name:<34} {t_ours * 1e3:9.1f} ms {t_hf * 1e3:12.1f} ms {t_ours / t_hf:7.2f}   "
          f"(max |logit diff| {diff:.1e})")


def child_peak_rss_mib(code):
    """Peak resident set of a fresh Python running `code`, in MiB.

    Read from VmHWM in /proc/self/status, the high-water mark of the child's own address space.
    On Linux the child's getrusage ru_maxrss is not usable here: a process started by exec
    inherits its parent's high-water mark, so it would report this (larger) process instead.
    """
    code += ("\nimport resource\nhwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]"
             "\nprint(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")  # both in KB
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def bench_load(directory):
    config = hf_config(dim=4096, n_layers=2, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000)
    config.save_pretrained(directory)
    tensors = {name: torch.randn(shape) * 0.02 for name, shape in
               ((n, p.shape) for n, p in _meta_hf(config).named_parameters())}
    save_safetensors(tensors, directory / "model.safetensors")
    del tensors
    size_mib = (directory / "model.safetensors").stat().st_size / 2**20
    idle = child_peak_rss_mib("import torch, model")
    load = child_peak_rss_mib(f"import model; model.Transformer.from_pretrained({str(directory)!r})")
    print(f"checkpoint on disk              {size_mib:9.0f} MiB")
    print(f"peak RSS, idle python+torch     {idle:9.0f} MiB")
    print(f"peak RSS, from_pretrained       {load:9.0f} MiB   raw / file size = {load / size_mib:.2f}")
    print(f"net of idle                     {load - idle:9.0f} MiB   net / file size = "
          f"{(load - idle) / size_mib:.2f}   (target <= 1.2)")


def _meta_hf(config):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--runs", type=int, default=7, help="timed forward passes per model")
    parser.add_argument("--skip-forward", action="store_true", help="only the loading benchmark")
    parser.add_argument("--skip-load", action="store_true", help="only the forward benchmark")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} torch threads, fp32 CPU\n")
    if not args.skip_forward:
        print(f"{'forward, batch 4 x 256 tokens':<34} {'model.py':>12} {'transformers':>15} {'ratio':>7}")
        for name, kv in (("dim 512, 4 layers, 8 heads (MHA)", 8), ("dim 512, 4 layers, 8/2 heads (GQA)", 2)):
            config = hf_config(dim=512, n_layers=4, n_heads=8, n_kv_heads=kv, hidden_dim=1376, vocab_size=32000)
            bench_forward(name, config, batch=4, seq_len=256, runs=args.runs)
    if not args.skip_load:
        print("\nloading a LLaMA-7B-wide 2-layer fp32 checkpoint (dim 4096, hidden 11008, vocab 32000)")
        with tempfile.TemporaryDirectory() as tmp:
            bench_load(Path(tmp))


if __name__ == "__main__":
    main()
