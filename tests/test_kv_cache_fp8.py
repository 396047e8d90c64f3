"""8-bit float KV caches (engine option ``kv_cache_dtype="fp8"``, ``attention/kv_dtype.py``)
against transformers with an attention that reads its keys and values rounded to e4m3 (clamped
to its range) as the cache would give them back."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
import transformers
from tiny_models import greedy_continuations
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from inferd import LLM, SamplingParams
from inferd.attention.kv_dtype import FP8_KV_MAX, as_read_back, to_cache
from inferd.engine.request import Request
from inferd.entrypoints.engine_args import add_engine_args, engine_options

_ATTENTION = "inferd_test_fp8_kv"


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)


def _fp8_kv_attention(module, query, key, value, *args, **kwargs):
    # Each architecture's own eager attention (Gemma 2's caps its scores, which SDPA cannot).
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, _rounded(key), _rounded(value), *args, **kwargs)


transformers.AttentionInterface.register(_ATTENTION, _fp8_kv_attention)
# ... with the additive masks eager attention takes (a name transformers does not know gets another kind).
AttentionMaskInterface.register(_ATTENTION, eager_mask)


def _reference(folder, rounded: bool = True) -> transformers.PreTrainedModel:
    attention = _ATTENTION if rounded else "eager"
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attention
    ).eval()


def _prompt(vocab: int, length: int = 41, seed: int = 3) -> list[int]:
    return [(seed * 7 + 13 * i) % vocab for i in range(length)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_prompt_logits_match_transformers_reading_rounded_keys(tiny_model_factory, arch: str) -> None:
    folder = tiny_model_factory(arch)
    llm = LLM(folder, kv_cache_memory="4MiB", block_size=8, kv_cache_dtype="fp8")
    assert all(t.dtype == torch.float8_e4m3fn for pair in llm.engine.core.runner.kv_caches for t in pair)
    core = llm.engine.core
    prompt = _prompt(llm.engine.config.model.vocab_size)
    core.add_request(Request("r", prompt, SamplingParams(max_tokens=1), frozenset(), 1))
    ours = core.runner.logits_for(core.scheduler.schedule())
    with torch.inference_mode():
        theirs = _reference(folder)(torch.tensor([prompt])).logits[0]
        unrounded = _reference(folder, rounded=False)(torch.tensor([prompt])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (unrounded - theirs).abs().max().item() > 1e-3  # the rounding shows in the logits


def test_greedy_batch_with_cached_prefixes_matches_transformers(tiny_model_factory) -> None:
    """Decode steps read the rounded keys back from the cache; a prompt whose head the prefix
    cache serves reads them from there, the rest of it from the step: both as transformers."""
    folder = tiny_model_factory("qwen3")
    llm = LLM(folder, kv_cache_memory="4MiB", block_size=8, kv_cache_dtype="fp8", max_num_batched_tokens=24)
    vocab = llm.engine.config.model.vocab_size
    head = _prompt(vocab, 24, seed=1)
    prompts = [head + _prompt(vocab, n, seed=n) for n in (3, 17, 30)] + [_prompt(vocab, 9, seed=9)]
    expected = greedy_continuations(_reference(folder), prompts, 12)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first = llm.generate(prompts[:1], params)
    rest = llm.generate(prompts[1:], params)
    assert llm.engine.stats().prefix_hits > 0
    assert [o.token_ids for o in first + rest] == expected


def test_the_same_memory_holds_more_blocks(tiny_model_factory) -> None:
    folder = tiny_model_factory("llama")
    plain = LLM(folder, kv_cache_memory="4MiB", dtype="float32")
    fp8 = LLM(folder, kv_cache_memory="4MiB", dtype="float32", kv_cache_dtype="fp8_e4m3")
    assert fp8.engine.config.kv_cache_dtype == "fp8"
    assert fp8.engine.config.cache.num_blocks == 4 * plain.engine.config.cache.num_blocks


def test_values_past_e4m3s_range_are_clamped_not_lost() -> None:
    x = torch.tensor([0.3, -1000.0, 500.0, 3.0e38, float("-inf")])
    stored = to_cache(x, torch.float8_e4m3fn)
    assert stored.dtype == torch.float8_e4m3fn
    assert stored.float().tolist() == [0.3125, -FP8_KV_MAX, FP8_KV_MAX, FP8_KV_MAX, -FP8_KV_MAX]
    assert torch.equal(as_read_back(x, torch.float32), x)  # a cache of the model's dtype: as it is


def test_option_and_flag_are_checked(tiny_model_factory) -> None:
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int8'"):
        LLM(tiny_model_factory("llama"), kv_cache_memory="4MiB", kv_cache_dtype="int8")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_options(parser.parse_args(["--kv-cache-dtype", "fp8"])) == {"kv_cache_dtype": "fp8"}


def test_older_gpus_are_told_to_take_the_torch_kernels(tiny_model_factory, monkeypatch) -> None:
    """Triton's e4m3 needs compute capability 8.9: on an older GPU the Triton kernels cannot store
    an 8-bit cache, and the engine says which options can."""
    from inferd.engine.builder import build_engine_config

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    folder = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="needs compute capability 8.9 or later"):
        build_engine_config(folder, device="cuda", kv_cache_dtype="fp8")
    config = build_engine_config(folder, device="cuda", kv_cache_dtype="fp8", attention_backend="torch",
                                 triton_ops=False)  # fmt: skip
    assert config.kv_dtype == torch.float8_e4m3fn
