"""End-to-end engine behaviour through the offline API on a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import split_tokenizer

from inferd import LLM, SamplingParams
from inferd.config import ModelLoadError
from inferd.engine.llm_engine import PromptError
from inferd.sampling_params import SamplingParamsError
from inferd.structured.spec import StructuredOutput


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(tiny_llama, kv_cache_memory="32MiB", block_size=8)


def test_seeded_sampling_same_alone_and_in_busy_batch(llm: LLM) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234)
    alone = llm.generate(["To be, or not"], params)[0]
    crowd = [SamplingParams(max_tokens=25, temperature=1.0) for _ in range(6)]
    busy = llm.generate(
        ["Whether", "The quick", "To be, or not", "Or to take", "Café", "0123"],
        crowd[:2] + [params] + crowd[2:5],
    )
    assert busy[2].token_ids == alone.token_ids
    assert busy[2].text == alone.text
    other_seed = llm.generate(["To be, or not"], SamplingParams(max_tokens=20, temperature=1.0, seed=99))[0]
    assert other_seed.token_ids != alone.token_ids


def _sampled(llm: LLM) -> tuple[list[int], str]:
    out = llm.generate(["To be"], SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True))[0]
    return out.token_ids, out.text


def test_final_only_requests_emit_once_with_the_streamed_text(llm: LLM) -> None:
    engine = llm.engine
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1)
    engine.add_request("streamed", "Café au", params)
    engine.add_request("final", "Café au", params, final_only=True)
    outputs: dict[str, list] = {"streamed": [], "final": []}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    (final,) = outputs["final"]
    streamed = outputs["streamed"][-1]
    assert len(outputs["streamed"]) == 12 and final.finished
    assert final.text == streamed.text == "".join(o.new_text for o in outputs["streamed"])
    assert final.token_ids == streamed.token_ids and len(final.logprobs) == 12
    assert final.metrics.first_token_time is not None


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_failed_generate_leaves_no_request_behind(
    tiny_llama, monkeypatch: pytest.MonkeyPatch, async_scheduling: bool
) -> None:
    # With async scheduling the failure leaves a launched step unread behind the aborted requests.
    llm = LLM(tiny_llama, kv_cache_memory="32MiB", block_size=8, async_scheduling=async_scheduling)
    engine = llm.engine
    real_step, steps = engine.step, []

    def failing_step() -> list:
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("device lost")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate(["To be", "or not"], SamplingParams(max_tokens=20, ignore_eos=True))
    assert not engine.has_unfinished() and engine.stats().kv_usage == 0.0
    monkeypatch.setattr(engine, "step", real_step)
    (out,) = llm.generate(["again"], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3


def test_stop_string_split_across_tokens_is_trimmed(llm: LLM) -> None:
    token_ids, text = _sampled(llm)
    pieces = [llm.tokenizer.decode([t]) for t in token_ids]
    # Two neighbouring tokens that each decode to clean text: the stop string straddles them.
    i = next(
        i
        for i in range(2, len(pieces) - 1)
        if pieces[i].strip() and pieces[i + 1].strip() and "\ufffd" not in pieces[i] + pieces[i + 1]
    )
    stop = pieces[i][-1] + pieces[i + 1][0]
    assert stop in text
    first = text.find(stop)
    out = llm.generate(
        ["To be"], SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop == out.outputs[0].stop_reason
    assert out.text == text[:first]
    kept = llm.generate(
        ["To be"],
        SamplingParams(
            max_tokens=30,
            temperature=1.0,
            seed=5,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
    )[0]
    assert kept.text == text[: first + 2]


def test_stop_token_ids_min_tokens_and_length(llm: LLM) -> None:
    token_ids, _ = _sampled(llm)
    stop_id = token_ids[4]
    first = token_ids.index(stop_id)
    base = {"max_tokens": 30, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    out = llm.generate(["To be"], SamplingParams(**base, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == token_ids[: first + 1]
    assert out.stop_reason == stop_id  # vLLM's stop_reason: the stop token id that ended it
    out = llm.generate(["To be"], SamplingParams(**{**base, "max_tokens": 7}))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7 and out.stop_reason is None
    # min_tokens blocks the stop token id from being *chosen*, so generation reaches min_tokens.
    out = llm.generate(["To be"], SamplingParams(**base, stop_token_ids=[stop_id], min_tokens=first + 3))[0]
    assert len(out.token_ids) >= first + 3


def test_eos_ends_unless_ignored(llm: LLM) -> None:
    eos = next(iter(llm.engine.eos_token_ids))
    biased = {"max_tokens": 10, "temperature": 0.0, "logit_bias": {eos: 100.0}}
    out = llm.generate(["To be"], SamplingParams(**biased))[0]
    assert out.finish_reason == "stop" and out.token_ids == [eos] and out.stop_reason is None
    # An EOS token that is also a stop token id ended the request as EOS: no stop_reason (vLLM's).
    assert llm.generate(["To be"], SamplingParams(**biased, stop_token_ids=[eos]))[0].stop_reason is None
    out = llm.generate(["To be"], SamplingParams(**biased, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_an_eos_id_beside_the_tokenizers_reports_itself_as_the_stop_reason(tiny_llama, tmp_path) -> None:
    """As vLLM, which counts generation_config.json's other EOS ids (Llama 3's <|eot_id|>) among
    the stop token ids: ending on one gives its id as stop_reason; the tokenizer's own EOS, None."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    primary = LLM(tiny_llama, kv_cache_memory="4MiB").tokenizer.eos_token_id
    assert primary is not None
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [primary, 7]}))
    llm = LLM(folder, kv_cache_memory="4MiB")
    for token, reason in ((7, 7), (primary, None)):
        out = llm.generate("To be", SamplingParams(max_tokens=4, temperature=0.0, logit_bias={token: 100.0}))[
            0
        ]
        assert out.token_ids == [token] and out.finish_reason == "stop" and out.stop_reason == reason


def test_logprobs_and_timing(llm: LLM) -> None:
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == 5
    for lp, token in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == token and len(lp.top) == 3
        assert lp.top[0][0] == token and lp.rank == 1  # greedy picks the most likely token
    assert 0 < out.metrics.ttft_s <= out.metrics.e2e_s


def test_only_steps_with_rows_that_do_not_sample_gather_the_rows_that_do(tiny_llama, monkeypatch) -> None:
    """A decode step samples from every row in order, so the forward's hidden states go to the LM
    head as they are; a prompt step (many rows, one sampling) gathers its last rows first. The
    tokens are those of the run before, with the wrappers off. On the CPU, where every step runs
    the model's forward (a GPU replays decode graphs)."""
    llm = LLM(tiny_llama, kv_cache_memory="4MiB", block_size=8, device="cpu")
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    expected = [out.token_ids for out in llm.generate(prompts, params)]
    model = llm.engine.core.runner.model
    forward, compute_logits = model.forward, model.compute_logits
    outputs: list[torch.Tensor] = []
    heads: list[torch.Tensor] = []

    def recorded_forward(*args: object, **kwargs: object) -> torch.Tensor:
        outputs.append(forward(*args, **kwargs))
        return outputs[-1]

    def recorded_logits(hidden: torch.Tensor) -> torch.Tensor:
        heads.append(hidden)
        return compute_logits(hidden)

    monkeypatch.setattr(model, "forward", recorded_forward)
    monkeypatch.setattr(model, "compute_logits", recorded_logits)
    assert [out.token_ids for out in llm.generate(prompts, params)] == expected
    assert [head.shape[0] for head in heads] == [2, 2, 2, 2]
    # The prompt step's 8 rows were gathered to 2; each decode step's 2 rows are the forward's own.
    assert [head.data_ptr() == out.data_ptr() for head, out in zip(heads, outputs, strict=True)] == [
        False, True, True, True,
    ]  # fmt: skip


def test_dummy_weights_are_seeded_and_the_layers_decide_the_tokens(tiny_model_factory) -> None:
    """Two engines loaded with ``load_format="dummy"`` hold the same weights whatever ran between
    them; matrices are N(0, 0.02), norms 1. At that scale the layers decide the greedy tokens:
    with every attention output projection zeroed they change."""
    folder = tiny_model_factory("qwen3")  # tied embeddings: torch's N(0, 1) ones would dominate
    first = LLM(folder, load_format="dummy", kv_cache_memory="4MiB", device="cpu")
    torch.randn(1000)  # the global generator moves on; the weights must not follow it
    second = LLM(folder, load_format="dummy", kv_cache_memory="4MiB", device="cpu")
    weights = dict(first.engine.core.runner.model.named_parameters())
    for name, param in second.engine.core.runner.model.named_parameters():
        assert torch.equal(param, weights[name]), name
        if name.endswith("norm.weight"):
            assert bool((param == 1).all()), name
    embedding = weights["model.embed_tokens.weight"]
    assert abs(embedding.std().item() - 0.02) < 0.002
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % 100 for i in range(12)] for j in range(4)]
    tokens = [out.token_ids for out in first.generate(prompts, params)]
    assert [out.token_ids for out in second.generate(prompts, params)] == tokens
    with torch.no_grad():
        for name, param in second.engine.core.runner.model.named_parameters():
            if "o_proj" in name:
                param.zero_()
    assert [out.token_ids for out in second.generate(prompts, params)] != tokens


def test_max_tokens_none_uses_rest_of_context(tiny_llama) -> None:
    llm = LLM(tiny_llama, kv_cache_memory="8MiB", max_model_len=40)
    out = llm.generate([[5] * 30], SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_prompt_errors_give_numbers(llm: LLM) -> None:
    limit = llm.engine.max_model_len
    with pytest.raises(PromptError, match=str(limit)):
        llm.generate([[5] * limit], SamplingParams())
    # The offline API, as vLLM's, stops at the context ("length"); an engine request of a server's
    # is refused with the numbers.
    near = llm.generate([[5] * (limit - 10)], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert near.finish_reason == "length" and len(near.token_ids) == 10
    with pytest.raises(PromptError, match=f"{limit - 10} tokens.*max_tokens asks for 20"):
        llm.engine.add_request("too-long", [5] * (limit - 10), SamplingParams(max_tokens=20))
    assert not llm.engine.has_unfinished()
    with pytest.raises(PromptError, match="empty"):
        llm.generate([""], SamplingParams())
    with pytest.raises(PromptError, match="out of range"):
        llm.generate([[10**6]], SamplingParams())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(tiny_llama, dtype: str) -> None:
    prompt = [[5, 9, 14, 3, 22, 17]]
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=0)
    full = LLM(tiny_llama, kv_cache_memory="8MiB").generate(prompt, params)[0]
    half = LLM(tiny_llama, kv_cache_memory="8MiB", dtype=dtype).generate(prompt, params)[0]
    assert half.token_ids[0] == full.token_ids[0]
    assert abs(half.logprobs[0].logprob - full.logprobs[0].logprob) < 0.1


def test_sharded_checkpoint_loads(tiny_llama, tmp_path) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    index = {}
    for shard, chunk in (("a.safetensors", names[:half]), ("b.safetensors", names[half:])):
        save_file({n: weights[n] for n in chunk}, str(folder / shard))
        index.update({n: shard for n in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    params = SamplingParams(max_tokens=6, temperature=0.0)
    expected = LLM(tiny_llama, kv_cache_memory="8MiB").generate([[5, 6, 7]], params)[0].token_ids
    assert LLM(folder, kv_cache_memory="8MiB").generate([[5, 6, 7]], params)[0].token_ids == expected


def test_clear_errors_for_unusable_folders(tiny_llama, tmp_path) -> None:
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_llama, no_weights)
    (no_weights / "model.safetensors").unlink()
    torch.save({}, no_weights / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        LLM(no_weights)
    other_arch = tmp_path / "other-arch"
    shutil.copytree(tiny_llama, other_arch)
    config = json.loads((other_arch / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other_arch / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        LLM(other_arch)
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(tmp_path)
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        LLM(no_tokenizer)


def test_cache_salt_shares_cached_prefixes_only_within_the_same_salt(llm: LLM) -> None:
    prompt = list(range(40, 80))  # five full blocks of 8
    greedy = {"max_tokens": 2, "temperature": 0.0}

    def hits(**extra: object) -> int:
        before = llm.engine.stats().prefix_hits
        out = llm.generate([prompt], SamplingParams(**greedy, **extra))[0]  # type: ignore[arg-type]
        assert out.finish_reason == "length"
        return llm.engine.stats().prefix_hits - before

    assert hits(cache_salt="tenant-a") == 0
    assert hits(cache_salt="tenant-b") == 0
    assert hits() == 0
    assert hits(cache_salt="tenant-a") == 32 and hits(cache_salt="tenant-b") == 32 and hits() == 32
    with pytest.raises(SamplingParamsError, match="cache_salt"):
        SamplingParams(cache_salt="")


def test_chat_renders_each_conversation_with_the_template(llm: LLM) -> None:
    """vLLM's LLM.chat: one conversation or several, text parts joined, the template's special tokens
    only (none added by the tokenizer)."""
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = [{"role": "user", "content": "To be, or not"}]
    second = [
        {"role": "user", "content": [{"type": "text", "text": "Tomorrow, "}, {"type": "text", "text": "and"}]}
    ]
    rendered = [llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], True)
                for text in ("To be, or not", "Tomorrow, and")]  # fmt: skip
    expected = llm.generate(
        [llm.tokenizer.encode(text, add_special_tokens=False) for text in rendered], greedy
    )
    both = llm.chat([first, second], greedy)
    assert [o.prompt_token_ids for o in both] == [o.prompt_token_ids for o in expected]
    assert [o.token_ids for o in both] == [o.token_ids for o in expected]
    assert [o.token_ids for o in llm.chat(first, greedy)] == [expected[0].token_ids]


def test_chat_continues_a_message_or_answers_it_not_both(llm: LLM) -> None:
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "To be"}]
    with pytest.raises(ValueError, match="give add_generation_prompt=False with it"):
        llm.chat(conversation, SamplingParams(max_tokens=1), continue_final_message=True)
    continued = llm.chat(
        conversation, SamplingParams(max_tokens=1), add_generation_prompt=False, continue_final_message=True
    )
    assert len(continued) == 1


def test_chat_refuses_parts_that_are_not_text(llm: LLM) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    conversation = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    with pytest.raises(ValueError, match="a message part must be text.*'image_url'"):
        llm.chat(conversation, SamplingParams(max_tokens=1))


def test_vllms_prompt_dicts_are_read_as_their_text_or_ids(llm: LLM) -> None:
    """vLLM's TextPrompt and TokensPrompt, alone or in a list beside plain prompts, give what the
    text and the ids give; a key beyond those is refused, not dropped."""
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    ids = llm.tokenizer.encode("To be, or not")
    expected = [out.token_ids for out in llm.generate(["To be, or not", ids], greedy)]
    mixed = llm.generate([{"prompt": "To be, or not"}, {"prompt_token_ids": ids}], greedy)
    assert [out.token_ids for out in mixed] == expected
    alone = llm.generate({"prompt_token_ids": ids}, greedy)
    assert len(alone) == 1 and alone[0].prompt_token_ids == ids and alone[0].token_ids == expected[1]
    assert [len(v) for v in llm.embed([{"prompt": "To be"}, "To be"])] == [
        llm.engine.config.model.hidden_size
    ] * 2
    # A generator of prompts (used up by one pass) gives every prompt.
    from_generator = llm.generate((p for p in ["To be, or not", ids]), greedy)
    assert [out.token_ids for out in from_generator] == expected
    with pytest.raises(ValueError, match=r"got the keys \['multi_modal_data', 'prompt'\]"):
        llm.generate({"prompt": "hi", "multi_modal_data": {}}, greedy)
    with pytest.raises(TypeError, match="token ids must be integers"):
        llm.generate({"prompt_token_ids": [1, "2"]}, greedy)
    with pytest.raises(TypeError, match="a prompt is text, a list of token ids or a prompt dict"):
        llm.generate([3.5], greedy)  # type: ignore[list-item]


def test_the_folder_is_vllms_model_keyword(tiny_llama) -> None:
    llm = LLM(model=tiny_llama, kv_cache_memory="4MiB")
    assert llm.engine.config.model_path == Path(tiny_llama)
    assert LLM(model_path=tiny_llama, kv_cache_memory="4MiB").engine.config.model_path == Path(tiny_llama)
    with pytest.raises(TypeError, match="not both"):
        LLM(tiny_llama, model_path=tiny_llama)


def test_a_tokenizer_from_another_folder_serves_a_model_without_one(tiny_llama, tmp_path) -> None:
    """vLLM's --tokenizer: weights in one folder, tokenizer.json and its config (chat template,
    special tokens) in another; the same answers as the folder that holds both."""
    weights, tokenizer = split_tokenizer(tiny_llama, tmp_path)
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    expected = LLM(tiny_llama, kv_cache_memory="4MiB").generate(["To be, or not"], greedy)[0]
    split = LLM(weights, tokenizer=str(tokenizer), kv_cache_memory="4MiB")
    answer = split.generate(["To be, or not"], greedy)[0]
    assert (answer.prompt_token_ids, answer.text) == (expected.prompt_token_ids, expected.text)
    assert split.chat([{"role": "user", "content": "Hi"}], greedy)[0].token_ids
    # A structured output compiles its grammar against the tokenizer at first use.
    choice = SamplingParams(
        max_tokens=8, temperature=0.0, structured_output=StructuredOutput(choice=["yes", "no"])
    )
    assert split.generate(["To be"], choice)[0].text in ("yes", "no")
    with pytest.raises(Exception, match="no tokenizer.json"):
        LLM(weights, kv_cache_memory="4MiB")


def test_default_sampling_params_are_the_generation_configs(tiny_llama, tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    config = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 64}
    (folder / "generation_config.json").write_text(json.dumps(config))
    llm = LLM(folder, kv_cache_memory="4MiB")
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.7, 0.8, 20, 64)
    # As vLLM's: generate and chat without sampling params take them (64 tokens, not 16).
    (folder / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 20}))
    llm = LLM(folder, kv_cache_memory="4MiB")
    ignoring_eos = dataclasses.replace(llm.get_default_sampling_params(), ignore_eos=True)
    llm.get_default_sampling_params = lambda: ignoring_eos  # type: ignore[method-assign]
    assert len(llm.generate(["To be"])[0].token_ids) == 20
    assert len(llm.chat([{"role": "user", "content": "To be"}])[0].token_ids) == 20
    (folder / "generation_config.json").unlink()
    assert LLM(folder, kv_cache_memory="4MiB").get_default_sampling_params() == SamplingParams()


def test_get_tokenizer_is_the_engines_as_vllms_is(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("To be, or not", add_special_tokens=False)
    assert tokenizer.decode(ids) == "To be, or not"
    out = llm.generate(ids, SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert tokenizer.decode(out.token_ids) == out.text


def test_reset_prefix_cache_starts_the_next_prompts_cold(llm: LLM) -> None:
    prompt = list(range(80, 120))
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def hits() -> int:
        before = llm.engine.stats().prefix_hits
        llm.generate([prompt], greedy)
        return llm.engine.stats().prefix_hits - before

    hits()
    assert hits() > 0
    llm.reset_prefix_cache()
    assert hits() == 0


def test_n_samples_a_prompt_n_times_in_vllms_output_shape(llm: LLM) -> None:
    """vLLM's SamplingParams(n=...): one output per prompt whose ``outputs`` holds every sample;
    sample j of a seeded prompt is what seed + j gives alone, so they differ yet each reproduces."""
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=40, ignore_eos=True, logprobs=0)
    first, second = llm.generate(["To be, or not", [5, 6, 7]], params)
    assert [o.index for o in first.outputs] == [0, 1, 2] and len(second.outputs) == 3
    assert first.prompt == "To be, or not" and second.prompt is None
    for sample, out in enumerate(first.outputs):
        alone = llm.generate(
            "To be, or not", SamplingParams(max_tokens=8, temperature=1.0, seed=40 + sample, ignore_eos=True)
        )[0]
        assert out.token_ids == alone.token_ids and out.text == alone.text
        assert out.finish_reason == "length"
        assert out.logprobs is not None
        assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1
    assert first.token_ids == first.outputs[0].token_ids  # the flat fields are the first sample's
    single = llm.generate("To be", SamplingParams(max_tokens=2, temperature=0.0))[0]
    (only,) = single.outputs
    assert (only.index, only.token_ids) == (0, single.token_ids)
    assert only.cumulative_logprob is None and only.logprobs is None  # not asked for, as in vLLM
    assert SamplingParams(5).max_tokens == 5  # n comes last: positional arguments keep their fields


def test_n_scores_the_prompt_once_for_all_samples(llm: LLM, monkeypatch) -> None:
    asked: list[int | None] = []
    add_request = llm.engine.add_request

    def recorded_add_request(request_id: str, prompt: object, params: SamplingParams, **kwargs: object):
        asked.append(params.prompt_logprobs)
        return add_request(request_id, prompt, params, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(llm.engine, "add_request", recorded_add_request)
    params = SamplingParams(n=3, max_tokens=2, temperature=1.0, prompt_logprobs=1, ignore_eos=True)
    out = llm.generate([[5, 6, 7, 8]], params)[0]
    assert asked == [1, None, None]
    monkeypatch.undo()
    alone = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == 4
    assert [e and e.logprob for e in out.prompt_logprobs] == pytest.approx(
        [e and e.logprob for e in alone.prompt_logprobs or []]
    )
    assert len(out.outputs) == 3


def test_chat_outputs_carry_the_rendered_prompt(llm: LLM) -> None:
    conversation = [{"role": "user", "content": "To be"}]
    out = llm.chat(conversation, SamplingParams(n=2, max_tokens=2, temperature=0.0))[0]
    assert out.prompt == llm.tokenizer.apply_chat_template(conversation, True)
    assert out.outputs[0].token_ids == out.outputs[1].token_ids  # greedy samples agree


def test_n_is_checked_and_an_engine_request_is_one_sample(llm: LLM) -> None:
    for bad in (0, 129, 2.0):
        with pytest.raises(SamplingParamsError, match=r"n: must be an integer in \[1, 128\]"):
            SamplingParams(n=bad)  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="an engine request is one sample, got n=2"):
        llm.engine.add_request("two", "To be", SamplingParams(n=2))
    assert not llm.engine.has_unfinished()


def test_prompts_sharing_a_head_give_what_each_gives_alone(llm: LLM) -> None:
    """Four prompts with one 64-token head arrive together: three wait while the first computes the
    head, then take it from the cache. Their greedy outputs are those of each prompt run alone on a
    cold cache."""
    head = list(range(200, 264))
    prompts = [head + [300 + i, 310 + i, 320 + i] for i in range(4)]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = []
    for prompt in prompts:
        llm.reset_prefix_cache()
        alone.append(llm.generate([prompt], greedy)[0].token_ids)
    llm.reset_prefix_cache()
    before = llm.engine.stats()
    together = [out.token_ids for out in llm.generate(prompts, greedy)]
    after = llm.engine.stats()
    assert together == alone
    assert after.prefix_waits - before.prefix_waits == 3  # each put off once, however many steps
    assert (
        after.prefix_hits - before.prefix_hits == 3 * 64
    )  # the head's 8 blocks, for each of the other three
