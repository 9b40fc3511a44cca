"""train.py for the regime study: two of its arms, and a probe of the experts over training.

    python study/regime_run.py [--tie-experts] [--magnitude] [--probe-every N] <train.py's flags>

--tie-experts  every expert of a layer starts as expert 0 and its gradient is the mean over the
               experts, so the experts stay identical for the whole run: collapse built in. Under
               AdamW that is one shared A and B (the update of a shared parameter, up to AdamW's eps
               and the clipped norm, which counts the copies); with soft routing and no Gram–Schmidt
               the layer computes exactly one LoRA of the expert's rank, Σ g_i e = e.
--magnitude    each layer's mixed update is multiplied by a learned magnitude exp(m), m a scalar per
               layer starting at 0. With orthonormal outputs a token's update Σ_k g_k q_k has length
               at most 1 whatever alpha is; this lifts that cap. It departs from the paper, which
               has no magnitude.
--probe-every  after every N steps and at the end, the experts are probed on a fixed batch (the first
               PROBE_PER_TASK validation questions of each task with their right answers) and what
               they do is appended to <out>/probe.jsonl: see `probe` for every quantity.

Everything else is train.py's own run, files and records; regime_study.py runs it.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import omoe  # noqa: E402
import train  # noqa: E402
from plumbing import adapters  # noqa: E402
from plumbing.base import files  # noqa: E402

PROBE_PER_TASK = 16


def expert_layers(model) -> dict[str, omoe.OMoELinear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, omoe.OMoELinear) and m.role == "experts" and m.experts > 1}


def tie(model) -> None:
    """Every expert a copy of expert 0, kept so by averaging the experts' gradients."""
    for m in expert_layers(model).values():
        for p in (m.lora_A, m.lora_B):
            with torch.no_grad():
                p[1:] = p[:1]
            p.register_hook(lambda g: g.mean(0, keepdim=True).expand_as(g).contiguous())


def add_magnitude(model) -> None:
    for m in expert_layers(model).values():
        m.log_magnitude = torch.nn.Parameter(torch.zeros((), dtype=m.lora_A.dtype,
                                                         device=m.lora_A.device))


def with_magnitude(mix):
    def scaled(self, h, gates, top):
        out = mix(self, h, gates, top)
        m = getattr(self, "log_magnitude", None)
        return out if m is None else out * m.exp().to(out.dtype)
    return scaled


# ── The probe ───────────────────────────────────────────────────────────────────────────────────

def erank(s: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy and Vetterli) from singular values s (..., n): exp of the entropy of
    s / Σ s; 1 for one direction, n for n equal ones."""
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    return (-(p * p.clamp_min(1e-30).log()).sum(-1)).exp()


def overlap(U: torch.Tensor) -> float:
    """Mean over pairs of experts of ‖Q_iᵀQ_j‖²_F / R, Q_i an orthonormal basis of the columns of
    U_i (E, D, R): 1 when two experts span one subspace, about R / D for random ones."""
    Q = torch.linalg.qr(U).Q                                                   # (E, D, R)
    E, R = U.shape[0], U.shape[-1]
    pairs = [(i, j) for i in range(E) for j in range(i + 1, E)]
    return sum(float((Q[i].T @ Q[j]).pow(2).sum()) / R for i, j in pairs) / len(pairs)


def mutual_information(joint: torch.Tensor) -> float:
    """I(T; Z) in nats from a joint distribution (tasks, experts)."""
    joint = joint / joint.sum()
    pt, pz = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    ratio = joint / (pt * pz).clamp_min(1e-30)
    return float((joint * ratio.clamp_min(1e-30).log()).sum())


def probe_batch(inputs):
    """The fixed probe: the first questions of each validation task with their right answers, as
    one batch (tokens, mask) and the task of every real token (N,)."""
    tasks = sorted(inputs.val_sets)
    items, which = [], []
    for t, task in enumerate(tasks):
        for ex in inputs.val_sets[task][:PROBE_PER_TASK]:
            ids, _ = data.encode_pair(inputs.tokenizer, data.prompt(ex), data.response_for(ex.answer))
            items.append({"input_ids": ids, "labels": ids})
            which.append(t)
    tokens, mask, _ = data.collate(items, inputs.tokenizer.pad_id)
    task_of = torch.tensor(which)[:, None].expand_as(mask)[mask.bool()]          # (N,)
    return tasks, tokens, mask, task_of


@torch.no_grad()
def probe(model, batch, previous: dict) -> dict:
    """Per layer with experts, over the probe's real tokens:
    cos, abs_cos   the mean signed and absolute cosine between two experts' outputs e_i = s·B_i A_i x
                   (all pairs, before Gram–Schmidt, whether the router activates them or not)
    out_erank      the mean over tokens of the effective rank of the E outputs (1: all alike, E)
    A_erank, B_erank  the effective rank of the stacked A's (E·R, D_in) and B's (D_out, E·R),
                   divided by R (1: the experts share one subspace, E: all apart)
    A_overlap, B_overlap  the experts' subspaces' mean overlap (1: one subspace)
    entropy        the router's mean entropy in nats (log E: uniform)
    prob, load     the mean router probability and the share of tokens activating each expert
    mi_soft, mi_top1  I(task; expert) in nats: from the mean router probabilities per task, and from
                   each token's most probable expert
    task_prob      the mean router probability per task (tasks x experts)
    switched       the share of tokens whose most probable expert changed since the previous probe
    magnitude      exp(m) of --magnitude, if any."""
    tasks, tokens, mask, task_of = batch
    layers, seen = expert_layers(model), {}
    hooks = [m.register_forward_hook(lambda m, a, out: seen.__setitem__(m, a[0]))
             for m in layers.values()]
    was = model.training
    model.eval()
    try:
        model(tokens, mask)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    real = mask.reshape(-1).bool()
    out = {}
    for name, m in layers.items():
        x = seen[m].reshape(-1, seen[m].shape[-1])[real].float()                   # (N, D_in)
        A, B = m.lora_A.float(), m.lora_B.float()                                  # (E,R,D) (E,O,R)
        h = torch.einsum("nd,erd->ner", x, A)                                      # (N, E, R)
        e = m.scaling * torch.einsum("ner,eor->neo", h, B)                         # (N, E, D_out)
        probs, _, active, _ = m.route(x)
        m.balance_loss = None
        unit = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        cos = unit @ unit.mT                                                       # (N, E, E)
        i, j = torch.triu_indices(m.experts, m.experts, 1)
        top1 = probs.argmax(-1)                                                    # (N,)
        joint = torch.zeros(len(tasks), m.experts).index_add_(0, task_of, probs)  # (T, E)
        hard = torch.zeros(len(tasks), m.experts).index_put_(
            (task_of, top1), torch.ones(len(top1)), accumulate=True)
        R = m.rank
        stats = {
            "cos": float(cos[:, i, j].mean()), "abs_cos": float(cos[:, i, j].abs().mean()),
            "out_erank": float(erank(torch.linalg.svdvals(e)).mean()),
            "A_erank": float(erank(torch.linalg.svdvals(A.flatten(0, 1)))) / R,
            "B_erank": float(erank(torch.linalg.svdvals(B.permute(1, 0, 2).flatten(1)))) / R,
            "A_overlap": overlap(A.mT), "B_overlap": overlap(B),
            "entropy": float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()),
            "prob": probs.mean(0).tolist(), "load": active.float().mean(0).tolist(),
            "mi_soft": mutual_information(joint), "mi_top1": mutual_information(hard),
            "task_prob": (joint / joint.sum(1, keepdim=True)).tolist(),
            "switched": float((top1 != previous[name]).float().mean()) if name in previous else None,
        }
        if getattr(m, "log_magnitude", None) is not None:
            stats["magnitude"] = float(m.log_magnitude.exp())
        previous[name] = top1
        out[name] = stats
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tie-experts", action="store_true", help="experts identical for the whole run")
    p.add_argument("--magnitude", action="store_true", help="a learned magnitude per layer")
    p.add_argument("--probe-every", type=int, default=0, help="probe the experts every N steps")
    ours, rest = p.parse_known_args(argv)
    state = {"previous": {}, "batch": None}
    add_experts, train_step, finish = omoe.add_experts, train.train_step, train.finish
    expected_shapes = adapters.expected_shapes
    omoe.OMoELinear.mix_fast = with_magnitude(omoe.OMoELinear.mix_fast)
    omoe.OMoELinear.mix_reference = with_magnitude(omoe.OMoELinear.mix_reference)

    def add(model, *args, **kwargs):
        add_experts(model, *args, **kwargs)
        if ours.tie_experts:
            tie(model)
        if ours.magnitude:
            add_magnitude(model)
        return model

    def shapes(model, *args, **kwargs):  # what the inputs' checks hold adapter files to
        found = expected_shapes(model, *args, **kwargs)
        if ours.magnitude:  # beside each router: the layers of expert_layers
            found.update({k.removesuffix("router.weight") + "log_magnitude": ()
                          for k in found if k.endswith(".router.weight")})
        return found

    def record(env, inputs, model, step):
        if not (ours.probe_every and env.main and inputs.val_sets):
            return
        if state["batch"] is None:
            state["batch"] = probe_batch(inputs)
        entry = {"step": step, "tasks": state["batch"][0],
                 "layers": probe(model, state["batch"], state["previous"])}
        files.append_line(env.out / "probe.jsonl", json.dumps(entry) + "\n")

    def step(r, index, record_step):
        if ours.probe_every and index and index % ours.probe_every == 0:  # after `index` steps
            record(r.env, r.inputs, r.model, index)
        return train_step(r, index, record_step)

    def last(r, *rest_args):
        record(r.env, r.inputs, r.model, r.total_steps)
        return finish(r, *rest_args)

    omoe.add_experts, train.train_step, train.finish = add, step, last
    adapters.expected_shapes = shapes
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())

