"""The feature head: a draft that reads the target's own hidden states (EAGLE-style).

At position j the head takes the token x_j and a *state* for position j-1 and predicts x_{j+1}.
For positions the target has verified, the state is `fuse(F_{j-1})`, the target's hidden states
of a few layers (low, middle, top) fused by one linear map; for positions the head drafted itself,
it is the head's own output at j-1. The input is `inp([norm(embed(x_j)), norm(state)])`, then
`n` decoder layers (Llama-shaped, initialised from target layers), a final norm and the target's
frozen embedding restricted to a reduced vocabulary as the output head.

Training unrolls the head over its own fed-back states ("training-time test", EAGLE-3): unroll
step k at row r sees the true context up to r and its own k-1 earlier outputs for that row, the
attention `forward` computes with `extra_kv` (one key/value per row and earlier unroll step).
Decoding keeps a plain per-layer key/value cache (`HeadCache`), rolled back by cropping.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from speckv.errors import SpecKVError


@dataclass
class FeatureHeadConfig:
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    features: list[int]  # target hidden-state indices (HF `hidden_states`: 0 = embeddings)
    vocab: int  # rows of the output head (the reduced vocabulary)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    init_layers: list[int] = field(default_factory=list)  # target layers the layers started from

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_target(cls, target_config, features: list[int], init_layers: list[int], vocab: int):
        return cls(
            hidden=target_config.hidden_size,
            heads=target_config.num_attention_heads,
            kv_heads=target_config.num_key_value_heads,
            intermediate=target_config.intermediate_size,
            layers=len(init_layers),
            features=list(features),
            vocab=vocab,
            rope_theta=rope_theta(target_config),
            rms_eps=float(target_config.rms_norm_eps),
            init_layers=list(init_layers),
        )


def rope_theta(config) -> float:
    """The target's rotary base (newer configs keep it in `rope_parameters`); only the default
    rotary type is implemented here, so another one is a clear error, not a silent mismatch."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind != "default":
        raise SpecKVError(f"the feature head implements default rotary embeddings, not {kind!r}")
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


@functools.lru_cache(maxsize=8)
def _inverse_frequencies(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Computed once per shape, not per drafted token (`rotate` runs in the drafting loop)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (the Llama convention: halves rotated) of x (..., T, d) at
    `positions` (..., T)."""
    d = x.shape[-1]
    angles = positions.float()[..., None] * _inverse_frequencies(d, theta, x.device)
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    first, second = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-second, first], -1) * sin


def _norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """An RMS norm in its weight's precision: under bf16 autocast (training) the activations
    arrive in bf16 while the weights stay fp32, and a mixed call loses the fused kernel."""
    return norm(x.to(norm.weight.dtype))


class Layer(nn.Module):
    """A Llama decoder layer, with the parameter names of Hugging Face's (so target layers load)."""

    def __init__(self, cfg: FeatureHeadConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden, cfg.head_dim
        self.input_layernorm = nn.RMSNorm(h, eps=cfg.rms_eps)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=cfg.rms_eps)
        self.self_attn = nn.ModuleDict(
            {
                "q_proj": nn.Linear(h, cfg.heads * d, bias=False),
                "k_proj": nn.Linear(h, cfg.kv_heads * d, bias=False),
                "v_proj": nn.Linear(h, cfg.kv_heads * d, bias=False),
                "o_proj": nn.Linear(cfg.heads * d, h, bias=False),
            }
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(h, cfg.intermediate, bias=False),
                "up_proj": nn.Linear(h, cfg.intermediate, bias=False),
                "down_proj": nn.Linear(cfg.intermediate, h, bias=False),
            }
        )

    def forward(self, x, positions, past_kv, mask, extra_kv=()):
        """x (B, T, h). Keys/values: `past_kv` (B, kvh, S, d) with the boolean `mask` (B or 1, 1,
        T, S + T) over past + new positions, plus `extra_kv`: per earlier unroll step one key and
        value per row (B, kvh, T, d), each seen only by its own row. Returns (x, (k, v) of x)."""
        cfg, attn = self.cfg, self.self_attn
        b, t, _ = x.shape
        y = _norm(self.input_layernorm, x)
        q = attn["q_proj"](y).view(b, t, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = attn["k_proj"](y).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = attn["v_proj"](y).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = rotate(q, positions[:, None], cfg.rope_theta), rotate(k, positions[:, None], cfg.rope_theta)
        new_kv = (k, v)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2)
        group = cfg.heads // cfg.kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        if not extra_kv:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:  # the row's own earlier unroll steps: one extra score per step, on the diagonal
            scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
            ek = [e[0].repeat_interleave(group, 1) for e in extra_kv]
            ev = [e[1].repeat_interleave(group, 1) for e in extra_kv]
            diag = torch.stack([(q * key).sum(-1) * scale for key in ek], -1)  # (B, H, T, steps)
            weights = torch.softmax(torch.cat([scores, diag], -1), -1)
            split = scores.shape[-1]
            out = weights[..., :split] @ v
            for step, value in enumerate(ev):
                out = out + weights[..., split + step, None] * value
        out = attn["o_proj"](out.transpose(1, 2).reshape(b, t, -1))
        x = x + out
        y = _norm(self.post_attention_layernorm, x)
        mlp = self.mlp
        x = x + mlp["down_proj"](torch.nn.functional.silu(mlp["gate_proj"](y)) * mlp["up_proj"](y))
        return x, new_kv


class FeatureHead(nn.Module):
    """fuse + input map + decoder layers + final norm; the embedding and head are the target's
    (passed in, frozen: `embed` (V, h) and `head` (vocab, h) rows)."""

    def __init__(self, cfg: FeatureHeadConfig, embed: torch.Tensor, head: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.fuse = nn.Linear(len(cfg.features) * h, h, bias=False)
        self.embed_norm = nn.RMSNorm(h, eps=cfg.rms_eps)
        self.state_norm = nn.RMSNorm(h, eps=cfg.rms_eps)
        self.inp = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(h, eps=cfg.rms_eps)
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("head", head, persistent=False)

    def reset_inputs(self) -> None:
        """Initial fuse and input maps: the state is the top feature, the input the sum of the
        normalised token embedding and state (the target's layers then see a familiar scale)."""
        h = self.cfg.hidden
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.weight[:, -h:] = torch.eye(h)
            self.inp.weight.copy_(torch.cat([torch.eye(h), torch.eye(h)], 1))

    def fused(self, features: torch.Tensor) -> torch.Tensor:
        """(…, L, h) target features -> (…, h) states."""
        return self.fuse(features.flatten(-2).to(self.fuse.weight.dtype))

    def forward(self, tokens, states, positions, past=None, mask=None, extra=None):
        """Outputs (B, T, h) for tokens (B, T) with states (B, T, h) at positions (B, T).
        `past`: per layer cached (k, v) or None; `mask`: (B or 1, 1, T, S+T) boolean, default
        causal; `extra`: per layer a list of (k, v) of earlier unroll steps (training).
        Returns (outputs, per layer (k, v) of these positions)."""
        x = self.inp(
            torch.cat([_norm(self.embed_norm, self.embed[tokens]), _norm(self.state_norm, states)], -1)
        )
        if mask is None:
            t = tokens.shape[1]
            s = past[0][0].shape[2] if past else 0
            mask = torch.ones((t, s + t), dtype=torch.bool, device=x.device).tril(s)[None, None]
        kvs = []
        for index, layer in enumerate(self.layers):
            x, kv = layer(x, positions, past[index] if past else None, mask, extra[index] if extra else ())
            kvs.append(kv)
        return x, kvs

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        normed = _norm(self.norm, outputs)
        return normed @ self.head.T.to(normed.dtype)


class HeadCache:
    """The head's keys and values of one sequence, per layer (1, kvh, S, d)."""

    def __init__(self):
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[2] if self.kv else 0

    def append(self, kvs) -> None:
        if self.kv is None:
            self.kv = [(k, v) for k, v in kvs]
        else:
            self.kv = [
                (torch.cat([k0, k], 2), torch.cat([v0, v], 2))
                for (k0, v0), (k, v) in zip(self.kv, kvs, strict=True)
            ]

    def crop(self, length: int) -> None:
        if self.kv is not None:
            self.kv = [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv]
