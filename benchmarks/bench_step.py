"""Training-step time and autograd memory of the embedded tiny LLaMA with each adapter, side by side.

One step = forward, loss, backward and AdamW on a batch of 16 training examples of assets/world, the
embedded recipe (rank 8, alpha 16, all seven projections). Every method steps on the same batch in
every round and the methods take turns, so that a machine that slows down or speeds up affects them
alike; the median over rounds after a warm-up round is reported, as a ratio to LoRA's.

  saved  bytes autograd keeps for backward in one step (every saved tensor counted once per storage,
         parameters excluded), which is what the Gram checkpoint trades against time

    OMP_NUM_THREADS=1 python benchmarks/bench_step.py
    OMP_NUM_THREADS=1 python benchmarks/bench_step.py --gram-checkpoint-min 1000000000   # never recompute the Gram
    OMP_NUM_THREADS=1 python benchmarks/bench_step.py --study   # the length study's methods: study/step_times.json
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import omoe  # noqa: E402
from model import Transformer  # noqa: E402

METHODS = {"LoRA": dict(experts=1), "vanilla MoE-LoRA, 2 soft": dict(experts=2, orth="none"),
           "OMoE, 2 soft": dict(experts=2), "normalised, 2 soft": dict(experts=2, orth="normalized"),
           "OMoE, top-2 of 8": dict(experts=8, top_k=2)}


# The length study's methods (study/length_study.py), as train.py builds them with their flags.
STUDY_METHODS = {"LoRA r=16": dict(experts=1, rank=16, alpha=32),
                 "normalised LoRA (1 expert)": dict(experts=1, rank=8, alpha=16, orth="normalized"),
                 "vanilla MoE-LoRA soft-2": dict(experts=2, rank=8, alpha=16, orth="none"),
                 "OMoE-2 orthonormal": dict(experts=2, rank=8, alpha=16),
                 "normalised only, 2 experts": dict(experts=2, rank=8, alpha=16, orth="normalized"),
                 "OMoE-2 orthogonal": dict(experts=2, rank=8, alpha=16, orth="orthogonal")}


def saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(storages.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--study", action="store_true", help="the length study's methods instead (their own ranks and "
                   "alphas), and their seconds per step written to study/step_times.json for its report")
    p.add_argument("--gram-checkpoint-min", type=int, default=None,
                   help=f"override omoe.GRAM_CHECKPOINT_MIN (now {omoe.GRAM_CHECKPOINT_MIN})")
    args = p.parse_args()
    if args.gram_checkpoint_min is not None:
        omoe.GRAM_CHECKPOINT_MIN = args.gram_checkpoint_min
    torch.manual_seed(0)
    tokenizer = data.Tokenizer(ROOT / "assets" / "tiny-llama" / "tokenizer.model")
    examples = [ex for task in data.load_tasks(ROOT / "assets" / "world", "train").values() for ex in task]
    items, _ = data.encode_for_training(tokenizer, examples, 512, False)
    order = torch.randperm(len(items)).tolist()
    batches = [data.collate([items[i] for i in order[16 * r:16 * (r + 1)]], tokenizer.pad_id)
               for r in range(args.rounds + 1)]
    base = Transformer.from_pretrained(ROOT / "assets" / "tiny-llama")
    runs = {}
    methods = STUDY_METHODS if args.study else {name: dict(rank=8, alpha=16, **kw) for name, kw in METHODS.items()}
    for name, kw in methods.items():
        torch.manual_seed(0)
        model = omoe.add_experts(copy.deepcopy(base), dropout=0.0, **kw)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=2e-3)
        runs[name] = (model, opt)

    def loss_of(model, batch):
        tokens, mask, labels = batch
        logits = model(tokens, mask)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100)

    times = {name: [] for name in runs}
    for r, batch in enumerate(batches):  # round 0 warms up
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times[name].append(time.perf_counter() - t0)
    lora = statistics.median(times[next(iter(runs))])
    print(f"embedded tiny LLaMA, batch 16, {torch.get_num_threads()} thread(s), median of {args.rounds} rounds, "
          f"GRAM_CHECKPOINT_MIN {omoe.GRAM_CHECKPOINT_MIN}")
    print("| method | step ms | step / LoRA | saved MiB |")
    print("|---|---|---|---|")
    for name, (model, _) in runs.items():
        t = statistics.median(times[name])
        saved = saved_bytes(lambda: loss_of(model, batches[0])) / 2**20
        model.zero_grad(set_to_none=True)
        print(f"| {name} | {1000 * t:.1f} | {t / lora:.2f} | {saved:.1f} |", flush=True)
    if args.study:
        path = ROOT / "study" / "step_times.json"
        path.write_text(json.dumps({name: statistics.median(times[name]) for name in runs}, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
