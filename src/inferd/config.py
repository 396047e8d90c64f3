"""Frozen configuration objects. Derived values (e.g. the number of KV blocks) come back as new objects."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inferd.attention.registry import resolve_backend_name
from inferd.quant_config import QuantScheme, read_quantization

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


# What each speed feature becomes on a GPU when its engine option is left unset (None), as H200
# runs measured them (BENCHMARKS.md). A device call's figures switch an entry ("Then the
# defaults" in docs/gpu.md); a feature on by default here still stays off where its kernels' needs are not met
# (``EngineConfig.uses_*``), while asking for it explicitly there is an error.
GPU_DEFAULTS: dict[str, bool] = {
    "triton_fused_linear": False,
    "triton_tiled_linear": False,
    "triton_decode_rotary": False,
    "triton_sampling": True,
    "triton_pdl": True,
    "triton_moe": False,
    "triton_penalties": False,
}
# Features off above because no GPU run has measured them yet (not because one measured no gain).
GPU_NOT_YET_MEASURED = frozenset({"triton_moe", "triton_penalties"})
# The kernel that draws the fused sampler's rows unless ``fused_sampler`` names another
# (sample/sampler.py's FUSED_KERNELS): the race is the one H200 runs measured; "inverse_cdf"
# takes its place here once its variant of benchmarks/gpu.py (inverse_cdf_sampler) beats it.
DEFAULT_FUSED_SAMPLER = "race"


class ModelLoadError(RuntimeError):
    """A model folder cannot be served; the message names what is missing or unsupported."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A model folder's JSON file (config, tokenizer config, weight index) as a dict; anything
    else is a ModelLoadError that names the file, not a decoder's or a lookup's traceback."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ModelLoadError(f"{path} is nested too deeply to read") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not a {type(raw).__name__}")
    return raw


def option_object(value: Any, option: str) -> dict[str, Any]:
    """An engine option that is a JSON object: a mapping, or its JSON text (a CLI flag's)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{option} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object")
    return value


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of float32, bfloat16, float16") from None


# Rotary scalings the engine computes (`layers/rotary.py`), with the parameters Hugging Face gives them.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    # linear, llama3 and yarn: how much longer the context is than the pretrained one.
    factor: float = 1.0
    # llama3: the wavelength band blended between scaled and kept.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn: the ramp between interpolated and extrapolated frequencies, and the cos/sin scale
    # (given, or derived from the factor and mscale / mscale_all_dim).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts model's routed MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE): each token goes
    to ``top_k`` of ``num_experts`` SiLU-gated experts, weighted by the router's softmax."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    # Scale the chosen experts' weights to sum to 1 (Mixtral always; Qwen by ``norm_topk_prob``).
    normalize_top_k: bool
    # Qwen2-MoE: a dense expert every token takes, weighted by a sigmoid gate of its own (0: none).
    shared_expert_intermediate_size: int
    # The layers whose MLP is routed; the others keep the dense MLP of ``intermediate_size``.
    sparse_layers: frozenset[int]

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], architecture: str, num_layers: int) -> MoEConfig | None:
        """None for a dense model. Hugging Face names the expert count ``num_local_experts``
        (Mixtral, and Qwen3-MoE as transformers 5 saves it) or ``num_experts`` (Qwen's own)."""
        if architecture not in _MOE_ARCHITECTURES:
            return None
        num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        if num_experts == 0 and architecture != "MixtralForCausalLM":
            return None  # Qwen's configs build every layer dense without experts
        top_k = int(cfg["num_experts_per_tok"])
        if architecture == "MixtralForCausalLM":
            every_layer = frozenset(range(num_layers))
            return cls(num_experts, top_k, int(cfg["intermediate_size"]), True, 0, every_layer)
        # Qwen's rule (as transformers builds the layers): routed unless listed as dense, every
        # ``decoder_sparse_step``-th layer.
        dense = {int(i) for i in cfg.get("mlp_only_layers") or []}
        step = int(cfg.get("decoder_sparse_step") or 1)
        sparse = frozenset(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
        if not sparse:
            return None  # every layer dense: no mixture of experts to run
        return cls(
            num_experts=num_experts,
            top_k=top_k,
            expert_intermediate_size=int(cfg["moe_intermediate_size"]),
            normalize_top_k=bool(cfg.get("norm_topk_prob", False)),
            # Only Qwen2-MoE has a shared expert (transformers ignores the field elsewhere).
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
            if architecture == "Qwen2MoeForCausalLM"
            else 0,
            sparse_layers=sparse,
        )

    def check_consistent(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"a mixture of experts needs at least one expert, not {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) must be between 1 and the {self.num_experts} experts"
            )
        if self.expert_intermediate_size < 1 or self.shared_expert_intermediate_size < 0:
            raise ValueError("the experts' intermediate sizes must be positive")


_MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


@dataclass(frozen=True)
class GraniteScales:
    """What Granite computes beyond Llama: embeddings times ``embedding_multiplier``, each
    attention and MLP output times ``residual_multiplier`` before it joins the residual stream,
    ``attention_multiplier`` as the attention scale (not the head size's), and logits divided by
    ``logits_scaling``."""

    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> GraniteScales:
        names = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
        scales = {name: float(cfg.get(name, 1.0)) for name in names}
        if scales["logits_scaling"] == 0:
            raise ValueError("logits_scaling must not be 0")
        return cls(**scales)


# Sequence classifiers served: their causal LM's architecture, with the classifier's head.
# (Gemma3ForSequenceClassification is the multimodal model's, whose text model sits elsewhere.)
_CLASSIFIER_ARCHITECTURES = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
    "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
    "Phi3ForSequenceClassification": "Phi3ForCausalLM",
    "SmolLM3ForSequenceClassification": "SmolLM3ForCausalLM",
    "GemmaForSequenceClassification": "GemmaForCausalLM",
    "Gemma2ForSequenceClassification": "Gemma2ForCausalLM",
    "Gemma3TextForSequenceClassification": "Gemma3ForCausalLM",
    "MixtralForSequenceClassification": "MixtralForCausalLM",
    "Qwen2MoeForSequenceClassification": "Qwen2MoeForCausalLM",
    "Qwen3MoeForSequenceClassification": "Qwen3MoeForCausalLM",
}


def _labels(cfg: dict[str, Any]) -> tuple[str, ...]:
    """A classifier's label names by index, from ``id2label`` (``LABEL_<i>`` for each of
    ``num_labels``, two by default, where the config has none, as transformers reads it)."""
    count = cfg.get("num_labels", 2)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"num_labels must be a positive integer, got {count!r}")
    id2label = cfg.get("id2label") or {str(i): f"LABEL_{i}" for i in range(count)}
    if not isinstance(id2label, dict):
        raise ValueError("id2label must be an object of label names by index")
    try:
        by_index = {int(index): str(name) for index, name in id2label.items()}
    except ValueError:
        raise ValueError(f"id2label's keys must be indices, got {sorted(id2label)[:5]}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"id2label must name every label from 0 to {len(by_index) - 1}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _matryoshka(cfg: dict[str, Any]) -> tuple[int, ...] | None:
    """The embedding widths a model was trained for besides its own (vLLM's reading of
    ``matryoshka_dimensions`` and ``is_matryoshka``); None: none."""
    widths = cfg.get("matryoshka_dimensions")
    if widths is not None:
        if not isinstance(widths, list) or not all(
            isinstance(width, int) and not isinstance(width, bool) and width > 0 for width in widths
        ):
            raise ValueError(f"matryoshka_dimensions must be a list of positive widths, got {widths!r}")
        return tuple(widths)
    return () if cfg.get("is_matryoshka") is True else None


@dataclass(frozen=True)
class HeadFromTokens:
    """vLLM's ``classifier_from_token``: a classifier whose head is made at load from its causal
    LM's head, the rows of some tokens (LLMs trained to rerank by answering "yes" or "no", such as
    Qwen3-Reranker, served through ``hf_overrides`` as a ``*ForSequenceClassification``).

    ``two_way`` (``method`` "from_2_way_softmax", or Qwen's ``is_original_qwen3_reranker``): one
    label whose logit is ``logit(tokens[1]) - logit(tokens[0])``, so its sigmoid is the softmax of
    the second token over the two. Otherwise ("no_post_processing") a label for each token, its
    logit the token's. ``tied``: the LM's head is its embeddings (read from them)."""

    tokens: tuple[str, ...]
    two_way: bool
    tied: bool
    # vLLM's ``use_pad_token``: whether a scored pair is joined by the tokenizer's pair template, as
    # a cross-encoder's is; off (the default for an LLM reranker): the two texts are read as one.
    use_pad_token: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        return self.tokens[1:] if self.two_way else self.tokens

    @classmethod
    def from_hf_config(
        cls, cfg: dict[str, Any], architecture: str, classifier: bool, tied: bool
    ) -> HeadFromTokens | None:
        tokens = cfg.get("classifier_from_token")
        if tokens is None:
            if classifier and cfg.get("method") in ("from_2_way_softmax", "no_post_processing"):
                raise ValueError(f"method {cfg['method']} makes a head from tokens: it needs "
                                 f"classifier_from_token")  # fmt: skip
            return None
        if not classifier:
            served = ", ".join(_CLASSIFIER_ARCHITECTURES)
            raise ValueError(f"classifier_from_token makes a classifier's head from the LM head: the "
                             f"architecture must be one of the served classifiers ({served}), not "
                             f"{architecture!r}")  # fmt: skip
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise ValueError("classifier_from_token must be a non-empty list of token strings")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"classifier_from_token names a token twice: {tokens}")
        use_pad_token = cfg.get("use_pad_token", False)
        if not isinstance(use_pad_token, bool):
            raise ValueError(f"use_pad_token must be true or false, got {use_pad_token!r}")
        # Qwen's flag for its rerankers, which vLLM reads as the two-way method.
        qwen3_reranker = cfg.get("is_original_qwen3_reranker")
        method = cfg.get("method") or ("from_2_way_softmax" if qwen3_reranker else None)
        if method not in ("from_2_way_softmax", "no_post_processing"):
            raise ValueError(f"classifier_from_token's method must be from_2_way_softmax or "
                             f"no_post_processing, got {method!r}")  # fmt: skip
        if method == "from_2_way_softmax" and len(tokens) != 2:
            raise ValueError(f"method from_2_way_softmax takes two tokens (false, true), got {len(tokens)}")
        return cls(tuple(tokens), method == "from_2_way_softmax", tied, use_pad_token)


_GEMMA_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# The decoders of models/olmo.py: norms after attention and the MLP instead of before them.
_POST_NORM_ARCHITECTURES = ("Olmo2ForCausalLM", "Olmo3ForCausalLM", "Exaone4ForCausalLM")


def _rope_by_layer_type(
    cfg: dict[str, Any], default_theta: float, sliding_theta: float
) -> tuple[RopeConfig, RopeConfig]:
    """The full-attention and the sliding layers' rotaries of a model that gives each kind its
    own (Gemma 3, OLMo 3): transformers 5 nests them by layer type in ``rope_parameters``; older
    configs give the full layers' as ``rope_theta`` and ``rope_scaling`` (``default_theta`` where
    the config has none), the sliding layers' plain, at ``sliding_theta``."""
    nested = cfg.get("rope_parameters") or {}
    if "full_attention" in nested:
        full_fields = {"rope_theta": default_theta, **nested["full_attention"]}
        full = _parse_rope({**cfg, "rope_parameters": full_fields, "rope_scaling": None})
    else:
        full = _parse_rope({**cfg, "rope_theta": cfg.get("rope_theta", default_theta)})
    sliding = nested.get("sliding_attention") or {"rope_type": "default", "rope_theta": sliding_theta}
    return full, _parse_rope({**cfg, "rope_parameters": sliding, "rope_scaling": None})


@dataclass(frozen=True)
class GemmaConfig:
    """What Gemma's decoders (1, 2 and 3) compute beyond the Llama family's: the attention scale
    from ``query_pre_attn_scalar`` (Gemma 1: the head size's), optional caps on the
    attention scores and the logits (``tanh(x / c) * c``; Gemma 2's, and Gemma 3's if its config
    sets them) and whether each layer also norms the outputs of its attention and MLP
    (``sandwich_norms``: Gemma 2 and 3)."""

    query_pre_attn_scalar: float
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None = None
    sandwich_norms: bool = True

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], architecture: str, head_dim: int) -> GemmaConfig:
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention is not supported: attention here is causal")

        def cap(key: str, default: float | None) -> float | None:
            value = cfg.get(key, default)
            if value is not None and float(value) <= 0:
                raise ValueError(f"{key} must be positive, got {value}")
            return None if value is None else float(value)

        if architecture == "GemmaForCausalLM":
            return cls(float(head_dim), None, sandwich_norms=False)
        if architecture == "Gemma2ForCausalLM":  # transformers' defaults where the config is silent
            return cls(
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
                final_logit_softcapping=cap("final_logit_softcapping", 30.0),
                attn_logit_softcapping=cap("attn_logit_softcapping", 50.0),
            )
        return cls(
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            final_logit_softcapping=cap("final_logit_softcapping", None),
            attn_logit_softcapping=cap("attn_logit_softcapping", None),
        )


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the engine needs, read from a Hugging Face `config.json`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Biases on q/k/v (``o_proj_bias``: on o_proj; Qwen2 biases q/k/v only).
    attention_bias: bool
    qk_norm: bool
    torch_dtype: str
    moe: MoEConfig | None = None
    # Each layer's attention window (0: the whole context; ``sliding_window`` in its sliding
    # layers); empty: every layer 0.
    layer_windows: tuple[int, ...] = ()
    # Gemma's own settings (models/gemma.py); None for the other architectures.
    gemma: GemmaConfig | None = None
    # The sliding-window layers' own rotary (Gemma 3's, OLMo 3's); None: theirs is ``rope``.
    sliding_rope: RopeConfig | None = None
    # A bias on o_proj (``attention_bias`` in config.json, where the architecture reads it so).
    o_proj_bias: bool = False
    # Granite's scales (models/llama.py); None for the other architectures.
    granite: GraniteScales | None = None
    # Whether each layer rotates its queries and keys (SmolLM3's NoPE layers do not); empty: all.
    layer_rope: tuple[bool, ...] = ()
    # How the checkpoint stores low-bit weights (``quantization_config``); None: it does not.
    quant: QuantScheme | None = None
    # A sequence classifier's label names (``id2label``), in the order of its head's outputs: the
    # model's ``*ForSequenceClassification`` head (``score``) takes the LM head's place, and every
    # request pools its prompt (``SamplingParams.embed``) into label logits. Empty: a causal LM.
    labels: tuple[str, ...] = ()
    # A classifier whose head is made from its LM head's rows of some tokens; None: it has its own.
    head_from_tokens: HeadFromTokens | None = None
    # Trained for shorter embeddings (``engine/matryoshka.py``): the widths it names, empty for any
    # width; None: only its own.
    matryoshka: tuple[int, ...] | None = None

    @property
    def head_size(self) -> int:
        """The width of the model's output head: its labels for a classifier, else the vocabulary."""
        return len(self.labels) or self.vocab_size

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        architecture = archs[0] if archs else ""
        # A classifier is its causal LM's architecture with another head.
        classifier = architecture in _CLASSIFIER_ARCHITECTURES
        architecture = _CLASSIFIER_ARCHITECTURES.get(architecture, architecture)
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        if num_heads < 1:
            raise ValueError(f"num_attention_heads ({num_heads}) must be at least 1")
        if not cfg.get("head_dim") and hidden % num_heads:
            raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads "
                             f"({num_heads}) when head_dim is not given")  # fmt: skip
        # Every architecture served computes with SiLU, Gemma with GELU-tanh (and all rotate whole
        # heads, `_parse_rope`): a config that asks otherwise would run, wrongly, without a word.
        gemma = architecture in _GEMMA_ARCHITECTURES
        activation = _activation(cfg, architecture)
        computed = ("gelu_pytorch_tanh",) if gemma else ("silu", "swish")
        if activation not in computed:
            raise ValueError(
                f"hidden_act {activation!r} is not supported; the engine computes {computed[0]} here"
            )
        # Gemma's hub configs leave it out: transformers ties its embeddings by default.
        tied = bool(cfg.get("tie_word_embeddings", gemma or architecture == "SmolLM3ForCausalLM"))
        head_from_tokens = HeadFromTokens.from_hf_config(cfg, archs[0] if archs else "", classifier, tied)
        sliding_rope: RopeConfig | None = None
        if architecture == "Gemma3ForCausalLM":  # transformers' default bases for it
            local_theta = cfg.get("rope_local_base_freq", 10_000.0)
            rope, sliding_rope = _rope_by_layer_type(cfg, 1_000_000.0, local_theta)
        elif architecture == "Olmo3ForCausalLM":
            rope, sliding_rope = _rope_by_layer_type(cfg, 500_000.0, cfg.get("rope_theta", 500_000.0))
        elif architecture == "SmolLM3ForCausalLM":  # transformers' default base for it
            rope = _parse_rope({"rope_theta": 2_000_000.0, **cfg})
        else:
            rope = _parse_rope(cfg)
        if architecture == "Phi3ForCausalLM" and rope.rope_type != "default":
            # transformers reads any Phi-3 scaling as LongRoPE (its long and short factors), which
            # the engine does not compute.
            raise ValueError(
                f"Phi-3's rope scaling ({rope.rope_type}) is not supported: LongRoPE is not built"
            )
        head_dim = cfg.get("head_dim") or hidden // num_heads
        # Mistral, Gemma 2 and 3 and OLMo 3 slide over 4,096 tokens unless their config says
        # otherwise (as transformers reads a config without the key).
        sliding_by_default = (
            "MistralForCausalLM",
            "MinistralForCausalLM",
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Olmo3ForCausalLM",
            "Exaone4ForCausalLM",
        )
        default_window = 4096 if architecture in sliding_by_default else None
        # OLMo 2 has no sliding layers: transformers reads no window for it.
        sliding = None if architecture == "Olmo2ForCausalLM" else cfg.get("sliding_window", default_window)
        # Qwen's configs carry a window that applies only with use_sliding_window (as transformers
        # reads them).
        gated = ("Qwen2", "Qwen3", "SmolLM3")  # SmolLM3's the same way, on its NoPE layers only
        if architecture.startswith(gated) and not cfg.get("use_sliding_window", False):
            sliding = None
        windows = _layer_windows(cfg, architecture, int(cfg["num_hidden_layers"]), sliding)
        config = cls(
            architecture=architecture,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            # A classifier's head is its own (``score``), never the embeddings.
            tie_word_embeddings=not classifier and tied,
            attention_bias=_attention_bias(cfg, architecture),
            o_proj_bias=_o_proj_bias(cfg, architecture),
            qk_norm=architecture.startswith(("Qwen3", "Gemma3", "Exaone4")),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            moe=MoEConfig.from_hf_config(cfg, architecture, int(cfg["num_hidden_layers"])),
            layer_windows=windows,
            layer_rope=_layer_rope(cfg, architecture, int(cfg["num_hidden_layers"]), windows),
            gemma=GemmaConfig.from_hf_config(cfg, architecture, int(head_dim)) if gemma else None,
            sliding_rope=sliding_rope if sliding_rope != rope else None,
            granite=GraniteScales.from_hf_config(cfg) if architecture == "GraniteForCausalLM" else None,
            quant=read_quantization(cfg),
            labels=(head_from_tokens.labels if head_from_tokens else _labels(cfg)) if classifier else (),
            head_from_tokens=head_from_tokens,
            matryoshka=_matryoshka(cfg),
        )
        config.check_consistent()
        return config

    def check_consistent(self) -> None:
        """Shapes a model can be built from, named by their config.json fields (ValueError): a
        zero size or a KV head count that does not divide the heads would otherwise surface as a
        tensor shape error at load, or as a failure of every request once serving."""
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                 "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
                 "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim}  # fmt: skip
        small = [f"{name} ({value})" for name, value in sizes.items() if value < 1]
        if small:
            raise ValueError(f"{', '.join(small)} must be at least 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads ({self.num_kv_heads}) must divide num_attention_heads "
                             f"({self.num_heads})")  # fmt: skip
        if self.moe is not None:
            self.moe.check_consistent()

    @classmethod
    def from_folder(cls, path: Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """The model of ``path``'s config.json, whose top-level fields ``overrides`` replaces
        (vLLM's ``hf_overrides``)."""
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"model folder {path} has no config.json")
        raw = {**read_json_object(config_path), **(overrides or {})}
        architectures = raw.get("architectures")
        if architectures is not None and not (
            isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)
        ):
            raise ModelLoadError(f"{config_path}: 'architectures' must be a list of names")
        # A missing or malformed field would otherwise surface as a bare KeyError or ValueError
        # (a traceback from the CLI), without the file's name.
        try:
            return cls.from_hf_config(raw)
        except KeyError as exc:
            raise ModelLoadError(f"{config_path} has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            where = f"{config_path} (with hf_overrides)" if overrides else str(config_path)
            raise ModelLoadError(f"{where} has a field the engine cannot read: {exc}") from None

    @property
    def has_dense_mlp(self) -> bool:
        """Whether some layer keeps the dense MLP of ``intermediate_size`` (not every layer routed)."""
        return self.moe is None or len(self.moe.sparse_layers) < self.num_layers

    def sharded(self, size: int) -> ModelConfig:
        """The per-rank shape under tensor parallelism over ``size`` ranks: heads and MLP width
        divided, each expert's too (see ``worker/tensor_parallel.py``)."""
        if size == 1:
            return self
        if self.architecture in _POST_NORM_ARCHITECTURES:
            raise ValueError("tensor parallelism over OLMo and EXAONE 4 is not supported (OLMo's q and k "
                             "norms each span every head, and a rank holds only its own)")  # fmt: skip
        if self.quant is not None and not self.quant.splits_over_ranks:
            raise ValueError("tensor parallelism over GPTQ weights in activation order (desc_act) is not "
                             "supported: their reordered input columns follow no rank's share")  # fmt: skip
        sizes = [("attention heads", self.num_heads), ("KV heads", self.num_kv_heads)]
        if self.has_dense_mlp:
            sizes.append(("intermediate size", self.intermediate_size))
        if self.moe is not None:
            sizes.append(("experts' intermediate size", self.moe.expert_intermediate_size))
            sizes.append(("shared expert's intermediate size", self.moe.shared_expert_intermediate_size))
        for name, value in sizes:
            if value % size:
                raise ValueError(f"tensor_parallel_size {size} does not divide the model's {name} ({value})")
        if self.quant is not None:
            self._check_whole_blocks(size, self.quant)
        moe = self.moe and dataclasses.replace(
            self.moe,
            expert_intermediate_size=self.moe.expert_intermediate_size // size,
            shared_expert_intermediate_size=self.moe.shared_expert_intermediate_size // size,
        )
        return dataclasses.replace(
            self,
            num_heads=self.num_heads // size,
            num_kv_heads=self.num_kv_heads // size,
            intermediate_size=self.intermediate_size // size,
            moe=moe,
        )

    def _check_whole_blocks(self, size: int, quant: QuantScheme) -> None:
        """Each rank's share of a split projection must be whole blocks of the checkpoint's scales
        and whole int32 words of its packed values and zero points: rows of q, k, v, gate and up
        (and of each expert's), columns of o_proj and down."""
        rows, columns = quant.block or (1, 1)
        rows = math.lcm(rows, quant.rows_per_zero_point_word)
        columns = math.lcm(columns, quant.values_per_word)
        moe = self.moe
        intermediates = [self.intermediate_size] if self.has_dense_mlp else []
        if moe is not None:
            intermediates += [moe.expert_intermediate_size, moe.shared_expert_intermediate_size]
        split = [(self.num_heads * self.head_dim, rows, "query rows"),
                 (self.num_kv_heads * self.head_dim, rows, "key and value rows"),
                 (self.num_heads * self.head_dim, columns, "o_proj's input columns")]  # fmt: skip
        for value in filter(None, intermediates):
            split += [(value, rows, "gate and up rows"), (value, columns, "down_proj's input columns")]
        for whole, unit, what in split:
            if (whole // size) % unit:
                raise ValueError(f"tensor_parallel_size {size} gives each rank {whole // size} {what}, not "
                                 f"whole blocks of {unit} of the checkpoint's scales or packed "
                                 f"words")  # fmt: skip

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


def _layer_windows(cfg: dict[str, Any], architecture: str, num_layers: int, sliding: Any) -> tuple[int, ...]:
    """Each layer's attention window, as transformers builds the layers: Gemma 2's, Gemma 3's,
    SmolLM3's, Qwen's and OLMo 3's as their ``layer_types`` say, or else by their own rules (every
    ``sliding_window_pattern``-th layer full, the NoPE layers, from ``max_window_layers`` on,
    every fourth layer full), the others all or none."""
    if not sliding:
        return ()
    window = int(sliding)
    if window < 1:
        raise ValueError(f"sliding_window must be at least 1, got {window}")
    # The config's own layer list, where it names every layer (transformers 5 writes one).
    types = cfg.get("layer_types")
    declared = None
    if isinstance(types, list) and len(types) == num_layers:
        declared = [kind == "sliding_attention" for kind in types]
    slides: list[bool]
    if architecture == "Qwen3MoeForCausalLM":
        slides = [True] * num_layers  # its layers all slide (transformers has no layer rule for it)
    elif declared is not None and architecture.startswith(
        ("Gemma2", "Gemma3", "SmolLM3", "Qwen2", "Qwen3", "Olmo3", "Ministral", "Exaone4")
    ):
        slides = declared
    elif architecture == "Olmo3ForCausalLM":  # every fourth layer full, as transformers fills it in
        slides = [bool((i + 1) % 4) for i in range(num_layers)]
    elif architecture == "Exaone4ForCausalLM":
        slides = _exaone_pattern(cfg.get("sliding_window_pattern", 4), num_layers)
    elif architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        # Older configs: every sliding_window_pattern-th layer full, the others sliding (Gemma 2:
        # every other layer, from the first).
        pattern = int(cfg.get("sliding_window_pattern", 2 if architecture == "Gemma2ForCausalLM" else 6))
        slides = [bool((i + 1) % pattern) for i in range(num_layers)]
    elif architecture == "SmolLM3ForCausalLM":  # its NoPE layers slide
        slides = [not rotates for rotates in _layer_rope(cfg, architecture, num_layers)]
    elif architecture.startswith(("Qwen2", "Qwen3")):
        first = int(cfg.get("max_window_layers", 28))  # transformers' default
        if architecture == "Qwen2MoeForCausalLM":  # every other layer, below max_window_layers
            slides = [bool((i + 1) % 2) and i < first for i in range(num_layers)]
        else:
            slides = [i >= first for i in range(num_layers)]
    else:
        slides = [True] * num_layers
    return tuple(window if slide else 0 for slide in slides)


def _exaone_pattern(pattern: Any, num_layers: int) -> list[bool]:
    """Which layers slide, by EXAONE 4's ``sliding_window_pattern``: a number n (every n-th layer
    full, as transformers fills layer_types in), or its hub configs' letters ("LLLG": local, local,
    local, global, repeated)."""
    if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:
        return [pattern[i % len(pattern)] == "L" for i in range(num_layers)]
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ValueError(
            f"sliding_window_pattern must be a positive number or letters L and G, got {pattern!r}"
        )
    return [bool((i + 1) % pattern) for i in range(num_layers)]


def _layer_rope(
    cfg: dict[str, Any], architecture: str, num_layers: int, windows: tuple[int, ...] = ()
) -> tuple[bool, ...]:
    """SmolLM3's ``no_rope_layers`` (1: the layer rotates), or every ``no_rope_layer_interval``-th
    layer without, as transformers builds them; EXAONE 4's global layers beside sliding ones
    (``windows``) attend without it; the other architectures rotate everywhere."""
    if architecture == "Exaone4ForCausalLM":
        return tuple(window > 0 for window in windows) if windows else ()
    if architecture != "SmolLM3ForCausalLM":
        return ()
    flags = cfg.get("no_rope_layers")
    if flags is None:
        interval = int(cfg.get("no_rope_layer_interval", 4))
        flags = [int((index + 1) % interval != 0) for index in range(num_layers)]
    if not (isinstance(flags, list) and len(flags) >= num_layers):
        raise ValueError(f"no_rope_layers must list a flag for each of the {num_layers} layers")
    return tuple(bool(flag) for flag in flags[:num_layers])  # transformers reads the first ones


def _activation(cfg: dict[str, Any], architecture: str) -> str:
    """The MLP's activation, from the field transformers reads for the architecture: Gemma 2 and
    3 ``hidden_activation``, Gemma 1 ``hidden_act`` (whose legacy ``gelu`` transformers takes as
    the tanh approximation), the others ``hidden_act``."""
    if architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        return str(cfg.get("hidden_activation") or "gelu_pytorch_tanh")
    if architecture == "GemmaForCausalLM":
        activation = str(cfg.get("hidden_act") or "gelu_pytorch_tanh")
        return "gelu_pytorch_tanh" if activation == "gelu" else activation
    return str(cfg.get("hidden_act", cfg.get("hidden_activation", "silu")))


# Families whose attention projections transformers builds without biases whatever config.json
# says (an ``attention_bias`` there is ignored).
_UNBIASED_ATTENTION = ("Mistral", "Ministral", "Mixtral", "Phi3")


def _family(architecture: str) -> str:
    """``Qwen2Moe`` of ``Qwen2MoeForCausalLM`` and of ``Qwen2MoeForSequenceClassification``."""
    return architecture.split("For", 1)[0]


def _attention_bias(cfg: dict[str, Any], architecture: str) -> bool:
    """Whether q/k/v have biases: Qwen2 always, Qwen2-MoE unless ``qkv_bias`` says not (as
    transformers 5 reads it), Mistral, Mixtral and Phi3 never, the others (Llama, Qwen3, Gemma,
    Granite, SmolLM3) as ``attention_bias`` says."""
    family = _family(architecture)
    if family == "Qwen2Moe":
        return bool(cfg.get("qkv_bias", True))
    if family == "SeedOss":  # biased unless said otherwise, as transformers' default
        return bool(cfg.get("attention_bias", True))
    if family == "Qwen2":
        return True
    return family not in _UNBIASED_ATTENTION and bool(cfg.get("attention_bias", False))


def _o_proj_bias(cfg: dict[str, Any], architecture: str) -> bool:
    """Whether o_proj has a bias: where q/k/v have theirs, but for Qwen2 and Qwen2-MoE, whose q/k/v
    biases come without one, and Seed-OSS, whose own field (``attention_out_bias``) says."""
    family = _family(architecture)
    if family == "SeedOss":
        return bool(cfg.get("attention_out_bias", False))
    return family not in ("Qwen2", "Qwen2Moe") and _attention_bias(cfg, architecture)


def _parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    # transformers 5 nests everything in `rope_parameters`; 4.x uses `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if float(cfg.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError(
            "partial_rotary_factor other than 1 is not supported: the engine rotates whole heads"
        )
    max_positions = int(cfg.get("max_position_embeddings", 2048))
    # As transformers reads it: a top-level value (Phi-3 style) first, then the scaling's, then the
    # model's own context.
    original = int(cfg.get("original_max_position_embeddings")
                   or params.get("original_max_position_embeddings") or max_positions)  # fmt: skip
    factor = params.get("factor", 1.0)
    if rope_type in ("linear", "yarn") and params.get("factor") is None:
        raise ValueError(f"the {rope_type} rope scaling needs a factor")

    def optional(key: str) -> float | None:
        return None if params.get(key) is None else float(params[key])

    rope = RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=optional("attention_factor"),
        mscale=optional("mscale"),
        mscale_all_dim=optional("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )
    # Values that would put infinities or NaNs into every rotation, named by their field.
    if rope.theta <= 0 or rope.factor <= 0 or rope.original_max_position_embeddings < 1:
        raise ValueError("rope_theta, the rope scaling's factor and original_max_position_embeddings must be "
                         "positive")  # fmt: skip
    if rope_type == "llama3" and not rope.low_freq_factor < rope.high_freq_factor:
        raise ValueError("the llama3 rope scaling needs low_freq_factor < high_freq_factor")
    return rope


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Bytes for the KV cache; None means a default derived from free memory.
    kv_cache_memory: int | None = None
    # On a GPU, without kv_cache_memory: the share of the device's whole memory this engine may
    # hold (vLLM's gpu_memory_utilization); the cache gets what it leaves after what is in use.
    gpu_memory_utilization: float | None = None
    # Set when derived from the memory budget (or forced, for tests).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True

    def with_num_blocks(self, num_blocks: int) -> CacheConfig:
        return dataclasses.replace(self, num_blocks=num_blocks)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    # Most output tokens one request may ask for (and what one that asks for none gets, if less
    # than the rest of its context); None: the context is the only limit.
    max_tokens_cap: int | None = None
    # "fcfs": requests run in arrival order; "priority": by SamplingParams.priority (lower first),
    # then arrival, in the queue, in each step's order and in who is preempted first (the last).
    policy: str = "fcfs"
    # Most prompt tokens one request computes in a step (vLLM's long_prefill_token_threshold; 0:
    # no limit but the step's budget): a long prompt then shares each step with the prompts behind
    # it, which get their first tokens sooner, at the cost of its own.
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        threshold = self.long_prefill_token_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise ValueError(f"long_prefill_token_threshold must be a whole number, got {threshold!r}")
        if threshold < 0:
            raise ValueError(
                f"long_prefill_token_threshold must be at least 0 (0: no limit), got {threshold}"
            )
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy {self.policy!r} is unknown; choose fcfs or priority")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be at least 1, got {self.max_tokens_cap}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: each step, a decoding request runs up to ``num_speculative_tokens``
    guesses of its next tokens after its last one; the model checks them all in one forward pass
    and keeps the longest run its own sampling agrees with, plus one token of its own. The output
    is distributed exactly as without speculation.

    ``method`` "ngram" (prompt lookup): a request whose last ``n`` tokens (``prompt_lookup_max``
    down to ``prompt_lookup_min``) appeared earlier in its prompt or output guesses the tokens that
    followed them there (sched/ngram_proposer.py). "draft_model" (the method wherever ``model`` is
    given): the model folder ``model``, smaller and of the same vocabulary, decodes the guesses
    greedily (sched/draft_proposer.py)."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    # None: 2, or prompt_lookup_max if that is 1 (a one-token match proposes poorly).
    prompt_lookup_min: int | None = None
    # None: "draft_model" where a model is given, else "ngram".
    method: str | None = None
    # The draft model's folder (method "draft_model").
    model: str | None = None

    def __post_init__(self) -> None:
        if self.prompt_lookup_min is None:
            object.__setattr__(self, "prompt_lookup_min", min(2, self.prompt_lookup_max))
        if self.method is None:  # as vLLM reads a config without one
            object.__setattr__(self, "method", "draft_model" if self.model is not None else "ngram")
        if self.method == "ngram" and self.model is not None:
            raise ValueError(
                "speculative method 'ngram' takes no model (a draft model's method is 'draft_model')"
            )
        if self.method not in ("ngram", "draft_model"):
            raise ValueError(
                f"speculative method {self.method!r} is not supported; use 'ngram' or 'draft_model'"
            )
        if self.method == "draft_model" and not self.model:
            raise ValueError("speculative method 'draft_model' needs the draft model's folder: model")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        assert self.prompt_lookup_min is not None
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )

    @classmethod
    def from_options(cls, value: SpeculativeConfig | dict[str, Any] | str) -> SpeculativeConfig:
        """From a mapping or its JSON text (the CLI's ``--speculative-config``), as vLLM spells it."""
        if isinstance(value, SpeculativeConfig):
            return value
        value = option_object(value, "speculative_config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens")
        for key, item in value.items():
            wanted, named = (str, "a string") if key in ("method", "model") else (int, "an integer")
            if not isinstance(item, wanted) or isinstance(item, bool):
                raise ValueError(f"speculative_config: {key} must be {named}")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: str = "cpu"
    dtype: str = "float32"
    attention_backend: str = "auto"
    seed: int = 0
    # "safetensors" reads the checkpoint; "dummy" draws seeded random weights (benchmarks of shapes).
    load_format: str = "safetensors"
    # "fp8": the projections the checkpoint holds in 16 or 32 bits are made 8-bit floats at load,
    # one scale per output row (layers/quantized.py); None: as the checkpoint holds them.
    quantization: str | None = None
    # "fp8": the KV cache holds 8-bit floats (e4m3), half the bytes of 16-bit ones
    # (attention/kv_dtype.py); "auto": the model's dtype.
    kv_cache_dtype: str = "auto"
    # Decode steps run as captured CUDA graphs on a GPU unless this is set.
    enforce_eager: bool = False
    # Triton kernels for RMSNorm (+ residual add), rotary and SiLU-and-mul; None: on a GPU only.
    triton_ops: bool | None = None
    # The skinny Triton matmul for projections of one or two rows (decode steps of one or two
    # sequences, layers/triton_linear.py); None: wherever triton_ops is on.
    triton_linear: bool | None = None
    # The next five are speed features: None means their GPU_DEFAULTS entry on a GPU (where their
    # kernels' needs are met) and off elsewhere.
    # Where that matmul runs, it also makes its input: the RMSNorm (and residual add) before the
    # q|k|v and gate|up projections, SiLU-and-mul before the down one; needs triton_linear.
    triton_fused_linear: bool | None = None
    # Projections of wide outputs (4,096+ features) in steps of up to 256 rows the skinny matmul
    # does not take, on a Triton tensor-core matmul (layers/triton_tiled_linear.py) instead of
    # cuBLAS.
    triton_tiled_linear: bool | None = None
    # A pure decode step's attention kernel applies the rotary (and q/k norms) and stores the new
    # K/V itself, one launch a layer fewer (attention/triton_kernels.py); needs triton_ops and the
    # Triton attention backend.
    triton_decode_rotary: bool | None = None
    # Temperature-only random rows drawn by a fused Triton race (sample/triton_sampling.py)
    # instead of the torch race.
    triton_sampling: bool | None = None
    # Which kernel draws them (sample/sampler.py's FUSED_KERNELS): "race", the torch path's
    # method over the logits once, or "inverse_cdf", one uniform draw a row inverted through the
    # softmax's running sum (sample/triton_inverse_cdf.py).
    fused_sampler: str = DEFAULT_FUSED_SAMPLER
    # Launch the Triton kernels a decode step runs (in every step) with programmatic dependent
    # launch (layers/triton_pdl.py): each kernel starts during the previous one's tail; needs a
    # Hopper or later GPU and a Triton with grid dependency control.
    triton_pdl: bool | None = None
    # A mixture of experts' routed experts on a Triton grouped matmul laid out on the device
    # (layers/triton_moe.py) instead of torch matmuls per expert after a host read: no host
    # synchronisation, so its decode steps can run as CUDA graphs.
    triton_moe: bool | None = None
    # The penalties' count tables (sample/penalty_tables.py) applied by one Triton pass
    # (sample/triton_penalties.py) instead of torch's elementwise passes over the penalized rows.
    triton_penalties: bool | None = None
    # Schedule and launch step N+1 before reading step N's tokens, so the host's work overlaps the
    # device's; None: on a GPU only (on the CPU the forward itself blocks, so it would only delay).
    async_scheduling: bool | None = None
    # Ranks the model is split over (worker/tensor_parallel.py); 1: the whole model in this process.
    tensor_parallel_size: int = 1
    # Run the largest step the budgets allow, a decode step, a few short prompt steps and each
    # sampling path once at start-up, before any request (worker/warm_up.py); None: on a GPU only,
    # where first runs cost (compiles, allocator growth, lazy kernel loading) and where a step too
    # large for the memory beside the KV cache should fail at start-up, not under load.
    warm_up: bool | None = None
    # LoRA adapters served beside the base model: (name, PEFT adapter folder) pairs (layers/lora.py).
    lora_modules: tuple[tuple[str, str], ...] = ()
    # Adapters may also be loaded and unloaded while serving (vLLM's runtime LoRA updating).
    allow_runtime_lora_updating: bool = False
    # Speculative decoding (prompt lookup); None: one token per request per step.
    speculative: SpeculativeConfig | None = None
    # The folder of tokenizer.json (and tokenizer_config.json: special tokens, chat template);
    # None: the model's own (vLLM's --tokenizer).
    tokenizer: Path | None = None

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer if self.tokenizer is not None else self.model_path

    @property
    def lora_names(self) -> tuple[str, ...]:
        """The adapters loaded at start-up."""
        return tuple(name for name, _ in self.lora_modules)

    @property
    def uses_lora(self) -> bool:
        """Whether requests may use LoRA adapters (then decode steps never run as CUDA graphs)."""
        return bool(self.lora_modules) or self.allow_runtime_lora_updating

    @property
    def kv_dtype(self) -> torch.dtype:
        """What the KV cache holds: 8-bit floats with ``kv_cache_dtype="fp8"``, else ``dtype``."""
        return torch.float8_e4m3fn if self.kv_cache_dtype in ("fp8", "fp8_e4m3") else parse_dtype(self.dtype)

    @property
    def local_model(self) -> ModelConfig:
        """The model's shape on one rank: the whole model without tensor parallelism."""
        return self.model.sharded(self.tensor_parallel_size)

    @property
    def uses_triton_ops(self) -> bool:
        return self.triton_ops if self.triton_ops is not None else self.device.startswith("cuda")

    @property
    def uses_triton_linear(self) -> bool:
        return self.triton_linear if self.triton_linear is not None else self.uses_triton_ops

    def _on_gpu_by_default(self, feature: str) -> bool:
        return self.device.startswith("cuda") and GPU_DEFAULTS[feature]

    @property
    def uses_triton_fused_linear(self) -> bool:
        if self.triton_fused_linear is not None:
            return self.triton_fused_linear
        return self._on_gpu_by_default("triton_fused_linear") and self.uses_triton_linear

    @property
    def uses_triton_tiled_linear(self) -> bool:
        if self.triton_tiled_linear is not None:
            return self.triton_tiled_linear
        # Turning the Triton ops off turns off every Triton kernel of the forward pass not asked for by name.
        return self._on_gpu_by_default("triton_tiled_linear") and self.uses_triton_ops

    @property
    def uses_triton_decode_rotary(self) -> bool:
        if self.triton_decode_rotary is not None:
            return self.triton_decode_rotary
        return (self._on_gpu_by_default("triton_decode_rotary") and self.uses_triton_ops
                and resolve_backend_name(self.attention_backend, self.device) == "triton")  # fmt: skip

    @property
    def uses_triton_sampling(self) -> bool:
        if self.triton_sampling is not None:
            return self.triton_sampling
        return self._on_gpu_by_default("triton_sampling")

    @property
    def uses_triton_penalties(self) -> bool:
        if self.triton_penalties is not None:
            return self.triton_penalties
        return self._on_gpu_by_default("triton_penalties")

    @property
    def uses_triton_pdl(self) -> bool:
        if self.triton_pdl is not None:
            return self.triton_pdl
        if not (self._on_gpu_by_default("triton_pdl") and self.uses_triton_ops):
            return False
        from inferd.layers.triton_pdl import unsupported_reason  # imports triton: only here

        return unsupported_reason(torch.device(self.device)) is None

    @property
    def uses_triton_moe(self) -> bool:
        if self.triton_moe is not None:
            return self.triton_moe
        return self._on_gpu_by_default("triton_moe") and self.uses_triton_ops

    @property
    def uses_warm_up(self) -> bool:
        return self.warm_up if self.warm_up is not None else self.device.startswith("cuda")

    @property
    def uses_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        if self.speculative is not None:
            return False  # proposing a request's next tokens needs its last one on the host
        # The other ranks get each step's inputs from the host, so its tokens must be read first.
        return self.device.startswith("cuda") and self.tensor_parallel_size == 1
