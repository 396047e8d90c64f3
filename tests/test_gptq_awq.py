"""GPTQ and AWQ checkpoints (``quant_method`` "gptq" / "awq", ``models/gptq_awq.py``): the engine
reads their packed words, zero points and scales as the model they stand for, which transformers
computes from a plain float32 copy (it reads these formats only through GPU packages)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from quantized_checkpoints import GPTQ_AWQ_LAYOUTS, INT_GROUP, make_gptq_awq_checkpoint
from safetensors.torch import load_file
from tiny_models import copy_with_config, copy_with_tensors, greedy_continuations

from inferd import LLM, SamplingParams
from inferd.config import ModelConfig, ModelLoadError
from inferd.engine.request import Request
from inferd.layers import quantized
from inferd.models import gptq_awq
from inferd.quant_config import QuantScheme, read_quantization


def _prompt(vocab: int) -> list[int]:
    return [(11 * i + 5) % vocab for i in range(37)]


def _our_logits(folder: Path, prompt: list[int]) -> tuple[LLM, torch.Tensor]:
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8)
    core = llm.engine.core
    core.add_request(Request("r", prompt, SamplingParams(max_tokens=1), frozenset(), 1))
    return llm, core.runner.logits_for(core.scheduler.schedule())


def _their_logits(folder: Path, prompt: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0].float()


@pytest.fixture(scope="module")
def folders(tiny_model_factory, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(arch, layout) -> (the checkpoint, its widened float32 copy)."""
    made = {}
    for arch in ("llama", "qwen2"):
        for layout in GPTQ_AWQ_LAYOUTS:
            root = tmp_path_factory.mktemp(f"{arch}-{layout}")
            folder = make_gptq_awq_checkpoint(tiny_model_factory(arch), root / "m", layout, root / "wide")
            made[arch, layout] = folder, root / "wide"
    return made


@pytest.mark.parametrize("layout", list(GPTQ_AWQ_LAYOUTS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_transformers_on_the_model_the_checkpoint_stands_for(
    folders, tiny_model_factory, arch: str, layout: str
) -> None:
    folder, widened = folders[arch, layout]
    prompt = _prompt(ModelConfig.from_folder(folder).vocab_size)
    llm, ours = _our_logits(folder, prompt)
    theirs = _their_logits(widened, prompt)
    assert (ours - theirs).abs().max().item() < 1e-4
    # The quantization is real: the unquantized model is further off than the check.
    _, unquantized = _our_logits(tiny_model_factory(arch), prompt)
    assert (unquantized - theirs).abs().max().item() > 1e-3
    # 4-bit weights stay in their int32 words, 8-bit ones are int8; only asymmetric ones keep
    # zero points, and the groups are the checkpoint's.
    quant = GPTQ_AWQ_LAYOUTS[layout]
    asymmetric = quant["quant_method"] == "awq" or quant["sym"] is False
    layer = llm.engine.core.runner.model.model.layers[1]
    attention, mlp = layer.self_attn, layer.mlp
    for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
        assert linear.weight.dtype == (torch.int32 if quant["bits"] == 4 else torch.int8)
        assert ("weight_zero_point" in linear._parameters) == asymmetric
        group = linear.in_features if quant["group_size"] == -1 else INT_GROUP
        assert linear.weight_block == (1, group)


def test_greedy_batch_matches_transformers(folders) -> None:
    folder, widened = folders["qwen2", "awq"]
    vocab = ModelConfig.from_folder(folder).vocab_size
    prompts = [[(13 * i + j) % vocab for i in range(5 + 7 * j)] for j in range(4)]
    model = transformers.AutoModelForCausalLM.from_pretrained(widened, dtype=torch.float32).eval()
    expected = greedy_continuations(model, prompts, 10)
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))
    assert [o.token_ids for o in outputs] == expected


def test_configs_as_the_hub_ships_them() -> None:
    # Qwen2.5's GPTQ-Int4 and GPTQ-Int8 releases, and its AWQ ones.
    qwen_gptq = {"bits": 4, "damp_percent": 0.01, "desc_act": False, "group_size": 128,
                 "modules_in_block_to_quantize": None, "quant_method": "gptq", "sym": True,
                 "true_sequential": True}  # fmt: skip
    assert read_quantization({"quantization_config": qwen_gptq}) == QuantScheme(
        "gptq", (1, 128), "int4", packed=True, zero_point_offset=1
    )
    assert read_quantization({"quantization_config": {**qwen_gptq, "bits": 8}}) == QuantScheme(
        "gptq", (1, 128), "int8", zero_point_offset=1
    )
    v2 = {**qwen_gptq, "sym": False, "checkpoint_format": "gptq_v2", "group_size": -1}
    assert read_quantization({"quantization_config": v2}) == QuantScheme(
        "gptq", None, "int4", packed=True, zero_points=True
    )
    assert read_quantization({"quantization_config": {**qwen_gptq, "desc_act": True}}).input_order  # type: ignore[union-attr]
    # GPTQModel's newer configs name the layout "format"; "-:" dynamic keys only skip modules.
    newer = {**qwen_gptq, "format": "gptq", "dynamic": {"-:.*mlp.*": {}}}
    assert read_quantization({"quantization_config": newer}).zero_point_offset == 1  # type: ignore[union-attr]
    qwen_awq = {"bits": 4, "group_size": 128, "modules_to_not_convert": None, "quant_method": "awq",
                "version": "gemm", "zero_point": True}  # fmt: skip
    assert read_quantization({"quantization_config": qwen_awq}) == QuantScheme(
        "awq", (1, 128), "int4", packed=True, zero_points=True
    )


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ checkpoints of bits 3 are not"),
        ({"quant_method": "gptq", "group_size": 128}, "GPTQ checkpoints of bits None are not"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "format 'marlin'"),
        ({"quant_method": "gptq", "bits": 4, "is_marlin_format": True}, "Marlin's layout"),
        ({"quant_method": "gptq", "bits": 8, "sym": False}, "asymmetric 8-bit GPTQ"),
        ({"quant_method": "gptq", "bits": 4, "dynamic": {"+:.*down.*": {"bits": 8}}}, "'dynamic' overrides"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size must be a positive"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ layout 'gemv'"),
        ({"quant_method": "awq", "bits": 4, "format": "gemv_fast"}, "AWQ layout 'gemv_fast'"),
        ({"quant_method": "awq", "bits": 4, "backend": "llm-awq"}, "AWQ layout 'llm-awq'"),
        ({"quant_method": "awq", "bits": 4, "zero_point": False}, "without zero points"),
        ({"quant_method": "awq", "bits": 8}, "8-bit weights are not supported"),
    ],
)  # fmt: skip
def test_layouts_not_computed_are_refused_at_load(tiny_model_factory, tmp_path, quant, message) -> None:
    folder = copy_with_config(tiny_model_factory("llama"), tmp_path / "m", quantization_config=quant)
    with pytest.raises(ModelLoadError, match=message):
        LLM(folder, kv_cache_memory="4MiB")


def test_words_as_the_formats_pack_them() -> None:
    """Columns 0..7 of values 0..7: AutoAWQ packs them as 0x75316420 (fields in the order 0 2 4 6 1
    3 5 7), GPTQ as 0x76543210. Zero points of 1..8 in GPTQ's first format are stored as 0..7,
    one taken from every field at once; a zero point of 0 borrows from the field above."""
    awq = QuantScheme("awq", (1, 8), "int4", packed=True, zero_points=True)
    gptq = QuantScheme("gptq", (1, 8), "int4", packed=True, zero_points=True, zero_point_offset=1)
    values = torch.arange(8, dtype=torch.int8)[None] - 8  # signed, as the engine holds them
    (_, awq_words), (_, awq_zeros), _ = _engine_tensors_of(awq, qweight=[[0x75316420]], qzeros=[[0x75316420]])
    # One input column, eight outputs: eight rows of one value each once held.
    assert torch.equal(quantized.unpack_int32(awq_words, 4, 1).t(), values)
    assert awq_zeros.flatten().tolist() == values.flatten().tolist()
    (_, gptq_words), (_, gptq_zeros), _ = _engine_tensors_of(
        gptq, qweight=[[0x76543210]], qzeros=[[0x76543210]]
    )
    assert torch.equal(gptq_words.t(), torch.tensor([[0x76543210]], dtype=torch.int32))
    assert (gptq_zeros.flatten() + 8).tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    # Zero points 0, 1, ..., 7 stored in the first format: 0x76543210 - 0x11111111 wraps.
    stored = (0x76543210 - 0x11111111) & 0xFFFFFFFF
    _, (_, zeros), _ = _engine_tensors_of(
        gptq, qweight=[[0]], qzeros=[[stored - (1 << 32) if stored >= 1 << 31 else stored]]
    )
    assert (zeros.flatten() + 8).tolist() == list(range(8))


def test_words_are_unpacked_where_the_model_is() -> None:
    """On a GPU the loader has the words repacked there; "meta" stands in for it here."""
    awq = QuantScheme("awq", (1, 8), "int4", packed=True, zero_points=True)
    for name in ("m.qweight", "m.qzeros"):
        ((_, held),) = gptq_awq.engine_tensors(name, torch.zeros(8, 1, dtype=torch.int32), awq, device="meta")
        assert held.device.type == "meta"
    # An activation order's g_idx too: the fused pieces' orders are compared on that device.
    ordered = QuantScheme("gptq", (1, 8), "int4", packed=True, input_order=True)
    ((_, g_idx),) = gptq_awq.engine_tensors(
        "m.g_idx", torch.zeros(8, dtype=torch.int32), ordered, device="meta"
    )
    assert g_idx.device.type == "meta"


def _engine_tensors_of(scheme: QuantScheme, qweight: list, qzeros: list) -> list[tuple[str, torch.Tensor]]:
    tensors = {"m.qweight": qweight, "m.qzeros": qzeros, "m.scales": [[1.0] * 8]}
    return [
        out
        for name, values in tensors.items()
        for out in gptq_awq.engine_tensors(
            name, torch.tensor(values, dtype=torch.float16 if name == "m.scales" else torch.int32), scheme
        )
    ]


def test_checkpoints_that_cannot_be_read_right_are_refused(folders, tmp_path) -> None:
    gptq, _ = folders["llama", "gptq-int4"]
    # Groups out of order, where the config does not say desc_act.
    g_idx = "model.layers.0.mlp.down_proj.g_idx"
    shuffled = copy_with_tensors(
        gptq, tmp_path / "a", lambda t: t.update({g_idx: t[g_idx].flip(0).contiguous()})
    )
    with pytest.raises(ModelLoadError, match="down_proj.g_idx' puts input columns in groups out of order"):
        LLM(shuffled, kv_cache_memory="4MiB")
    # A symmetric checkpoint whose zero points are not the middle of the range.
    zeros = "model.layers.1.self_attn.k_proj.qzeros"
    off_middle = copy_with_tensors(gptq, tmp_path / "b", lambda t: t.update({zeros: t[zeros] + 1}))
    with pytest.raises(ModelLoadError, match="k_proj.qzeros': a symmetric checkpoint's zero points must all"):
        LLM(off_middle, kv_cache_memory="4MiB")
    # A missing piece is named as the format names it.
    awq, _ = folders["llama", "awq"]
    lonely = copy_with_tensors(awq, tmp_path / "c", lambda t: t.pop("model.layers.1.self_attn.v_proj.qzeros"))
    with pytest.raises(ModelLoadError, match=r"lacks tensors: model.layers.1.self_attn.v_proj.qzeros$"):
        LLM(lonely, kv_cache_memory="4MiB")
    no_words = copy_with_tensors(awq, tmp_path / "d", lambda t: t.pop("model.layers.0.mlp.up_proj.qweight"))
    with pytest.raises(ModelLoadError, match=r"lacks tensors: model.layers.0.mlp.up_proj.qweight$"):
        LLM(no_words, kv_cache_memory="4MiB")
    words = "model.layers.0.mlp.up_proj.qweight"
    as_floats = copy_with_tensors(awq, tmp_path / "e", lambda t: t.update({words: t[words].float()}))
    with pytest.raises(ModelLoadError, match="up_proj.qweight' must be 2-D int32 words"):
        LLM(as_floats, kv_cache_memory="4MiB")


def test_activation_order_reorders_each_projections_input(folders, tmp_path) -> None:
    """A projection quantized in activation order holds its columns group by group and reorders its
    input alike; the pieces of a fused projection share one order, and each group must have its
    size."""
    folder, _ = folders["llama", "gptq-int4-act-order"]
    llm = LLM(folder, kv_cache_memory="4MiB")
    layer = llm.engine.core.runner.model.model.layers[0]
    g_idx = load_file(folder / "model.safetensors")["model.layers.0.self_attn.q_proj.g_idx"].long()
    order = layer.self_attn.qkv_proj.input_order
    assert order is not None and torch.equal(g_idx[order], torch.arange(g_idx.numel()) // INT_GROUP)
    assert layer.mlp.down_proj.input_order is not None and "g_idx" not in layer.mlp.down_proj._parameters
    k_idx = "model.layers.1.self_attn.k_proj.g_idx"
    apart = copy_with_tensors(
        folder, tmp_path / "a", lambda t: t.update({k_idx: t[k_idx].roll(1).contiguous()})
    )
    with pytest.raises(
        ModelLoadError, match=r"layers.1.self_attn.[qk]_proj.g_idx' orders the input columns otherwise"
    ):
        LLM(apart, kv_cache_memory="4MiB")
    v_idx = "model.layers.1.self_attn.v_proj.g_idx"
    short = copy_with_tensors(folder, tmp_path / "s", lambda t: t.update({v_idx: t[v_idx][:-1].contiguous()}))
    with pytest.raises(ModelLoadError, match=r"v_proj.g_idx' has shape \(63,\), expected \(64,\)"):
        LLM(short, kv_cache_memory="4MiB")
    o_idx = "model.layers.1.self_attn.o_proj.g_idx"
    uneven = copy_with_tensors(folder, tmp_path / "b", lambda t: t[o_idx].__setitem__(0, 1 - t[o_idx][0]))
    with pytest.raises(ModelLoadError, match="o_proj.g_idx does not give every group 32 input columns"):
        LLM(uneven, kv_cache_memory="4MiB")


def test_zero_biases_the_quantizers_write_are_left_out(tiny_model_factory, folders, tmp_path) -> None:
    """GPTQ's quantizers write a bias of zeros beside every projection; a model without biases
    leaves them out, and a bias that is not zeros still has no place."""
    folder = make_gptq_awq_checkpoint(
        tiny_model_factory("llama"), tmp_path / "m", "gptq-int4", tmp_path / "wide", zero_bias=True
    )
    assert "model.layers.0.self_attn.o_proj.bias" in load_file(folder / "model.safetensors")
    prompt = _prompt(ModelConfig.from_folder(folder).vocab_size)
    _, ours = _our_logits(folder, prompt)
    assert (ours - _their_logits(tmp_path / "wide", prompt)).abs().max().item() < 1e-4
    bias = "model.layers.0.self_attn.o_proj.bias"
    nonzero = copy_with_tensors(folder, tmp_path / "n", lambda t: t.update({bias: t[bias] + 1}))
    with pytest.raises(ModelLoadError, match="o_proj.bias' has no place"):
        LLM(nonzero, kv_cache_memory="4MiB")


@pytest.mark.parametrize(("layout", "held"), [("awq", torch.int32), ("gptq-int8", torch.int8)])
def test_random_weights_of_a_gptq_or_awq_checkpoints_shape(folders, layout: str, held: torch.dtype) -> None:
    llm = LLM(folders["llama", layout][0], kv_cache_memory="4MiB", load_format="dummy")
    down = llm.engine.core.runner.model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == held and down.weight_block == (1, INT_GROUP)
    # AWQ's packed words come with zero points (of 0 here), which the matmuls then read.
    assert ("weight_zero_point" in down._parameters) == (layout == "awq")
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].token_ids
