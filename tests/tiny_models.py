"""Builds tiny random-weight Hugging Face model folders of each supported architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TRAINING_TEXT = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles, and by opposing end them.",
    "Café, naïve, jalapeño, 東京, Привет, 🙂 — unicode text for multi-byte tests.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?;:,.",
]
EOS = "<|eos|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": True,
    },
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None},
    # Sequence classifiers: three named labels on Llama (tied embeddings in its config, which the
    # head must not take), one label (a reward model's score) on Qwen3.
    "llama-classifier": {
        "architectures": ["LlamaForSequenceClassification"],
        "model_type": "llama",
        "tie_word_embeddings": True,
        "id2label": {0: "negative", 1: "neutral", 2: "positive"},
        "label2id": {"negative": 0, "neutral": 1, "positive": 2},
    },
    "qwen3-reward": {
        "architectures": ["Qwen3ForSequenceClassification"],
        "model_type": "qwen3",
        "head_dim": 16,
        "id2label": {0: "LABEL_0"},
        "label2id": {"LABEL_0": 0},
    },
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "pad_token_id": 0},
    # Gemma 3: a sliding layer (window 12, its own rotary base) then a full one; a linear rotary
    # scaling on the full layers, and capped logits, so both are checked.
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": 12,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "final_logit_softcapping": 5.0,
    },
    # Gemma 2: a sliding layer (window 12) then a full one, attention scores capped (a cap low
    # enough to change them) and capped logits. Gemma 1: no window, no caps, two norms a layer, the
    # legacy "gelu" name of its activation.
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": 12,
        "attn_logit_softcapping": 1.0,
        "initializer_range": 0.2,  # scores large enough for the cap to bend them, and untied
        "tie_word_embeddings": False,  # embeddings, or the large weights only echo the last token
        "final_logit_softcapping": 5.0,
    },
    # SmolLM3: its second layer a NoPE one (no rotary), which also slides over 12 tokens; weights
    # large enough, and embeddings untied, that greedy tokens depend on both (with tied ones the
    # tiny model only repeats the prompt's last token).
    "smollm3": {
        "architectures": ["SmolLM3ForCausalLM"],
        "model_type": "smollm3",
        "pad_token_id": 0,
        "no_rope_layer_interval": 2,
        "use_sliding_window": True,
        "sliding_window": 12,
        "tie_word_embeddings": False,
        "initializer_range": 0.1,
    },
    # Granite: Llama with its four scales, at Granite 3's values but for the attention's, which
    # stands far from the head size's (0.25 here) so that it is checked.
    "granite": {
        "architectures": ["GraniteForCausalLM"],
        "model_type": "granite",
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 1.0,
        "logits_scaling": 8.0,
        "initializer_range": 0.1,  # scores large enough for their scale to matter
    },
    # Ministral: Mistral's layers, the first sliding (window 12), the second full. Seed-OSS: Llama's
    # with q/k/v biases and, here, o_proj's too.
    "ministral": {
        "architectures": ["MinistralForCausalLM"],
        "model_type": "ministral",
        "head_dim": 16,  # transformers' Ministral reads no default for it
        "sliding_window": 12,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "seed-oss": {
        "architectures": ["SeedOssForCausalLM"],
        "model_type": "seed_oss",
        "head_dim": 16,
        "attention_out_bias": True,
    },
    # EXAONE 4: OLMo 2's layers with each head's q and k normed; a sliding layer (window 12), then
    # a global one that attends without the rotary.
    "exaone4": {
        "architectures": ["Exaone4ForCausalLM"],
        "model_type": "exaone4",
        "head_dim": 16,
        "sliding_window": 12,
        "layer_types": ["sliding_attention", "full_attention"],
        "pad_token_id": 0,
    },
    # OLMo 2: norms after attention and the MLP only, q and k normed across their heads. OLMo 3: a
    # sliding layer (window 12, a plain rotary) then a full one (a YaRN-scaled rotary).
    "olmo2": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "pad_token_id": 0},
    "olmo3": {
        "architectures": ["Olmo3ForCausalLM"],
        "model_type": "olmo3",
        "pad_token_id": 0,
        "sliding_window": 12,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "full_attention": {
                "rope_type": "yarn",
                "rope_theta": 500000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    "gemma": {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "head_dim": 16,
        "hidden_act": "gelu",
    },
    # Sliding-window attention, a window far shorter than the tests' prompts: Mistral's in every
    # layer; Qwen2's from layer max_window_layers (1) on, layer 0 full.
    "mistral-sliding": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "sliding_window": 12,
    },
    "qwen2-sliding": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 12,
        "max_window_layers": 1,
    },
    # Mixtures of experts: Mixtral (every layer routed, weights renormalised), Qwen2-MoE (a gated
    # shared expert, weights as the softmax gave them, layer 0 dense) and Qwen3-MoE (q/k norms).
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "qwen2-moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "mlp_only_layers": [0],
        "norm_topk_prob": False,
    },
    "qwen3-moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
    },
    # The other rotary scalings: YaRN as Qwen ships it for long contexts (the cos/sin scale from
    # the factor), YaRN with DeepSeek's mscale pair and its own ramp, and linear.
    "qwen2-yarn": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "qwen3-yarn-mscale": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 3.0,
            "original_max_position_embeddings": 128,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "beta_slow": 2,
        },
    },
    # attention_bias: Llama biases q/k/v and o_proj; Mistral's transformers class ignores it.
    "llama-attention-bias": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": True,
    },
    "mistral-attention-bias": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "attention_bias": True,
        "sliding_window": None,
    },
    "llama-linear": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    },
}


def save_tokenizer(folder: Path) -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": EOS, "bos_token": EOS, "chat_template": CHAT_TEMPLATE})
    )
    return int(tok.get_vocab_size())


def build_tiny_model(folder: Path, arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(folder)
    spec = dict(ARCH_CONFIGS[arch])
    architecture = spec.pop("architectures")[0]
    model_type = spec.pop("model_type")
    config_cls = transformers.AutoConfig.for_model(model_type).__class__
    config = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=0,
        bos_token_id=0,
        **spec,
    )
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(dtype)
    # Random init leaves biases/norms at 0/1; perturb them so those code paths are really checked.
    # An o_proj bias adds the same vector to every token's residual stream: at the others' scale it
    # would drown the 0.02-scale weights, and every prompt would decode the same token.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * (0.02 if name.endswith("o_proj.bias") else 0.1))
    model.save_pretrained(folder)
    return folder


# The token id that ``with_think_end_token`` makes "</think>".
THINK_END = 3


def with_think_end_token(source: Path, folder: Path) -> Path:
    """A copy of the tiny model ``source`` whose token 3 is "</think>", a token of its own as in
    Qwen3 (not special: it stays in the text), for Qwen3's reasoning parser."""
    import shutil

    shutil.copytree(source, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"][THINK_END] = {
        **tokenizer["added_tokens"][THINK_END],
        "content": "</think>",
        "special": False,
    }
    vocab = tokenizer["model"]["vocab"]
    vocab["</think>"] = vocab.pop("<|system|>")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(
    base: Path,
    folder: Path,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = LORA_TARGETS,
    **config: object,
) -> Path:
    """A PEFT adapter (its folder as PEFT saves it) of random A and B for every ``targets``
    projection of ``base``'s layers."""
    import transformers
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out_features, in_features = module.weight.shape
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.3
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    settings = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
                "peft_type": "LORA", **config}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def copy_with_config(source: Path, folder: Path, **changes: Any) -> Path:
    """A copy of the model folder ``source`` whose config.json has ``changes`` over its fields."""
    import shutil

    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def split_tokenizer(source: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of the model folder ``source`` in two folders under ``folder``: the weights without
    the tokenizer's files, and those files (``--tokenizer``'s layout)."""
    import shutil

    weights, tokenizer = folder / "weights", folder / "tokenizer"
    shutil.copytree(source, weights)
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (weights / name).exists():
            shutil.move(str(weights / name), tokenizer / name)
    return weights, tokenizer


def copy_with_tensors(source: Path, folder: Path, edit: Any) -> Path:
    """A copy of the model folder ``source`` whose tensors ``edit`` changed (it takes their dict)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def greedy_continuations(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """A transformers model's greedy continuation of each prompt, run alone."""
    with torch.inference_mode():
        return [
            model.generate(
                torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
            for ids in prompts
        ]
