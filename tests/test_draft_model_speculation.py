"""Speculative decoding with a draft model (``sched/draft_proposer.py``): a smaller model of the
same vocabulary guesses each request's next tokens and the served model keeps the run its own
samples agree with, so outputs are those of one token a step."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from inferd import LLM, SamplingParams
from inferd.config import ModelLoadError, SpeculativeConfig
from inferd.engine.builder import build_engine_config, default_model_path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from speculative import first_layers  # noqa: E402

TEXT_PROMPTS = ["ROMEO:\nWhat", "KING HENRY:\nThe king, the king, the", "To be, or not to be", "JULIET:\nO"]


@pytest.fixture(scope="module")
def draft(tmp_path_factory) -> Path:
    """The built-in model's first two layers, its final norm and head kept: a draft that guesses
    like its model often, not always (an early exit)."""
    return first_layers(default_model_path(), tmp_path_factory.mktemp("draft") / "m", 2)


def _spec(model: Path, tokens: int = 4) -> dict:
    return {"model": str(model), "num_speculative_tokens": tokens}


def test_a_draft_models_guesses_leave_greedy_outputs_as_they_are(draft: Path) -> None:
    """The built-in model served, its first two layers as the draft: some guesses kept, some not,
    the tokens and log-probabilities those of the plain engine. A small step budget splits the
    draft's first pass over the prompts too."""
    options = {"kv_cache_memory": "16MiB", "block_size": 8, "max_num_batched_tokens": 16}
    speculative = LLM(speculative_config=_spec(draft), **options)
    plain = LLM(**options)
    prompts = [speculative.tokenizer.encode(text) for text in TEXT_PROMPTS]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=1)
    ours = speculative.generate(prompts, params)
    reference = plain.generate(prompts, params)
    assert [o.token_ids for o in ours] == [o.token_ids for o in reference]
    for a, b in zip(ours, reference, strict=True):
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    stats = speculative.engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    # Every finished request's draft state is gone.
    proposer = speculative.engine.core.scheduler.proposer
    assert not proposer._states and proposer.kv.usage() == 0


def test_the_served_model_as_its_own_draft_is_always_right() -> None:
    """A draft whose K/V, positions or catch-up were off would guess otherwise than the served
    model: with the same weights, greedy, every guess stands, across chunked first passes and
    requests that join while others decode."""
    folder = default_model_path()
    llm = LLM(folder, speculative_config=_spec(folder, 3), kv_cache_memory="16MiB", block_size=4,
              max_num_batched_tokens=12)  # fmt: skip
    prompts = [llm.tokenizer.encode(text) for text in TEXT_PROMPTS]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (30, 9, 21, 14)]
    outputs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outputs] == [30, 9, 21, 14]
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens > 20 and stats.spec_accepted_tokens == stats.spec_draft_tokens


def test_preempted_requests_guess_again_from_scratch(draft: Path) -> None:
    """A KV cache too small for every request at once preempts some; their draft state goes with
    their blocks, and the outputs are still the plain engine's."""
    options = {"num_kv_blocks": 12, "block_size": 4, "max_num_batched_tokens": 32, "max_model_len": 48}
    speculative = LLM(speculative_config=_spec(draft), **options)
    plain = LLM(**options)
    prompts = [speculative.tokenizer.encode(text) for text in TEXT_PROMPTS]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ours = speculative.generate(prompts, params)
    assert speculative.engine.core.scheduler.num_preemptions > 0
    assert [o.token_ids for o in ours] == [o.token_ids for o in plain.generate(prompts, params)]
    assert speculative.engine.core.scheduler.proposer.kv.usage() == 0


def test_a_seeded_request_draws_the_same_tokens_with_a_draft(draft: Path) -> None:
    options = {"kv_cache_memory": "16MiB", "block_size": 8}
    seeded = SamplingParams(max_tokens=30, temperature=0.7, seed=11, ignore_eos=True)
    prompt = LLM(**options).tokenizer.encode(TEXT_PROMPTS[1])
    ours = LLM(speculative_config=_spec(draft), **options).generate([prompt], seeded)[0].token_ids
    assert ours == LLM(**options).generate([prompt], seeded)[0].token_ids


def test_draft_configs_that_cannot_serve_are_refused(draft: Path, tmp_path) -> None:
    assert SpeculativeConfig.from_options({"model": "x", "num_speculative_tokens": 2}).method == "draft_model"
    with pytest.raises(ValueError, match="'ngram' takes no model"):
        SpeculativeConfig.from_options({"method": "ngram", "model": "x", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="needs the draft model's folder"):
        SpeculativeConfig.from_options({"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="model must be a string"):
        SpeculativeConfig.from_options({"model": 3, "num_speculative_tokens": 2})
    served_vocab = json.loads((default_model_path() / "config.json").read_text())["vocab_size"]
    bigger = tmp_path / "bigger"
    shutil.copytree(draft, bigger)
    config = json.loads((bigger / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**config, "vocab_size": served_vocab + 8}))
    with pytest.raises(ModelLoadError, match="more than the served model's"):
        build_engine_config(speculative_config=_spec(bigger))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        build_engine_config(speculative_config=_spec(tmp_path))
    with pytest.raises(ValueError, match="not supported with tensor parallelism"):
        build_engine_config(speculative_config=_spec(draft), tensor_parallel_size=2)
    short = tmp_path / "short"
    shutil.copytree(draft, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    with pytest.raises(ModelLoadError, match="reaches 64 positions, fewer than the engine's max_model_len"):
        build_engine_config(speculative_config=_spec(short))


def test_a_draft_of_a_smaller_vocabulary_leaves_out_requests_it_cannot_read(draft: Path, tmp_path) -> None:
    """A served model's vocabulary may be padded past the draft's (Qwen2.5-7B's 152,064 ids against
    0.5B's 151,936): a request holding an id the draft has no embedding for never guesses, and the
    others still do."""
    from safetensors.torch import load_file, save_file

    smaller = shutil.copytree(draft, tmp_path / "smaller")
    config = json.loads((smaller / "config.json").read_text())
    vocab = config["vocab_size"] - 96
    (smaller / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))
    tensors = load_file(smaller / "model.safetensors")
    cut = {name: t[:vocab].contiguous() if t.shape[0] == vocab + 96 else t for name, t in tensors.items()}
    save_file(cut, smaller / "model.safetensors")
    options = {"kv_cache_memory": "16MiB", "block_size": 8}
    speculative = LLM(speculative_config=_spec(smaller), **options)
    prompts = [speculative.tokenizer.encode(text) for text in TEXT_PROMPTS[:2]]
    prompts[1] = [*prompts[1][:-1], vocab + 5, *prompts[1][-1:]]  # an id past the draft's vocabulary
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ours = speculative.generate(prompts, params)
    assert [o.token_ids for o in ours] == [o.token_ids for o in LLM(**options).generate(prompts, params)]
    assert speculative.engine.stats().spec_draft_tokens > 0
    alone = LLM(speculative_config=_spec(smaller), **options)
    alone.generate(prompts[1:], params)
    assert alone.engine.stats().spec_draft_tokens == 0
    assert alone.engine.core.scheduler.proposer.kv.usage() == 0


def test_a_long_prompt_is_caught_up_over_several_steps_and_the_kv_budget_holds_both_caches(
    draft: Path,
) -> None:
    """The draft computes at most a step's budget of unseen tokens a step, shortest first, so a
    long new prompt does not hold up the others' guesses; the KV budget is split between the
    served model's cache and the draft's, block for block."""
    folder = default_model_path()
    options = {"kv_cache_memory": "16MiB", "block_size": 4, "max_num_batched_tokens": 16}
    llm = LLM(folder, speculative_config=_spec(folder, 2), **options)
    assert llm.engine.config.cache.num_blocks == LLM(**options).engine.config.cache.num_blocks // 2
    text = " ".join(TEXT_PROMPTS) * 3
    prompts = [llm.tokenizer.encode(TEXT_PROMPTS[0]), llm.tokenizer.encode(text)]
    assert len(prompts[1]) > 3 * 16
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outputs] == [24, 24]
    stats = llm.engine.stats()
    assert stats.spec_draft_tokens > 10 and stats.spec_accepted_tokens == stats.spec_draft_tokens


def test_requests_sharing_a_prompts_start_share_the_drafts_blocks(draft: Path) -> None:
    """The draft's cache reuses the blocks of a prompt's start another request computed (as the
    served model's does), so a common system prompt is computed once and does not fill it."""
    folder = default_model_path()
    options = {"kv_cache_memory": "16MiB", "block_size": 4}
    llm = LLM(folder, speculative_config=_spec(folder, 3), **options)
    head = llm.tokenizer.encode(" ".join(TEXT_PROMPTS))
    prompts = [head + llm.tokenizer.encode(text) for text in TEXT_PROMPTS]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm.generate(prompts[:1], params)
    outputs = llm.generate(prompts[1:], params)
    proposer = llm.engine.core.scheduler.proposer
    assert proposer.kv.prefix_hits >= 3 * (len(head) // 4) * 4
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens == stats.spec_draft_tokens > 0  # its own draft: all kept
    reference = LLM(**options).generate(prompts[1:], params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]


def test_the_drafts_cached_blocks_are_shared_only_under_the_same_cache_salt(draft: Path) -> None:
    folder = default_model_path()
    llm = LLM(folder, speculative_config=_spec(folder, 3), kv_cache_memory="16MiB", block_size=4)
    prompt = llm.tokenizer.encode(" ".join(TEXT_PROMPTS))
    proposer = llm.engine.core.scheduler.proposer

    def draft_hits(salt: str | None) -> int:
        before = proposer.kv.prefix_hits
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, cache_salt=salt)
        llm.generate([prompt], params)
        return proposer.kv.prefix_hits - before

    assert draft_hits("tenant-a") == 0
    assert draft_hits(None) == 0 and draft_hits("tenant-b") == 0  # salted lookups and keys both
    assert draft_hits("tenant-a") >= (len(prompt) // 4 - 1) * 4


def test_the_draft_attends_on_the_served_models_backend(draft: Path) -> None:
    """With the Triton attention backend (its interpreter here, its kernels on a GPU) the draft's
    passes run on it too: the served model as its own draft still has every guess kept."""
    folder = default_model_path()
    options = {"kv_cache_memory": "8MiB", "block_size": 16, "attention_backend": "triton"}
    llm = LLM(folder, speculative_config=_spec(folder, 2), **options)
    assert llm.engine.core.scheduler.proposer.backend.name == "triton"
    prompts = [llm.tokenizer.encode(text) for text in TEXT_PROMPTS[:2]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    stats = llm.engine.stats()
    assert stats.spec_accepted_tokens == stats.spec_draft_tokens > 0
    reference = LLM(**options).generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]


def test_the_drafts_cache_use_is_reported(draft: Path) -> None:
    """``EngineStats.draft_kv_usage`` (the /metrics gauge ``spec_decode_draft_kv_cache_usage_perc``):
    above 0 while a request guesses, 0 once it is done; None without a draft model."""
    llm = LLM(speculative_config=_spec(draft), kv_cache_memory="16MiB", block_size=8)
    engine = llm.engine
    engine.add_request(
        "r", llm.tokenizer.encode(TEXT_PROMPTS[1]), SamplingParams(max_tokens=20, temperature=0)
    )
    while engine.stats().spec_drafts == 0:
        engine.step()
    assert 0 < engine.stats().draft_kv_usage < 1
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().draft_kv_usage == 0
    assert LLM(kv_cache_memory="4MiB").engine.stats().draft_kv_usage is None
