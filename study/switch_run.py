"""A control for the length study: train.py whose layers change `orth` once, after step K.

    python study/switch_run.py --switch-at 48 --switch-to none  <train.py's flags>

Does normalising the experts' outputs help because it gives the first updates their length (a
normalised output is unit-long from the first step, where plain LoRA's grows from B = 0), or does it
help until the end? Train normalised for K steps, then go on without (--switch-to none), and the
reverse (a plain run that is normalised from step K on): if the first matches the normalised method
at the end, the early steps are where normalisation matters; if the second catches up, it can rescue
a run later too.

Going from normalised to plain keeps the function continuous on average: each expert's B is divided
by the mean length of its normalised denominator over the tokens of the next batch (and AdamW's
moments of B with it), so that e_i = s·B_i h_i starts out as long as q_i was. The reverse cannot be
continuous (a normalised output has unit length whatever B is): it is switched as it is. Everything
else is train.py's own run, records and files; such a run does not resume (its flags say neither
orth). The study runs it through harness.py when a method's flags hold --switch-at.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import omoe  # noqa: E402
import train  # noqa: E402


@torch.no_grad()
def denominators(model, tokens, mask) -> dict:
    """{layer: (E,) the mean over real tokens of sqrt(|e_i|² + ridge)}, what "normalized" divides by."""
    found, hooks = {}, []
    real = mask.reshape(-1).bool()
    for m in model.modules():
        if isinstance(m, omoe.OMoELinear) and m.role == "experts":
            def hook(m, args, out):
                x = args[0].reshape(-1, args[0].shape[-1])[real].to(m.lora_A.dtype)      # (N, D_in)
                h = torch.einsum("nd,erd->ner", x, m.lora_A)                              # (N, E, R)
                sq = omoe.expert_sq_lengths(h, m.lora_B, m.scaling)                      # (N, E)
                found[m] = (sq + omoe.ridge(sq)[:, None]).sqrt().mean(0)                  # (E,)
            hooks.append(m.register_forward_hook(hook))
    model(tokens, mask)
    for h in hooks:
        h.remove()
    return found


@torch.no_grad()
def switch(model, optimizer, to: str, tokens, mask) -> None:
    lengths = denominators(model, tokens, mask) if to == "none" else {}
    for m in model.modules():
        if not (isinstance(m, omoe.OMoELinear) and m.role == "experts"):
            continue
        if m in lengths:  # normalised -> plain: e_i = s·B_i h_i as long as q_i was, on average
            scale = lengths[m][:, None, None]                                              # (E, 1, 1)
            m.lora_B.div_(scale)
            state = optimizer.state.get(m.lora_B, {})
            if "exp_avg" in state:
                state["exp_avg"].div_(scale)
                state["exp_avg_sq"].div_(scale ** 2)
        m.orth = to


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--switch-at", type=int, required=True, help="steps trained before the switch")
    p.add_argument("--switch-to", choices=omoe.ORTH_MODES, required=True, help="orth from then on")
    ours, rest = p.parse_known_args(argv)
    train_step = train.train_step

    def step(r, index, record):
        if index == ours.switch_at:
            items, args = r.inputs.train_items, r.args
            mine = data.batch_indices(len(items), args.batch_size, args.seed, index)
            tokens, mask, _ = data.collate([items[i] for i in mine], r.inputs.tokenizer.pad_id)
            switch(r.model, r.optimizer, ours.switch_to, tokens.to(r.env.device),
                   mask.to(r.env.device))
            r.env.say(f"step {index}: the experts' outputs are now orth={ours.switch_to!r}")
        return train_step(r, index, record)

    train.train_step = step
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
