"""Per-request generation settings, validated once at construction."""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inferd.structured.spec import StructuredOutput

# Seeds a torch generator takes: a signed or unsigned 64-bit integer (negative ones wrap).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Most bad words (and token sequences) one request may ban: each is matched at every step.
MAX_BAD_WORDS = 1024
# Temperatures below this are greedy: dividing logits by them overflows float32 (as in vLLM).
GREEDY_TEMPERATURE = 1e-5
# Most samples one offline prompt may ask for (``SamplingParams.n``), the servers' bound on ``n``.
MAX_SAMPLES = 128
# Every new token is searched for every stop string (and its id checked against the stop ids) on
# the engine's thread: an unbounded list let one request slow every other (50,000 stop strings
# took another client's latency from 20 ms to 2 s). Far above what clients send (OpenAI takes 4).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 16 * 1024  # all of a request's stop strings together
MAX_STOP_TOKEN_IDS = 1024


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample ``sample`` of a request seeded ``seed`` (the servers' choices and the
    offline API's ``n``): the samples differ from each other yet each is reproducible. Wrapped into
    the 64-bit range a generator takes (the same seed to it)."""
    return (seed + sample) % 2**64


class SamplingParamsError(ValueError):
    """A sampling field is out of range; `field` names it for protocol error messages."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature`` below `GREEDY_TEMPERATURE` (0 included) means greedy. ``top_k <= 0``,
    ``top_p == 1`` and ``typical_p == 1`` disable those filters.
    ``max_tokens=None`` means "whatever is left of the context".
    """

    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # Locally typical sampling (TGI's and transformers' typical_p): keep the tokens whose surprise
    # is nearest the distribution's entropy, as many as make up this share of its mass.
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    # Log-probabilities of the prompt's tokens (each given the ones before it), with this many
    # alternatives each: what scoring a text needs. Such a prompt is computed whole, never taken
    # from the prefix cache.
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # The output must match this (a JSON schema, a regex, a grammar, ...): each step samples only
    # from the tokens it allows next, and the request stops when it allows nothing more.
    structured_output: StructuredOutput | None = None
    # The LoRA adapter to answer with (a name the engine was started with); None: the base model.
    adapter: str | None = None
    # With the priority scheduling policy: lower runs first (ties by arrival), as vLLM's; the
    # first-come-first-served policy takes only 0.
    priority: int = 0
    # The prefix cache shares K/V only between requests giving the same salt (vLLM's ``cache_salt``:
    # one per tenant keeps another tenant's prompts from learning, by timing, what is cached).
    cache_salt: str | None = None
    # Only these token ids may be sampled (vLLM's ``allowed_token_ids``); None: any.
    allowed_token_ids: list[int] | None = None
    # Words the output must not contain (vLLM's ``bad_words``): each is tokenized by the engine,
    # as written and after a space, and the last token of any such sequence is banned wherever the
    # output ends with the ones before it. ``bad_words_token_ids`` gives such sequences directly;
    # the engine adds those of ``bad_words`` to it.
    bad_words: list[str] = field(default_factory=list)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    # Embed the prompt instead of continuing it: the output carries the prompt's last token's final
    # hidden state, L2-normalized (the last-token pooling of decoder embedding models such as
    # Qwen3-Embedding, as vLLM's embed task pools them), or for a sequence classifier that state's
    # label logits; one token is sampled and dropped.
    embed: bool = False
    # Samples per prompt, as vLLM's: the offline API (``LLM.generate``) runs n engine requests and
    # gathers them in one output's ``outputs``; one engine request is one sample, so the engine
    # itself takes only 1 (the servers fan out their own ``n``). Last, so the fields before it keep
    # their places for positional arguments.
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        # None where vLLM's optional fields take it: nothing of that kind.
        for name in ("stop", "stop_token_ids", "bad_words", "bad_words_token_ids"):
            if getattr(self, name) is None:
                setattr(self, name, [])
        self.logit_bias = _token_biases(self.logit_bias)
        for name in (*_INTEGER_FIELDS, "n"):
            value = getattr(self, name)
            if _whole(value) and type(value) is not int:  # numpy's: kept as Python's
                setattr(self, name, int(value))
        self._validate()

    def _validate(self) -> None:
        if not (_whole(self.n) and 1 <= self.n <= MAX_SAMPLES):
            raise SamplingParamsError("n", f"must be an integer in [1, {MAX_SAMPLES}], got {self.n!r}")
        for name in _INTEGER_FIELDS:
            value = getattr(self, name)
            if value is not None and not _whole(value):
                raise SamplingParamsError(name, f"must be an integer, got {value!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop", f"must be strings, got {self.stop!r}")
        if not all(_whole(t) for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", f"must be token ids, got {self.stop_token_ids!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", f"must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", f"must not exceed max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingParamsError("temperature", f"must be in [0, 100], got {self.temperature}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise SamplingParamsError("seed", f"must be a 64-bit integer, got {self.seed}")
        if not SEED_MIN <= self.priority <= SEED_MAX:
            raise SamplingParamsError("priority", f"must be a 64-bit integer, got {self.priority}")
        if self.cache_salt is not None and not (isinstance(self.cache_salt, str) and self.cache_salt):
            raise SamplingParamsError("cache_salt", "must be a non-empty string")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise SamplingParamsError("top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.typical_p <= 1.0:
            raise SamplingParamsError("typical_p", f"must be in (0, 1], got {self.typical_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise SamplingParamsError(
                "repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"must be in [-2, 2], got {value}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise SamplingParamsError(name, f"must be in [0, 20], got {value}")
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop", "stop strings must be non-empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(
                "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"
            )
        if (chars := sum(map(len, self.stop))) > MAX_STOP_CHARS:
            raise SamplingParamsError(
                "stop", f"the stop strings are {chars} characters; at most {MAX_STOP_CHARS}"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError(
                "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}"
            )
        if any(t < 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", "token ids must be non-negative")
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids or any(t < 0 for t in self.allowed_token_ids)
        ):
            raise SamplingParamsError("allowed_token_ids", "must be a non-empty list of token ids")
        if any(not word.strip() for word in self.bad_words):
            raise SamplingParamsError("bad_words", "words must have a non-space character")
        # A word gives two token sequences (as written and after a space), which the engine adds to
        # those given directly.
        for name, limit in (("bad_words", MAX_BAD_WORDS), ("bad_words_token_ids", 4 * MAX_BAD_WORDS)):
            count = len(getattr(self, name))
            if count > limit:
                raise SamplingParamsError(name, f"at most {limit}, got {count}")
        if any(not ids or any(t < 0 for t in ids) for ids in self.bad_words_token_ids):
            raise SamplingParamsError("bad_words_token_ids", "each must be a non-empty list of token ids")
        for token_id, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                raise SamplingParamsError("logit_bias", f"bias for token {token_id} must be in [-100, 100]")
        if self.embed and self.max_tokens != 1:
            raise SamplingParamsError("max_tokens", f"must be 1 to embed a prompt, got {self.max_tokens}")
        if self.structured_output is not None:
            problem = self.structured_output.problem()
            if problem is not None:
                raise SamplingParamsError("structured_output", problem)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def params_of_sample(params: SamplingParams, sample: int, scores_once: bool = True) -> SamplingParams:
    """The engine request of sample ``sample`` of a prompt asking ``params`` for several (the
    servers' choices, the offline API's ``n``): one sample, seeded ``sample_seed`` where a seed is
    given, and with ``scores_once``, scoring the prompt (``prompt_logprobs``) only in the first,
    whose scores the caller gives every sample (scoring bypasses the prefix cache)."""
    changes: dict[str, Any] = {}
    if params.n != 1:
        changes["n"] = 1
    if sample and params.seed is not None:
        changes["seed"] = sample_seed(params.seed, sample)
    if sample and scores_once and params.prompt_logprobs is not None:
        changes["prompt_logprobs"] = None
    return dataclasses.replace(params, **changes) if changes else params


def _whole(value: object) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, not a count or a token id);
    numpy's integers too."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_DIGITS = re.compile(r"-?[0-9]+")
# Counts and ids: whole numbers (None where the field allows it).
_INTEGER_FIELDS = ("max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs", "priority")


def _token_biases(biases: Mapping[Any, Any] | None) -> dict[int, float]:
    """``logit_bias`` keyed by token id: keys given as strings of digits (JSON's object keys) are
    read as ids, as the OpenAI API sends them; anything else is refused."""
    keyed: dict[int, float] = {}
    for key, bias in (biases or {}).items():
        if (isinstance(key, str) and _DIGITS.fullmatch(key)) or _whole(key):
            token_id = int(key)
        else:
            raise SamplingParamsError("logit_bias", f"keys must be token ids, got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, numbers.Real):
            raise SamplingParamsError(
                "logit_bias", f"bias for token {token_id} must be a number, got {bias!r}"
            )
        keyed[token_id] = float(bias)
    return keyed
