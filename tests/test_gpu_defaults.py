"""The speed features whose GPU default a device run decides: unset, each follows
``GPU_DEFAULTS`` on a GPU where its kernels' needs are met, and stays off elsewhere, so switching
one on after a device call is one entry of that table."""

from __future__ import annotations

import pytest

from inferd import config as config_module
from inferd.engine.builder import build_engine_config

FEATURES = tuple(config_module.GPU_DEFAULTS)


def uses(folder, **options) -> dict[str, bool]:
    config = build_engine_config(folder, **options)
    return {feature: getattr(config, f"uses_{feature}") for feature in FEATURES}


@pytest.fixture
def all_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every feature on by default on a GPU, and PDL supported, as on a Hopper card."""
    monkeypatch.setattr(config_module, "GPU_DEFAULTS", dict.fromkeys(FEATURES, True))
    pdl = pytest.importorskip("inferd.layers.triton_pdl")
    monkeypatch.setattr(pdl, "unsupported_reason", lambda device: None)


def test_unset_features_follow_the_table_on_a_gpu_and_stay_off_on_the_cpu(tiny_llama, monkeypatch) -> None:
    pdl = pytest.importorskip("inferd.layers.triton_pdl")
    monkeypatch.setattr(pdl, "unsupported_reason", lambda device: None)  # a Hopper card
    assert uses(tiny_llama, device="cuda") == config_module.GPU_DEFAULTS
    assert not any(uses(tiny_llama, device="cpu").values())


def test_a_gpu_default_switches_a_feature_on_on_a_gpu_only(tiny_llama, all_on_a_gpu) -> None:
    assert all(uses(tiny_llama, device="cuda").values())
    assert not any(uses(tiny_llama, device="cpu").values())
    # Asked for by name, each option wins over the table.
    off = dict.fromkeys(FEATURES, False)
    assert not any(uses(tiny_llama, device="cuda", **off).values())


def test_a_default_stays_off_where_its_needs_are_not_met(tiny_llama, all_on_a_gpu, monkeypatch) -> None:
    # Without the Triton ops (and so the skinny matmul) only the sampler's kernels are left.
    assert uses(tiny_llama, device="cuda", triton_ops=False) == {
        "triton_fused_linear": False,
        "triton_tiled_linear": False,
        "triton_decode_rotary": False,
        "triton_sampling": True,
        "triton_pdl": False,
        "triton_moe": False,
        "triton_penalties": True,
    }
    assert not uses(tiny_llama, device="cuda", triton_linear=False)["triton_fused_linear"]
    assert not uses(tiny_llama, device="cuda", attention_backend="torch")["triton_decode_rotary"]
    pdl = pytest.importorskip("inferd.layers.triton_pdl")
    monkeypatch.setattr(pdl, "unsupported_reason", lambda device: "compute capability 8.0")
    assert not uses(tiny_llama, device="cuda")["triton_pdl"]  # an older GPU starts without it


def test_pdl_on_by_default_asks_no_absent_gpu_for_its_capability(tiny_llama, monkeypatch) -> None:
    """A config for ``cuda`` resolved where no GPU is (a CPU test, a host building configs)."""
    monkeypatch.setattr(config_module, "GPU_DEFAULTS", {**config_module.GPU_DEFAULTS, "triton_pdl": True})
    pytest.importorskip("inferd.layers.triton_pdl")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert not uses(tiny_llama, device="cuda")["triton_pdl"]


def test_asking_for_a_feature_whose_needs_are_not_met_is_an_error(tiny_llama) -> None:
    with pytest.raises(ValueError, match="needs triton_linear"):
        build_engine_config(tiny_llama, device="cuda", triton_linear=False, triton_fused_linear=True)
    with pytest.raises(ValueError, match="triton attention backend"):
        build_engine_config(tiny_llama, device="cuda", attention_backend="torch", triton_decode_rotary=True)
    with pytest.raises(ValueError, match="CUDA GPU"):
        build_engine_config(tiny_llama, device="cpu", triton_pdl=True)


def test_the_penalties_kernel_asks_for_a_gpu_or_the_interpreter(tiny_llama, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton_penalties runs a Triton kernel on a CUDA GPU"):
        build_engine_config(tiny_llama, device="cpu", triton_penalties=True)
    assert build_engine_config(tiny_llama, device="cuda", triton_penalties=True).uses_triton_penalties
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel tests' CPU engines
    assert build_engine_config(tiny_llama, device="cpu", triton_penalties=True).uses_triton_penalties


def test_the_help_tells_an_unmeasured_default_from_a_measured_one() -> None:
    from inferd.entrypoints.engine_args import _default_on_a_gpu

    assert "until a GPU run measures it" in _default_on_a_gpu("triton_penalties")
    assert "until a GPU run measures it" in _default_on_a_gpu("triton_moe")
    assert "measured no consistent gain" in _default_on_a_gpu("triton_fused_linear")
    assert "on for CUDA" in _default_on_a_gpu("triton_sampling")
