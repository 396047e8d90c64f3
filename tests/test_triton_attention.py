"""Triton paged-attention kernels against a plain PyTorch reference.

Runs on the CPU through the Triton interpreter (set before triton is first imported); with
``TRITON_INTERPRET=0`` and a CUDA device the same tests check the compiled kernels.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch
from triton_device import DEVICE, INTERPRETED  # before triton is imported: interpreted or compiled

from inferd.attention import triton_kernels
from inferd.attention.base import AttentionMetadata
from inferd.attention.triton_backend import TritonAttentionBackend

# Compiled fp32 dots run in tf32 on NVIDIA GPUs; half precision rounds P before P @ V.
TOLERANCE = {torch.float32: 2e-5 if INTERPRETED else 1e-2, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass
class PagedBatch:
    """One step's inputs: earlier context already in the cache, this step's K/V not yet stored."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_batch(
    context_lens: list[int],
    query_lens: list[int],
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedBatch:
    """Sequences whose blocks are scattered over the cache in shuffled order, padded block tables."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few blocks that belong to nobody
    shuffled = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = shuffled[used : used + n]
        used += n

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    total = sum(query_lens)
    slots = [
        int(block_tables[i, pos // block_size]) * block_size + pos % block_size
        for i, (c, n) in enumerate(zip(context_lens, seq_lens, strict=True))
        for pos in range(c, n)
    ]
    meta = AttentionMetadata.from_host(slots, query_lens, seq_lens, block_tables, DEVICE)
    return PagedBatch(
        q=randn(total, num_heads, head_dim).to(DEVICE),
        k=randn(total, num_kv_heads, head_dim).to(DEVICE),
        v=randn(total, num_kv_heads, head_dim).to(DEVICE),
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        meta=meta,
        scale=head_dim**-0.5,
    )


def store_reference(batch: PagedBatch) -> None:
    """What the store kernel must do, with plain indexing."""
    slots = batch.meta.slot_mapping.long()
    keep = slots >= 0
    block_size = batch.k_cache.shape[1]
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    batch.k_cache[blocks, offsets] = batch.k[keep]
    batch.v_cache[blocks, offsets] = batch.v[keep]


def reference_attention(batch: PagedBatch, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """Gather each sequence's keys from the cache and run causal softmax attention in fp32; with
    ``window``, each query row sees only its last ``window`` positions; with ``softcap``, scaled
    scores are capped at ``softcap * tanh(score / softcap)``."""
    meta, k_cache, v_cache = batch.meta, batch.k_cache.float(), batch.v_cache.float()
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = batch.q.shape[1] // num_kv_heads
    out = torch.empty(batch.q.shape, dtype=torch.float32, device=batch.q.device)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host, strict=True)):
        pos = torch.arange(seq_len, device=batch.q.device)
        blocks = meta.block_tables[i, pos // block_size].long()
        keys = k_cache[blocks, pos % block_size].repeat_interleave(group, dim=1)
        values = v_cache[blocks, pos % block_size].repeat_interleave(group, dim=1)
        q = batch.q[start : start + q_len].float()
        scores = torch.einsum("qhd,khd->hqk", q, keys) * batch.scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=batch.q.device)
        hidden = pos[None, None, :] > q_pos[None, :, None]
        if window:
            hidden |= pos[None, None, :] <= q_pos[None, :, None] - window
        scores = scores.masked_fill(hidden, float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        start += q_len
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def test_store_writes_each_token_to_its_slot_and_skips_negative_slots() -> None:
    batch = make_batch([5, 0], [3, 20], block_size=8, num_heads=4, num_kv_heads=2, head_dim=64)
    slot_mapping = batch.meta.slot_mapping.clone()
    slot_mapping[[1, 7]] = -1
    expected = make_batch([5, 0], [3, 20], block_size=8, num_heads=4, num_kv_heads=2, head_dim=64)
    expected.meta = AttentionMetadata(**{**vars(expected.meta), "slot_mapping": slot_mapping})
    store_reference(expected)

    triton_kernels.store_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, slot_mapping)

    torch.testing.assert_close(batch.k_cache, expected.k_cache, atol=0, rtol=0)
    torch.testing.assert_close(batch.v_cache, expected.v_cache, atol=0, rtol=0)


# (block_size, num_heads, num_kv_heads, head_dim, num_splits): MHA and GQA ratios 2 and 4.
DECODE_CASES = [
    (8, 2, 2, 64, 1),
    (16, 4, 2, 128, 1),
    (32, 8, 2, 64, 3),
    (16, 4, 1, 64, 2),
    (12, 2, 1, 64, 1),  # a block size that is not a power of two
]


@pytest.mark.parametrize(("block_size", "num_heads", "num_kv_heads", "head_dim", "num_splits"), DECODE_CASES)
def test_decode_matches_reference(
    block_size: int, num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int
) -> None:
    context_lens = [0, 16, 63, 299]  # ragged: 1 .. 300 keys, block boundaries on both sides
    batch = make_batch(context_lens, [1] * 4, block_size, num_heads, num_kv_heads, head_dim)
    store_reference(batch)
    m = batch.meta

    out = triton_kernels.paged_decode_attention(
        batch.q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, m.query_start_loc, batch.scale,
        num_splits,
    )  # fmt: skip

    assert_close(out, reference_attention(batch), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_launched_heads_first_gives_the_same_output(monkeypatch, num_splits: int) -> None:
    """The launch order changes which program runs when, never what a program computes."""
    batch = make_batch([0, 16, 63, 299], [1] * 4, 16, 8, 2, 64)
    store_reference(batch)
    m = batch.meta

    def decode() -> torch.Tensor:
        return triton_kernels.paged_decode_attention(
            batch.q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, m.query_start_loc,
            batch.scale, num_splits,
        )  # fmt: skip

    monkeypatch.setattr(triton_kernels, "_DECODE_HEADS_FIRST", False)
    assert triton_kernels._decode_grid(4, 2, num_splits) == (4, 2, num_splits)
    sequence_first = decode()
    monkeypatch.setattr(triton_kernels, "_DECODE_HEADS_FIRST", True)
    assert triton_kernels._decode_grid(4, 2, num_splits) == (8, 1, num_splits)
    assert torch.equal(decode(), sequence_first)


def test_decode_of_a_sequence_without_context_is_zero_not_nan() -> None:
    """Padded decode rows (e.g. to fill a captured batch size) have seq_len 0."""
    batch = make_batch([40], [1], block_size=16, num_heads=4, num_kv_heads=2, head_dim=64)
    store_reference(batch)
    q = torch.cat([batch.q, batch.q])
    seq_lens = torch.tensor([41, 0], dtype=torch.int32, device=DEVICE)
    block_tables = batch.meta.block_tables.repeat(2, 1)
    starts = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    for num_splits in (1, 2):
        out = triton_kernels.paged_decode_attention(
            q, batch.k_cache, batch.v_cache, block_tables, seq_lens, starts, batch.scale, num_splits
        )
        assert_close(out[0], reference_attention(batch)[0], torch.float32)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_decode_splits_the_context_only_when_programs_would_leave_sms_idle(monkeypatch) -> None:
    # The arithmetic at one program per SM and parts of 256 tokens or more (the H200's tunings
    # are 4 and 64).
    monkeypatch.setattr(triton_kernels, "_DECODE_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(triton_kernels, "_MIN_TOKENS_PER_SPLIT", 256)
    assert triton_kernels.default_num_splits(256, 8, 4096, num_sms=132) == 1
    assert triton_kernels.default_num_splits(1, 8, 4096, num_sms=132) == 16  # capped
    assert triton_kernels.default_num_splits(2, 8, 1024, num_sms=132) == 4  # >= 256 tokens a split
    assert triton_kernels.default_num_splits(1, 8, 100, num_sms=132) == 1
    assert triton_kernels.default_num_splits(32, 8, 2048, num_sms=132) == 1  # 256 programs fill 132 SMs


def test_decode_splits_a_mid_size_batch_for_more_programs_per_sm(monkeypatch) -> None:
    monkeypatch.setattr(triton_kernels, "_DECODE_PROGRAMS_PER_SM", 4)
    monkeypatch.setattr(triton_kernels, "_MIN_TOKENS_PER_SPLIT", 256)
    # 32 sequences of 8 KV heads: 256 programs, 528 wanted; 3 splits of at least 256 tokens.
    assert triton_kernels.default_num_splits(32, 8, 2048, num_sms=132) == 3
    assert triton_kernels.default_num_splits(32, 8, 600, num_sms=132) == 2
    assert triton_kernels.default_num_splits(32, 8, 511, num_sms=132) == 1
    assert triton_kernels.default_num_splits(128, 8, 2048, num_sms=132) == 1  # 1,024 programs


# (block_size, num_heads, num_kv_heads, head_dim)
EXTEND_CASES = [(8, 2, 2, 64), (16, 4, 2, 128), (32, 8, 2, 64)]


@pytest.mark.parametrize(("block_size", "num_heads", "num_kv_heads", "head_dim"), EXTEND_CASES)
def test_extend_matches_reference(block_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    # A fresh prefill, a one-token prompt, a chunk after a prefix-cache hit or earlier chunk,
    # a chunk ending on a block boundary, and a decode row in the same batch.
    context_lens = [0, 0, 100, 64, 230]
    query_lens = [37, 1, 28, 64, 1]
    batch = make_batch(context_lens, query_lens, block_size, num_heads, num_kv_heads, head_dim)
    store_reference(batch)
    m = batch.meta

    out = triton_kernels.paged_extend_attention(
        batch.q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, m.query_start_loc,
        m.max_query_len, batch.scale,
    )  # fmt: skip

    assert_close(out, reference_attention(batch), torch.float32)


def test_extend_of_a_long_prompt_matches_reference() -> None:
    batch = make_batch([0, 5], [300, 2], block_size=16, num_heads=2, num_kv_heads=1, head_dim=64)
    store_reference(batch)
    m = batch.meta

    out = triton_kernels.paged_extend_attention(
        batch.q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, m.query_start_loc,
        m.max_query_len, batch.scale,
    )  # fmt: skip

    assert_close(out, reference_attention(batch), torch.float32)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(
                INTERPRETED, reason="triton's interpreter multiplies bf16 tl.dot operands as raw uint16 bits"
            ),
        ),
    ],
)
def test_half_precision_matches_reference(dtype: torch.dtype) -> None:
    decode = make_batch([20, 150], [1, 1], 16, 4, 2, 64, dtype=dtype)
    extend = make_batch([0, 40], [30, 9], 16, 4, 2, 64, dtype=dtype)
    backend = TritonAttentionBackend(decode_splits=2)
    for batch in (decode, extend):
        caches = {"k_cache": batch.k_cache.clone(), "v_cache": batch.v_cache.clone()}
        expected = PagedBatch(**{**vars(batch), **caches})
        store_reference(expected)

        b = batch
        out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale)

        assert out.dtype == dtype
        assert torch.equal(batch.k_cache, expected.k_cache) and torch.equal(batch.v_cache, expected.v_cache)
        assert_close(out, reference_attention(expected), dtype)


def test_backend_stores_then_attends_with_strided_inputs() -> None:
    """q, k and v arrive as views of one fused projection, so their rows are not contiguous."""
    batch = make_batch([0, 70, 33], [12, 1, 5], 16, 4, 2, 64)
    fused = torch.cat([batch.q.flatten(1), batch.k.flatten(1), batch.v.flatten(1)], dim=1)
    q, k, v = fused.split([4 * 64, 2 * 64, 2 * 64], dim=1)
    q, k, v = q.view(-1, 4, 64), k.view(-1, 2, 64), v.view(-1, 2, 64)
    assert not q.is_contiguous()

    out = TritonAttentionBackend().forward(q, k, v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)

    reference = make_batch([0, 70, 33], [12, 1, 5], 16, 4, 2, 64)
    store_reference(reference)
    torch.testing.assert_close(batch.k_cache, reference.k_cache, atol=0, rtol=0)
    assert_close(out, reference_attention(reference), torch.float32)


@pytest.mark.skipif(
    importlib.util.find_spec("inferd.attention.torch_backend") is None, reason="no PyTorch backend yet"
)
@pytest.mark.parametrize(
    ("context_lens", "query_lens"), [([9, 200, 0], [1, 1, 1]), ([0, 48, 150], [25, 16, 1])]
)
def test_backend_matches_the_pytorch_backend(context_lens: list[int], query_lens: list[int]) -> None:
    from inferd.attention.torch_backend import TorchAttentionBackend

    triton_batch = make_batch(context_lens, query_lens, 16, 8, 2, 64)
    torch_batch = make_batch(context_lens, query_lens, 16, 8, 2, 64)

    outputs = [
        backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale)
        for backend, b in ((TritonAttentionBackend(), triton_batch), (TorchAttentionBackend(), torch_batch))
    ]

    torch.testing.assert_close(triton_batch.k_cache, torch_batch.k_cache, atol=0, rtol=0)
    torch.testing.assert_close(triton_batch.v_cache, torch_batch.v_cache, atol=0, rtol=0)
    assert_close(outputs[0], outputs[1], torch.float32)


@pytest.fixture(scope="module")
def attentive_llama(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama folder whose weights are large enough that greedy tokens depend on attention
    (at the usual init scale a random model mostly repeats the last prompt token). Written
    directly, without transformers, whose import alone takes seconds."""
    import json

    from safetensors.torch import save_file
    from tiny_models import save_tokenizer

    folder = tmp_path_factory.mktemp("attentive-llama")
    vocab = save_tokenizer(folder)
    hidden, inter, layers, heads, kv_heads, head_dim = 64, 128, 2, 4, 2, 16
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "eos_token_id": 0,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"model.layers.{i}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"model.layers.{i}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"model.layers.{i}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"model.layers.{i}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"model.layers.{i}.mlp.gate_proj.weight": (inter, hidden),
            f"model.layers.{i}.mlp.up_proj.weight": (inter, hidden),
            f"model.layers.{i}.mlp.down_proj.weight": (hidden, inter),
            f"model.layers.{i}.input_layernorm.weight": (hidden,),
            f"model.layers.{i}.post_attention_layernorm.weight": (hidden,),
        }
    gen = torch.Generator().manual_seed(1)
    tensors = {
        name: torch.randn(shape, generator=gen) * 0.25 if len(shape) == 2 else torch.ones(shape)
        for name, shape in shapes.items()
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.skipif(not INTERPRETED, reason="the engine test runs the CPU engine")
def test_greedy_tokens_equal_between_torch_and_triton_backends(attentive_llama) -> None:
    from inferd.llm import LLM
    from inferd.sampling_params import SamplingParams

    prefix = list(range(5, 29))  # three blocks of 8, cached by the first call and hit by the second
    first_call = [prefix + [7, 8]]
    # A prompt longer than the token budget is prefilled in two chunks.
    second_call = [prefix + [11], [3, 4], list(range(60, 100))]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[list[int]]] = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            attentive_llama, attention_backend=backend, device="cpu", block_size=8,
            max_num_batched_tokens=32, num_kv_blocks=48, max_model_len=384,
        )  # fmt: skip
        outputs = llm.generate(first_call, params) + llm.generate(second_call, params)
        tokens[backend] = [out.token_ids for out in outputs]
        assert llm.engine.stats().prefix_hits > 0  # the extend kernel read a cached prefix

    assert len({t for seq in tokens["torch"] for t in seq}) > 5  # the check is not vacuous
    assert tokens["triton"] == tokens["torch"]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 7, 40, 500])
def test_sliding_window_decode_sees_the_last_window_positions(num_splits: int, window: int) -> None:
    """Contexts shorter and longer than the window, split or not; a window of 500 covers them all."""
    batch = make_batch([0, 16, 63, 299], [1] * 4, 16, 8, 2, 64)
    store_reference(batch)
    m = batch.meta
    out = triton_kernels.paged_decode_attention(
        batch.q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, m.query_start_loc, batch.scale,
        num_splits, window=window,
    )  # fmt: skip
    assert_close(out, reference_attention(batch, window), torch.float32)
    if window < 300:  # the window changes the answer: the comparison is not vacuous
        assert (reference_attention(batch, window) - reference_attention(batch)).abs().max() > 1e-3


@pytest.mark.parametrize("window", [1, 5, 33])
def test_sliding_window_extend_and_both_backends_agree(window: int) -> None:
    """Fresh prompts, chunks after cached context and decode rows in one step, through the Triton
    kernels and the PyTorch backend, against the reference."""
    from inferd.attention.torch_backend import TorchAttentionBackend

    context_lens, query_lens = [0, 48, 150, 0], [25, 16, 1, 70]
    batches = [make_batch(context_lens, query_lens, 16, 8, 2, 64) for _ in range(2)]
    outputs = [
        backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale, window=window)
        for backend, b in zip((TritonAttentionBackend(), TorchAttentionBackend()), batches, strict=True)
    ]
    expected = reference_attention(batches[0], window)
    assert_close(outputs[0], expected, torch.float32)
    assert_close(outputs[1], expected, torch.float32)


def _poison_behind_windows(batch: PagedBatch, window: int) -> int:
    """NaN in every block no query of the step sees, as another request's blocks might hold (a
    sliding-window model gives them back); returns how many."""
    from inferd.attention.torch_backend import window_start_block

    m, block_size = batch.meta, batch.k_cache.shape[1]
    poisoned = 0
    for i, (q_len, seq_len) in enumerate(zip(m.query_lens_host, m.seq_lens_host, strict=True)):
        for block in m.block_tables[i, : window_start_block(seq_len - q_len, window, block_size)].tolist():
            batch.k_cache[block] = float("nan")
            batch.v_cache[block] = float("nan")
            poisoned += 1
    return poisoned


@pytest.mark.parametrize("num_splits", [1, 3])
def test_sliding_window_kernels_read_no_block_behind_the_window(num_splits: int) -> None:
    """Decode (split or not) and extend over caches whose blocks behind every window hold NaN give
    what the clean caches give."""
    window = 20
    decode = make_batch([16, 63, 299, 150], [1] * 4, 16, 8, 2, 64)
    store_reference(decode)
    m = decode.meta
    expected = reference_attention(decode, window)
    assert _poison_behind_windows(decode, window) > 10
    out = triton_kernels.paged_decode_attention(
        decode.q, decode.k_cache, decode.v_cache, m.block_tables, m.seq_lens, m.query_start_loc,
        decode.scale, num_splits, window=window,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float32)
    extend = make_batch([48, 150, 90], [16, 1, 33], 16, 8, 2, 64)
    store_reference(extend)
    expected = reference_attention(extend, window)
    assert _poison_behind_windows(extend, window) > 5
    e = extend
    out = TritonAttentionBackend().forward(
        e.q, e.k, e.v, e.k_cache, e.v_cache, e.meta, e.scale, window=window
    )
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.float32)


def test_sliding_window_decode_of_the_pytorch_backend() -> None:
    from inferd.attention.torch_backend import TorchAttentionBackend

    batch = make_batch([0, 16, 63, 299, 5, 40, 120, 77, 8, 200], [1] * 10, 16, 8, 2, 64)
    out = TorchAttentionBackend().forward(
        batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, batch.scale, window=24
    )
    assert_close(out, reference_attention(batch, 24), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_soft_capped_decode_matches_reference(num_splits: int) -> None:
    """Gemma 2's cap on the attention scores, in the decode kernel, with and without a window."""
    batch = make_batch([0, 16, 63, 299], [1] * 4, 16, 8, 2, 64)
    store_reference(batch)
    m = batch.meta
    for window in (0, 40):
        out = triton_kernels.paged_decode_attention(
            batch.q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, m.query_start_loc, batch.scale,
            num_splits, window=window, softcap=0.5,
        )  # fmt: skip
        expected = reference_attention(batch, window, softcap=0.5)
        assert_close(out, expected, torch.float32)
        assert (expected - reference_attention(batch, window)).abs().max() > 1e-2  # the cap bites


@pytest.mark.parametrize("window", [0, 5])
def test_soft_capped_extend_and_both_backends_agree(window: int) -> None:
    """Fresh prompts (the PyTorch backend's direct path among them), chunks after cached context
    and decode rows in one step, and a step of few-token queries (its padded path), capped."""
    from inferd.attention.torch_backend import TorchAttentionBackend

    for context_lens, query_lens in (([0, 48, 150, 0], [25, 16, 1, 70]), ([0, 30, 9], [3, 4, 1])):
        batches = [make_batch(context_lens, query_lens, 16, 8, 2, 64) for _ in range(2)]
        outputs = [
            backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, b.scale, window=window, softcap=0.5)
            for backend, b in zip((TritonAttentionBackend(), TorchAttentionBackend()), batches, strict=True)
        ]
        expected = reference_attention(batches[0], window, softcap=0.5)
        assert_close(outputs[0], expected, torch.float32)
        assert_close(outputs[1], expected, torch.float32)
        assert (expected - reference_attention(batches[0], window)).abs().max() > 1e-2


def test_soft_capped_decode_of_the_pytorch_backend() -> None:
    from inferd.attention.torch_backend import TorchAttentionBackend

    batch = make_batch([0, 16, 63, 299, 5, 40, 120, 77, 8, 200], [1] * 10, 16, 8, 2, 64)
    out = TorchAttentionBackend().forward(
        batch.q,
        batch.k,
        batch.v,
        batch.k_cache,
        batch.v_cache,
        batch.meta,
        batch.scale,
        window=24,
        softcap=0.5,
    )
    assert_close(out, reference_attention(batch, 24, softcap=0.5), torch.float32)


@pytest.mark.parametrize("arch", ["mistral-sliding", "gemma2", "gemma3", "smollm3"])
def test_a_sliding_window_model_gives_the_same_greedy_tokens_on_both_backends(
    tiny_model_factory, arch
) -> None:
    """A 12-token window (Mistral's in every layer, Gemma 2's and 3's in one of two; Gemma 2's
    scores capped), prompts of up to 70 tokens, chunked: the Triton kernels' windows (decode, and
    extend after cached chunks) against the PyTorch backend's."""
    from inferd import LLM, SamplingParams

    folder = tiny_model_factory(arch)
    prompts = [list(range(5, 5 + n)) for n in (70, 13, 3, 40)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outputs = [
        [o.token_ids for o in LLM(folder, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=32,
                                  attention_backend=backend, device=DEVICE.type).generate(prompts, params)]
        for backend in ("torch", "triton")
    ]  # fmt: skip
    assert outputs[0] == outputs[1]
