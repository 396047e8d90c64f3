"""The start-up warm-up's steps: the largest prompt step the budgets allow, a decode step after it,
and the requests each sampling path is exercised with.

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


@dataclass(frozen=True)
class WarmUpShape:
    """``num_seqs`` prompts of ``prompt_len`` tokens each, then one decode token each (when
    ``decodes``)."""

    num_seqs: int
    prompt_len: int
    decodes: bool

    @property
    def prompt_tokens(self) -> int:
        return self.num_seqs * self.prompt_len


@dataclass(frozen=True)
class WarmUpReport:
    shape: WarmUpShape
    sampling_passes: int
    seconds: float


def warm_up_shape(scheduler: SchedulerConfig, num_blocks: int, block_size: int) -> WarmUpShape:
    """The largest prompt step within every budget: at most ``max_num_batched_tokens`` tokens over
    at most ``max_num_seqs`` equal prompts (as many sequences as a step may sample), each prompt
    with room for one more token within ``max_model_len`` and within its share of the KV blocks."""
    # Two token slots a sequence at least (its prompt token and its decode token).
    min_blocks = 1 if block_size >= 2 else 2
    num_seqs = max(1, min(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, num_blocks // min_blocks))
    slots = (num_blocks // num_seqs) * block_size
    room = min(slots, scheduler.max_model_len)
    prompt_len = max(1, min(scheduler.max_num_batched_tokens // num_seqs, room - 1))
    return WarmUpShape(num_seqs, prompt_len, decodes=prompt_len < room)


def warm_up_requests(shape: WarmUpShape, vocab_size: int) -> list[Request]:
    """Greedy requests whose prompts spread over the vocabulary (any ids would do)."""
    requests = []
    for i in range(shape.num_seqs):
        prompt = [(i * shape.prompt_len + j) % vocab_size for j in range(shape.prompt_len)]
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        requests.append(Request(f"warm-up-{i}", prompt, params, frozenset(), 2))
    return requests


def prompt_step(requests: list[Request], block_size: int) -> SchedulerOutput:
    """Every prompt whole in one step, on consecutive blocks from 0, each sampling its first token;
    each sequence holds the blocks its decode token needs too."""
    sequences = []
    next_block = 0
    for request in requests:
        blocks = -(-(request.num_prompt_tokens + 1) // block_size)
        table = list(range(next_block, next_block + blocks))
        next_block += blocks
        sequences.append(ScheduledSequence(request, request.prompt_token_ids, 0, table, True))
    return SchedulerOutput(sequences, [])


def decode_step(prompts: SchedulerOutput, sampled: Mapping[str, int] | None) -> SchedulerOutput:
    """One token more for each sequence of ``prompts``: its sampled token (request id -> token)
    when the host has read them, else (None) the one still on the device, as asynchronous
    scheduling feeds it."""
    sequences = [
        ScheduledSequence(
            seq.request,
            [sampled[seq.request.request_id] if sampled is not None else 0],
            seq.num_tokens,
            seq.block_table,
            True,
            from_last_sample=sampled is None,
        )
        for seq in prompts.sequences
    ]
    return SchedulerOutput(sequences, [])


def sampling_mixes(num_rows: int, vocab_size: int) -> list[list[Request]]:
    """Rows for each path of the sampler: all random with a temperature only (the common serving
    case, the fused race when it is on), then a mix of greedy, top-k, top-p, min-p, seeded and
    penalised rows, all with log-probabilities."""
    temperature = SamplingParams(temperature=0.6, ignore_eos=True)
    mixed = [
        SamplingParams(temperature=0.0, logprobs=_WARM_UP_LOGPROBS),
        SamplingParams(top_k=20, logprobs=_WARM_UP_LOGPROBS),
        SamplingParams(top_p=0.9, logprobs=_WARM_UP_LOGPROBS),
        SamplingParams(min_p=0.05, logprobs=_WARM_UP_LOGPROBS),
        SamplingParams(seed=0, logprobs=_WARM_UP_LOGPROBS),
        SamplingParams(repetition_penalty=1.1, frequency_penalty=0.5, logprobs=_WARM_UP_LOGPROBS),
    ]
    prompt = [i % vocab_size for i in range(8)]

    def request(i: int, params: SamplingParams) -> Request:
        return Request(f"warm-up-sample-{i}", prompt, params, frozenset(), 1)

    return [
        [request(i, temperature) for i in range(num_rows)],
        [request(i, mixed[i % len(mixed)]) for i in range(num_rows)],
    ]
