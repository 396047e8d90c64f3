"""The start-up warm-up's steps: the largest prompt step the budgets allow, a decode step after it,
a few short prompt steps, and the requests each sampling path is exercised with.

On a GPU the first run of each kind of step pays what no request should: Triton compiles the
prompt path's kernels (graph capture compiled only the decode ones), CUDA loads each kernel's
module at its first launch, and the caching allocator grows to the step's peak. A step too large
for the memory left beside the KV cache would also fail only under load. The runner
(``ModelRunner.warm_up``) runs these steps once before the engine takes a request.

What the warm-up leaves behind is harmless by construction: its K/V goes into blocks the KV manager
has not handed out (a block is always written by its request before it is read), and its random
rows are drawn by a sampler of its own, so the engine's generator, and every later draw, are as
without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from inferd.config import SchedulerConfig
from inferd.engine.request import Request
from inferd.sampling_params import SamplingParams
from inferd.sched.output import ScheduledSequence, SchedulerOutput

# Top log-probabilities the mixed sampling pass asks for per row (OpenAI's completions allow 5).
_WARM_UP_LOGPROBS = 5
# Lengths of the short prompt steps, one sequence each: where the tiled matmul's compiled variants
# change (tiles of 16, 32 and 64 rows; a row count that is a multiple of 16 or not), which also
# takes the eager path through small row counts once.
_SHORT_PROMPT_LENS = (2, 16, 17, 32, 33, 64)
# The sampling paths of the mixed pass, one row kind each (``sampling_mixes``).
_MIXED_PARAMS = (
    SamplingParams(temperature=0.0, logprobs=_WARM_UP_LOGPROBS),
    SamplingParams(top_k=20, logprobs=_WARM_UP_LOGPROBS),
    SamplingParams(top_p=0.9, logprobs=_WARM_UP_LOGPROBS),
    SamplingParams(min_p=0.05, logprobs=_WARM_UP_LOGPROBS),
    SamplingParams(seed=0, logprobs=_WARM_UP_LOGPROBS),
    SamplingParams(repetition_penalty=1.1, frequency_penalty=0.5, logprobs=_WARM_UP_LOGPROBS),
    SamplingParams(logit_bias={0: -5.0}, logprobs=_WARM_UP_LOGPROBS),
)


@dataclass(frozen=True)
class WarmUpShape:
    """One prompt step of ``prompt_lens`` (one sequence each), then one decode token for each of
    them (when ``decodes``); ``short_prompts``, one step each; sampling passes of
    ``sampling_rows`` rows."""

    prompt_lens: tuple[int, ...]
    decodes: bool
    short_prompts: tuple[int, ...]
    sampling_rows: int
    # Steps the model's own kernels need (their prompt lengths), each of a given number of tokens.
    model_steps: tuple[tuple[int, ...], ...] = ()

    @property
    def num_seqs(self) -> int:
        return len(self.prompt_lens)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)


@dataclass(frozen=True)
class WarmUpReport:
    shape: WarmUpShape
    sampling_passes: int
    seconds: float


def warm_up_shape(
    scheduler: SchedulerConfig,
    num_blocks: int,
    block_size: int,
    model_prompt_lens: tuple[int, ...] = (),
    max_sample_rows: int | None = None,
) -> WarmUpShape:
    """The largest prompt step within every budget: at most ``max_num_batched_tokens`` tokens over
    at most ``max_num_seqs`` prompts of two tokens or more (a step of one-token rows would be a
    decode step), each with room for one more token within ``max_model_len`` and within its share
    of the KV blocks. ``model_prompt_lens`` are the token counts of steps the model's own kernels
    need (a mixture of experts' on the Triton grouped matmul: ``triton_moe.warm_up_token_counts``),
    each made of as many prompts as the context limit asks. ``max_sample_rows``: the most rows a
    step samples (more than ``max_num_seqs`` with speculative decoding), for the sampling passes."""
    # Three token slots a sequence where possible: two prompt tokens and the decode token.
    min_blocks = -(-3 // block_size)
    num_seqs = max(
        1, min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens // 2, num_blocks // min_blocks)
    )
    room = min((num_blocks // num_seqs) * block_size, scheduler.max_model_len)
    per_seq = room - 1 if room >= 3 else room  # a slot for the decode token only where a prompt keeps two
    tokens = min(scheduler.max_num_batched_tokens, num_seqs * per_seq)
    # The tokens the budget leaves over go one each to the first prompts.
    prompt_lens = tuple(tokens // num_seqs + (i < tokens % num_seqs) for i in range(num_seqs))
    capacity = min(scheduler.max_num_batched_tokens, scheduler.max_model_len, num_blocks * block_size)
    return WarmUpShape(
        prompt_lens=prompt_lens,
        decodes=max(prompt_lens) < room,
        short_prompts=tuple(n for n in _SHORT_PROMPT_LENS if n <= capacity),
        sampling_rows=max(max_sample_rows or scheduler.max_num_seqs, len(_MIXED_PARAMS)),
        model_steps=tuple(
            lens
            for lens in (_spread(n, scheduler, num_blocks, block_size) for n in model_prompt_lens)
            if lens
        ),
    )


def _spread(tokens: int, scheduler: SchedulerConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """A step of ``tokens`` prompt tokens as prompts within the context limit; empty where no step
    of that many tokens fits the budgets."""
    per_prompt = max(1, min(tokens, scheduler.max_model_len - 1))
    lens = [per_prompt] * (tokens // per_prompt) + ([tokens % per_prompt] if tokens % per_prompt else [])
    blocks = sum(-(-n // block_size) for n in lens)
    fits = tokens <= scheduler.max_num_batched_tokens and len(lens) <= scheduler.max_num_seqs
    return tuple(lens) if fits and blocks <= num_blocks else ()


def prompt_step(
    prompt_lens: tuple[int, ...],
    decodes: bool,
    block_size: int,
    vocab_size: int,
    adapters: tuple[str | None, ...] = (),
) -> SchedulerOutput:
    """Greedy requests, one per length, whose prompts run whole in one step on consecutive blocks
    from 0, each sampling its first token; with ``decodes``, each holds the blocks its decode token
    needs too. The token ids spread over the vocabulary (any would do). ``adapters``: the LoRA
    adapter (or None) of each request in turn, cycled."""
    sequences = []
    next_block = first_token = 0
    for i, length in enumerate(prompt_lens):
        prompt = [(first_token + j) % vocab_size for j in range(length)]
        first_token += length
        adapter = adapters[i % len(adapters)] if adapters else None
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, adapter=adapter)
        request = Request(f"warm-up-{i}", prompt, params, frozenset(), 2)
        blocks = -(-(length + decodes) // block_size)
        table = list(range(next_block, next_block + blocks))
        next_block += blocks
        sequences.append(ScheduledSequence(request, prompt, 0, table, True))
    return SchedulerOutput(sequences, [])


def decode_step(prompts: SchedulerOutput, sampled: Mapping[str, list[int]] | None) -> SchedulerOutput:
    """One token more for each sequence of ``prompts``: its sampled token (request id -> its
    samples, as the runner reports them) when the host has read them, else (None) the one still
    on the device, as asynchronous scheduling feeds it."""
    sequences = [
        ScheduledSequence(
            seq.request,
            [sampled[seq.request.request_id][-1] if sampled is not None else 0],
            seq.num_tokens,
            seq.block_table,
            True,
            from_last_sample=sampled is None,
        )
        for seq in prompts.sequences
    ]
    return SchedulerOutput(sequences, [])


def sampling_mixes(num_rows: int, vocab_size: int, penalized_rows: int | None = None) -> list[list[Request]]:
    """Rows for each path of the sampler: all random with a temperature only (the common serving
    case, the fused race when it is on), then a mix of greedy, top-k, top-p, min-p, seeded,
    penalised and biased rows, all with log-probabilities (``num_rows`` must hold one of each),
    then temperature-only rows beside one penalised row, whose processing makes the whole step's
    logits float32: the fused race on float32 logits is a kernel variant of its own, which the
    mixed pass, with too few temperature-only rows for the race (``FUSED_MIN_ROWS``), no longer
    reaches; then ``penalized_rows`` rows penalised (all, if None; the rest temperature-only), as a
    model's ``generation_config.json`` penalty makes every request: on a GPU the penalties' count
    tables grow to that many rows, with their passes' temporaries, so a step too large for them
    beside the KV cache fails at start-up and not under load. ``penalized_rows`` is the most
    sequences a step holds: a penalized request takes one row (no guesses), and its tables a row."""
    if num_rows < len(_MIXED_PARAMS):
        raise ValueError(f"the mixed pass needs {len(_MIXED_PARAMS)} rows, got {num_rows}")
    temperature = SamplingParams(temperature=0.6, ignore_eos=True)
    prompt = [i % vocab_size for i in range(8)]

    def request(i: int, params: SamplingParams) -> Request:
        made = Request(f"warm-up-sample-{i}", prompt, params, frozenset(), 2)
        made.output_token_ids.append(1 % vocab_size)  # a penalty counts the output's tokens too
        return made

    penalised = SamplingParams(temperature=0.6, presence_penalty=0.5, ignore_eos=True)
    all_penalties = SamplingParams(temperature=0.6, repetition_penalty=1.05, presence_penalty=0.5,
                                   frequency_penalty=0.3, ignore_eos=True)  # fmt: skip
    return [
        [request(i, temperature) for i in range(num_rows)],
        [request(i, _MIXED_PARAMS[i % len(_MIXED_PARAMS)]) for i in range(num_rows)],
        [request(0, penalised)] + [request(i, temperature) for i in range(1, num_rows)],
        [
            request(i, all_penalties if i < (penalized_rows or num_rows) else temperature)
            for i in range(num_rows)
        ],
    ]
