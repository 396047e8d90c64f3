"""The inverse-CDF temperature sampler (``sample/triton_inverse_cdf.py``): one uniform draw a
row, inverted through the running sum of the tempered softmax's weights.

Runs through Triton's interpreter on the CPU, or compiled on a GPU with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from philox_reference import philox_uniforms
from triton_device import DEVICE  # before triton is imported: interpreted or compiled

from inferd.sample import triton_inverse_cdf


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 8 tokens, so a small vocabulary spans several blocks and parts."""
    monkeypatch.setattr(triton_inverse_cdf, "_BLOCK", 8)


def _sample(
    logits: torch.Tensor, temperatures: torch.Tensor, seed: int, parts: int | None = None
) -> list[int]:
    """The kernel's tokens, on the device the tests run on, as a list."""
    tokens = triton_inverse_cdf.inverse_cdf_sample(logits.to(DEVICE), temperatures.to(DEVICE), seed, parts)
    return tokens.tolist()


@pytest.mark.usefixtures("small_blocks")
def test_draws_follow_the_tempered_softmax() -> None:
    """600 rows of the same 6 logits (one block of 8), then of 20 logits (3 blocks): each
    token's count within 5 standard deviations of its expected count. Ignoring the temperature
    would put token 3 of the first row 11 deviations off."""
    rows, temperature = 600, 0.5
    first = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, 1.5])
    second = torch.linspace(-1.0, 1.5, 20)
    for row in (first, second):
        tokens = torch.tensor(_sample(row.repeat(rows, 1), torch.full((rows,), temperature), seed=11))
        counts = torch.bincount(tokens, minlength=row.numel()).double()
        expected = torch.softmax(row.double() / temperature, dim=0) * rows
        sigma = (expected * (1 - expected / rows)).sqrt()
        assert ((counts - expected).abs() <= 5 * sigma).all(), (counts, expected)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize(("vocab", "parts"), [(37, 1), (37, 3), (203, 4), (203, 64)])
def test_each_row_inverts_its_own_philox_draws(vocab: int, parts: int) -> None:
    """Row ``r`` draws, with word 0 of Philox counter ``r``, the block whose running softmax mass
    (in float64 here) first passes that share of the total, then with word 1 the token whose
    running mass within the block first passes that share of the block's: the kernel's tokens
    must be those. Statistical tests would not see rows sharing a draw, a block searched in the
    wrong order or a search stopping a token early or late; this does, across blocks and parts."""
    rows, seed, block = 12, 4321, triton_inverse_cdf._BLOCK
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    temperatures = torch.linspace(0.3, 3.0, rows)
    tokens = _sample(logits, temperatures, seed, parts)
    uniforms = philox_uniforms(seed, np.arange(rows)).astype(np.float64)
    weights = np.exp((logits.double() / temperatures.double()[:, None]).numpy())
    for row in range(rows):
        masses = np.add.reduceat(weights[row], np.arange(0, vocab, block))
        chosen, near_block = _inverted(masses, uniforms[row, 0])
        inside = weights[row, chosen * block : (chosen + 1) * block]
        picked, near_token = _inverted(inside, uniforms[row, 1])
        # A float32 sum may put a target within rounding of a boundary on either side of it.
        assert tokens[row] == chosen * block + picked or near_block or near_token, (row, tokens[row])


def _inverted(weights: np.ndarray, uniform: float) -> tuple[int, bool]:
    """The index whose running sum first passes ``uniform`` of the total, and whether the target
    lies within float32 rounding of a boundary."""
    running = np.cumsum(weights)
    target = uniform * running[-1]
    return int(np.searchsorted(running, target, side="right")), bool(
        np.abs(running - target).min() < 1e-5 * running[-1]
    )


@pytest.mark.usefixtures("small_blocks")
def test_a_draw_does_not_depend_on_how_the_blocks_are_split() -> None:
    """Each block's max and mass are its own, whichever program computes them: any split gives
    the tokens of the unsplit one, parts of several blocks and a short last block included. The
    logits sit far below 0, so a weight taken relative to 0 rather than the row's largest logit
    would underflow."""
    vocab = 37
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(4)) - 1000
    temperatures = torch.tensor([0.3, 1.0, 2.0, 5.0, 50.0])
    for seed in (1, 2, 3):
        whole = _sample(logits, temperatures, seed, 1)
        for parts in (2, 3, 5, 64):
            assert _sample(logits, temperatures, seed, parts) == whole, parts


@pytest.mark.usefixtures("small_blocks")
def test_every_token_of_every_block_can_be_drawn_and_none_outside() -> None:
    """Uniform draws over 20 tokens in 3 blocks of 8 (the last one 4): every id comes up, the
    first and last of each block included, and none outside the vocabulary."""
    vocab, rows = 20, 160
    tokens = _sample(torch.zeros(rows, vocab), torch.ones(rows), seed=7, parts=3)
    assert set(tokens) == set(range(vocab))


@pytest.mark.usefixtures("small_blocks")
def test_tokens_of_no_weight_are_never_drawn() -> None:
    """-inf logits (whole blocks of them, and tokens between finite ones) are never drawn, not
    even when rounding leaves the target at the end of the running sum: a row where one token
    holds nearly all the mass and the others sit at the bottom of float32's range."""
    vocab, rows = 30, 80
    logits = torch.full((rows, vocab), float("-inf"))
    allowed = [9, 11, 12, 27]  # blocks 1 and 3; blocks 0 and 2 have no finite logit
    logits[:, allowed] = torch.tensor([0.0, 1.0, -1.0, 0.5])
    tokens = _sample(logits, torch.ones(rows), seed=3)
    assert set(tokens) == set(allowed)
    lopsided = torch.full((rows, vocab), -80.0)
    lopsided[:, 5] = 80.0
    lopsided[:, 17:] = float("-inf")
    assert _sample(lopsided, torch.ones(rows), seed=5) == [5] * rows


# The NaN and infinite rows make NaNs on purpose; the interpreter's numpy says so.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_each_row_uses_its_own_temperature_and_odd_rows_stay_in_the_vocabulary() -> None:
    vocab = 37  # one block of the default 1,024, mostly past the vocabulary
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2))
    cold = torch.tensor([1e-4, 1e-4, 1e-4, 50.0, 50.0, 50.0])
    draws = [_sample(logits, cold, seed=s) for s in range(20)]
    assert all(d[:3] == logits[:3].argmax(dim=-1).tolist() for d in draws)  # a tiny temperature is greedy
    assert len({t for d in draws for t in d[3:]}) > 10  # a huge one is near uniform
    broken = torch.zeros(3, vocab)
    broken[0, 4] = float("nan")
    broken[1, :] = float("-inf")
    broken[2, 7] = float("inf")
    assert all(0 <= t < vocab for t in _sample(broken, torch.ones(3), seed=1))


def test_half_precision_logits_are_read_as_they_are() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    temperatures = torch.full((4,), 0.7)
    assert _sample(logits, temperatures, seed=9) == _sample(logits.float(), temperatures, seed=9)


def test_seeds_repeat_and_differ() -> None:
    logits, temperatures = torch.zeros(8, 50), torch.ones(8)
    first = _sample(logits, temperatures, seed=5)
    assert first == _sample(logits, temperatures, seed=5)
    assert first != _sample(logits, temperatures, seed=6)
    assert len(set(first)) > 1  # rows draw independent numbers


def test_rejects_mismatched_temperatures() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        _sample(torch.zeros(3, 5), torch.ones(2), seed=0)
    assert _sample(torch.zeros(0, 5), torch.ones(0), seed=0) == []
