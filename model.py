"""A LLaMA-style decoder that loads Hugging Face checkpoints, read top-down:
ModelArgs -> RMSNorm -> rotary embedding -> Attention -> FeedForward -> Block
-> Transformer.

Module names are those of transformers' LlamaForCausalLM without its
"model." prefix, so loading a checkpoint is that one key map (see
Transformer.from_pretrained).

Shapes: B batch, T tokens in this call, S keys attended to (cached + new),
D dim, H query heads, K key/value heads, hd head_dim, F hidden_dim of the
MLP, V vocab_size.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from plumbing.base import config, hub
from plumbing.base.weights import checkpoint_names, open_weights


@dataclass
class ModelArgs:
    dim: int = 4096              # hidden_size, the residual stream's width
    n_layers: int = 32           # num_hidden_layers
    n_heads: int = 32            # num_attention_heads, the query heads
    n_kv_heads: int = 32         # num_key_value_heads
    vocab_size: int = 32000
    hidden_dim: int = 11008      # intermediate_size of the SwiGLU MLP
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-6       # rms_norm_eps
    rope_theta: float = 10000.0  # the base of the rotary frequencies
    max_seq_len: int = 2048      # max_position_embeddings: generate()'s limit
    tie_embeddings: bool = False  # tie_word_embeddings: lm_head = embed_tokens
    # None for plain RoPE, else e.g. {"rope_type": "linear", "factor": 2.0}.
    rope_scaling: dict | None = None
    # Mistral: each token attends to itself and the window - 1 before it.
    sliding_window: int | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        # Fewer key/value heads than query heads is grouped-query attention.
        assert (self.n_heads % self.n_kv_heads == 0
                and self.head_dim % 2 == 0), "heads, even hd"

    @classmethod
    def from_hf_config(cls, d: dict) -> "ModelArgs":
        """config.json's names -> ours, each value checked first
        (plumbing/base/config.py)."""
        config.check(d)
        return cls(
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            vocab_size=d["vocab_size"],
            hidden_dim=d["intermediate_size"],
            head_dim=d.get("head_dim"),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=config.rope_theta(d),
            max_seq_len=d.get("max_position_embeddings", 2048),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope_scaling=config.rope_scaling(d),
            sliding_window=d.get("sliding_window"))


def load_config(path) -> ModelArgs:
    """The ModelArgs of a Hugging Face model directory (its config.json)."""
    return ModelArgs.from_hf_config(config.read_config(path))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 even for bf16, then scale: HF's order, so
        # that bf16 rounds the same way.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# Rotary embeddings (RoPE) turn pairs of coordinates of each query and key
# head by pos * freq_i. Meta's code pairs neighbours (x0, x1), ...; Hugging
# Face's rotate_half pairs the halves (x_i, x_{i+hd/2}), and its converter
# permuted the rows of q_proj and k_proj to match, so HF checkpoints are used
# as they are. Undoing that permutation is where converters go wrong: with
# grouped-query attention k_proj has n_kv_heads heads, not n_heads, and a
# wrong un-permute still has valid shapes.
#
# Scaling changes the frequencies, never the rotation. "linear" divides them
# all by factor. "dynamic" (NTK-aware) raises theta once a call reaches
# n > L = max_position_embeddings positions, per call, so that cached keys
# keep their angles. "llama3" divides the slow pairs (wavelengths past
# original_max_position_embeddings / low_freq_factor) by factor, keeps the
# fast ones, and blends those in between.
def rope_inv_freq(args: ModelArgs, seq_len: int, device) -> torch.Tensor:
    """The rotation frequencies (hd/2,) float32 for a call whose positions
    are < seq_len. They are computed step by step as transformers does: at
    large positions an ulp of inv_freq is visible."""
    hd, theta = args.head_dim, args.rope_theta
    scaling = args.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic" and seq_len > args.max_seq_len:
        n, factor = torch.tensor(seq_len, device=device), scaling["factor"]
        theta = theta * ((factor * n / args.max_seq_len)
                         - (factor - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, device=device).float() / hd)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, L0 = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > L0 / low, inv_freq / factor, inv_freq)
        # smooth is 0 at wavelength L0 / low, and 1 at L0 / high.
        smooth = (L0 / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < L0 / high) * ~(wavelen > L0 / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(positions, args: ModelArgs, dtype):
    """Angles for integer positions (B, T) or (1, T) -> cos and sin, each
    (B, 1, T, hd). They are float32, computed on every call: a buffer would
    be garbage after `to_empty`, and `model.to(bfloat16)` would round it,
    which at position 1000 turns the angle into noise."""
    dynamic = args.rope_scaling and args.rope_scaling["rope_type"] == "dynamic"
    seq_len = int(positions.max()) + 1 if dynamic else 0
    inv_freq = rope_inv_freq(args, seq_len, positions.device)  # (hd/2,)
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    # One angle for x_i and for x_{i+hd/2}.
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin  # (B, H or K, T, hd)


class KVCache:
    """Keys and values of every position so far, preallocated for the whole
    generation, so that a new token runs through the model alone instead of
    the whole sequence again. It costs 2·n_layers·B·n_kv_heads·head_dim
    numbers per position (LLaMA-7B in bf16: 0.5 MB per token)."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype, device):
        # Each layer's keys, and its values: (B, K, S_max, hd).
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(args.n_layers)]
        # Positions filled, advanced by Transformer.forward after the last layer.
        self.length = 0

    def update(self, layer: int, k, v):
        """Store this call's k, v (B, K, T, hd) after the cached ones, and
        return all of them (B, K, S, hd)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id  # which KVCache slot is ours
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.n_heads, args.n_kv_heads, args.head_dim)
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, allowed=None, cache=None):
        """x (B, T, D); allowed (B, 1, T, S) bool, or None: plain causal."""
        B, T, _ = x.shape
        H, K, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, K, hd).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, K, hd).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # (B, K, S, hd)
        # Grouped-query attention: each key/value head serves g = H // K
        # consecutive query heads (0..g-1 share kv head 0, as in HF's
        # repeat_kv); enable_gqa groups them without copying k and v.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, is_causal=allowed is None,
            enable_gqa=H != K)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        # (B, T, D) -> (B, T, F) -> (B, T, D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, allowed=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, D)


def attention_allowed(mask, start: int, T: int, window: int | None = None):
    """Padding mask (B, S) of the whole sequence -> (B, 1, T, S) bool for
    the queries start .. start+T-1.

    Query t sees key s if s is a real token at or before it and, with a
    sliding window, fewer than `window` real tokens before it: transformers'
    rule, counted in real tokens so that a padded row sees what the sequence
    alone would. Every query also sees itself: a padding query of a
    left-padded row has no real key, and a softmax over nothing is NaN."""
    S = mask.shape[1]
    q_pos = torch.arange(start, start + T, device=mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=mask.device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos) & mask[:, None, :].bool()  # (B, T, S)
    if window is not None:
        # Real tokens up to and including each position: (B, S).
        real = mask.long().cumsum(-1)
        allowed &= real[:, start:start + T, None] - real[:, None, :] < window
    return (allowed | (k_pos == q_pos))[:, None]  # (B, 1, T, S)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Recompute each block in backward: less memory, more time.
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens, attention_mask=None, cache: KVCache | None = None):
        """tokens (B, T) -> logits (B, T, V) in the model's dtype.

        attention_mask is (B, T), or (B, cache.length + T) with a cache:
        1/True is a real token, 0/False padding, on either side. Positions
        count real tokens only, so a left-padded row gives its real tokens
        exactly the logits of the same sequence run alone; logits at padding
        positions are finite and meaningless.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        window = self.args.sliding_window
        if (attention_mask is None and cache is None
                and (window is None or T <= window)):
            positions = torch.arange(T, device=tokens.device)[None]  # (1, T)
            # Plain causal attention: SDPA's fastest path.
            allowed = None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, start + T, dtype=torch.long,
                                            device=tokens.device)
            if attention_mask.shape != (B, start + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, "
                    f"expected {(B, start + T)}")
            # Each token's position counts the real tokens before it: (B, T).
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            allowed = attention_allowed(
                attention_mask, start, T, window)  # (B, 1, T, S)
        x = self.embed_tokens(tokens)  # (B, T, D)
        cos, sin = rope_cos_sin(positions, self.args, x.dtype)
        for layer in self.layers:
            if (self.gradient_checkpointing and self.training
                    and torch.is_grad_enabled()):
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, allowed, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, allowed, cache)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.norm(x))  # (B, T, V)

    @torch.no_grad()
    def generate(self, tokens, attention_mask=None, max_new_tokens: int = 32,
                 temperature: float = 0.0,
                 eos_id: int | Iterable[int] | None = None,
                 use_cache: bool = True, top_p: float = 1.0, on_token=None):
        """Extend each row of tokens (B, T) by up to max_new_tokens: (B, T + n).

        Greedy at temperature 0, else sampling from softmax(logits /
        temperature) over the smallest set of tokens whose probabilities sum
        to top_p. Rows of different lengths are left-padded (attention_mask 0
        on the left), so every row's new tokens follow its last real token.
        eos_id is one stop id or several (Llama-3 instruct ends a turn with
        any of three); a finished row repeats its stop id, and generation
        ends once every row has one. use_cache=False re-runs the whole
        sequence for each new token: the same tokens, more work. on_token
        (next_token (B,)) is called for each new token, to stream them.
        """
        B, T = tokens.shape
        mask = (torch.ones_like(tokens) if attention_mask is None
                else attention_mask.long())
        if not mask[:, -1].all():
            raise ValueError("generate needs left padding: attention_mask "
                             "must be 1 in the last column")
        # Dynamic RoPE scaling lets a model run past max_seq_len.
        dynamic = (self.args.rope_scaling or {}).get("rope_type") == "dynamic"
        if T + max_new_tokens > self.args.max_seq_len and not dynamic:
            raise ValueError(f"{T} + {max_new_tokens} new tokens exceed "
                             f"max_seq_len={self.args.max_seq_len}")
        stop = None if eos_id is None else torch.tensor(
            [eos_id] if isinstance(eos_id, int) else sorted(eos_id),
            device=tokens.device)
        w = self.embed_tokens.weight
        cache = (KVCache(self.args, B, T + max_new_tokens, w.dtype, w.device)
                 if use_cache else None)
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            # With a cache only the newest token goes through (all at first).
            new = tokens if cache is None or cache.length == 0 else tokens[:, -1:]
            logits = self(new, mask, cache=cache)[:, -1].float()  # (B, V)
            next_token = (logits.argmax(-1) if temperature == 0
                          else sample(logits / temperature, top_p))  # (B,)
            if stop is not None:
                # A finished row repeats its stop id.
                next_token = torch.where(done, tokens[:, -1], next_token)
                done |= torch.isin(next_token, stop)
            if on_token is not None:
                on_token(next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, T + step)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            if done.all():
                break
        return tokens

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """A Hugging Face LLaMA: a local directory (config.json, safetensors
        or .bin weights), its cache folder or its hub id. dtype defaults to
        float32 as in transformers, device to the CPU.

        Built on the meta device (no memory), then allocated on `device`,
        each tensor copied in from the memory-mapped files: the peak is about
        one copy of the weights. Every parameter must come from the
        checkpoint (plumbing/base/weights.py checks)."""
        path = hub.resolve_model(path)
        args = load_config(path)
        device = torch.device(device or "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}, "
                             f"but CUDA is not available here")
        config.check_memory(args, dtype, device, Path(path) / "config.json")
        with torch.device("meta"):
            model = cls(args)
        model.to(dtype or torch.float32).to_empty(device=device)
        # to_empty gives each module its own tensor, untying lm_head.
        model.tie_weights()
        # There are no buffers (RoPE angles are computed in forward), so
        # after loading the parameters nothing is left uninitialised.
        ours = model.state_dict()
        with open_weights(path) as reader:
            for name, file_name in checkpoint_names(ours, reader, path,
                                                    args.tie_embeddings):
                reader.copy_into(file_name, ours[name])
        return model.eval()


def sample(logits, top_p: float = 1.0):
    """A token per row (B,) from softmax(logits) (B, V), keeping the
    smallest set of the likeliest tokens whose probabilities reach top_p
    (nucleus sampling; 1.0 keeps them all)."""
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the mass before it is enough.
        outside = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = torch.zeros_like(probs).scatter(
            -1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1)[:, 0]
