"""Owns the model weights and the KV cache tensors; runs one scheduled step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from inferd.attention.base import AttentionBackend
from inferd.attention.kv_dtype import FP8_KV_DTYPE
from inferd.attention.registry import create_backend, resolve_backend_name
from inferd.config import EngineConfig, ModelLoadError, parse_dtype
from inferd.engine.request import Request
from inferd.layers.lora import LoraAdapter, LoraBatch, attach_adapters, detach_adapters, read_adapter
from inferd.models.loader import enable_configured_kernels, load_model
from inferd.sample.sampler import PendingSample, Sampler, TokenLogprobs, chosen_logprobs
from inferd.sched.output import SchedulerOutput
from inferd.worker.cuda_graphs import (
    CudaGraphCapturer,
    DecodeGraphs,
    GraphCapturer,
    context_tiers,
    graph_batch_sizes,
)
from inferd.worker.input_batch import BlockTableRows, ModelInputs, build_inputs
from inferd.worker.input_buffers import StepInputBuffers
from inferd.worker.kv_cache import allocate_kv_caches
from inferd.worker.tensor_parallel import StepInputs, TensorParallelGroup, all_reduce, configure_cpu_threads
from inferd.worker.warm_up import WarmUpReport, decode_step, prompt_step, sampling_mixes, warm_up_shape

logger = logging.getLogger(__name__)

# Prompt tokens scored at once: a long prompt chunk's logits (rows x vocabulary, in float32) are
# made in slices, so scoring needs no more memory beside the KV cache than sampling a batch does.
_SCORE_ROWS = 128


@dataclass(frozen=True)
class ModelRunnerOutput:
    # request id -> its samples: one token, or with speculative decoding one after its last token
    # and one after each proposed token (the scheduler keeps those that follow accepted guesses)
    sampled: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprobs]]  # the same rows' log-probabilities, where asked for
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why sampling it failed
    # request id -> (position of the first, the prompt tokens' log-probabilities from there on)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # request id -> its prompt's embedding, for those that embed it (SamplingParams.embed)
    embeddings: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptLogprobs:
    """One sequence's prompt-token log-probabilities of a step, still on the device: the tokens
    `targets`, at positions `first`, `first + 1`, ..., each given the ones before it."""

    request_id: str
    first: int
    targets: list[int]
    chosen: torch.Tensor  # [tokens]
    ranks: torch.Tensor  # [tokens]
    top_values: torch.Tensor  # [tokens, k]
    top_ids: torch.Tensor  # [tokens, k]

    def to_host(self) -> tuple[int, list[TokenLogprobs]]:
        rows = zip(
            self.targets,
            self.chosen.tolist(),
            self.ranks.tolist(),
            self.top_ids.tolist(),
            self.top_values.tolist(),
            strict=True,
        )
        return self.first, [
            TokenLogprobs(token, chosen, tuple(zip(ids, values, strict=True)), rank)
            for token, chosen, rank, ids, values in rows
        ]


@dataclass(frozen=True)
class LaunchedStep:
    """A step queued on the device whose tokens the host has not read yet."""

    scheduled: SchedulerOutput
    # The sampling ones, in the order of the sampled tokens (with speculative decoding a request
    # has a row after its last token and one after each proposed token, side by side).
    requests: list[Request]
    sample: PendingSample | None  # None when the step samples nothing (prompt chunks only)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    # The embeddings of the prompts that end in this step and embed them, still on the device.
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def sample_rows(self) -> dict[str, int]:
        """Request id -> row of its token in ``sample.token_ids`` (for the next step to carry)."""
        return {r.request_id: row for row, r in enumerate(self.requests)}


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            # A configuration may name CUDA anywhere; running it needs a GPU torch can see.
            raise ModelLoadError(f"device {config.device!r}: torch {torch.__version__} sees no CUDA device")
        self._bind_device()
        self.dtype = parse_dtype(config.dtype)
        # With tensor parallelism this is rank 0: the other ranks start first and load alongside.
        self.tensor_parallel: TensorParallelGroup | None = None
        # Set once a tensor-parallel step failed part-way: the ranks' collectives are out of step.
        self._broken: str | None = None
        # Restored at shutdown: on the CPU the ranks split the cores for as long as they run.
        self._num_threads = torch.get_num_threads()
        if config.tensor_parallel_size > 1:
            configure_cpu_threads(config)
            self.tensor_parallel = TensorParallelGroup(config)
        try:
            self.model = load_model(
                config.model_path,
                config.local_model,
                config.scheduler.max_model_len,
                self.dtype,
                config.device,
                config.load_format,
                quantization=config.quantization,
                shard=(0, config.tensor_parallel_size) if self.tensor_parallel is not None else None,
                kv_cache_scales=config.kv_dtype == FP8_KV_DTYPE,
                tokenizer_path=config.tokenizer_path,
            )
            enable_configured_kernels(self.model, config)
            # The adapters served now, by name: those of the start-up, and at run time any loaded.
            self.adapters: dict[str, LoraAdapter] = {
                name: read_adapter(name, Path(path)) for name, path in config.lora_modules
            }
            self.lora_batch = self._attach_adapters() if self.adapters else None
            if self.adapters:
                logger.info("LoRA adapters: %s", ", ".join(self.adapters))
            if self.tensor_parallel is not None:
                self.model.set_all_reduce(all_reduce)
                self.tensor_parallel.wait_loaded()
        except BaseException:
            self.shutdown()
            raise
        self.backend = create_backend(config.attention_backend, config.device)
        self.sampler = self._new_sampler()
        self.block_size = config.cache.block_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        sched = config.scheduler
        max_tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)
        guesses = config.speculative.num_speculative_tokens if config.speculative is not None else 0
        # A step samples once a sequence, and once more per proposed token with speculative decoding.
        self.max_sample_rows = min(sched.max_num_seqs * (1 + guesses), max_tokens)
        self.buffers = StepInputBuffers(
            max_tokens=max_tokens,
            max_seqs=sched.max_num_seqs,
            max_blocks_per_seq=-(-sched.max_model_len // self.block_size),
            device=self.device,
            max_sample_rows=self.max_sample_rows,
        )
        self.table_rows = BlockTableRows()
        self.graphs: DecodeGraphs | None = None
        self.warm_up_report: WarmUpReport | None = None

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_caches(self.config.local_model, num_blocks, self.block_size,
                                            self.config.kv_dtype, self.device)  # fmt: skip
        if self.tensor_parallel is not None:
            self.tensor_parallel.allocate(num_blocks)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any (the engine's own state needs nothing)."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.shutdown(timeout_s=5.0 if self._broken else 30.0)
            self.tensor_parallel = None
        if torch.get_num_threads() != self._num_threads:
            torch.set_num_threads(self._num_threads)

    def _bind_device(self) -> None:
        """Make this engine's GPU the calling thread's current device (a no-op for ``cuda`` and
        the CPU): graph capture, events and Triton launches all use the current device, which is
        per thread, and the engine may step on another thread than the one that built it."""
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)

    def device_memory_bytes(self) -> int | None:
        """What torch's allocator holds on the GPU (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_reserved(self.device))

    def _attach_adapters(self) -> LoraBatch:
        """Give the projections the served adapters target their stacked weights."""
        model = self.config.local_model
        q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        return attach_adapters(cast(nn.Module, self.model), list(self.adapters.values()), [q, kv, kv])

    def load_adapter(self, name: str, path: Path) -> None:
        """Serve one more adapter (ModelLoadError: it cannot be read or does not fit the model;
        the adapters served before are left as they were)."""
        adapter = read_adapter(name, path)
        before = self.adapters
        self.adapters = {**before, name: adapter}
        try:
            self.lora_batch = self._attach_adapters()
        except BaseException:
            self.adapters = before
            self.lora_batch = self._attach_adapters() if before else None
            if not before:
                detach_adapters(cast(nn.Module, self.model))
            raise
        logger.info("LoRA adapter %r loaded from %s", name, path)

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter; no running or waiting request may use it."""
        del self.adapters[name]
        if self.adapters:
            self.lora_batch = self._attach_adapters()
        else:
            detach_adapters(cast(nn.Module, self.model))
            self.lora_batch = None
        logger.info("LoRA adapter %r unloaded", name)

    def _new_sampler(self) -> Sampler:
        """A sampler as the engine's options ask (the steps' own, and the warm-up's)."""
        config = self.config
        return Sampler(
            config.seed,
            triton_sampling=config.uses_triton_sampling,
            fused_kernel=config.fused_sampler,
            triton_penalties=config.uses_triton_penalties,
            penalty_rows=config.scheduler.max_num_seqs,
        )

    def uses_cuda_graphs(self) -> bool:
        """Whether decode steps should run as CUDA graphs (captured by ``capture_decode_graphs``)."""
        if self.config.enforce_eager or self.device.type != "cuda":
            return False
        if self.config.uses_lora:
            # Which rows take which adapter is set on the host each step (layers/lora.py).
            logger.info("CUDA graphs are not used with LoRA adapters; decode runs eagerly")
            return False
        if self.tensor_parallel is not None:
            logger.info("CUDA graphs are not used with tensor parallelism; decode runs eagerly")
            return False
        if self.config.model.moe is not None and not self.config.uses_triton_moe:
            # The torch experts read each expert's share of the tokens on the host (models/moe.py).
            logger.info("CUDA graphs need triton_moe for a mixture of experts; decode runs eagerly")
            return False
        if resolve_backend_name(self.config.attention_backend, self.config.device) != "triton":
            logger.info("CUDA graphs need the triton attention backend; decode runs eagerly")
            return False
        return True

    def forget(self, request_ids: list[str]) -> None:
        """Finished requests: the sampler's state for them (penalty counts) goes."""
        self.sampler.forget(request_ids)

    @torch.inference_mode()
    def capture_decode_graphs(self, capturer: GraphCapturer | None = None) -> None:
        """Capture the decode graphs over the allocated KV cache. ``capturer`` defaults to CUDA's."""
        if self.tensor_parallel is not None:
            raise RuntimeError("decode graphs are not supported with tensor parallelism")
        from inferd.attention import triton_kernels
        from inferd.attention.triton_backend import TritonAttentionBackend

        sched, m = self.config.scheduler, self.config.model
        sms = triton_kernels.num_sms(self.device)

        def splits(size: int, longest_context: int) -> int:
            return triton_kernels.default_num_splits(size, m.num_kv_heads, longest_context, sms)

        def backend_for(size: int, longest_context: int) -> AttentionBackend:
            # The split is fixed per graph: the one the tier's longest context would get.
            return TritonAttentionBackend(decode_splits=splits(size, longest_context))

        def tiers_for(size: int) -> list[int]:
            first = triton_kernels.longest_unsplit_context()
            return context_tiers(sched.max_model_len, lambda context: splits(size, context), first)

        sizes = graph_batch_sizes(sched.max_num_seqs)
        graphs = DecodeGraphs(self.model, self.kv_caches, self.buffers, backend_for, sizes, tiers_for)
        graphs.capture(capturer or CudaGraphCapturer())
        self.graphs = graphs

    def _model_warm_up_lens(self) -> tuple[int, ...]:
        """Token counts of steps that compile the rest of the model's own kernel variants."""
        moe = self.config.model.moe
        if moe is None or not self.config.uses_triton_moe:
            return ()
        from inferd.layers import triton_moe

        return triton_moe.warm_up_token_counts(moe.num_experts, moe.top_k)

    @torch.inference_mode()
    def warm_up(self) -> WarmUpReport:
        """Run the largest prompt step the budgets allow, a decode step (a graph replay, where
        graphs were captured), a few short prompt steps and each sampling path once, before any
        request (``warm_up.py``). Call it after the KV cache is allocated and the graphs captured,
        before the first step."""
        start = time.perf_counter()
        num_blocks = self.kv_caches[0][0].shape[0] if self.kv_caches else 0
        if num_blocks == 0:
            raise RuntimeError("allocate the KV cache before warming up")
        shape = warm_up_shape(
            self.config.scheduler,
            num_blocks,
            self.block_size,
            self._model_warm_up_lens(),
            self.max_sample_rows,
        )
        vocab = self.config.model.vocab_size
        # With LoRA adapters the largest step mixes them with the base model, as served batches do:
        # its peak memory holds their gathered rows and terms too.
        adapters = (None, *self.config.lora_names) if self.config.lora_names else ()
        prompts = prompt_step(shape.prompt_lens, shape.decodes, self.block_size, vocab, adapters)
        first = self.launch(prompts)
        if shape.decodes:
            # As the engine feeds the next step: from the device when scheduling runs ahead.
            if self.config.uses_async_scheduling:
                second = self.launch(decode_step(prompts, None), first)
                self.collect(first)
            else:
                second = self.launch(decode_step(prompts, self.collect(first).sampled))
            self.collect(second)
        else:
            self.collect(first)
        for length in shape.short_prompts:
            self.collect(self.launch(prompt_step((length,), False, self.block_size, vocab)))
        for lens in shape.model_steps:
            self.collect(self.launch(prompt_step(lens, False, self.block_size, vocab)))
        # Logits of the shape and dtype a step samples from; a sampler of its own leaves the
        # engine's generator where it was.
        generator = torch.Generator(device=self.device).manual_seed(0)
        rows = shape.sampling_rows
        logits = torch.randn((rows, vocab), generator=generator, device=self.device).to(self.dtype)
        mixes = sampling_mixes(rows, vocab, self.config.scheduler.max_num_seqs)
        sampler = self._new_sampler()
        for requests in mixes:
            # A processor that fails fails its rows alone when serving; here it means a path that
            # cannot run on this engine (a kernel that does not compile, tables that do not fit).
            failed = sampler.sample(logits, requests).result().errors
            if failed:
                row, message = min(failed.items())
                raise RuntimeError(f"warm-up: {len(failed)} rows of a sampling pass failed; row {row}: "
                                   f"{message}")  # fmt: skip
        self.table_rows = BlockTableRows()  # nothing of the warm-up's requests is kept
        report = WarmUpReport(shape, len(mixes), time.perf_counter() - start)
        logger.info(
            "warm-up: a step of %d prompts (%d tokens), %s%d short prompt steps, %d sampling passes of %d "
            "rows in %.2f s",
            shape.num_seqs, shape.prompt_tokens, "a decode step, " if shape.decodes else "",
            len(shape.short_prompts), len(mixes), rows, report.seconds,
        )  # fmt: skip
        self.warm_up_report = report
        return report

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step's forward pass and sampling without waiting for the device.

        ``previous`` is the step launched before this one when its tokens are still unread: the
        sequences of ``out`` that decode one of those tokens take it from the device.
        """
        self._bind_device()
        inputs, hidden = self._forward(out, previous)
        prompt_logprobs = self._prompt_logprobs(out, hidden)
        embeddings = self._embeddings(out, hidden)
        if not inputs.sampling_rows:
            return LaunchedStep(out, [], None, prompt_logprobs, embeddings)
        # Every token samples only in a step of one token per sequence, all sampling: the rows
        # are then the hidden states in order, and gathering them would be a copy for nothing.
        every_row = len(inputs.sampling_rows) == hidden.shape[0]
        last = hidden if every_row else hidden.index_select(0, inputs.logits_indices)
        logits = self.model.compute_logits(last)
        requests = [out.sequences[row].request for row in inputs.sampling_rows]
        return LaunchedStep(out, requests, self.sampler.sample(logits, requests), prompt_logprobs, embeddings)

    def _embeddings(self, out: SchedulerOutput, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """For the sequences that embed their prompt and compute its last token in this step: that
        token's final hidden state (after the model's last norm), L2-normalized in float32; for a
        sequence classifier, its head's label logits of that state, in float32."""
        found: dict[str, torch.Tensor] = {}
        if not out.embeds_prompts:
            return found
        row = 0
        for seq in out.sequences:
            row += seq.num_tokens
            request = seq.request
            if request.params.embed and seq.start_pos + seq.num_tokens == request.num_prompt_tokens:
                last = hidden[row - 1]
                if self.config.model.labels:
                    found[request.request_id] = self.model.compute_logits(last[None])[0].float()
                else:
                    found[request.request_id] = F.normalize(last.float(), dim=0)
        return found

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor) -> list[PromptLogprobs]:
        """For the sequences that score their prompt: each computed prompt token's hidden state
        gives the next prompt token's log-probability (a step's rows are its sequences' tokens in
        order)."""
        found: list[PromptLogprobs] = []
        if not out.scores_prompts:
            return found
        row = 0
        for seq in out.sequences:
            request, first_row = seq.request, row
            row += seq.num_tokens
            top = request.params.prompt_logprobs
            # Positions start_pos .. end - 1 predict the prompt tokens start_pos + 1 .. end.
            end = min(seq.start_pos + seq.num_tokens, request.num_prompt_tokens - 1)
            if top is None or end <= seq.start_pos:
                continue
            targets = request.prompt_token_ids[seq.start_pos + 1 : end + 1]
            target_ids = torch.tensor(targets, dtype=torch.long, device=hidden.device)
            rows = hidden[first_row : first_row + len(targets)]
            parts = [
                self._score_rows(rows[at : at + _SCORE_ROWS], target_ids[at : at + _SCORE_ROWS], top)
                for at in range(0, len(targets), _SCORE_ROWS)
            ]
            chosen, ranks, top_values, top_ids = (torch.cat(pieces) for pieces in zip(*parts, strict=True))
            found.append(
                PromptLogprobs(
                    request.request_id, seq.start_pos + 1, targets, chosen, ranks, top_values, top_ids
                )
            )
        return found

    def _score_rows(
        self, hidden: torch.Tensor, targets: torch.Tensor, top: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's log-probability of its target token and that token's rank, and the row's `top`
        best tokens."""
        logprobs = torch.log_softmax(self.model.compute_logits(hidden).float(), dim=-1)
        chosen, ranks = chosen_logprobs(logprobs, targets)
        top_values, top_ids = logprobs.topk(top, dim=-1)
        return chosen, ranks, top_values, top_ids

    def collect(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step's tokens and hand them out per request."""
        prompt_logprobs = {found.request_id: found.to_host() for found in step.prompt_logprobs}
        embeddings = {request_id: vector.tolist() for request_id, vector in step.embeddings.items()}
        if step.sample is None:
            return ModelRunnerOutput({}, {}, prompt_logprobs=prompt_logprobs, embeddings=embeddings)
        result = step.sample.result()
        requests = step.requests
        errors = {requests[row].request_id: message for row, message in result.errors.items()}
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, list[TokenLogprobs]] = {}
        for r, token, lp in zip(requests, result.token_ids, result.logprobs, strict=True):
            request_id = r.request_id
            if request_id in errors:
                continue
            tokens = sampled.get(request_id)
            if tokens is None:
                sampled[request_id] = [token]
            else:
                tokens.append(token)  # a row after a proposed token: the same request's next
            if lp is not None:
                logprobs.setdefault(request_id, []).append(lp)
        return ModelRunnerOutput(sampled, logprobs, errors, prompt_logprobs, embeddings)

    @torch.inference_mode()
    def logits_for(self, out: SchedulerOutput) -> torch.Tensor:
        """All-position float32 logits of a step (for checks against a reference implementation)."""
        return self.model.compute_logits(self._forward(out)[1]).float()

    def _forward(
        self, out: SchedulerOutput, previous: LaunchedStep | None = None
    ) -> tuple[ModelInputs, torch.Tensor]:
        """Build the step's tensors once and run the model; returns them with the final hidden states.
        ``previous``: the launched step whose samples decode rows of ``out`` may carry."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        graph_size = self.graphs.padded_size(out) if self.graphs is not None else None
        last_sample = previous.sample if previous is not None else None
        carried = previous.sample_rows if previous is not None and last_sample is not None else None
        inputs = build_inputs(out, self.block_size, self.buffers, self.table_rows, graph_size, carried)
        if self.lora_batch is not None:
            self.lora_batch.set_rows([(seq.request.params.adapter, seq.num_tokens) for seq in out.sequences])
        if inputs.carried_rows.numel():
            assert last_sample is not None
            # Device to device, queued behind the step that sampled them: the host never waits.
            tokens = last_sample.token_ids.index_select(0, inputs.carried_sources)
            self.buffers.device_views["input_ids"].index_copy_(0, inputs.carried_rows, tokens)
        if self.graphs is not None and graph_size is not None:
            hidden = self.graphs.replay(graph_size, inputs.meta.max_seq_len)[: inputs.input_ids.shape[0]]
        elif self.tensor_parallel is not None:
            hidden = self._tensor_parallel_forward(self.tensor_parallel, inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend)
        return inputs, hidden

    def _tensor_parallel_forward(self, group: TensorParallelGroup, inputs: ModelInputs) -> torch.Tensor:
        """Rank 0's forward, after sending the step to the other ranks. A failure part-way leaves
        the ranks' collectives out of step, so it stops the group: every later step fails at once
        instead of pairing its all-reduces with the failed step's."""
        try:
            group.run_step(StepInputs.of(inputs.input_ids, inputs.positions, inputs.meta, self.block_size))
            hidden: torch.Tensor = self.model(
                inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend
            )
        except BaseException as exc:
            self._broken = f"tensor-parallel step failed, the ranks are stopped: {exc!r}"
            self.shutdown()
            raise
        return hidden
