"""model.py against transformers' LlamaForCausalLM, on tiny random checkpoints written here."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from plumbing.base.weights import CheckpointError  # noqa: E402
from model import KVCache, ModelArgs, Transformer, attention_allowed  # noqa: E402
from plumbing.base.config import check_memory, parameter_count  # noqa: E402
from plumbing.base.errors import BadInput  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


def hf_model(seed=0, arch="Llama", **overrides):
    """A random LlamaForCausalLM (or Mistral...). Weights are redrawn larger than HF's 0.02 init,
    and the norm weights away from 1, so that a wrong norm, rotation or head layout shows."""
    torch.manual_seed(seed)
    config = getattr(transformers, f"{arch}Config")(**{**TINY, **overrides})
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def save(hf, directory, fmt="safetensors"):
    """Write hf as a Hugging Face directory: safetensors / sharded / bin / sharded-bin."""
    if fmt == "safetensors":
        hf.save_pretrained(directory)
    elif fmt == "sharded":
        hf.save_pretrained(directory, max_shard_size="40KB")
        assert (directory / "model.safetensors.index.json").exists()
    else:  # transformers 5 writes only safetensors, so .bin checkpoints are written by hand
        hf.config.save_pretrained(directory)
        state = {k: v.clone() for k, v in hf.state_dict().items()
                 if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
        if fmt == "bin":
            torch.save(state, directory / "pytorch_model.bin")
        else:
            names = sorted(state)
            shards = [names[i::3] for i in range(3)]
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
                torch.save({k: state[k] for k in shard}, directory / file)
                weight_map.update(dict.fromkeys(shard, file))
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                     "weight_map": weight_map}
            (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


def tokens(B=2, T=12, vocab=256, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("overrides, fmt", [
    ({}, "safetensors"),  # grouped-query attention: 4 query heads share 2 key/value heads
    ({"num_key_value_heads": 4}, "sharded"),  # plain multi-head attention
    ({"tie_word_embeddings": True}, "bin"),
    ({"rope_theta": 500.0}, "sharded-bin"),
    ({"head_dim": 32}, "safetensors"),  # head_dim != hidden_size / heads
], ids=["gqa", "mha-sharded", "tied-bin", "rope_theta-sharded_bin", "head_dim"])
def test_logits_match_transformers(tmp_path, overrides, fmt):
    hf = hf_model(**overrides)
    model = Transformer.from_pretrained(save(hf, tmp_path, fmt))
    assert not model.training and model.lm_head.weight.dtype == torch.float32
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.embed_tokens.weight
    x = tokens()
    with torch.no_grad():
        expected = hf(x).logits
        got = model(x)
    assert got.shape == (2, 12, 256)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_mistral_without_sliding_window_matches_transformers(tmp_path):
    hf = hf_model(arch="Mistral", sliding_window=None)
    model = Transformer.from_pretrained(save(hf, tmp_path))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_bfloat16_load_runs_and_tracks_transformers(tmp_path):
    hf = hf_model()
    save(hf, tmp_path)
    model = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = tokens()
    with torch.no_grad():
        got = model(x).float()
        expected = hf(x).logits
    assert torch.isfinite(got).all()
    # bf16 keeps ~3 significant digits: compare against the logits' own scale.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_greedy_generation_matches_transformers(tmp_path):
    hf = hf_model()
    model = Transformer.from_pretrained(save(hf, tmp_path))
    prompt = tokens(B=1, T=6)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                           do_sample=False)
    assert expected.shape == (1, 18)
    assert torch.equal(model.generate(prompt, max_new_tokens=12), expected)


def test_stale_rotary_buffer_in_checkpoint_is_ignored(tmp_path):
    hf = hf_model()
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    hf.config.save_pretrained(tmp_path)
    safetensors_torch.save_file(state, tmp_path / "model.safetensors")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(tmp_path)(x), hf(x).logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- padding and generation

def small_model(**overrides):
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                                  hidden_dim=160, max_seq_len=64, **overrides))
    with torch.no_grad():  # like hf_model: norms away from 1, weights big enough to matter
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return model.eval()


def padded_batch(lengths, side, T=10, seed=2):
    """Rows of the given lengths padded to T with random junk tokens; mask 1 on real tokens."""
    junk = tokens(B=len(lengths), T=T, seed=seed + 1)
    rows = [tokens(B=1, T=n, seed=seed + 10 + i)[0] for i, n in enumerate(lengths)]
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        where = slice(T - n, T) if side == "left" else slice(0, n)
        junk[i, where], mask[i, where] = row, 1
    return rows, junk, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_the_sequence_alone(side):
    model = small_model()
    rows, batch, mask = padded_batch([10, 4, 7], side)
    # Every query, padding included, may attend to some key: no softmax over an empty set.
    assert attention_allowed(mask, 0, 10).any(-1).all()
    logits = model(batch, attention_mask=mask)
    assert torch.isfinite(logits).all()
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = model(row[None])[0]  # (n, V)
        torch.testing.assert_close(logits[i][mask[i].bool()], alone, atol=1e-5, rtol=0)
    # Nothing from the padding reaches the gradients either.
    logits[mask.bool()].logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_kv_cache_logits_equal_full_forward():
    model = small_model()
    _, batch, mask = padded_batch([10, 6], "left")
    with torch.no_grad():
        full = model(batch, mask)
        cache = KVCache(model.args, 2, 10, torch.float32, "cpu")
        steps = [model(batch[:, :5], mask[:, :5], cache=cache)]  # a prefix, then one token at a time
        steps += [model(batch[:, t:t + 1], mask[:, :t + 1], cache=cache) for t in range(5, 10)]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=0)


def test_generate_left_padded_batch_equals_rows_alone_with_and_without_cache():
    model = small_model()
    rows, batch, mask = padded_batch([10, 4, 7], "left")
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8)
    assert out.shape == (3, 18) and torch.equal(out[:, :10], batch)
    assert torch.equal(model.generate(batch, attention_mask=mask, max_new_tokens=8, use_cache=False), out)
    for i, row in enumerate(rows):
        assert torch.equal(model.generate(row[None], max_new_tokens=8)[0, len(row):], out[i, 10:])


def test_generate_stops_at_eos_and_pads_finished_rows_with_it():
    model = small_model()
    prompts = tokens(B=2, T=5, seed=3)
    free = model.generate(prompts, max_new_tokens=10)
    eos = int(free[0, 5])  # row 0's first new token
    out = model.generate(prompts, max_new_tokens=10, eos_id=eos)
    assert (out[0, 5:] == eos).all()
    hits = (free[1, 5:] == eos).nonzero()
    n = int(hits[0]) + 1 if len(hits) else 10  # row 1 runs until its own first eos
    assert out.shape[1] == 5 + n and torch.equal(out[1], free[1, :5 + n])
    # A single row stops as soon as it has produced eos.
    assert torch.equal(model.generate(prompts[:1], max_new_tokens=10, eos_id=eos), free[:1, :6])


def test_sampling_at_tiny_temperature_is_greedy_and_refusals():
    model = small_model()
    prompts = tokens(B=2, T=5, seed=4)
    torch.manual_seed(0)
    assert torch.equal(model.generate(prompts, max_new_tokens=6, temperature=1e-4),
                       model.generate(prompts, max_new_tokens=6))
    sampled = model.generate(prompts, max_new_tokens=6, temperature=1.0)
    assert sampled.shape == (2, 11) and ((0 <= sampled) & (sampled < 256)).all()
    with pytest.raises(ValueError, match="left padding"):
        model.generate(prompts, attention_mask=torch.tensor([[1, 1, 1, 1, 0]] * 2))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model.generate(prompts, max_new_tokens=60)


# ---------------------------------------------------------------- config.json

DROP = object()  # a key to leave out of the config


def hf_dict(**overrides):
    return {**json.loads(transformers.LlamaConfig(**TINY).to_json_string()), **overrides}


def test_config_both_rope_layouts_and_defaults():
    new = hf_dict(rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    old = {k: v for k, v in hf_dict().items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling=None)
    assert ModelArgs.from_hf_config(new) == ModelArgs.from_hf_config(old)
    args = ModelArgs.from_hf_config(new)
    assert (args.rope_theta, args.n_kv_heads, args.head_dim, args.max_seq_len) == (500000.0, 2, 16, 128)
    bare = {k: v for k, v in old.items() if k not in ("num_key_value_heads", "head_dim", "rope_theta")}
    args = ModelArgs.from_hf_config(bare)
    assert (args.n_kv_heads, args.head_dim, args.rope_theta, args.tie_embeddings) == (4, 16, 10000.0, False)
    assert ModelArgs.from_hf_config(hf_dict(model_type="mistral", sliding_window=None)).dim == 64
    assert ModelArgs.from_hf_config(hf_dict(tie_word_embeddings=True)).tie_embeddings
    assert ModelArgs.from_hf_config(hf_dict(rope_scaling={"rope_type": "default"})).rope_theta == 10000.0


@pytest.mark.parametrize("overrides, named", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling of type 'llama3' has no low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    ({"rope_scaling": {"type": "dynamic"}}, "rope_scaling of type 'dynamic' has no factor"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters of type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_scaling of type 'longrope' is not supported"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 4096}, "sliding_window=4096 with model_type='llama'"),
    ({"hidden_size": DROP}, "hidden_size"),
])
def test_config_refuses_what_the_model_does_not_implement(overrides, named):
    d = {k: v for k, v in hf_dict(**overrides).items() if v is not DROP}
    with pytest.raises(ValueError, match=named):
        ModelArgs.from_hf_config(d)


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"head_dim": 8},
                                       {"num_key_value_heads": 4}], ids=["plain", "tied", "head_dim", "MHA"])
def test_parameter_count_from_the_config_equals_transformers(overrides):
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    hf = transformers.LlamaForCausalLM(config)
    assert parameter_count(ModelArgs.from_hf_config(config.to_dict())) == hf.num_parameters()


def test_a_model_larger_than_memory_is_refused_before_allocation():
    args = ModelArgs.from_hf_config(hf_dict(num_hidden_layers=10**12, hidden_size=4096, num_attention_heads=32,
                                            num_key_value_heads=32, intermediate_size=11008))
    with pytest.raises(ValueError, match=r"where: the model it describes has [\d,]+ parameters, [\d,.]+ GiB in "
                                         r"torch.bfloat16, more than the [\d,.]+ GiB of memory of cpu"):
        check_memory(args, torch.bfloat16, "cpu", "where")
    check_memory(ModelArgs.from_hf_config(hf_dict()), torch.float32, "cpu", "where")  # a tiny one fits


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", "64", "a positive integer"), ("hidden_size", 64.0, "a positive integer"),
    ("num_hidden_layers", 0, "a positive integer"), ("vocab_size", True, "a positive integer"),
    ("head_dim", -16, "a positive integer or null"), ("rms_norm_eps", float("inf"), "a positive finite number"),
    ("rope_theta", 0, "a positive finite number"), ("tie_word_embeddings", 0, "true or false"),
    ("model_type", None, "a string"), ("rope_parameters", "default", "an object or null"),
    ("sliding_window", 0, "a positive integer or null"),
])
def test_config_values_of_the_wrong_type_or_range_name_the_key(key, value, expected):
    with pytest.raises(ValueError, match=f"^{key}=.* must be {expected}$"):
        ModelArgs.from_hf_config(hf_dict(**{key: value}))


# ---------------------------------------------------------------- from_pretrained errors

def test_missing_directory_and_missing_config(tmp_path):
    with pytest.raises(BadInput, match="nowhere: no such directory"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(BadInput, match=f"{tmp_path}: no config.json in this directory"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    save(hf_model(), tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available"):
        Transformer.from_pretrained(tmp_path, device="cuda")


def test_config_without_weights(tmp_path):
    hf_model().config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as error:
        Transformer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value) and "model.safetensors" in str(error.value)


def test_unsupported_config_names_the_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_dict(attention_bias=True)))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}.*attention_bias"):
        Transformer.from_pretrained(tmp_path)


def write_state(directory, state, config=None):
    (directory / "config.json").write_text(json.dumps(config or hf_dict()))
    safetensors_torch.save_file(state, directory / "model.safetensors")
    return directory


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    state = dict(hf_model().state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight; "
                                              r"unexpected tensors: none"):
        Transformer.from_pretrained(write_state(tmp_path, state))
    state = dict(hf_model().state_dict())
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"missing tensors: none; "
                                              r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias"):
        Transformer.from_pretrained(write_state(tmp_path, state))
    state = {k: v for k, v in hf_model().state_dict().items() if k != "lm_head.weight"}  # untied: needed
    with pytest.raises(CheckpointError, match=r"missing tensors: lm_head\.weight"):
        Transformer.from_pretrained(write_state(tmp_path, state))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    state = dict(hf_model().state_dict())
    write_state(tmp_path, state, hf_dict(intermediate_size=128))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: "
                                              r"checkpoint \(160, 64\) vs config \(128, 64\)"):
        Transformer.from_pretrained(tmp_path)


# ---------------------------------------------------------------- the families people fine-tune

# Every key of each family's config.json as shipped on the Hub (the old layout: top-level rope_theta,
# rope_scaling), with the sizes shrunk: hidden_size, intermediate_size, num_hidden_layers, heads,
# vocab_size, and for the scaled LLaMA-2s max_position_embeddings and Mistral's sliding_window, so
# that the test sequences run past them. Everything else is the real value.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 256}
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 160, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 1,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 256}
MISTRAL_7B_V0_1 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 160, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 16, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 256}
VICUNA_7B_V1_5_16K = {  # linear scaling, factor 4
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 160, "max_position_embeddings": 32,
    "max_sequence_length": 128, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 4, "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 4.0, "type": "linear"}, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 256}
LLAMA_2_DYNAMIC = {**VICUNA_7B_V1_5_16K, "rope_scaling": {"factor": 2.0, "type": "dynamic"}}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 48, "initializer_range": 0.041666666666666664,
    "intermediate_size": 128, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 3, "num_hidden_layers": 2, "num_key_value_heads": 1, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "vocab_size": 256}
FAMILIES = {"llama-3.2-1b": (LLAMA_3_2_1B, 300), "llama-3.1-8b": (LLAMA_3_1_8B, 300),
            "mistral-7b-v0.1": (MISTRAL_7B_V0_1, 40), "vicuna-16k-linear": (VICUNA_7B_V1_5_16K, 80),
            "llama-2-dynamic": (LLAMA_2_DYNAMIC, 80), "smollm2-135m": (SMOLLM2_135M, 40)}  # config, test length


def family_checkpoint(directory, config, layout):
    """A random transformers model of this config, saved; config.json as shipped ("hub": the old layout)
    or as transformers >= 5 rewrites it ("transformers": rope_parameters)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(directory)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    hf.save_pretrained(directory)
    if layout == "hub":
        (directory / "config.json").write_text(json.dumps(config))
    else:
        assert "rope_parameters" in json.loads((directory / "config.json").read_text())
    return hf


@pytest.mark.parametrize("layout", ["hub", "transformers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_families_logits_match_transformers(tmp_path, family, layout):
    config, T = FAMILIES[family]
    hf = family_checkpoint(tmp_path, config, layout)
    model = Transformer.from_pretrained(tmp_path)
    assert model.args.sliding_window == config.get("sliding_window")
    scaling = config.get("rope_scaling") or {}
    assert (model.args.rope_scaling or {}).get("rope_type") == scaling.get("rope_type", scaling.get("type"))
    x = tokens(B=2, T=T)
    mask = torch.ones_like(x)
    mask[1, :T // 3] = 0  # row 1 left-padded: scaling and window count real tokens, as transformers' positions do
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)
        alone = hf(x[1:, T // 3:]).logits[0]
        torch.testing.assert_close(model(x, mask)[1, T // 3:], alone, atol=1e-4, rtol=0)
    if family != "smollm2-135m":  # the scaling or the window must matter at this length:
        plain = {k: v for k, v in config.items() if k not in ("rope_scaling", "sliding_window")}
        with torch.no_grad():
            unscaled = Transformer(ModelArgs.from_hf_config(plain))
            unscaled.load_state_dict(model.state_dict())
            assert (unscaled(x) - model(x)).abs().max() > 1e-2


@pytest.mark.parametrize("family, prompt_len, new", [
    ("mistral-7b-v0.1", 10, 30),  # 40 tokens through a window of 16
    ("llama-2-dynamic", 20, 30),  # past max_position_embeddings=32: frequencies change at every step
    ("llama-3.2-1b", 10, 20),
    ("smollm2-135m", 10, 20),
])
def test_families_greedy_generation_matches_transformers(tmp_path, family, prompt_len, new):
    config, _ = FAMILIES[family]
    hf = family_checkpoint(tmp_path, config, "hub")
    model = Transformer.from_pretrained(tmp_path)
    prompt = tokens(B=1, T=prompt_len, seed=5)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert expected.shape == (1, prompt_len + new)
    assert torch.equal(model.generate(prompt, max_new_tokens=new), expected)
    if family == "mistral-7b-v0.1":  # the window also holds for the re-run path
        assert torch.equal(model.generate(prompt, max_new_tokens=new, use_cache=False), expected)


def test_sliding_window_with_padding_and_cache():
    model = small_model(sliding_window=4)
    rows, batch, mask = padded_batch([10, 4, 7], "left")
    logits = model(batch, attention_mask=mask)
    for i, row in enumerate(rows):
        with torch.no_grad():
            torch.testing.assert_close(logits[i][mask[i].bool()], model(row[None])[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        cache = KVCache(model.args, 3, 10, torch.float32, "cpu")
        steps = [model(batch[:, :5], mask[:, :5], cache=cache)]
        steps += [model(batch[:, t:t + 1], mask[:, :t + 1], cache=cache) for t in range(5, 10)]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], logits[real], atol=1e-5, rtol=0)
    # The window of 4 real tokens: query 9 of row 1 (real tokens 6..9) sees keys 6..9 only.
    allowed = attention_allowed(mask, 0, 10, window=4)[1, 0, 9]
    assert allowed.nonzero().flatten().tolist() == [6, 7, 8, 9]
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(model.generate(batch, attention_mask=mask, max_new_tokens=8, use_cache=False), out)
    for i, row in enumerate(rows):
        assert torch.equal(model.generate(row[None], max_new_tokens=8)[0, len(row):], out[i, 10:])


def test_generate_stops_at_any_of_several_eos_ids():
    model = small_model()
    prompts = tokens(B=2, T=5, seed=3)
    free = model.generate(prompts, max_new_tokens=10)
    stops = {int(free[0, 7]), int(free[1, 6])}  # each row's third / second new token
    out = model.generate(prompts, max_new_tokens=10, eos_id=stops)
    for row, free_row in zip(out, free):
        first = next(i for i in range(5, 15) if int(free_row[i]) in stops)
        assert torch.equal(row[:first + 1], free_row[:first + 1]) and (row[first:] == row[first]).all()
    assert out.shape[1] == 5 + max(next(i for i in range(10) if int(r[5 + i]) in stops) for r in free) + 1


def test_from_pretrained_reads_a_hugging_face_cache_folder(tmp_path):
    cache = tmp_path / "models--org--tiny"
    hf = hf_model()
    save(hf, cache / "snapshots" / "0123abcd")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abcd\n")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(cache)(x), hf(x).logits, atol=1e-4, rtol=0)


def test_left_padded_generation_through_a_sliding_window_matches_transformers(tmp_path):
    config, _ = FAMILIES["mistral-7b-v0.1"]
    hf = family_checkpoint(tmp_path, config, "hub")
    model = Transformer.from_pretrained(tmp_path)
    _, batch, mask = padded_batch([10, 6], "left")
    expected = hf.generate(batch, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert expected.shape == (2, 40)
    assert torch.equal(model.generate(batch, attention_mask=mask, max_new_tokens=30), expected)
