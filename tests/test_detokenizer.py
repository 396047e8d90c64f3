from __future__ import annotations

import pytest

from inferd.engine.detokenizer import IncrementalDetokenizer, find_stop
from inferd.engine.tokenizer import Tokenizer

TEXT = "Café naïve 東京 🙂 Привет, to be or not to be."


@pytest.fixture(scope="module")
def tokenizer(tiny_llama) -> Tokenizer:
    return Tokenizer(tiny_llama)


def test_incremental_text_equals_full_decode_and_never_splits_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    # Byte-level BPE: some multi-byte characters span several tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids) == TEXT


def test_prompt_context_does_not_leak_into_output(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Hello there")
    ids = tokenizer.encode(" friend")
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    assert "".join(detok.add(i) for i in ids) == " friend"


def test_find_stop_only_looks_at_new_text() -> None:
    assert find_stop("abc STOP", 2, ["STOP"]) == (4, "STOP")
    assert find_stop("abc STOP xyz", 3, ["STOP"]) is None
    assert find_stop("abXY", 1, ["XY", "bX"]) == (2, "XY")  # "bX" was complete before the new "Y"
    assert find_stop("abXY", 2, ["XY", "bX"]) == (1, "bX")  # earliest match wins
    assert find_stop("abc", 1, []) is None
    # The stop found is the one reported, not the first in the list starting at the same place.
    assert find_stop(" ab a", 2, ["a", "ab a"]) == (1, "ab a")


def test_decode_all_equals_the_incremental_text(tokenizer: Tokenizer) -> None:
    import random

    rng = random.Random(0)
    vocab = tokenizer.vocab_size
    texts = [TEXT, " and 🙂🙂 then", "東京"]
    random_ids = [[rng.randrange(vocab) for _ in range(40)] for _ in range(20)]
    cases = [tokenizer.encode(t) for t in texts] + random_ids
    prompt = tokenizer.encode("Hello there")
    for ids in cases:
        incremental = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
        streamed = "".join(incremental.add(i) for i in ids) + incremental.flush()
        at_once = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True).decode_all(ids)
        assert at_once == streamed


def test_token_bytes_rebuild_characters_split_over_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == TEXT.encode()
    # A piece of a character is its own bytes, not the U+FFFD its decoding shows.
    split = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert split and all("\ufffd".encode() not in tokenizer.token_bytes(i) for i in split)
    for special in tokenizer.special_token_ids:
        assert (
            tokenizer.token_bytes(special) == tokenizer.decode([special], skip_special_tokens=False).encode()
        )


def test_a_prompt_ending_inside_a_character_leaves_streamed_and_whole_text_equal(
    tokenizer: Tokenizer,
) -> None:
    import random

    split = tokenizer.encode("é", add_special_tokens=False)
    assert len(split) == 2 and all("\ufffd" in tokenizer.decode([i]) for i in split)
    prompt = tokenizer.encode("Caf", add_special_tokens=False) + split[:1]  # ends after é's first byte
    rng = random.Random(1)
    outputs = [split[1:] + tokenizer.encode(" naïve", add_special_tokens=False)]
    outputs += [[rng.randrange(tokenizer.vocab_size) for _ in range(24)] for _ in range(20)]
    for ids in outputs:
        incremental = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
        streamed = "".join(incremental.add(i) for i in ids) + incremental.flush()
        at_once = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True).decode_all(ids)
        assert streamed == at_once == tokenizer.decode(ids)


def test_token_bytes_of_sentencepiece_byte_fallback_pieces(tmp_path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "▁caf": 3}
    spm_like = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    spm_like.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    spm_like.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path)
    assert [tokenizer.token_bytes(i) for i in (3, 1, 2)] == [b" caf", b"\xc3", b"\xa9"]
    assert tokenizer.decode([3, 1, 2]) == " café"
