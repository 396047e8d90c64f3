"""Mixtures of experts: the routed block against a token-by-token reference, the config fields that
choose the routed layers, and checkpoints whose experts are incomplete. (Logits and greedy tokens
against transformers are in test_model_correctness.py, tensor parallelism in test_tensor_parallel.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from inferd.config import ModelConfig, ModelLoadError, MoEConfig
from inferd.engine.llm_engine import LLMEngine
from inferd.models.moe import Experts, route


def _reference(
    experts: Experts, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
) -> torch.Tensor:
    """Each token through each of its experts, one at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(chosen.shape[1]):
            e = int(chosen[t, j])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def test_experts_sum_each_tokens_chosen_experts_by_their_weights() -> None:
    torch.manual_seed(0)
    experts = Experts(num_experts=5, hidden_size=16, intermediate_size=8)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    x = torch.randn(7, 16)
    # Expert 4 takes no token, expert 1 several; token 3 takes the same two as token 0.
    chosen = torch.tensor([[1, 0], [2, 1], [1, 3], [1, 0], [0, 2], [3, 1], [2, 0]])
    weights = torch.rand(7, 2)
    torch.testing.assert_close(experts(x, weights, chosen), _reference(experts, x, weights, chosen))


@pytest.mark.parametrize("normalize", [False, True])
def test_route_takes_the_top_experts_of_the_softmax(normalize: bool) -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    weights, chosen = route(logits, top_k=2, normalize=normalize)
    probs = torch.softmax(logits, dim=-1)[0]
    assert chosen.tolist() == [[1, 2]]
    expected = probs[[1, 2]] / (probs[1] + probs[2] if normalize else 1.0)
    torch.testing.assert_close(weights[0], expected)


def _hf(architecture: str, **fields: Any) -> dict[str, Any]:
    return {"architectures": [architecture], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 64,
            "num_hidden_layers": 6, "num_attention_heads": 2, "num_experts_per_tok": 2, **fields}  # fmt: skip


def test_the_routed_layers_follow_each_architectures_fields() -> None:
    # Qwen's hub configs say num_experts; routed every decoder_sparse_step-th layer unless listed dense.
    qwen = ModelConfig.from_hf_config(
        _hf(
            "Qwen3MoeForCausalLM",
            num_experts=8,
            moe_intermediate_size=12,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            norm_topk_prob=True,
        )  # fmt: skip
    )
    assert qwen.moe == MoEConfig(8, 2, 12, True, 0, frozenset({1, 5}))
    # transformers 5 saves Qwen3-MoE's count as num_local_experts, as Mixtral's; Mixtral routes
    # every layer, through experts of the config's intermediate size, and always renormalises.
    assert ModelConfig.from_hf_config(_hf("Qwen3MoeForCausalLM", num_local_experts=4,
                                          moe_intermediate_size=12)).moe.num_experts == 4  # type: ignore[union-attr]  # fmt: skip
    mixtral = ModelConfig.from_hf_config(_hf("MixtralForCausalLM", num_local_experts=4))
    assert mixtral.moe == MoEConfig(4, 2, 64, True, 0, frozenset(range(6)))
    shared = ModelConfig.from_hf_config(_hf("Qwen2MoeForCausalLM", num_experts=4, moe_intermediate_size=12,
                                            shared_expert_intermediate_size=40))  # fmt: skip
    assert shared.moe is not None and shared.moe.shared_expert_intermediate_size == 40
    assert ModelConfig.from_hf_config(_hf("Qwen3ForCausalLM")).moe is None


def test_fields_transformers_reads_only_for_some_qwen_models_are_read_so() -> None:
    # No experts: every layer dense, as transformers builds it.
    assert (
        ModelConfig.from_hf_config(_hf("Qwen2MoeForCausalLM", num_experts=0, moe_intermediate_size=12)).moe
        is None
    )
    # A shared expert is Qwen2-MoE's alone; q/k/v biases follow its qkv_bias.
    qwen3 = ModelConfig.from_hf_config(_hf("Qwen3MoeForCausalLM", num_experts=4, moe_intermediate_size=12,
                                           shared_expert_intermediate_size=40))  # fmt: skip
    assert qwen3.moe is not None and qwen3.moe.shared_expert_intermediate_size == 0
    fields = {"num_experts": 4, "moe_intermediate_size": 12}
    assert not ModelConfig.from_hf_config(_hf("Qwen2MoeForCausalLM", qkv_bias=False, **fields)).attention_bias
    assert ModelConfig.from_hf_config(_hf("Qwen2MoeForCausalLM", **fields)).attention_bias
    # Qwen's window applies only with use_sliding_window, the dense Qwen3's as the MoE's.
    for architecture in ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM"):
        window = {"sliding_window": 4096, "max_window_layers": 0}
        off = ModelConfig.from_hf_config(_hf(architecture, **window, **fields))
        on = ModelConfig.from_hf_config(_hf(architecture, use_sliding_window=True, **window, **fields))
        assert (off.layer_windows, on.layer_windows) == ((), (4096,) * 6)


def test_impossible_routing_is_refused() -> None:
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) must be between 1 and the 4 experts"):
        ModelConfig.from_hf_config(_hf("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=5))


def test_tensor_parallelism_splits_every_expert() -> None:
    fields = {"num_experts": 4, "moe_intermediate_size": 12, "shared_expert_intermediate_size": 40}
    cfg = ModelConfig.from_hf_config(_hf("Qwen2MoeForCausalLM", num_attention_heads=8, **fields))
    half = cfg.sharded(2).moe
    assert half is not None
    assert (half.expert_intermediate_size, half.shared_expert_intermediate_size) == (6, 20)
    with pytest.raises(ValueError, match=r"does not divide the model's experts' intermediate size \(12\)"):
        cfg.sharded(8)


def _rewrite(folder: Path, tmp_path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    weights = load_file(copy / "model.safetensors")
    change(weights)
    save_file(weights, copy / "model.safetensors")
    return copy


def test_a_checkpoint_missing_one_experts_projection_is_refused(tiny_model_factory, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    folder = _rewrite(tiny_model_factory("qwen3-moe"), tmp_path, lambda w: w.pop(name))
    with pytest.raises(ModelLoadError, match=f"checkpoint lacks tensors: {name}"):
        LLMEngine.from_options(folder, kv_cache_memory="8MiB")


def test_an_expert_past_the_configs_count_is_refused(tiny_model_factory, tmp_path: Path) -> None:
    def add_expert(weights: dict[str, torch.Tensor]) -> None:
        weights["model.layers.0.block_sparse_moe.experts.4.w2.weight"] = weights[
            "model.layers.0.block_sparse_moe.experts.0.w2.weight"
        ].clone()

    folder = _rewrite(tiny_model_factory("mixtral"), tmp_path, add_expert)
    with pytest.raises(
        ModelLoadError, match=r"'model.layers.0.block_sparse_moe.experts.4.w2.weight' names an expert past"
    ):
        LLMEngine.from_options(folder, kv_cache_memory="8MiB")


def test_a_mixtral_tensor_missing_is_named_as_mixtral_names_it(tiny_model_factory, tmp_path: Path) -> None:
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    folder = _rewrite(tiny_model_factory("mixtral"), tmp_path, lambda w: w.pop(name))
    with pytest.raises(ModelLoadError, match=f"checkpoint lacks tensors: {name}"):
        LLMEngine.from_options(folder, kv_cache_memory="8MiB")


def _stack_experts(weights: dict[str, torch.Tensor]) -> None:
    """Each layer's experts as two stacked tensors, [experts, 2 * intermediate, hidden] and
    [experts, hidden, intermediate], as transformers 5 holds them in memory."""
    for layer in sorted({n.split(".experts.")[0] for n in weights if ".experts." in n}):
        count = len(
            {n for n in weights if n.startswith(f"{layer}.experts.") and n.endswith("down_proj.weight")}
        )
        pieces = [[weights.pop(f"{layer}.experts.{e}.{p}_proj.weight") for e in range(count)]
                  for p in ("gate", "up", "down")]  # fmt: skip
        gate_up = [torch.cat([g, u]) for g, u in zip(pieces[0], pieces[1], strict=True)]
        weights[f"{layer}.experts.gate_up_proj"] = torch.stack(gate_up)
        weights[f"{layer}.experts.down_proj"] = torch.stack(pieces[2])


def test_stacked_expert_tensors_load_whole_and_split_over_ranks(tiny_model_factory, tmp_path: Path) -> None:
    from inferd import LLM, SamplingParams

    folder = tiny_model_factory("qwen2-moe")
    stacked = _rewrite(folder, tmp_path, _stack_experts)
    prompts = [list(range(5, 30)), [7, 8, 9]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(folder, num_kv_blocks=64).generate(prompts, params)]
    assert [o.token_ids for o in LLM(stacked, num_kv_blocks=64).generate(prompts, params)] == expected
    split = LLM(stacked, num_kv_blocks=64, tensor_parallel_size=2)
    try:
        assert [o.token_ids for o in split.generate(prompts, params)] == expected
    finally:
        split.shutdown()


def test_a_qwen_config_whose_every_layer_is_dense_is_no_mixture() -> None:
    fields = {"num_experts": 4, "moe_intermediate_size": 12, "mlp_only_layers": list(range(6))}
    assert ModelConfig.from_hf_config(_hf("Qwen3MoeForCausalLM", **fields)).moe is None


def test_a_mixture_whose_every_layer_is_routed_splits_whatever_its_unused_dense_width() -> None:
    """Every layer routed: the dense ``intermediate_size`` is never built, so a tensor-parallel
    split need not divide it; one dense layer makes it count."""
    fields = {"num_experts": 4, "moe_intermediate_size": 12, "intermediate_size": 25}
    routed = ModelConfig.from_hf_config(_hf("Qwen3MoeForCausalLM", **fields))
    assert routed.sharded(2).moe is not None and routed.sharded(2).moe.expert_intermediate_size == 6
    dense = ModelConfig.from_hf_config(_hf("Qwen3MoeForCausalLM", mlp_only_layers=[0], **fields))
    with pytest.raises(ValueError, match="does not divide the model's intermediate size"):
        dense.sharded(2)
