"""Gemma's text decoders (``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``)
over a flat batch and a paged KV cache.

What they compute beyond the Llama family: embeddings scaled by sqrt(hidden); RMSNorms that scale
by ``1 + weight`` in float32; a GELU (tanh) gated MLP. Gemma 2 and 3 add: four norms to a layer
(after attention and after the MLP as well as before them); an attention scale of
``query_pre_attn_scalar ** -0.5``; sliding-window layers between full-attention ones
(``ModelConfig.layer_windows``); attention scores and logits capped by ``tanh`` (Gemma 2's caps;
Gemma 3's configs set none). Gemma 3 adds q/k norms and a rotary of the sliding layers' own. The
settings are ``config.GemmaConfig``'s. The projections are fused (q|k|v, gate|up) as in
``models/llama.py``, and on a GPU go to the same Triton matmuls; the norms, rotary and activation
stay in torch (the Triton small ops compute the Llama family's forms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.attention.base import AttentionBackend, AttentionMetadata
from inferd.config import GemmaConfig, ModelConfig
from inferd.layers.linear import Linear, route_projections_only
from inferd.layers.rotary import FullAndSlidingRotary, GatheredRotary, RotaryStep
from inferd.models.mlp import AllReduce, reduced


class GemmaRMSNorm(nn.Module):
    """``x / rms(x) * (1 + weight)``, computed in float32 and cast back, as Gemma's checkpoints
    are trained (their weights are stored as offsets from 1)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, gemma: GemmaConfig, index: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = gemma.query_pre_attn_scalar**-0.5
        self.window = cfg.layer_windows[index] if cfg.layer_windows else 0
        self.softcap = gemma.attn_logit_softcapping or 0.0
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
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
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if not isinstance(rotary, GatheredRotary):  # the Triton rotary is never switched on here
            raise TypeError(f"Gemma rotates in torch, not with {type(rotary).__name__}")
        q, k = rotary.apply(q, k)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window, self.softcap)
        return reduced(self.o_proj(out.reshape(-1, self.q_size)), self.all_reduce)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.all_reduce: AllReduce | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return reduced(self.down_proj(F.gelu(gate, approximate="tanh") * up), self.all_reduce)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, gemma: GemmaConfig, index: int) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(cfg, gemma, index)
        self.mlp = GemmaMLP(cfg)
        size, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        # Gemma 1's post_attention_layernorm is the MLP's input norm (as the Llama family's is);
        # Gemma 2 and 3 norm the attention's output with it and have two more around the MLP.
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.sandwich_norms = gemma.sandwich_norms
        if gemma.sandwich_norms:
            self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

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
        attended = self.self_attn(self.input_layernorm(x), rotary, kv_cache, meta, backend)
        if not self.sandwich_norms:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, gemma: GemmaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, gemma, index) for index in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GemmaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        if cfg.gemma is None:
            raise ValueError("GemmaForCausalLM needs the config's Gemma settings")
        self.config = cfg
        self.model = GemmaModel(cfg, cfg.gemma)
        self.rotaries = FullAndSlidingRotary(cfg.head_dim, max_positions, cfg.rope, cfg.sliding_rope)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.head_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # A classifier's head (in the LM head's place) gives its label logits uncapped, as
        # transformers' Gemma classifiers read them; only the LM's vocabulary logits are capped.
        self.softcap = None if cfg.labels else cfg.gemma.final_logit_softcapping
        # sqrt(hidden) rounded to the model's dtype, as the checkpoints were trained with it; a
        # Python number, so a step makes no host-to-device copy (CUDA graphs allow none).
        self.embed_scale = float(torch.tensor(cfg.hidden_size**0.5, dtype=torch.get_default_dtype()))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Returns the final hidden states, [num_tokens, hidden]."""
        x = self.model.embed_tokens(input_ids) * self.embed_scale
        full, sliding = self.rotaries.lookup(positions)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, sliding if layer.sliding else full, kv_cache, meta, backend)
        hidden: torch.Tensor = self.model.norm(x)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits.float() / self.softcap) * self.softcap
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
        """The projections go to the Triton matmuls as the Llama family's do; the norms, rotary
        and activation are Gemma's own and stay in torch (``enabled`` has nothing to switch)."""
        route_projections_only(self, "Gemma", linear, fused_linear, tiled_linear, decode_rotary)

    def set_all_reduce(self, all_reduce: AllReduce) -> None:
        for layer in self.model.layers:
            assert isinstance(layer, GemmaDecoderLayer)
            layer.self_attn.all_reduce = all_reduce
            layer.mlp.all_reduce = all_reduce
