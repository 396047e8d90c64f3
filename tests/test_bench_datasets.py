"""Bench workloads: seeded reproducibility, length ranges, context clipping, ShareGPT and JSONL parsing."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from tiny_models import save_tokenizer

from inferd.bench.datasets import (
    BenchRequest,
    LengthRange,
    clip_to_context,
    jsonl_requests,
    load_tokenizer,
    nanovllm_requests,
    random_requests,
    sharegpt_requests,
)


class WordTokenizer:
    """One token per whitespace-separated word; ids index a fixed word list."""

    words = [f"w{i}" for i in range(50)]
    vocab_size = len(words)

    def encode(self, text: str) -> list[int]:
        return [self.words.index(word) if word in self.words else 0 for word in text.split()]

    def decode(self, token_ids: Sequence[int]) -> str:
        return " ".join(self.words[i] for i in token_ids)


def test_length_range_parses_fixed_and_ranges() -> None:
    assert LengthRange.parse("128") == LengthRange(128, 128)
    assert LengthRange.parse("100:1024") == LengthRange(100, 1024)
    with pytest.raises(ValueError):
        LengthRange.parse("10:5")
    with pytest.raises(ValueError):
        LengthRange.parse("0")


def test_random_requests_are_seeded_and_within_ranges() -> None:
    make = lambda seed: random_requests(200, LengthRange(5, 40), LengthRange(3, 9), seed, token_id_limit=50)  # noqa: E731
    first, again, other = make(1), make(1), make(2)
    assert first == again
    assert first != other
    assert {len(r.prompt) for r in first} <= set(range(5, 41))
    assert {r.max_tokens for r in first} <= set(range(3, 10))
    assert all(r.input_len == len(r.prompt) for r in first)
    assert max(max(r.prompt) for r in first) < 50  # type: ignore[type-var]
    # Uniform draws over 200 samples reach both ends of a small range.
    assert {min(r.max_tokens for r in first), max(r.max_tokens for r in first)} == {3, 9}


def test_random_requests_decode_to_text_with_a_tokenizer() -> None:
    requests = random_requests(
        5, LengthRange(4, 4), LengthRange(2, 2), 0, token_id_limit=50, tokenizer=WordTokenizer()
    )
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 4 for r in requests)
    # A limit above the vocabulary is capped to it, or unknown ids would decode to nothing.
    wide = random_requests(
        50, LengthRange(4, 4), LengthRange(2, 2), 0, token_id_limit=10000, tokenizer=WordTokenizer()
    )
    assert all(len(r.prompt.split()) == 4 for r in wide)  # type: ignore[union-attr]


def test_nanovllm_preset_matches_its_reference_draws() -> None:
    # nano-vllm's bench.py draws this way from the global generator after random.seed(0).
    reference = random.Random(0)
    prompts = [[reference.randint(0, 10000) for _ in range(reference.randint(100, 1024))] for _ in range(256)]
    output_lens = [reference.randint(100, 1024) for _ in range(256)]

    requests, clipped = nanovllm_requests(vocab_size=151936, max_model_len=4096)
    assert not clipped
    assert [r.prompt for r in requests] == prompts
    assert [r.max_tokens for r in requests] == output_lens


def test_nanovllm_preset_clips_to_a_small_model() -> None:
    requests, clipped = nanovllm_requests(vocab_size=400, max_model_len=512)
    assert clipped and len(requests) == 256
    assert all(len(r.prompt) + r.max_tokens <= 512 for r in requests)
    assert all(max(r.prompt) < 400 for r in requests)  # type: ignore[type-var]


def test_clip_to_context_keeps_short_requests_and_text() -> None:
    short = BenchRequest(prompt=[1, 2], max_tokens=3, input_len=2)
    text = BenchRequest(prompt="hello", max_tokens=100, input_len=None)
    long = BenchRequest(prompt=list(range(30)), max_tokens=30, input_len=30)
    fitted, clipped = clip_to_context([short, text, long], max_model_len=20)
    assert clipped
    assert fitted[:2] == [short, text]
    assert len(fitted[2].prompt) == 10 and fitted[2].max_tokens == 10


def _write_sharegpt(path: Path) -> Path:
    entries = [
        {
            "id": "a",
            "conversations": [{"from": "human", "value": "w1 w2 w3"}, {"from": "gpt", "value": "w4 w5"}],
        },
        {"id": "b", "conversations": [{"from": "gpt", "value": "w1"}, {"from": "human", "value": "w2"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "w6"}]},
        {
            "id": "d",
            "conversations": [{"from": "human", "value": "w7 w8"}, {"from": "gpt", "value": "w9 w1 w2"}],
        },
    ]
    path.write_text(json.dumps(entries))
    return path


def test_sharegpt_takes_the_first_exchange_and_sizes_replies(tmp_path: Path) -> None:
    path = _write_sharegpt(tmp_path / "sharegpt.json")
    requests = sharegpt_requests(path, num_prompts=10, seed=0, tokenizer=WordTokenizer())
    assert sorted((r.prompt, r.max_tokens, r.input_len) for r in requests) == [
        ("w1 w2 w3", 2, 3),
        ("w7 w8", 3, 2),
    ]
    assert sharegpt_requests(path, 10, seed=0, tokenizer=WordTokenizer()) == requests
    fixed = sharegpt_requests(path, num_prompts=1, seed=0, output_len=7)
    assert len(fixed) == 1 and fixed[0].max_tokens == 7 and fixed[0].input_len is None
    with pytest.raises(ValueError, match="tokenizer"):
        sharegpt_requests(path, 1, seed=0)


def test_jsonl_reads_text_and_token_prompts(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi there", "max_tokens": 5}\n\n{"prompt": [1, 2, 3], "max_tokens": 2}\n')
    assert jsonl_requests(path) == [
        BenchRequest(prompt="hi there", max_tokens=5, input_len=None),
        BenchRequest(prompt=[1, 2, 3], max_tokens=2, input_len=3),
    ]
    assert len(jsonl_requests(path, num_prompts=1)) == 1
    path.write_text('{"prompt": "no budget"}\n')
    with pytest.raises(ValueError, match="max_tokens"):
        jsonl_requests(path)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        # Each was a TypeError or OverflowError traceback, or (1.9) silently another budget.
        ("5", "each line is a JSON object with 'prompt' and 'max_tokens'"),
        ('"prompt max_tokens"', "each line is a JSON object"),
        ('{"prompt": "hi", "max_tokens": null}', "'max_tokens' is a positive integer"),
        ('{"prompt": "hi", "max_tokens": Infinity}', "not JSON: Infinity is not a JSON number"),
        ('{"prompt": "hi", "max_tokens": 1.9}', "'max_tokens' is a positive integer, got 1.9"),
        ('{"prompt": 5, "max_tokens": 2}', "'prompt' is a text or a list of token ids"),
        ("{nope", "not JSON"),
    ],
)
def test_a_jsonl_line_of_another_shape_is_refused_naming_it(tmp_path: Path, line: str, words: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine", "max_tokens": 3}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"prompts.jsonl:2: {re.escape(words)}"):
        jsonl_requests(path)


def test_sharegpt_entries_of_other_shapes_are_passed_over(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    good = {"conversations": [{"from": "human", "value": "w1"}, {"from": "gpt", "value": "w2 w3"}]}
    odd = ["text", {"conversations": "text"}, {"conversations": ["a", "b"]},
           {"conversations": [{"from": "human"}, {"from": "gpt", "value": "w"}]}]  # fmt: skip
    path.write_text(json.dumps([*odd, good]))
    requests = sharegpt_requests(path, num_prompts=10, seed=0, tokenizer=WordTokenizer())
    assert [(r.prompt, r.max_tokens) for r in requests] == [("w1", 2)]
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="a JSON list of conversations"):
        sharegpt_requests(path, num_prompts=10, seed=0, tokenizer=WordTokenizer())


def test_load_tokenizer_from_a_model_folder(tmp_path: Path) -> None:
    save_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    ids = tokenizer.encode("To be, or not to be")
    assert ids and tokenizer.decode(ids) == "To be, or not to be"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_a_random_prefix_is_shared_by_every_prompt() -> None:
    shared = random_requests(6, LengthRange(5, 9), LengthRange(4, 4), seed=2, prefix_len=12)
    prompts = [request.prompt for request in shared]
    assert all(isinstance(p, list) and p[:12] == prompts[0][:12] for p in prompts)  # type: ignore[index]
    assert len({tuple(p[12:]) for p in prompts}) == 6  # type: ignore[index]
    assert all(17 <= r.input_len == len(r.prompt) <= 21 for r in shared)
    # No prefix: the very workload the seed drew before prefixes existed.
    assert random_requests(6, LengthRange(5, 9), LengthRange(4, 4), seed=2, prefix_len=0) == random_requests(
        6, LengthRange(5, 9), LengthRange(4, 4), seed=2
    )
    with pytest.raises(ValueError, match="prefix"):
        random_requests(1, LengthRange(5, 5), LengthRange(4, 4), seed=0, prefix_len=-1)
