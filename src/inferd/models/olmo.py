"""The post-norm decoders, OLMo 2 and 3's and EXAONE 4's (``Olmo2ForCausalLM``,
``Olmo3ForCausalLM``, ``Exaone4ForCausalLM``), over a flat batch and a paged KV cache.

What they compute beyond the Llama family: no norm before attention or the MLP, but one after
each, on its output before it joins the residual stream; q and k normed before the rotary. OLMo
norms them over the whole projection (every head together) with RMSNorms that multiply by their
weight in float32 and cast after; EXAONE 4 norms each head (``ModelConfig.qk_norm``) with the Llama
family's RMSNorms. OLMo 3 adds sliding-window layers (``ModelConfig.layer_windows``) with a rotary
of their own (``ModelConfig.sliding_rope``; the full layers may scale theirs); EXAONE 4's global
layers beside sliding ones attend without a rotary (``ModelConfig.layer_rope``). The projections are
fused (q|k|v, gate|up) as in ``models/llama.py`` and on a GPU go to the same Triton matmuls; the
norms and the rotary stay in torch (the Triton small ops compute the Llama family's forms).
"""

from __future__ import annotations

import torch
from torch import nn

from inferd.attention.base import AttentionBackend, AttentionMetadata
from inferd.config import ModelConfig
from inferd.layers.linear import Linear, route_projections_only
from inferd.layers.norm import RMSNorm
from inferd.layers.rotary import FullAndSlidingRotary, GatheredRotary, RotaryStep
from inferd.models.mlp import MLP, AllReduce, reduced


class OlmoRMSNorm(nn.Module):
    """``(weight * rmsnorm(x))`` in float32, cast back after the product (the Llama family's casts
    before it), as OLMo's checkpoints were trained."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


# Architectures whose RMSNorms are the Llama family's (cast before the weight's product).
_LLAMA_FORM_NORMS = ("Exaone4ForCausalLM",)


def _norm(cfg: ModelConfig, size: int) -> nn.Module:
    if cfg.architecture in _LLAMA_FORM_NORMS:
        return RMSNorm(size, cfg.rms_norm_eps)
    return OlmoRMSNorm(size, cfg.rms_norm_eps)


class OlmoAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.window = cfg.layer_windows[index] if cfg.layer_windows else 0
        # EXAONE 4's global layers beside sliding ones (NoPE) attend unrotated.
        self.rotates = cfg.layer_rope[index] if cfg.layer_rope else True
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        # Each head's q and k normed on its own, or each projection's as a whole.
        self.per_head_norms = cfg.qk_norm
        self.q_norm = _norm(cfg, cfg.head_dim if cfg.qk_norm else self.q_size)
        self.k_norm = _norm(cfg, cfg.head_dim if cfg.qk_norm else self.kv_size)
        self.all_reduce: AllReduce | None = None

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryStep,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.per_head_norms:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
        else:
            q = self.q_norm(q).reshape(-1, self.num_heads, self.head_dim)
            k = self.k_norm(k).reshape(-1, self.num_kv_heads, self.head_dim)
        if not isinstance(rotary, GatheredRotary):  # the Triton rotary is never switched on here
            raise TypeError(f"OLMo and EXAONE rotate in torch, not with {type(rotary).__name__}")
        if self.rotates:
            q, k = rotary.apply(q, k)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        return reduced(self.o_proj(out.reshape(-1, self.q_size)), self.all_reduce)


class OlmoDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn = OlmoAttention(cfg, index)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.post_attention_layernorm = _norm(cfg, cfg.hidden_size)
        self.post_feedforward_layernorm = _norm(cfg, cfg.hidden_size)

    @property
    def sliding(self) -> bool:
        return self.self_attn.window > 0

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryStep,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, rotary, kv_cache, meta, backend))
        return x + self.post_feedforward_layernorm(self.mlp(self.mlp.gate_up_proj(x)))


class OlmoModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(OlmoDecoderLayer(cfg, index) for index in range(cfg.num_layers))
        self.norm = _norm(cfg, cfg.hidden_size)


class OlmoForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = OlmoModel(cfg)
        self.rotaries = FullAndSlidingRotary(cfg.head_dim, max_positions, cfg.rope, cfg.sliding_rope)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.head_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Returns the final hidden states, [num_tokens, hidden]."""
        x = self.model.embed_tokens(input_ids)
        full, sliding = self.rotaries.lookup(positions)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, sliding if layer.sliding else full, kv_cache, meta, backend)
        hidden: torch.Tensor = self.model.norm(x)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(hidden)
        return logits

    def enable_triton_ops(
        self,
        enabled: bool,
        linear: bool = False,
        fused_linear: bool = False,
        tiled_linear: bool = False,
        decode_rotary: bool = False,
        moe: bool = False,
    ) -> None:
        """The projections go to the Triton matmuls as the Llama family's do; the norms and the
        rotary are OLMo's own and stay in torch (``enabled`` has nothing to switch)."""
        family = "EXAONE" if self.config.architecture in _LLAMA_FORM_NORMS else "OLMo"
        route_projections_only(self, family, linear, fused_linear, tiled_linear, decode_rotary)

    def set_all_reduce(self, all_reduce: AllReduce) -> None:
        raise ValueError(
            "tensor parallelism over OLMo and EXAONE 4 is not supported (ModelConfig.sharded refuses it)"
        )
