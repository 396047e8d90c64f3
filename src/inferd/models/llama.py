"""The Llama family decoder (Llama, Mistral, Ministral, Seed-OSS, Qwen2, Qwen3, Phi-3, and the
mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE) over a flat batch and a paged KV cache.

The architectures differ only in switches read from the config: q/k/v biases (Qwen2), per-head
q/k RMSNorm (Qwen3), tied embeddings, rope scaling (Llama 3.1/3.2), and routed experts in place of
the MLP (``models/moe.py``). Projections are fused (q|k|v and gate|up) so each layer does two
matmuls fewer; the loader splits checkpoint shards in.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from inferd.attention.base import AttentionBackend, AttentionMetadata
from inferd.attention.triton_backend import TritonAttentionBackend
from inferd.config import ModelConfig
from inferd.layers.activation import SiluAndMul
from inferd.layers.linear import Linear, route_projections
from inferd.layers.norm import RMSNorm
from inferd.layers.rotary import RotaryEmbedding, RotaryStep, TritonRotary, qk_norm_weights
from inferd.models.mlp import MLP, AllReduce, reduced
from inferd.models.moe import Experts, SparseMoE


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        # A sliding-window layer's window (0: it sees the whole context).
        self.window = cfg.layer_windows[index] if cfg.layer_windows else 0
        # A NoPE layer (SmolLM3's) attends without rotating its queries and keys.
        self.rotates = cfg.layer_rope[index] if cfg.layer_rope else True
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.granite.attention_multiplier if cfg.granite is not None else cfg.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # Under tensor parallelism: sums the ranks' partial outputs (see set_all_reduce).
        self.all_reduce: AllReduce | None = None

    def forward(
        self,
        qkv: torch.Tensor,
        rotary: RotaryStep,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """Attention from the output of ``qkv_proj``, which the layer runs (with its norm)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.q_norm is not None and self.k_norm is not None else None
        if not self.rotates:
            if norms is not None:
                q, k = norms[0](q), norms[1](k)
            out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        elif isinstance(rotary, TritonRotary) and rotary.in_decode_attention and meta.is_pure_decode:
            # The decode attention kernel rotates, stores the new K/V and attends: one launch.
            if not isinstance(backend, TritonAttentionBackend):
                raise TypeError(
                    f"rotary in decode attention needs the triton attention backend, not {backend.name}"
                )
            out = backend.rotate_store_attend(
                q, k, v, rotary, qk_norm_weights(norms), *kv_cache, meta, self.scale, self.window
            )  # fmt: skip
        elif isinstance(rotary, TritonRotary):
            # One kernel rotates and stores the new K/V; attention then reads them from the cache.
            q = rotary.rotate_and_store(q, k, v, kv_cache, meta.slot_mapping, norms)
            out = backend.attend(q, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        else:
            q, k = rotary.apply_normed(q, k, *norms) if norms is not None else rotary.apply(q, k)
            out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        return reduced(self.o_proj(out.reshape(-1, self.q_size)), self.all_reduce)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, index)
        self.mlp: MLP | SparseMoE
        if cfg.moe is not None and index in cfg.moe.sparse_layers:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Granite scales the attention and MLP outputs before they join the residual stream.
        self.residual_multiplier = cfg.granite.residual_multiplier if cfg.granite is not None else 1.0

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: RotaryStep,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes and returns the residual stream apart from the layer's last output, so each
        add fuses into the norm after it, and the norm into the projection after that where the
        projection can (``Linear.forward_normed``; ``residual`` is None before the first layer)."""
        qkv, residual = self.self_attn.qkv_proj.forward_normed(x, residual, self.input_layernorm)
        x = self._scaled(self.self_attn(qkv, rotary, kv_cache, meta, backend))
        if isinstance(self.mlp, SparseMoE):
            # The router and every expert read the same normed input.
            hidden, residual = self.post_attention_layernorm(x, residual)
            return self._scaled(self.mlp(hidden)), residual
        gate_up, residual = self.mlp.gate_up_proj.forward_normed(x, residual, self.post_attention_layernorm)
        return self._scaled(self.mlp(gate_up)), residual

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.residual_multiplier == 1.0 else out * self.residual_multiplier


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, index) for index in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Also serves the Mistral, Ministral, Seed-OSS, Qwen2, Qwen3, Phi-3, SmolLM3, Granite, Mixtral,
    Qwen2-MoE and Qwen3-MoE architectures, and their sequence classifiers
    (``config._CLASSIFIER_ARCHITECTURES``), whose head (``score``, one output per label) is held as
    ``lm_head``."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.head_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        scales = cfg.granite
        self.embedding_multiplier = scales.embedding_multiplier if scales is not None else 1.0
        self.logits_scaling = scales.logits_scaling if scales is not None else 1.0

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
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        residual: torch.Tensor | None = None
        rotary = self.rotary.lookup(positions)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rotary, kv_cache, meta, backend)
        if residual is None:  # a model without layers
            return self.model.norm(x)
        hidden, _ = self.model.norm(x, residual)
        return hidden

    def enable_triton_ops(
        self,
        enabled: bool,
        linear: bool = False,
        fused_linear: bool = False,
        tiled_linear: bool = False,
        decode_rotary: bool = False,
        moe: bool = False,
    ) -> None:
        """Switch every RMSNorm (with its residual add), the rotary embedding and SiLU-and-mul
        to the Triton kernels of ``layers/triton_ops.py``, or back to torch; with ``linear``, the
        layers' projections of few-row inputs to ``layers/triton_linear.py``, and with
        ``fused_linear`` too, those projections make their inputs (norm, SiLU-and-mul) on load;
        with ``tiled_linear``, wide projections of up to 256 rows to
        ``layers/triton_tiled_linear.py``; with ``decode_rotary``, a pure decode step's attention
        kernel does the rotary, the q/k norms and the KV store itself (it needs the Triton
        attention backend); with ``moe``, routed experts run on ``layers/triton_moe.py``. Off by
        default."""
        if fused_linear and not linear:
            raise ValueError("fused_linear fuses ops into the Triton matmul, which needs linear")
        if decode_rotary and not enabled:
            raise ValueError("decode_rotary moves the Triton rotary into decode attention: it needs enabled")
        # Fails here, not in the middle of the first forward, where triton is missing.
        if enabled:
            importlib.import_module("inferd.layers.triton_ops")
        if moe:
            importlib.import_module("inferd.layers.triton_moe")
        route_projections(self, linear, tiled_linear, fused_linear)
        for module in self.modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding, SiluAndMul)):
                module.use_triton = enabled
                if isinstance(module, RotaryEmbedding):
                    module.in_decode_attention = decode_rotary
            elif isinstance(module, Experts):
                if moe and module.weight_blocks:
                    raise ValueError(
                        "triton_moe's grouped matmul does not read low-bit experts; leave it off"
                    )
                module.use_triton = moe

    def set_all_reduce(self, all_reduce: AllReduce) -> None:
        """Run as one rank of a tensor-parallel group: the attention and MLP output projections
        hold this rank's columns, so their outputs are summed over the ranks in place (a mixture
        of experts sums its routed and shared experts' parts together, once)."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.all_reduce = all_reduce
            layer.mlp.all_reduce = all_reduce

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype: the sampler widens them to float32 only on the paths that
        compute with them (a greedy argmax and the fused race read them as they are)."""
        logits: torch.Tensor = self.lm_head(hidden)
        return logits if self.logits_scaling == 1.0 else logits / self.logits_scaling
