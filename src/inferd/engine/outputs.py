"""What the engine reports to callers, per request and per step."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from inferd.sample.sampler import TokenLogprobs

T = TypeVar("T")
V = TypeVar("V")


# Not frozen: one is made per sequence per step, and a frozen dataclass's __init__ costs 3x.
@dataclass(slots=True)
class EngineCoreOutput:
    """One step's news for one request, straight from the engine core (token ids only)."""

    request_id: str
    new_token_id: int | None
    logprobs: TokenLogprobs | None
    finish_reason: str | None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    error: str | None = None  # set when processing this request failed (finish_reason "error")
    # With its first token, a request that scores its prompt gets the prompt's log-probabilities
    # (entry p: prompt token p's; the first token has none).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # A "stop" because the structured output is whole: the last token is the output's, not a
    # stop token whose text stays out.
    structure_complete: bool = False
    # With its first token, a request that embeds its prompt (SamplingParams.embed) gets it.
    embedding: list[float] | None = None
    # The error is the request's own (a RequestFault's message; the class does not cross a process).
    client_fault: bool = False


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def queue_s(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def prefill_s(self) -> float | None:
        """First scheduling to first token: the prompt's steps (chunks and preemptions included)."""
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time

    @property
    def decode_s(self) -> float | None:
        """First token to the last."""
        if self.first_token_time is None or self.finished_time is None:
            return None
        return self.finished_time - self.first_token_time


@dataclass(frozen=True)
class CompletionOutput:
    """One sample of a prompt, vLLM's ``CompletionOutput``: ``RequestOutput.outputs`` holds one per
    sample (``SamplingParams.n``). ``logprobs`` as ``RequestOutput.logprobs``, and
    ``cumulative_logprob`` their sum; both None where logprobs were not asked for (as vLLM's)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    # The stop string or stop token id that ended it; None for EOS or another end (vLLM's).
    stop_reason: str | int | None = None


class Prefix(Sequence[T], Generic[T]):
    """The first ``length`` items of a list, read-only: a step's cumulative token ids or logprobs.

    A streaming request gets an output every step; copying its whole history into each one made
    every step O(output length) (and gave the GC ever longer lists to walk). The list must only
    grow (append) while views of it live, so a view shows exactly the items of its own step, even
    when it is read after later steps, on another thread. ``len`` and indexing are O(1); a slice
    is a new list of what it takes. It equals a list (or view) with the same items, as a list does.
    """

    __slots__ = ("_items", "_length")

    def __init__(self, items: list[T], length: int) -> None:
        self._items = items
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            if step == 1:
                return self._items[start:stop]
            return [self._items[i] for i in range(start, stop, step)]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("Prefix index out of range")
        return self._items[index]

    def __iter__(self) -> Iterator[T]:
        # Lazy and bounded: items appended while iterating are not this view's.
        return itertools.islice(self._items, self._length)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Prefix):
            return len(other) == self._length and list(self) == list(other)
        if isinstance(other, list):
            return len(other) == self._length and list(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return repr(list(self))


class TextPrefix:
    """The first ``length`` characters of a text kept as pieces, the first ``count`` of a list that
    only grows (append) while this lives: a step's cumulative text, joined only if it is read."""

    __slots__ = ("_count", "_length", "_pieces")

    def __init__(self, pieces: list[str], count: int, length: int) -> None:
        self._pieces = pieces
        self._count = count
        self._length = length

    def __str__(self) -> str:
        if self._count == 1 and len(self._pieces[0]) == self._length:
            return self._pieces[0]  # a whole text (a finished or cut one): no copy
        return "".join(self._pieces[: self._count])[: self._length]


class _Deferred(Generic[V]):
    """A ``RequestOutput`` field that holds its value, or a view (``TextPrefix``, ``Prefix``)
    turned into the value's type on first read and kept: the output processor makes one output per
    request per step, and most streaming readers only read the step's news (``new_text``...)."""

    def __init__(self, kind: type[V], build: Callable[[Any], V], default: Any = MISSING) -> None:
        self._kind = kind
        self._build = build
        self._default = default

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._slot = "_" + name

    def __get__(self, obj: object | None, owner: type[Any] | None = None) -> Any:
        if obj is None:
            # dataclass asks the class for the field's default: AttributeError means none.
            if self._default is MISSING:
                raise AttributeError(self._slot[1:])
            return self._default
        value = getattr(obj, self._slot)
        if not isinstance(value, self._kind):
            value = self._build(value)
            object.__setattr__(obj, self._slot, value)
        return value

    def __set__(self, obj: object, value: object) -> None:
        # An attribute, not obj.__dict__[...]: reading __dict__ makes CPython build the instance's
        # dict, one more object for the GC per output.
        object.__setattr__(obj, self._slot, value)


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative text/tokens plus what is new since the last report.

    The cumulative fields are this step's: an output read later (on another thread, after more
    tokens came) still shows only its own step's. An unfinished output's ``token_ids`` is a
    ``Prefix`` view of the request's growing list (``len`` in O(1)), and its ``text`` and
    ``logprobs`` are built on first read, so making an output costs the same at any length; a
    finished output holds a plain list (JSON-ready) and str.
    """

    request_id: str
    prompt_token_ids: list[int]
    # A str and a list to every reader; the output processor may defer them (``defer_cumulative``).
    # mypy is shown the readers' view: it cannot type a descriptor field that has no default.
    if TYPE_CHECKING:
        text: str
    else:
        text: str = _Deferred(str, str)
    token_ids: Sequence[int]
    new_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    if TYPE_CHECKING:
        logprobs: list[TokenLogprobs] = field(default_factory=list)
    else:
        logprobs: list[TokenLogprobs] = _Deferred(list, list, default=())
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # With params.prompt_logprobs, from the first output on: entry p is prompt token p's.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    error: str | None = None
    # The error is the request's own (its limits, its grammar): a client error, not a failure.
    client_fault: bool = False
    # With params.embed, from the first output on: the prompt's embedding (L2-normalized), or a
    # sequence classifier's label logits.
    embedding: list[float] | None = None
    # Where it ended with "stop": the stop string matched or the stop token id asked for that ended
    # it (vLLM's stop_reason); None for an EOS token.
    stop_reason: str | int | None = None
    # The offline API's: the prompt's text (None for token ids), as vLLM's ``RequestOutput.prompt``.
    prompt: str | None = None
    # The offline API's with SamplingParams.n > 1: every sample, the first of which the fields
    # above describe.
    samples: list[CompletionOutput] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def outputs(self) -> list[CompletionOutput]:
        """The samples in vLLM's shape (``out.outputs[0].text``): one unless n > 1 was asked."""
        return self.samples if self.samples is not None else [self.completion(0)]

    def completion(self, index: int) -> CompletionOutput:
        """This request's output as sample ``index`` of a prompt."""
        return CompletionOutput(
            index,
            self.text,
            self.token_ids if isinstance(self.token_ids, list) else list(self.token_ids),
            sum(entry.logprob for entry in self.logprobs) if self.logprobs else None,
            self.logprobs or None,
            self.finish_reason,
            self.stop_reason,
        )

    @property
    def mean_logprob(self) -> float:
        """The generated tokens' mean log-probability (with ``logprobs`` asked for; else -inf):
        how ``best_of`` ranks candidates, as OpenAI's and TGI's do."""
        if not self.logprobs:
            return float("-inf")
        return sum(entry.logprob for entry in self.logprobs) / len(self.logprobs)


def defer_cumulative(out: RequestOutput, text: TextPrefix, logprobs: Sequence[TokenLogprobs]) -> None:
    """Gives ``out`` its text and logprobs as views (any sequence), built only if read (see ``_Deferred``)."""
    object.__setattr__(out, "_text", text)
    object.__setattr__(out, "_logprobs", logprobs)


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output for two consecutive ones of a request: the later state, with both deltas."""
    later.new_text = earlier.new_text + later.new_text
    later.new_token_ids = earlier.new_token_ids + later.new_token_ids
    later.new_logprobs = earlier.new_logprobs + later.new_logprobs
    return later


@dataclass(frozen=True)
class ClassificationOutput:
    """A sequence classifier's verdict on one prompt: its label logits, their probabilities
    (softmax over two or more labels; the sigmoid of a single label's logit, the score of reward
    models and cross-encoders, as vLLM's classify pooling gives them) and the likeliest label."""

    logits: list[float]
    probs: list[float]
    label: str

    @classmethod
    def from_logits(cls, logits: list[float], labels: tuple[str, ...]) -> ClassificationOutput:
        if not all(math.isfinite(value) for value in logits):
            raise ValueError(f"the classifier gave non-finite logits: {logits[:8]}")
        if len(logits) == 1:
            # tanh's form of the sigmoid: no overflow for any finite logit.
            probs = [0.5 * (1.0 + math.tanh(logits[0] / 2))]
        else:
            top = max(logits)
            exps = [math.exp(value - top) for value in logits]
            total = sum(exps)
            probs = [value / total for value in exps]
        return cls(list(logits), probs, labels[max(range(len(probs)), key=probs.__getitem__)])
