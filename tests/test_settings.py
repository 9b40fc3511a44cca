"""Every setting that changes a number is declared once. Adding one touches these places, and only
these:

- an adapter setting (one the layer reads): its argument and default in omoe.layer_settings, with
  its check beside the others there (plumbing/base/checks.check_layer_args); what OMoELinear does
  with it, kept as an attribute of the same name; and its flag, of the same name, in
  plumbing/cli.py;
- a training setting: its flag in plumbing/cli.py (must_match=True when it changes what a run
  computes), and where train.py uses it.

The adapter files' keys, the add_experts arguments of the flags, and the settings a resumed run must
keep all follow from those declarations, as the tests below check.
"""
import argparse
import inspect
from pathlib import Path

import pytest
import torch

import omoe
import train
from model import ModelArgs, Transformer
from plumbing import adapters, cli, gate, run_folder

LAYER = tuple(inspect.signature(omoe.layer_settings).parameters)
# A value other than the default for each adapter setting (a new setting needs one here too).
OTHER = dict(experts=3, top_k=2, rank=5, alpha=7.0, dropout=0.25, orth="normalized")


def test_every_adapter_setting_is_a_layout_key_a_flag_and_kept_on_resume():
    parser = train.parse_args([])[0]
    flags = {a.dest for a in parser._actions}
    assert set(LAYER) == set(OTHER), "give the new setting a non-default value in OTHER"
    assert adapters.LAYOUT_KEYS == ("targets", *LAYER, "lora_targets")
    for key in adapters.LAYOUT_KEYS:
        assert key in flags, f"--{key.replace('_', '-')}: an adapter setting needs its flag"
        assert key in cli.must_match(), f"--{key}: an adapter setting must match on --resume"
    _, args = train.parse_args(["--experts", "3", "--top-k", "2", "--rank", "5"])
    assert list(gate.experts_of(args)) == list(adapters.LAYOUT_KEYS)


def test_the_layer_keeps_every_setting_and_the_adapter_config_gives_them_back():
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64,
                                  vocab_size=16))
    omoe.add_experts(model, targets=["q_proj"], lora_targets=["v_proj"], **OTHER)
    layer = omoe.adapted_layers(model)["layers.0.self_attn.q_proj"]
    assert {k: getattr(layer, k) for k in LAYER} == OTHER
    config = adapters.adapter_config(model)
    assert config == {"targets": ["q_proj"], **OTHER, "lora_targets": ["v_proj"]}
    fresh = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64,
                                  vocab_size=16))
    assert adapters.adapter_config(omoe.add_experts(fresh, **config)) == config


@pytest.mark.parametrize("key", [k for k in cli.must_match() if k not in ("model", "data")])
def test_resume_refuses_a_change_of_every_setting_that_must_match(key, tmp_path):
    _, args = train.parse_args(["--experts", "3", "--top-k", "2", "--lr", "1e-3"])
    saved = dict(vars(args))
    saved[key] = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.5,
                  list: lambda v: v + ["k_proj"], str: lambda v: v + "x",
                  type(None): lambda v: 1}[type(saved[key])](saved[key])
    ckpt = {"args": saved, "data_fingerprint": "f", "format": run_folder.CHECKPOINT_FORMAT}
    with pytest.raises(run_folder.RunError, match=f"--{key.replace('_', '-')} was "):
        run_folder.check_resumable(ckpt, args, tmp_path / "checkpoint.pt", {"data": "f"},
                                   cli.defaults(), cli.must_match())


def test_the_checkpoint_is_built_in_train_py(tmp_path):
    """train.save holds the checkpoint's entries; the plumbing only adds its bookkeeping."""
    source = inspect.getsource(train.save)
    for key in ("adapters", "optimizer", "scheduler", "rng", "step", "args", "before",
                "val_before", "loss_window", "identity"):
        assert f'"{key}"' in source
    model = omoe.add_experts(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2,
                                                   hidden_dim=64, vocab_size=16)), rank=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = {"adapters": omoe.adapter_state_dict(model), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "rng": [run_folder.rng_state()], "step": 7,
                  "args": vars(argparse.Namespace(seed=0)), "before": None, "val_before": None,
                  "loss_window": [0.0, 0], "identity": {"data": "f"}}
    run_folder.save_checkpoint(tmp_path / "checkpoint.pt", checkpoint, 5)
    saved = run_folder.load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(saved) - set(checkpoint) == {"data_fingerprint", "format", "data_position",
                                            "checksums"}
    assert saved["data_position"] == {"epoch": 1, "batch_in_epoch": 2}


def test_no_caller_lists_the_adapter_settings_by_hand():
    """add_experts takes the flags' settings through gate.experts_of, so a new setting reaches every
    caller without another edit."""
    root = Path(__file__).resolve().parents[1]
    by_hand = [str(p.relative_to(root)) for p in root.glob("**/*.py")
               if ".venv" not in p.parts and p != Path(__file__).resolve()
               and "targets=args.targets" in p.read_text()]
    assert not by_hand
