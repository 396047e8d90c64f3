"""Beam search over the engine: each step, every live beam is a one-token request whose log-probabilities
give its best continuations; the ``beam_width`` likeliest of them all live on.

The engine runs each beam's step as an ordinary request of the whole sequence so far, so the prefix
cache serves all but its last tokens, and one batch holds the beams of every prompt. The search
itself (``BeamSearch``) only ranks candidates; ``LLM.beam_search`` and the server drive it.

Ranking, as vLLM's beam search does: live beams by their summed log-probability; finished ones (EOS,
or the token budget) by that sum over the whole sequence's length, the prompt's tokens included and
an ending EOS not, to the power ``length_penalty`` (Hugging Face's counts the generated tokens only,
the EOS among them, so with a penalty other than 0 the two can rank finished beams differently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inferd.sample.sampler import TokenLogprobs
from inferd.sampling_params import SamplingParams

# The engine returns at most this many alternatives a token (SamplingParams' logprobs limit), and a
# step keeps twice the width of candidates per beam, so that EOS among them leaves enough alive.
MAX_BEAM_WIDTH = 10
# A length penalty's bound: lengths to its power stay far inside float range.
MAX_LENGTH_PENALTY = 10.0


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise ValueError(f"length_penalty must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}], "
                             f"got {self.length_penalty}")  # fmt: skip

    @property
    def candidates_per_beam(self) -> int:
        return 2 * self.beam_width


@dataclass(frozen=True)
class Beam:
    token_ids: tuple[int, ...]  # generated so far (the prompt not included)
    cumulative_logprob: float
    finish_reason: str | None = None  # "stop" (EOS) or "length" once finished

    def score(self, length_penalty: float, prompt_len: int) -> float:
        length = prompt_len + len(self.token_ids) - (self.finish_reason == "stop")
        return self.cumulative_logprob / max(length, 1) ** length_penalty


@dataclass
class BeamSearch:
    """One prompt's search: ``live`` beams to extend next, ``finished`` ones set aside."""

    params: BeamSearchParams
    eos_token_ids: frozenset[int]
    prompt_len: int
    live: list[Beam] = field(default_factory=lambda: [Beam((), 0.0)])
    finished: list[Beam] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.live

    def advance(self, steps: list[TokenLogprobs]) -> None:
        """``steps[i]``: the top alternatives of live beam ``i``'s next token (at least
        ``candidates_per_beam`` of them, or the whole vocabulary)."""
        candidates: list[Beam] = []
        for beam, step in zip(self.live, steps, strict=True):
            for token_id, logprob in step.top[: self.params.candidates_per_beam]:
                tokens = (*beam.token_ids, token_id)
                total = beam.cumulative_logprob + logprob
                if token_id in self.eos_token_ids and not self.params.ignore_eos:
                    self.finished.append(Beam(tokens, total, "stop"))
                else:
                    candidates.append(Beam(tokens, total))
        candidates.sort(key=lambda beam: beam.cumulative_logprob, reverse=True)
        self.live = candidates[: self.params.beam_width]
        if self.live and len(self.live[0].token_ids) >= self.params.max_tokens:
            self.finished.extend(Beam(b.token_ids, b.cumulative_logprob, "length") for b in self.live)
            self.live = []

    def best(self) -> list[Beam]:
        """The ``beam_width`` best of the finished beams (all of them once ``done``), best first."""
        penalty, prompt_len = self.params.length_penalty, self.prompt_len
        return sorted(self.finished, key=lambda beam: beam.score(penalty, prompt_len), reverse=True)[
            : self.params.beam_width
        ]


def live_sequences(
    searches: list[BeamSearch], prompts: list[list[int]]
) -> list[tuple[BeamSearch, list[int]]]:
    """Every live beam of every prompt's search, as (its search, prompt and beam tokens), in order:
    one step's requests."""
    return [
        (search, [*prompt, *beam.token_ids])
        for search, prompt in zip(searches, prompts, strict=True)
        for beam in search.live
    ]


def advance_all(stepped: list[tuple[BeamSearch, list[int]]], steps: list[TokenLogprobs]) -> None:
    """Each search advanced by its own beams' steps (``steps[i]``: ``stepped[i]``'s alternatives)."""
    by_search: dict[int, tuple[BeamSearch, list[TokenLogprobs]]] = {}
    for (search, _), step in zip(stepped, steps, strict=True):
        by_search.setdefault(id(search), (search, []))[1].append(step)
    for search, own in by_search.values():
        search.advance(own)


@dataclass(frozen=True)
class BeamSearchSequence:
    token_ids: list[int]
    text: str
    cumulative_logprob: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass(frozen=True)
class BeamSearchOutput:
    """One prompt's result: its ``beam_width`` best sequences, best first."""

    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]


def step_params(
    params: BeamSearchParams, adapter: str | None = None, priority: int = 0, cache_salt: str | None = None
) -> SamplingParams:
    """What each beam's one-token request asks of the engine (with the search's adapter, priority
    and cache salt): the log-probabilities of the best continuations (EOS among them: it is ranked
    here, not obeyed)."""
    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprobs=params.candidates_per_beam,
        ignore_eos=True,
        adapter=adapter,
        priority=priority,
        cache_salt=cache_salt,
    )
