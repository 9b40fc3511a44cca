"""Adapters PEFT can read and adapters PEFT wrote: plumbing/peft_format.py, through plumbing/adapters.py."""

import json

import pytest
import torch

import omoe
import train
from conftest import train_tokenizer
from model import Transformer
from plumbing import adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # inside peft

VOCAB = 400  # the sentencepiece tokenizer of conftest


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random transformers LLaMA (weights large enough that a wrong layer shows) with a tokenizer."""
    directory = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    hf.save_pretrained(directory)
    train_tokenizer(directory / "tokenizer.model")
    return directory


def hf_base(base):
    return transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def randomised(model, std=0.3):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in omoe.adapter_state_dict(model).values():
            p.normal_(std=std)
    return model


def test_plain_lora_is_written_exactly_as_peft_writes_it(base, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = randomised(omoe.add_experts(Transformer.from_pretrained(base), targets, experts=1, rank=4, alpha=8.0,
                                       dropout=0.05)).eval()
    adapters.save_adapters(ours, tmp_path / "ours", base_model=str(base))
    reference = peft.get_peft_model(hf_base(base), peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.05,
                                                                    target_modules=targets, task_type="CAUSAL_LM"))
    reference.save_pretrained(tmp_path / "peft")
    # The same tensor names and shapes, and the same config once PEFT has read it.
    with safetensors.safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as a, \
            safetensors.safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as b:
        assert {k: a.get_slice(k).get_shape() for k in a.keys()} == {k: b.get_slice(k).get_shape() for k in b.keys()}
        # PEFT writes {"format": "pt"}; ours adds the per-tensor checksums that load_safetensors verifies.
        ours_meta = a.metadata()
        assert b.metadata() == {"format": "pt"} and ours_meta["format"] == "pt"
        assert set(json.loads(ours_meta["sha256"])) == set(a.keys())
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: v for k, v in written.items() if k != "target_modules"} == \
           {k: theirs[k] for k in written if k != "target_modules"}
    assert sorted(written["target_modules"]) == sorted(theirs["target_modules"])
    read = [peft.LoraConfig.from_pretrained(tmp_path / d).to_dict() for d in ("ours", "peft")]
    assert read[0] == read[1]
    # PEFT runs our adapter and gets our logits, which the adapter changed.
    loaded = peft.PeftModel.from_pretrained(hf_base(base), tmp_path / "ours").eval()
    expected = logits(loaded, TOKENS)
    with loaded.disable_adapter():
        plain = logits(loaded, TOKENS)
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(logits(ours, TOKENS), expected, atol=1e-5, rtol=1e-5)
    # And it reads back here as the same adapter.
    config, state = adapters.load_adapter_files(tmp_path / "ours")
    assert config == adapters.adapter_config(ours)
    assert all(torch.equal(state[k], v) for k, v in omoe.adapter_state_dict(ours).items())
    assert state.keys() == omoe.adapter_state_dict(ours).keys()


def test_plain_lora_beyond_the_projections_reloads_as_saved(base, tmp_path):
    """A plain LoRA on lm_head (not one of the seven projections) is saved in PEFT's format, which PEFT
    runs, and read back here as the same adapter (it was once saved and then refused on reload)."""
    ours = randomised(omoe.add_experts(Transformer.from_pretrained(base), ["v_proj", "lm_head"], experts=1,
                                       rank=2, alpha=4.0, dropout=0.0)).eval()
    adapters.save_adapters(ours, tmp_path / "ours", base_model=str(base))
    config, state = adapters.load_adapter_files(tmp_path / "ours")
    assert config["targets"] == ["v_proj", "lm_head"] and config == adapters.adapter_config(ours)
    again = omoe.add_experts(Transformer.from_pretrained(base), **config).eval()
    adapters.load_adapters(again, state)
    torch.testing.assert_close(logits(again, TOKENS), logits(ours, TOKENS), atol=0, rtol=0)
    loaded = peft.PeftModel.from_pretrained(hf_base(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(ours, TOKENS), logits(loaded, TOKENS), atol=1e-5, rtol=1e-5)


def test_a_peft_trained_lora_is_read_and_evaluated(base, tmp_path, task_dir):
    targets = ["k_proj", "o_proj", "gate_proj", "up_proj"]  # a subset, and r / alpha unlike ours
    trained = peft.get_peft_model(hf_base(base), peft.LoraConfig(r=2, lora_alpha=16, lora_dropout=0.1,
                                                                  target_modules=targets))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)  # PEFT starts B at 0: make every matrix count
    trained.save_pretrained(tmp_path / "peft")
    trained.eval()
    expected = logits(trained, TOKENS)
    with trained.disable_adapter():
        assert (expected - logits(trained, TOKENS)).abs().max() > 1e-2
    config, state = adapters.load_adapter_files(tmp_path / "peft")
    assert config == dict(targets=targets, experts=1, top_k=None, rank=2, alpha=16, dropout=0.1, orth="none")
    ours = omoe.add_experts(Transformer.from_pretrained(base), **config)
    adapters.load_adapters(ours, state)
    torch.testing.assert_close(logits(ours.eval(), TOKENS), expected, atol=1e-5, rtol=1e-5)
    # train.py --eval-only --adapter takes the PEFT directory as it is.
    out = tmp_path / "eval"
    argv = ["--model", base, "--eval-data", task_dir, "--eval-only", "--adapter", tmp_path / "peft",
            "--eval-limit", 3, "--out", out]
    assert train.main([str(a) for a in argv]) == 0
    assert json.loads(next(out.glob("eval-*.json")).read_text())["adapter"] == config


def test_peft_refuses_an_adapter_with_experts(base, tmp_path):
    ours = randomised(omoe.add_experts(Transformer.from_pretrained(base), ["q_proj"], experts=2, rank=2))
    adapters.save_adapters(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "omoe_model.safetensors"]
    with pytest.raises(KeyError, match="peft_type"):
        peft.PeftModel.from_pretrained(hf_base(base), str(tmp_path))
    # Even with a config edited to look like PEFT's, PEFT finds no weights instead of loading none.
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {**config, "peft_type": "LORA", "r": 2, "lora_alpha": 32, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError):  # no adapter_model.safetensors here, and the path is no hub name either
        peft.PeftModel.from_pretrained(hf_base(base), str(tmp_path))
    # What the separate file name prevents: under PEFT's name, PEFT would run the base model, with a warning.
    (tmp_path / "omoe_model.safetensors").rename(tmp_path / "adapter_model.safetensors")
    silent = peft.PeftModel.from_pretrained(hf_base(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(silent, TOKENS), logits(hf_base(base), TOKENS), atol=0, rtol=0)


def write_peft(directory, **overrides):
    directory.mkdir(exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj"],
              "bias": "none", **overrides}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory / "adapter_config.json"


@pytest.mark.parametrize("overrides, message", [
    ({"use_dora": True}, "use_dora=True is not supported (plain LoRA only: use_dora=False)"),
    ({"use_rslora": True}, "use_rslora=True is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern={'q_proj': 8} is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] is not supported"),
    ({"target_modules": ".*proj"}, "target_modules='.*proj' must be a list of layer names, such as the "
                                   "projections q_proj"),
    ({"target_modules": ["q_proj", 5]}, "target_modules=['q_proj', 5] must be a list of layer names"),
    ({"r": 0}, "r must be an integer >= 1, got 0"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0, got nan"),
    ({"lora_dropout": "0.1"}, "lora_dropout must be a number in [0, 1), got '0.1'"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported (only 'LORA')"),
    ({"r": None, "lora_alpha": None}, "no 'r'"),
])
def test_peft_configs_we_cannot_run_name_file_and_key(tmp_path, overrides, message):
    if overrides.get("r", 0) is None:
        overrides = {}
        path = write_peft(tmp_path)
        config = json.loads(path.read_text())
        del config["r"]
        path.write_text(json.dumps(config))
    else:
        path = write_peft(tmp_path, **overrides)
    with pytest.raises(ValueError) as err:
        adapters.load_adapter_files(tmp_path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_peft_weights_of_another_kind_and_unknown_keys_of_ours(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{tmp_path / 'adapter_config.json'}: expected a JSON object"):
        adapters.load_adapter_files(tmp_path)
    write_peft(tmp_path)
    safetensors.torch.save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 4)},
                                tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path / 'adapter_model.safetensors'}: tensor "
                                         f"'base_model.model.model.embed_tokens.lora_embedding_A' is not a lora_A"):
        adapters.load_adapter_files(tmp_path)
    config = {"format_version": 1, "targets": ["q_proj"], "experts": 2, "rank": 2, "top_k": None, "alpha": 4,
              "dropout": 0.0, "orth": "orthonormal", "experts_per_token": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{tmp_path / 'adapter_config.json'}: unknown key 'experts_per_token' "
                                         f"\\(an adapter config has format_version, "
                                         f"base_model_name_or_path, revision, identity, targets, experts"):
        adapters.load_adapter_files(tmp_path)
