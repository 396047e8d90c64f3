"""Benchmark workloads: seeded random token prompts, ShareGPT conversations, and JSONL prompt files."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class TextTokenizer(Protocol):
    """What the datasets need; `load_tokenizer`'s result and the engine's tokenizer fit."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `prompt` is text or token ids; `input_len` is None when unknown."""

    prompt: str | list[int]
    max_tokens: int
    input_len: int | None


@dataclass(frozen=True)
class LengthRange:
    """Inclusive integer range that lengths are drawn uniformly from."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"length range needs 1 <= low <= high, got {self.low}:{self.high}")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """Parse `N` (a fixed length) or `LOW:HIGH`."""
        low, _, high = text.partition(":")
        return cls(int(low), int(high or low))

    def clipped(self, limit: int) -> LengthRange:
        return LengthRange(min(self.low, limit), min(self.high, limit))

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


class _HFTokenizer:
    """Adapter over `tokenizers.Tokenizer` without special tokens, so lengths count only prompt text."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a `tokenizer.json`, given either the file or a model folder that holds it."""
    location = Path(path)
    if location.is_dir():
        location = location / "tokenizer.json"
    if not location.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return _HFTokenizer(location)


def random_requests(
    num_prompts: int,
    input_len: LengthRange,
    output_len: LengthRange,
    seed: int,
    token_id_limit: int = 10000,
    tokenizer: TextTokenizer | None = None,
    prefix_len: int = 0,
) -> list[BenchRequest]:
    """Prompts of random token ids below `token_id_limit`, decoded to text when a tokenizer is given.
    With `prefix_len`, every prompt starts with the same `prefix_len` random tokens (a shared system
    prompt, which a prefix cache computes once) before its own `input_len` ones, as vLLM's
    `--random-prefix-len`.

    With a tokenizer the ids also stay below its vocabulary size: ids it does not know decode to nothing.

    Decoding then re-encoding need not give back the same count, so text prompts keep the drawn
    length only as a target; the client reads the real prompt length from the server's usage.
    """
    if tokenizer is not None:
        token_id_limit = min(token_id_limit, tokenizer.vocab_size)
    if prefix_len < 0:
        raise ValueError(f"the shared prefix's length must be at least 0, got {prefix_len}")
    rng = random.Random(seed)
    prefix = [rng.randrange(token_id_limit) for _ in range(prefix_len)]
    requests = []
    for _ in range(num_prompts):
        length = input_len.draw(rng)
        token_ids = prefix + [rng.randrange(token_id_limit) for _ in range(length)]
        prompt: str | list[int] = tokenizer.decode(token_ids) if tokenizer else token_ids
        requests.append(
            BenchRequest(prompt=prompt, max_tokens=output_len.draw(rng), input_len=len(token_ids))
        )
    return requests


def nanovllm_requests(vocab_size: int, max_model_len: int) -> tuple[list[BenchRequest], bool]:
    """The nano-vllm benchmark workload: 256 prompts, input and output lengths uniform in [100, 1024].

    Draws in nano-vllm's order from a generator seeded like its `random.seed(0)` (all prompts, then all
    output lengths; ids `randint(0, 10000)`, capped by the vocabulary), so a large-vocabulary model sees
    the very same token ids. Lengths are clipped so prompt plus output fits `max_model_len`; the flag
    says whether any were.
    """
    rng = random.Random(0)
    top_id = min(10000, vocab_size - 1)
    prompts = [[rng.randint(0, top_id) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    output_lens = [rng.randint(100, 1024) for _ in range(256)]
    requests = [
        BenchRequest(prompt=ids, max_tokens=max_tokens, input_len=len(ids))
        for ids, max_tokens in zip(prompts, output_lens, strict=True)
    ]
    return clip_to_context(requests, max_model_len)


def _fit_context(token_ids: list[int], max_tokens: int, max_model_len: int) -> tuple[list[int], int, bool]:
    """Shrink prompt and output in proportion until together they fit the model's context."""
    total = len(token_ids) + max_tokens
    if total <= max_model_len:
        return token_ids, max_tokens, False
    kept_prompt = max(1, len(token_ids) * max_model_len // total)
    kept_output = max(1, max_model_len - kept_prompt)
    return token_ids[:kept_prompt], kept_output, True


def clip_to_context(requests: list[BenchRequest], max_model_len: int) -> tuple[list[BenchRequest], bool]:
    """Fit token-id requests into `max_model_len`; returns the requests and whether any were clipped."""
    fitted, clipped = [], False
    for request in requests:
        if not isinstance(request.prompt, list):
            fitted.append(request)
            continue
        token_ids, max_tokens, was_clipped = _fit_context(request.prompt, request.max_tokens, max_model_len)
        clipped |= was_clipped
        fitted.append(BenchRequest(prompt=token_ids, max_tokens=max_tokens, input_len=len(token_ids)))
    return fitted, clipped


def sharegpt_requests(
    path: str | Path,
    num_prompts: int,
    seed: int,
    tokenizer: TextTokenizer | None = None,
    output_len: int | None = None,
) -> list[BenchRequest]:
    """First human turn as prompt, the reply's length as `max_tokens`, shuffled by `seed`.

    ShareGPT JSON is a list of `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}`.
    Without `output_len` the reply is measured with `tokenizer`, so one of the two is required.
    """
    if output_len is None and tokenizer is None:
        raise ValueError("sharegpt needs a tokenizer to size replies, or a fixed output length")
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = [_first_exchange(entry) for entry in entries]
    usable = [pair for pair in pairs if pair is not None]
    random.Random(seed).shuffle(usable)
    requests: list[BenchRequest] = []
    for prompt, reply in usable:
        if len(requests) == num_prompts:
            break
        input_len = len(tokenizer.encode(prompt)) if tokenizer else None
        max_tokens = output_len if output_len is not None else len(tokenizer.encode(reply))  # type: ignore[union-attr]
        if max_tokens < 1 or input_len == 0:
            continue
        requests.append(BenchRequest(prompt=prompt, max_tokens=max_tokens, input_len=input_len))
    return requests


def _first_exchange(entry: object) -> tuple[str, str] | None:
    """An entry's first human turn and the reply to it; None for an entry of another shape."""
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    if first.get("from") != "human" or second.get("from") != "gpt":
        return None
    prompt, reply = first.get("value"), second.get("value")
    return (prompt, reply) if isinstance(prompt, str) and isinstance(reply, str) else None


def _jsonl_request(line: str, where: str) -> BenchRequest:
    """One line's request; a line of another shape is a ValueError naming ``where`` (file:line)."""
    try:
        record = json.loads(line, parse_constant=refused_json_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: not JSON: {exc}") from None
    if not isinstance(record, dict) or "prompt" not in record or "max_tokens" not in record:
        raise ValueError(f"{where}: each line is a JSON object with 'prompt' and 'max_tokens'")
    prompt, max_tokens = record["prompt"], record["max_tokens"]
    is_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or is_ids):
        raise ValueError(f"{where}: 'prompt' is a text or a list of token ids")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"{where}: 'max_tokens' is a positive integer, got {max_tokens!r}")
    return BenchRequest(prompt=prompt, max_tokens=max_tokens, input_len=len(prompt) if is_ids else None)


def refused_json_constant(name: str) -> object:
    """``json.loads``' ``parse_constant``: NaN and Infinity, which no JSON body carries, refused."""
    raise ValueError(f"{name} is not a JSON number")


def jsonl_requests(path: str | Path, num_prompts: int | None = None) -> list[BenchRequest]:
    """One JSON object a line with `prompt` (text or token ids) and `max_tokens`; blank lines skipped."""
    requests = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            requests.append(_jsonl_request(line, f"{path}:{number}"))
            if num_prompts is not None and len(requests) == num_prompts:
                break
    return requests
