"""Offline API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from tqdm import tqdm

from inferd.engine.beam_search import (
    BeamSearch,
    BeamSearchOutput,
    BeamSearchParams,
    BeamSearchSequence,
    advance_all,
    live_sequences,
    step_params,
)
from inferd.engine.generation_config import read_sampling_defaults
from inferd.engine.llm_engine import LLMEngine, Prompt
from inferd.engine.matryoshka import check_dimensions, shortened
from inferd.engine.outputs import ClassificationOutput, RequestOutput
from inferd.engine.scoring import check_scoring_labels, joined_pair, pair_indices
from inferd.engine.tokenizer import Tokenizer
from inferd.sampling_params import SamplingParams, params_of_sample

# What the offline methods take as one prompt: text, token ids, or vLLM's prompt dicts
# (``{"prompt": text}``, ``{"prompt_token_ids": ids}``).
PromptInput = Prompt | Mapping[str, Any]


class LLM:
    """Runs a model from a Hugging Face folder (``None``: the built-in default model)."""

    def __init__(
        self, model: str | Path | None = None, *, model_path: str | Path | None = None, **engine_options: Any
    ) -> None:
        """``model``: the folder (vLLM's name for it, so ``LLM(model=...)`` reads as there);
        ``model_path``, its name before, is taken too."""
        if model is not None and model_path is not None:
            raise TypeError("give the model folder as model or as model_path, not both")
        self.engine = LLMEngine.from_options(model if model is not None else model_path, **engine_options)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer:
        """The engine's tokenizer (vLLM's method of that name): ``encode``, ``decode``,
        ``apply_chat_template``."""
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine's other tensor-parallel ranks, if any; the object is unusable after."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """``with LLM(...) as llm:`` shuts the engine down at the end: a tensor-parallel one left
        running keeps its ranks, its rendezvous folder and the process's one process group."""
        self.shutdown()

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
        *,
        raise_on_error: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt, all in one continuously batched run; outputs in prompt order.
        With ``n`` > 1 a prompt's samples are n engine requests, gathered in its output's
        ``outputs`` (sample j seeded ``seed + j`` where a seed is given; only the first scores the
        prompt for ``prompt_logprobs``). A request the engine failed fails the call, as vLLM's;
        ``raise_on_error`` false returns it, ``finish_reason`` "error" and its ``error`` set (a
        benchmark counts such failures). ``priority``: each prompt's (vLLM's argument), in place of
        its sampling params' ``priority``."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:  # as vLLM: the model's recommendation
            sampling_params = self.get_default_sampling_params()
        params_list = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(params_list)} sampling params")
        if priority is not None:
            if len(priority) != len(prompt_list):
                raise ValueError(f"{len(prompt_list)} prompts but {len(priority)} priorities")
            params_list = [
                dataclasses.replace(params, priority=rank)
                for params, rank in zip(params_list, priority, strict=True)
            ]
        # Engine request id -> (prompt index, sample index).
        placed: dict[str, tuple[int, int]] = {}
        samples: list[list[RequestOutput | None]] = [[None] * params.n for params in params_list]
        try:
            for index, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=True)):
                for sample in range(params.n):
                    request_id = f"offline-{next(self._ids)}"
                    engine_params = params_of_sample(params, sample)
                    # As vLLM's offline API: max_tokens past the context stops there ("length").
                    self.engine.add_request(
                        request_id, prompt, engine_params, final_only=True, clamp_to_context=True
                    )
                    placed[request_id] = (index, sample)
            with tqdm(total=len(placed), desc="generate", disable=not use_tqdm, unit="req") as bar:
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished:
                            index, sample = placed[out.request_id]
                            samples[index][sample] = out
                            bar.update(1)
        except BaseException:
            # An error or an interrupt (a later prompt refused, say) must not leave this call's
            # requests in the engine, where the next call would run them (and their KV blocks stay
            # taken).
            self.engine.abort([rid for rid, (i, j) in placed.items() if samples[i][j] is None])
            raise
        gathered = []
        for index, (prompt, outs) in enumerate(zip(prompt_list, samples, strict=True)):
            finished = [out for out in outs if out is not None]
            if len(finished) < len(outs):
                raise RuntimeError(f"prompt {index}: the engine finished without its output")
            failed = next((out for out in finished if out.finish_reason == "error"), None)
            if failed is not None and raise_on_error:
                # As vLLM's offline API: a request the engine failed fails the call, rather than
                # coming back as an empty answer a caller reading .text would take for one.
                raise RuntimeError(f"prompt {index}: {failed.error or 'the engine failed on it'}")
            gathered.append(_gathered(prompt, finished))
        return gathered

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or several, as
        vLLM's ``LLM.chat``: each is rendered by the model's chat template (with ``tools`` and
        ``chat_template_kwargs`` as its variables), tokenized without the tokenizer's own special
        tokens (the template writes those it wants), and generated as ``generate`` does. A message's
        content may be a string or a list of text parts."""
        if continue_final_message and add_generation_prompt:
            # As vLLM: the last message is either continued or answered, not both.
            raise ValueError(
                "continue_final_message continues the last message: give add_generation_prompt=False with it"
            )
        conversations = cast(
            "Sequence[Sequence[Mapping[str, Any]]]",
            [messages] if messages and isinstance(messages[0], Mapping) else messages,
        )
        variables = {**(chat_template_kwargs or {}), **({"tools": tools} if tools else {})}
        rendered = [
            self.tokenizer.apply_chat_template(
                [_plain_message(message) for message in conversation],
                add_generation_prompt,
                variables or None,
                continue_final_message,
            )
            for conversation in conversations
        ]
        prompts: list[Prompt] = [self.tokenizer.encode(text, add_special_tokens=False) for text in rendered]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for out, text in zip(outputs, rendered, strict=True):
            out.prompt = text
        return outputs

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's method of that name): the next prompts start cold."""
        self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling the model's ``generation_config.json`` recommends (temperature, top-p, top-k,
        min-p, repetition penalty, max_new_tokens as max_tokens), as vLLM's method of that name;
        ``SamplingParams()`` where it recommends nothing. ``generate`` and ``chat`` use it where no
        sampling params are given, as vLLM's do."""
        return SamplingParams(**read_sampling_defaults(self.engine.config.model_path))  # type: ignore[arg-type]

    def embed(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        adapter: str | None = None,
        use_tqdm: bool = False,
        dimensions: int | None = None,
    ) -> list[list[float]]:
        """Each prompt's embedding: its last token's final hidden state, L2-normalized (the pooling
        of decoder embedding models such as Qwen3-Embedding; ``SamplingParams.embed``); a sequence
        classifier's label logits (``classify`` reads them). ``dimensions``: only the first so many
        values, normalized again, for a model trained for shorter embeddings
        (``engine/matryoshka.py``)."""
        model = self.engine.config.model
        if dimensions is not None:
            if model.labels:
                raise ValueError("dimensions shortens embeddings; a classifier gives label logits")
            check_dimensions(model, dimensions)
        params = SamplingParams(max_tokens=1, temperature=0.0, embed=True, adapter=adapter)
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm, raise_on_error=False)
        failed = [out.error for out in outputs if out.embedding is None]
        if failed:
            raise RuntimeError(f"a prompt could not be embedded: {failed[0]}")
        return [shortened(out.embedding, dimensions) for out in outputs if out.embedding is not None]

    def classify(
        self, prompts: PromptInput | Sequence[PromptInput], adapter: str | None = None, use_tqdm: bool = False
    ) -> list[ClassificationOutput]:
        """A sequence classifier's (``*ForSequenceClassification``) label logits, probabilities and
        likeliest label for each prompt, read at its last token."""
        labels = self.engine.config.model.labels
        if not labels:
            raise ValueError("the model is not a sequence classifier (its config.json names no "
                             "*ForSequenceClassification architecture)")  # fmt: skip
        return [
            ClassificationOutput.from_logits(logits, labels)
            for logits in self.embed(prompts, adapter, use_tqdm)
        ]

    def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        adapter: str | None = None,
        use_tqdm: bool = False,
        use_activation: bool = True,
    ) -> list[float]:
        """vLLM's ``LLM.score``: one ``text_1`` scored against every ``text_2``, or two lists of one
        length pair by pair (``engine/scoring.py``). A cross-encoder (a classifier of one label)
        gives the sigmoid of its logit for the two texts read as one pair (the logit itself
        without ``use_activation``); any other causal LM the cosine similarity of their
        embeddings."""
        firsts = [text_1] if isinstance(text_1, str) else list(text_1)
        seconds = [text_2] if isinstance(text_2, str) else list(text_2)
        pairs = pair_indices(len(firsts), len(seconds))
        labels = self.engine.config.model.labels
        check_scoring_labels(labels)
        if labels:
            tokenizer, model = self.engine.tokenizer, self.engine.config.model
            joined: list[Prompt] = [joined_pair(tokenizer, model, firsts[i], seconds[j]) for i, j in pairs]
            verdicts = self.classify(joined, adapter, use_tqdm)
            return [v.probs[0] if use_activation else v.logits[0] for v in verdicts]
        vectors = self.embed([*firsts, *seconds], adapter, use_tqdm)
        left, right = vectors[: len(firsts)], vectors[len(firsts) :]
        return [sum(a * b for a, b in zip(left[i], right[j], strict=True)) for i, j in pairs]

    def beam_search(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        params: BeamSearchParams,
        use_tqdm: bool = False,
        adapter: str | None = None,
    ) -> list[BeamSearchOutput]:
        """Beam search for every prompt (``engine/beam_search.py``), with a LoRA ``adapter`` if
        named: each step runs the live beams of all prompts as one batch of one-token requests.
        Outputs in prompt order."""
        inputs = self.engine.inputs
        prompt_ids = [inputs.tokenize_prompt(prompt) for prompt in _as_prompt_list(prompts)]
        for ids in prompt_ids:  # a prompt that cannot take the whole budget fails now, not midway
            inputs.resolve_max_tokens(len(ids), SamplingParams(max_tokens=params.max_tokens))
        searches = [BeamSearch(params, self.engine.eos_token_ids, len(ids)) for ids in prompt_ids]
        per_step = step_params(params, adapter)
        with tqdm(total=params.max_tokens, desc="beam search", disable=not use_tqdm, unit="tok") as bar:
            while not all(search.done for search in searches):
                stepped = live_sequences(searches, prompt_ids)
                outputs = self.generate([tokens for _, tokens in stepped], per_step, raise_on_error=False)
                failed = next((out for out in outputs if out.error is not None or not out.logprobs), None)
                if failed is not None:
                    raise RuntimeError(f"a beam search step failed: {failed.error or failed.finish_reason}")
                advance_all(stepped, [out.logprobs[0] for out in outputs])
                bar.update(1)
        tokenizer = self.engine.tokenizer
        return [
            BeamSearchOutput(
                ids,
                [
                    BeamSearchSequence(
                        list(beam.token_ids),
                        tokenizer.decode(beam.token_ids),
                        beam.cumulative_logprob,
                        beam.finish_reason or "length",
                    )
                    for beam in search.best()
                ],
            )  # fmt: skip
            for search, ids in zip(searches, prompt_ids, strict=True)
        ]


def _gathered(prompt: Prompt, samples: Sequence[RequestOutput]) -> RequestOutput:
    """A prompt's output: its first sample's, with every sample in ``outputs`` where there are
    several (and the first's prompt scores, which the others did not compute)."""
    first = samples[0]
    first.prompt = prompt if isinstance(prompt, str) else None
    if len(samples) > 1:
        first.samples = [out.completion(index) for index, out in enumerate(samples)]
    return first


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[Prompt]:
    """One prompt or several, as text, token ids or vLLM's prompt dicts, as the engine takes them."""
    if isinstance(prompts, str | Mapping):
        return [_prompt(prompts)]
    # Read once: a generator or map object passed as the prompts is used up by the first look.
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]
    return [_prompt(prompt) for prompt in items]


def _prompt(prompt: PromptInput) -> Prompt:
    """vLLM's ``{"prompt": text}`` (TextPrompt) and ``{"prompt_token_ids": ids}`` (TokensPrompt)
    read as the text or the ids; any other key (images, processor options) is refused, not dropped."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        if set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"]
        if set(prompt) == {"prompt_token_ids"} and not isinstance(prompt["prompt_token_ids"], str | Mapping):
            return _token_ids(prompt["prompt_token_ids"])
        raise ValueError(
            "a prompt dict holds 'prompt' (text) or 'prompt_token_ids' (token ids) and nothing else, "
            f"got the keys {sorted(map(str, prompt))}"
        )
    if isinstance(prompt, Sequence):
        return _token_ids(prompt)
    raise TypeError(f"a prompt is text, a list of token ids or a prompt dict, not {type(prompt).__name__}")


def _token_ids(ids: Sequence[Any]) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise TypeError("token ids must be integers")
    return list(ids)


def _plain_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as chat templates read it: text parts joined into one string. Other parts (images,
    audio) are refused: the models served read text only, and dropping them would answer another
    question than the one asked."""
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping) or part.get("type", "text") != "text" or "text" not in part:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(
                    f"a message part must be text ({{'type': 'text', 'text': ...}}), got {kind!r}"
                )
        return {**message, "content": "".join(part["text"] for part in content)}
    return dict(message)
