"""The Triton grouped matmul for routed experts (``layers/triton_moe.py``) against the torch experts.

Runs on the CPU through the Triton interpreter; with ``TRITON_INTERPRET=0`` and a CUDA device the
same tests check the compiled kernel.
"""

from __future__ import annotations

import pytest
import torch
from triton_device import DEVICE, INTERPRETED  # before triton is imported: interpreted or compiled

from inferd import LLM, SamplingParams
from inferd.layers import triton_moe
from inferd.models.moe import Experts

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])


def _experts(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype) -> Experts:
    gen = torch.Generator().manual_seed(1)
    experts = Experts(num_experts, hidden, intermediate)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * hidden**-0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * intermediate**-0.5)
    return experts.to(dtype=dtype, device=DEVICE)


def _routing(tokens: int, top_k: int, num_experts: int, skip: int | None = None) -> tuple[torch.Tensor, ...]:
    """Distinct experts per token (``skip`` never chosen) and positive weights."""
    gen = torch.Generator().manual_seed(tokens)
    pool = [e for e in range(num_experts) if e != skip]
    chosen = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=gen)[:top_k]]
                          for _ in range(tokens)])  # fmt: skip
    weights = torch.rand(tokens, top_k, generator=gen)
    return chosen.to(DEVICE), weights.to(DEVICE)


@torch.no_grad()
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "hidden", "intermediate"),
    [
        (1, 2, 4, 32, 16),  # one decode row: blocks of 16 rows, mostly padding
        (9, 3, 8, 48, 40),  # features and inner size not multiples of the tiles
        (40, 2, 4, 64, 24),  # some 20 rows per expert: blocks of 32
        (300, 2, 4, 32, 16),  # a prompt step: blocks of 64
    ],
)
def test_routed_experts_match_the_torch_experts(
    dtype: torch.dtype, tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int
) -> None:
    experts = _experts(num_experts, hidden, intermediate, dtype)
    chosen, weights = _routing(tokens, top_k, num_experts, skip=num_experts - 1)  # one expert idle
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2)).to(dtype=dtype, device=DEVICE)
    expected = experts(x, weights, chosen)
    got = triton_moe.routed_experts(x, experts.gate_up_proj, experts.down_proj, weights, chosen)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_pairs_lays_each_experts_pairs_in_whole_blocks(block_m: int) -> None:
    chosen = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 4]], device=DEVICE)  # expert 3 idle
    pair_ids, block_expert = triton_moe.align_pairs(chosen, num_experts=5, block_m=block_m)
    flat = chosen.reshape(-1).tolist()
    pairs, owners = pair_ids.tolist(), block_expert.tolist()
    assert sorted(p for p in pairs if p < len(flat)) == list(range(len(flat)))  # each pair once
    assert set(pairs) - set(range(len(flat))) <= {len(flat)}  # the rest is padding
    for block, owner in enumerate(owners):
        members = [p for p in pairs[block * block_m : (block + 1) * block_m] if p < len(flat)]
        if owner < 0:
            assert not members
        else:
            assert members and all(flat[p] == owner for p in members)
    assert [o for o in owners if o >= 0] == [0, 1, 2, 4]  # one block each, in expert order


def test_an_engine_with_triton_moe_gives_the_torch_experts_tokens(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3-moe")
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40, 1)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    options = dict(device=DEVICE.type, kv_cache_memory="16MiB", block_size=8)
    expected = [o.token_ids for o in LLM(folder, triton_moe=False, **options).generate(prompts, params)]
    llm = LLM(folder, triton_moe=True, **options)
    assert llm.engine.config.uses_triton_moe
    experts = [m for m in llm.engine.core.runner.model.modules() if isinstance(m, Experts)]  # type: ignore[attr-defined]
    assert experts and all(e.use_triton for e in experts)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
