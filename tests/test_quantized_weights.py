"""Low-bit checkpoints (8-bit floats, 4- and 8-bit integers: ``quant_config.py``,
``layers/quantized.py``), against transformers reading the same folders, and the refusals of what
the engine does not compute."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from quantized_checkpoints import (
    INT_GROUP,
    INT_LAYOUTS,
    LAYOUTS,
    make_checkpoint,
    make_fp8_checkpoint,
    make_gptq_awq_checkpoint,
    make_int_checkpoint,
    packed_integers,
    widened_copy,
)
from safetensors.torch import load_file, save_file
from tiny_models import copy_with_config, greedy_continuations

from inferd import LLM, SamplingParams
from inferd.config import ModelConfig, ModelLoadError
from inferd.engine.request import Request
from inferd.layers import quantized
from inferd.layers.linear_operands import WeightScale
from inferd.quant_config import QuantScheme, read_quantization

pytest.importorskip("accelerate")  # transformers reads the fp8 method's folders with it
pytest.importorskip("compressed_tensors")  # and compressed-tensors' with this


def _prompt(vocab: int) -> list[int]:
    return [(11 * i + 5) % vocab for i in range(37)]


def _our_logits(folder: Path, prompt: list[int], **options: object) -> tuple[LLM, torch.Tensor]:
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8, **options)
    core = llm.engine.core
    core.add_request(Request("r", prompt, SamplingParams(max_tokens=1), frozenset(), 1))
    return llm, core.runner.logits_for(core.scheduler.schedule())


def _transformers_model(folder: Path) -> transformers.PreTrainedModel:
    """transformers' model of a low-bit folder, its weights widened with their scales as it loads
    them (on the CPU it does so for the fp8 method unasked; compressed-tensors would otherwise
    also round each activation to 8 bits, which the engine does not)."""
    options = {}
    if json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] != "fp8":
        options["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options).eval()


def _their_logits(folder: Path, prompt: list[int], quantized: bool = True) -> torch.Tensor:
    if quantized:
        model = _transformers_model(folder)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0].float()


@pytest.fixture(scope="module")
def low_bit_folders(tiny_model_factory, tmp_path_factory) -> dict[tuple[str, str], Path]:
    folders = {}
    for arch in ("llama", "qwen3"):
        for layout in (*LAYOUTS, *INT_LAYOUTS):
            folder = tmp_path_factory.mktemp(f"{arch}-{layout}") / "model"
            folders[arch, layout] = make_checkpoint(tiny_model_factory(arch), folder, layout)
    return folders


@pytest.mark.parametrize("layout", [*LAYOUTS, *INT_LAYOUTS])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logits_match_transformers_reading_the_same_checkpoint(
    low_bit_folders, tiny_model_factory, arch, layout
):
    """8-bit float checkpoints, and W4A16, W8A16 (packed into int32 words) and W8A8 ones."""
    folder = low_bit_folders[arch, layout]
    prompt = _prompt(ModelConfig.from_folder(folder).vocab_size)
    llm, ours = _our_logits(folder, prompt)
    theirs = _their_logits(folder, prompt)
    assert (ours - theirs).abs().max().item() < 1e-4
    # The quantization is real: the unquantized model's logits are further off than the check.
    _, unquantized = _our_logits(tiny_model_factory(arch), prompt)
    assert (unquantized - theirs).abs().max().item() > 1e-3
    # The projections hold 8-bit values (integers of 4 bits too) and their scales, the embeddings
    # their own dtype.
    # 4-bit integers that come packed stay packed in int32 words; other integers are int8.
    bits, packed = (INT_LAYOUTS[layout][1], INT_LAYOUTS[layout][3]) if layout in INT_LAYOUTS else (8, False)
    held = torch.float8_e4m3fn if layout in LAYOUTS else torch.int32 if bits == 4 and packed else torch.int8
    layer = llm.engine.core.runner.model.model.layers[1]
    for linear in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ):
        assert linear.weight.dtype == held and linear.quant_scale().dtype == torch.float32
        if layout in INT_LAYOUTS:
            grouped = INT_LAYOUTS[layout][2] == "group"
            assert linear.weight_block == (1, INT_GROUP if grouped else linear.in_features)
    assert llm.engine.core.runner.model.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("layout", ["fp8-block", "ct-w4a16"])
def test_greedy_batch_matches_transformers(low_bit_folders, layout: str) -> None:
    folder = low_bit_folders["qwen3", layout]
    vocab = ModelConfig.from_folder(folder).vocab_size
    prompts = [[(13 * i + j) % vocab for i in range(5 + 7 * j)] for j in range(4)]
    expected = greedy_continuations(_transformers_model(folder), prompts, 10)
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))
    assert [o.token_ids for o in outputs] == expected


def test_projections_left_unquantized_stay_in_the_models_dtype(tiny_model_factory, tmp_path) -> None:
    """Which projections are 8-bit floats is read from the checkpoint (a scale beside the weight),
    as an ignore list in the config would leave some out."""
    folder = make_fp8_checkpoint(
        tiny_model_factory("llama"), tmp_path / "m", "ct-channel", skip=("down_proj",)
    )
    prompt = _prompt(ModelConfig.from_folder(folder).vocab_size)
    llm, ours = _our_logits(folder, prompt)
    layer = llm.engine.core.runner.model.model.layers[1]
    assert layer.mlp.down_proj.weight.dtype == torch.float32 and layer.mlp.down_proj.weight_block is None
    assert layer.mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn
    assert (ours - _their_logits(folder, prompt)).abs().max().item() < 1e-4


def test_blocks_that_end_part_way_along_a_weight(tiny_model_factory, tmp_path) -> None:
    """Blocks of 16 x 48 leave partial blocks along the 64- and 128-wide inputs (transformers
    refuses such checkpoints; the engine reads them as the widened model's weights)."""
    folder = make_fp8_checkpoint(
        tiny_model_factory("qwen3"), tmp_path / "m", "fp8-block", block_size=(16, 48)
    )
    prompt = _prompt(ModelConfig.from_folder(folder).vocab_size)
    _, ours = _our_logits(folder, prompt)
    theirs = _their_logits(widened_copy(folder, tmp_path / "widened"), prompt, quantized=False)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_dequantize_and_quantize_round_trip() -> None:
    torch.manual_seed(0)
    weight = torch.randn(37, 70)
    for block in ((16, 48), (1, 70), (128, 128)):
        q, scale = quantized.quantize(weight, block)
        assert q.dtype == torch.float8_e4m3fn and scale.shape == (-(-37 // block[0]), -(-70 // block[1]))
        back = quantized.dequantize(q, WeightScale(scale, block), torch.float32)
        # e4m3 keeps 3 mantissa bits: within 1/16 of each block's largest magnitude.
        assert (back - weight).abs().max() <= weight.abs().max() / 16
        assert quantized.quantize(back, block)[0].view(torch.uint8).equal(q.view(torch.uint8))


def test_configs_as_the_hub_ships_them() -> None:
    assert read_quantization({}) is None
    qwen3_fp8 = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "fmt": "e4m3",
    }
    assert read_quantization({"quantization_config": qwen3_fp8}) == QuantScheme("fp8", (128, 128))
    assert read_quantization({"quantization_config": {"quant_method": "fp8"}}) == QuantScheme("fp8", None)
    for layout in ("ct-channel", "ct-tensor"):
        assert read_quantization({"quantization_config": LAYOUTS[layout][0]}) == QuantScheme(
            "compressed-tensors", None
        )
    block = json.loads(json.dumps(LAYOUTS["ct-channel"][0]))
    block["config_groups"]["group_0"]["weights"].update(strategy="block", block_structure=[128, 128])
    assert read_quantization({"quantization_config": block}) == QuantScheme("compressed-tensors", (128, 128))
    assert QuantScheme("fp8", (16, 48)).scale_shape(64, 128) == (4, 3)
    assert QuantScheme("fp8", None).scale_shape(64, 128) == (64, 1)


@pytest.mark.parametrize(
    ("quant", "message"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "method 'bitsandbytes' is not supported"),
        ({"quant_method": "gguf"}, "quantization method 'gguf' is not supported"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "fp8 format 'e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be two positive"),
        ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group"}}}},
         "stores 4-bit float weights as 'nvfp4-pack-quantized'"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "strategy": "group",
                                              "group_size": 128, "symmetric": False}}}},
         "asymmetric 8-bit int weights"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                              "group_size": 128, "actorder": "group"}}}},
         "actorder"),
        ({**LAYOUTS["ct-channel"][0], "kv_cache_scheme": {"num_bits": 8, "type": "int", "dynamic": False}},
         "kv_cache_scheme 8-bit 'int'"),
        ({**LAYOUTS["ct-channel"][0],
          "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "attn_head", "dynamic": False}},
         "strategy 'attn_head'"),
        ({**LAYOUTS["ct-channel"][0], "transform_config": {"config_groups": {}}}, "transform_config"),
        ({**LAYOUTS["ct-channel"][0], "sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity format"),
        ("fp8", "quantization_config must be an object"),
    ],
)  # fmt: skip
def test_methods_and_formats_not_computed_are_refused_at_load(tiny_model_factory, tmp_path, quant, message):
    folder = copy_with_config(tiny_model_factory("llama"), tmp_path / "m", quantization_config=quant)
    with pytest.raises(ModelLoadError, match=message):
        LLM(folder, kv_cache_memory="4MiB")


def _edited(folder: Path, edit) -> Path:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_checkpoints_that_cannot_be_read_right_are_refused(tiny_model_factory, tmp_path) -> None:
    source = tiny_model_factory("llama")
    # q is 8-bit float with its scale, k is not: one fused projection cannot hold both.
    half = make_fp8_checkpoint(source, tmp_path / "a", "ct-channel", skip=("k_proj",))
    with pytest.raises(
        ModelLoadError, match="k_proj.weight' has dtype torch.float32; its projection's other"
    ):
        LLM(half, kv_cache_memory="4MiB")
    # An 8-bit float weight without its scale.
    scaleless = _edited(make_fp8_checkpoint(source, tmp_path / "b", "ct-channel"),
                        lambda t: t.pop("model.layers.0.mlp.down_proj.weight_scale"))  # fmt: skip
    with pytest.raises(ModelLoadError, match="down_proj.weight' is torch.float8_e4m3fn without a scale"):
        LLM(scaleless, kv_cache_memory="4MiB")
    # A scale without its fused piece's sibling: the missing one is named as the format names it.
    lonely = _edited(make_fp8_checkpoint(source, tmp_path / "c", "fp8-block"),
                     lambda t: t.pop("model.layers.1.self_attn.v_proj.weight_scale_inv"))  # fmt: skip
    with pytest.raises(
        ModelLoadError, match=r"lacks tensors: model.layers.1.self_attn.v_proj.weight_scale_inv$"
    ):
        LLM(lonely, kv_cache_memory="4MiB")
    # Scales in a type that is no scale's.
    scale = "model.layers.0.mlp.up_proj.weight_scale"
    odd_scales = _edited(make_fp8_checkpoint(source, tmp_path / "e", "ct-channel"),
                         lambda t: t.update({scale: t[scale].to(torch.int32)}))  # fmt: skip
    with pytest.raises(ModelLoadError, match="up_proj.weight_scale' has dtype torch.int32; scales are"):
        LLM(odd_scales, kv_cache_memory="4MiB")
    # Blocks of 24 rows cut the fused q|k|v inside k (q has 64 rows).
    odd = make_fp8_checkpoint(source, tmp_path / "d", "fp8-block", block_size=(24, 32))
    with pytest.raises(ModelLoadError, match="do not span whole blocks of 24 rows"):
        LLM(odd, kv_cache_memory="4MiB")


def test_tensor_parallelism_needs_whole_packed_words_on_each_rank(low_bit_folders) -> None:
    """Low-bit weights split as wide ones do (``test_tensor_parallel.py`` runs them), as long as
    each rank's share is whole int32 words: with 8 KV heads of 2, two ranks hold 8 rows of k and v
    each, one word of zero points packed down the rows; four would hold 4, half a word."""
    config = json.loads((low_bit_folders["llama", "ct-w4a16-asym"] / "config.json").read_text())
    config.update(num_attention_heads=32, num_key_value_heads=8, head_dim=2)
    cfg = ModelConfig.from_hf_config(config)
    assert cfg.sharded(2).num_kv_heads == 4
    with pytest.raises(ValueError, match="each rank 4 key and value rows, not whole blocks of 8"):
        cfg.sharded(4)


def test_quantization_option_makes_fp8_weights_at_load(low_bit_folders, tiny_model_factory, tmp_path) -> None:
    """``quantization="fp8"`` on a 32-bit checkpoint computes what an 8-bit float checkpoint with
    one scale per output channel of the same weights computes (as transformers reads that one)."""
    source = tiny_model_factory("qwen3")
    channel = low_bit_folders["qwen3", "ct-channel"]
    prompt = _prompt(ModelConfig.from_folder(source).vocab_size)
    llm, ours = _our_logits(source, prompt, quantization="fp8")
    assert llm.engine.config.quantization == "fp8"
    layer = llm.engine.core.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.qkv_proj.weight_block == (1, layer.self_attn.qkv_proj.weight.shape[1])
    assert llm.engine.core.runner.model.lm_head.weight.dtype == torch.float32
    assert (ours - _their_logits(channel, prompt)).abs().max().item() < 1e-4
    # An 8-bit float checkpoint is read as it is: its blocks are kept, and the projections it
    # left wide stay so.
    block = make_fp8_checkpoint(source, tmp_path / "m", "fp8-block", skip=("o_proj",))
    _, plain = _our_logits(block, prompt)
    llm, asked = _our_logits(block, prompt, quantization="fp8")
    assert torch.equal(plain, asked)
    layer = llm.engine.core.runner.model.model.layers[0]
    assert layer.mlp.down_proj.weight_block == (16, 32)
    assert (
        layer.self_attn.o_proj.weight.dtype == torch.float32 and layer.self_attn.o_proj.weight_block is None
    )


def test_quantization_option_is_checked(tiny_model_factory) -> None:
    folder = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        LLM(folder, kv_cache_memory="4MiB", quantization="int4")


def test_quantization_option_makes_a_mixtures_experts_fp8_too(tiny_model_factory, tmp_path) -> None:
    """The routed experts, most of a mixture's weights, are made 8-bit floats with a scale per
    output row of each expert, as an FP8 checkpoint with per-channel scales stores them."""
    source = tiny_model_factory("qwen3-moe")
    channel = make_checkpoint(source, tmp_path / "m", "ct-channel")
    prompt = _prompt(ModelConfig.from_folder(source).vocab_size)
    llm, ours = _our_logits(source, prompt, quantization="fp8")
    experts = llm.engine.core.runner.model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
    assert experts.weight_blocks == {"gate_up_proj": (1, 64), "down_proj": (1, 32)}
    theirs = _their_logits(widened_copy(channel, tmp_path / "widened"), prompt, quantized=False)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_random_weights_of_an_fp8_checkpoints_shape_hold_its_blocks(low_bit_folders) -> None:
    """``load_format="dummy"`` (the benchmarks' shapes) of an 8-bit float checkpoint holds 8-bit
    floats in its blocks, as the checkpoint would load."""
    llm = LLM(low_bit_folders["qwen3", "fp8-block"], kv_cache_memory="4MiB", load_format="dummy")
    layer = llm.engine.core.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.qkv_proj.weight_block == (16, 32)
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].token_ids


def test_scales_as_powers_of_two_in_8_bit_exponents(low_bit_folders, tmp_path) -> None:
    """UE8M0 scales (float8_e8m0fnu, DeepSeek-V3.1's) give what the same powers of two in float32
    give."""
    source = low_bit_folders["llama", "fp8-block"]
    powers = _edited(shutil.copytree(source, tmp_path / "f32"), _scales_to_powers_of_two(torch.float32))
    exponents = _edited(
        shutil.copytree(source, tmp_path / "e8m0"), _scales_to_powers_of_two(torch.float8_e8m0fnu)
    )
    prompt = _prompt(ModelConfig.from_folder(source).vocab_size)
    assert torch.equal(_our_logits(powers, prompt)[1], _our_logits(exponents, prompt)[1])


def _scales_to_powers_of_two(dtype: torch.dtype):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.endswith("weight_scale_inv")]:
            tensors[name] = torch.exp2(torch.ceil(torch.log2(tensors[name]))).to(dtype)

    return edit


def test_kv_scales_and_input_scales_are_dropped(low_bit_folders, tmp_path, caplog) -> None:
    """Calibrated KV-cache scales ride along in some 8-bit float checkpoints; a 16-bit KV cache
    leaves them out and says so (``test_kv_cache_scales.py`` has an 8-bit one apply them), and the
    checkpoint loads as without them; static input scales are dropped."""
    source = low_bit_folders["llama", "ct-tensor"]

    def add_kv_scales(tensors: dict[str, torch.Tensor]) -> None:
        for i in range(2):
            tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5)
            tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25)

    with_scales = _edited(shutil.copytree(source, tmp_path / "m"), add_kv_scales)
    prompt = _prompt(ModelConfig.from_folder(source).vocab_size)
    assert torch.equal(_our_logits(with_scales, prompt)[1], _our_logits(source, prompt)[1])
    assert "calibrated KV-cache scales are not applied: they scale an 8-bit KV cache" in caplog.text


def test_fp8_projections_widen_their_weights_where_the_kernel_cannot_read_them(monkeypatch) -> None:
    """Triton's e4m3 needs compute capability 8.9: an Ampere GPU's decode steps take the torch path."""
    fp8, cuda = torch.float8_e4m3fn, torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not quantized.skinny_kernel_reads(fp8, cuda)
    assert quantized.skinny_kernel_reads(torch.int8, cuda)  # integers it reads anywhere
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert quantized.skinny_kernel_reads(fp8, cuda)
    assert quantized.skinny_kernel_reads(fp8, torch.device("cpu"))  # the CPU's interpreter


def test_mixtures_of_experts_take_8_bit_attention(tiny_model_factory, tmp_path) -> None:
    source = tiny_model_factory("qwen3-moe")
    experts = ("gate_proj", "up_proj", "down_proj")
    attention_only = make_fp8_checkpoint(source, tmp_path / "a", "ct-channel", skip=experts)
    prompt = _prompt(ModelConfig.from_folder(source).vocab_size)
    llm, ours = _our_logits(attention_only, prompt)
    assert llm.engine.core.runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    theirs = _their_logits(widened_copy(attention_only, tmp_path / "widened"), prompt, quantized=False)
    assert (ours - theirs).abs().max().item() < 1e-4


# A mixture's experts in every kind of low-bit layout: 8-bit floats in blocks and per channel, 8-bit
# integers unpacked (W8A8, GPTQ-Int8) and packed (W8A16), 4-bit integers packed with zero points
# (W4A16 asymmetric, GPTQ's first format, AWQ) and without (W4A16, GPTQ-Int4).
_EXPERT_LAYOUTS = ["fp8-block", "ct-channel", "ct-w8a8", "gptq-int8", "ct-w8a16", "ct-w4a16",
                   "ct-w4a16-asym", "gptq-int4", "gptq-int4-asym", "awq"]  # fmt: skip


def _low_bit_experts(source: Path, tmp_path: Path, layout: str) -> Path:
    """``source`` stored as ``layout``, and at ``tmp_path / "widened"`` the float model it stands for."""
    if layout.startswith(("gptq", "awq")):
        return make_gptq_awq_checkpoint(source, tmp_path / "m", layout, tmp_path / "widened")
    if layout in INT_LAYOUTS:
        return make_int_checkpoint(source, tmp_path / "m", layout, widened=tmp_path / "widened")
    folder = make_checkpoint(source, tmp_path / "m", layout)
    widened_copy(folder, tmp_path / "widened")
    return folder


@pytest.mark.parametrize("layout", _EXPERT_LAYOUTS)
def test_mixtures_of_experts_hold_low_bit_experts(tiny_model_factory, tmp_path, layout: str) -> None:
    """Qwen3-30B-A3B-FP8's layout (every expert's projections e4m3 in blocks), Qwen3-30B-A3B's
    GPTQ-Int4 and AWQ layouts, and the others: each expert's weights held as the checkpoint stores
    them (4-bit ones packed, with their zero points) and widened when it runs, as transformers reads
    the widened copy."""
    source = tiny_model_factory("qwen3-moe")
    folder = _low_bit_experts(source, tmp_path, layout)
    prompt = _prompt(ModelConfig.from_folder(source).vocab_size)
    llm, ours = _our_logits(folder, prompt)
    stacks = llm.engine.core.runner.model.model.layers[0].mlp.experts
    packed_4_bit = layout in ("ct-w4a16", "ct-w4a16-asym", "gptq-int4", "gptq-int4-asym", "awq")
    held = (
        torch.float8_e4m3fn
        if layout.startswith(("fp8", "ct-channel"))
        else torch.int32
        if packed_4_bit
        else torch.int8
    )
    assert stacks.gate_up_proj.dtype == stacks.down_proj.dtype == held and set(stacks.weight_blocks) == {
        "gate_up_proj",
        "down_proj",
    }
    if packed_4_bit:  # eight to a word along each expert's rows
        assert stacks.gate_up_proj.shape[2] == stacks.in_features["gate_up_proj"] // 8
    asymmetric = layout in ("ct-w4a16-asym", "gptq-int4-asym", "awq")
    assert hasattr(stacks, "down_proj_zero_point") == asymmetric
    theirs = _their_logits(tmp_path / "widened", prompt, quantized=False)
    assert (ours - theirs).abs().max().item() < 1e-4
    _, unquantized = _our_logits(source, prompt)
    assert (unquantized - theirs).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="triton_moe's grouped matmul does not read low-bit experts"):
        llm.engine.core.runner.model.enable_triton_ops(False, moe=True)
    # Random weights in the checkpoint's shape hold such experts too.
    dummy = LLM(folder, kv_cache_memory="4MiB", load_format="dummy")
    assert dummy.engine.core.runner.model.model.layers[0].mlp.experts.gate_up_proj.dtype == held
    assert dummy.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].token_ids


def test_experts_that_cannot_be_held_are_refused(tiny_model_factory, tmp_path) -> None:
    source = tiny_model_factory("qwen3-moe")
    act_order = make_gptq_awq_checkpoint(source, tmp_path / "a", "gptq-int4-act-order", tmp_path / "w")
    with pytest.raises(
        ModelLoadError, match="routed experts cannot hold weights quantized in activation order"
    ):
        LLM(act_order, kv_cache_memory="4MiB")
    # A missing expert scale or zero point is named as the checkpoint would name it.
    lonely = _edited(make_checkpoint(source, tmp_path / "b", "fp8-block"),
                     lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"))  # fmt: skip
    with pytest.raises(
        ModelLoadError, match=r"lacks tensors: model.layers.1.mlp.experts.2.up_proj.weight_scale_inv$"
    ):
        LLM(lonely, kv_cache_memory="4MiB")
    awq = make_gptq_awq_checkpoint(source, tmp_path / "d", "awq", tmp_path / "dw")
    no_zeros = _edited(shutil.copytree(awq, tmp_path / "d1"),
                       lambda t: t.pop("model.layers.0.mlp.experts.3.down_proj.qzeros"))  # fmt: skip
    with pytest.raises(
        ModelLoadError, match=r"lacks tensors: model.layers.0.mlp.experts.3.down_proj.qzeros$"
    ):
        LLM(no_zeros, kv_cache_memory="4MiB")
    no_words = _edited(awq, lambda t: t.pop("model.layers.0.mlp.experts.1.gate_proj.qweight"))
    with pytest.raises(
        ModelLoadError, match=r"lacks tensors: model.layers.0.mlp.experts.1.gate_proj.qweight$"
    ):
        LLM(no_words, kv_cache_memory="4MiB")
    # compressed-tensors' weight_shape of an expert must be the expert's.
    w4a16 = make_checkpoint(source, tmp_path / "e", "ct-w4a16")
    wrong_shape = _edited(
        w4a16,
        lambda t: t.__setitem__(
            "model.layers.0.mlp.experts.0.down_proj.weight_shape", torch.tensor([64, 24])
        ),
    )
    with pytest.raises(ModelLoadError, match=r"experts.0.down_proj.weight_shape' gives the shape \[64, 24\], "
                                             r"expected \[64, 32\]"):  # fmt: skip
        LLM(wrong_shape, kv_cache_memory="4MiB")
    # Blocks of 48 rows cut the experts' 32 rows of gate and of up.
    uneven = make_fp8_checkpoint(source, tmp_path / "c", "fp8-block", block_size=(48, 32))
    with pytest.raises(ModelLoadError, match="do not divide the experts' 32 rows"):
        LLM(uneven, kv_cache_memory="4MiB")


@pytest.mark.parametrize("columns", [64, 60, 37])
@pytest.mark.parametrize("bits", [4, 8])
def test_packed_integers_unpack_in_order(bits: int, columns: int) -> None:
    """As compressed-tensors packs them, rows whose width leaves the last word part-filled too."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator().manual_seed(columns)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    values = torch.randint(low, high, (5, columns), generator=gen, dtype=torch.int8)
    values[0, :4] = torch.tensor([low, high - 1, 0, -1])
    words = pack_to_int32(values, bits)
    assert torch.equal(quantized.unpack_int32(words, bits, columns), values)
    if columns == 64:  # the tests' own packer writes the same words
        assert torch.equal(packed_integers(values, bits), words)
    with pytest.raises(ValueError, match=f"do not hold rows of {columns + 32}"):
        quantized.unpack_int32(words, bits, columns + 32)


@pytest.mark.parametrize("bits", [4, 8])
def test_large_packed_weights_unpack_field_by_field_alike(bits: int) -> None:
    """From a million values on the CPU unpacks field by field; the same values either way, a
    part-filled last word too, and ``pack_int32`` packs them back into compressed-tensors' words."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    values = torch.randint(
        low, high, (1024, 1028), generator=torch.Generator().manual_seed(bits), dtype=torch.int8
    )
    words = pack_to_int32(values, bits)
    assert words.numel() * 32 // bits >= quantized._FIELD_BY_FIELD_MIN_VALUES
    assert torch.equal(quantized.unpack_int32(words, bits, 1028), values)
    assert torch.equal(quantized.pack_int32(values, bits), words)


def test_integer_configs_as_the_hub_ships_them() -> None:
    schemes = {
        layout: read_quantization({"quantization_config": INT_LAYOUTS[layout][0]}) for layout in INT_LAYOUTS
    }
    assert schemes == {
        "ct-w4a16": QuantScheme("compressed-tensors", (1, INT_GROUP), "int4", packed=True),
        "ct-w4a16-asym": QuantScheme(
            "compressed-tensors", (1, INT_GROUP), "int4", packed=True, zero_points=True
        ),
        "ct-w4a16-tensor-asym": QuantScheme(
            "compressed-tensors", None, "int4", packed=True, zero_points=True
        ),
        "ct-w8a16": QuantScheme("compressed-tensors", None, "int8", packed=True),
        "ct-w8a8": QuantScheme("compressed-tensors", None, "int8", packed=False),
    }
    # llm-compressor's GPTQ default orders by activation only when choosing the scales: stored alike.
    for order in ("static", "weight"):
        config = json.loads(json.dumps(INT_LAYOUTS["ct-w4a16"][0]))
        config["config_groups"]["group_0"]["weights"]["actorder"] = order
        assert read_quantization({"quantization_config": config}) == schemes["ct-w4a16"]


def test_packed_shapes_are_checked_and_activation_zero_points_dropped(low_bit_folders, tmp_path) -> None:
    shape = "model.layers.0.mlp.down_proj.weight_shape"
    narrower = _edited(shutil.copytree(low_bit_folders["llama", "ct-w4a16"], tmp_path / "a"),
                       lambda t: t.update({shape: torch.tensor([64, 120])}))  # fmt: skip
    with pytest.raises(
        ModelLoadError, match=r"down_proj.weight_shape' gives the shape \[64, 120\], expected"
    ):
        LLM(narrower, kv_cache_memory="4MiB")
    source = low_bit_folders["llama", "ct-w8a8"]

    def static_activations(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.endswith("_proj.weight_scale")]:
            module = name.removesuffix(".weight_scale")
            tensors[f"{module}.input_scale"] = torch.tensor([0.05])
            tensors[f"{module}.input_zero_point"] = torch.tensor([3], dtype=torch.int8)

    asymmetric = _edited(shutil.copytree(source, tmp_path / "b"), static_activations)
    prompt = _prompt(ModelConfig.from_folder(source).vocab_size)
    assert torch.equal(_our_logits(asymmetric, prompt)[1], _our_logits(source, prompt)[1])


def test_random_weights_of_an_integer_checkpoints_shape(low_bit_folders) -> None:
    llm = LLM(low_bit_folders["llama", "ct-w4a16"], kv_cache_memory="4MiB", load_format="dummy")
    down = llm.engine.core.runner.model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.int32 and down.weight_block == (1, INT_GROUP)  # packed, as it comes
    values = quantized.unpack_int32(down.weight, 4, down.in_features)
    assert int(values.abs().max()) == 7 and values.shape == (down.out_features, down.in_features)
    assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].token_ids


def test_a_lora_adapter_over_packed_4_bit_weights(low_bit_folders, tiny_model_factory, tmp_path) -> None:
    """The adapter's A and B take the projections' unpacked widths (the packed weight's rows are
    words): its requests differ from the base model's, whose own are unchanged beside them."""
    from tiny_models import make_lora_adapter

    folder = low_bit_folders["qwen3", "ct-w4a16"]
    adapter = make_lora_adapter(tiny_model_factory("qwen3"), tmp_path / "adapter", seed=3)
    llm = LLM(folder, kv_cache_memory="4MiB", lora_modules={"a": str(adapter)})
    assert llm.engine.core.runner.model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.int32
    prompt = _prompt(ModelConfig.from_folder(folder).vocab_size)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    base, with_adapter = llm.generate([prompt, prompt], [greedy, dataclasses.replace(greedy, adapter="a")])
    assert base.token_ids == LLM(folder, kv_cache_memory="4MiB").generate([prompt], greedy)[0].token_ids
    assert with_adapter.token_ids != base.token_ids
