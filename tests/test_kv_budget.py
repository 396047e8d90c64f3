"""The default CPU KV budget follows the memory this process may take: inside a container, the
cgroup's limit less its usage, not the host's free memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.engine import builder


def _cgroup(tmp_path: Path, limit: str, usage: str, inactive_file: int = 0) -> tuple:
    limit_file, usage_file, stat_file = (
        tmp_path / "memory.max",
        tmp_path / "memory.current",
        tmp_path / "stat",
    )
    limit_file.write_text(limit + "\n")
    usage_file.write_text(usage + "\n")
    stat_file.write_text(f"anon 4096\ninactive_file {inactive_file}\nactive_file 8192\n")
    absent = (tmp_path / "absent.max", tmp_path / "absent.current", tmp_path / "absent.stat", "inactive_file")
    return (absent, (limit_file, usage_file, stat_file, "inactive_file"))


def test_a_container_limit_caps_the_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = builder._available_ram()
    monkeypatch.setattr(builder, "_CGROUP_MEMORY_FILES", _cgroup(tmp_path, str(3 * 2**30), str(2**30)))
    assert builder._available_ram() == min(host, 2 * 2**30)
    # The default budget is a quarter of that.
    assert builder._default_kv_budget("cpu") == min(host, 2 * 2**30) // 4


@pytest.mark.parametrize("limit", ["max", str(2**62)])
def test_no_limit_leaves_the_hosts_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    monkeypatch.setattr(builder, "_CGROUP_MEMORY_FILES", _cgroup(tmp_path, limit, "12345"))
    assert builder._cgroup_memory_left() is None


def test_a_full_container_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "_CGROUP_MEMORY_FILES", _cgroup(tmp_path, "1000", "2000"))
    assert builder._available_ram() == 0


def test_reclaimable_file_cache_does_not_count_as_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3 GiB used, of which 2 GiB is inactive file cache (weights just read): 3 GiB are left.
    files = _cgroup(tmp_path, str(4 * 2**30), str(3 * 2**30), inactive_file=2 * 2**30)
    monkeypatch.setattr(builder, "_CGROUP_MEMORY_FILES", files)
    assert builder._cgroup_memory_left() == 3 * 2**30


def test_cpu_ranks_share_the_default_budget(tiny_model_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "_available_ram", lambda: 2**30)
    one = builder.resolve_num_blocks(builder.build_engine_config(tiny_model_factory("qwen3"), device="cpu"))
    config = builder.build_engine_config(tiny_model_factory("qwen3"), device="cpu", tensor_parallel_size=2)
    two = builder.resolve_num_blocks(config)
    assert one.cache.num_blocks is not None and two.cache.num_blocks is not None
    # A rank's block is half the bytes, and the ranks share the budget: the same blocks in all.
    assert two.cache.num_blocks == one.cache.num_blocks


def test_a_gpu_budget_leaves_room_for_a_draft_models_weights(
    tiny_model_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU a draft model's weights load after the KV cache is allocated: the default budget
    is the share of what is free less those weights (in the served model's dtype), not of all of
    it; an explicit budget is the user's."""
    import math

    from safetensors import safe_open

    folder = tiny_model_factory("qwen3")
    monkeypatch.setattr(builder.torch.cuda, "mem_get_info", lambda: (2**26, 2**30))
    spec = {"model": str(folder), "num_speculative_tokens": 2}
    drafted = builder.build_engine_config(folder, device="cuda", dtype="bfloat16", speculative_config=spec)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as tensors:
        elements = sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())
    assert builder._draft_weight_bytes(drafted) == 2 * elements  # bfloat16, stored in float32
    per_block = 2 * drafted.model.kv_bytes_per_token(drafted.kv_dtype) * drafted.cache.block_size
    budget = int((2**26 - 2 * elements) * builder._GPU_KV_FRACTION)
    assert builder.resolve_num_blocks(drafted).cache.num_blocks == budget // per_block
    explicit = builder.build_engine_config(folder, device="cuda", dtype="bfloat16", speculative_config=spec,
                                           kv_cache_memory="4MiB")  # fmt: skip
    assert builder.resolve_num_blocks(explicit).cache.num_blocks == 4 * 2**20 // per_block
    plain = builder.build_engine_config(folder, device="cuda", dtype="bfloat16")
    assert builder._draft_weight_bytes(plain) == 0


def test_a_low_bit_drafts_values_count_as_stored(tmp_path: Path) -> None:
    """A draft's packed int32 words and 8-bit floats stay as they are stored; its float tensors
    take the served model's dtype."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        "qweight": torch.zeros(64, 8, dtype=torch.int32),
        "fp8": torch.zeros(10, dtype=torch.float8_e4m3fn),
        "scales": torch.zeros(64, 1, dtype=torch.float16),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))

    class Speculative:
        model = str(tmp_path)

    class Config:
        speculative = Speculative()
        dtype = "float32"

    assert builder._draft_weight_bytes(Config()) == 64 * 8 * 4 + 10 + 64 * 4  # type: ignore[arg-type]


def test_gpu_memory_utilization_fills_that_share_of_the_whole_device(tiny_model_factory, monkeypatch) -> None:
    """vLLM's gpu_memory_utilization: the share of the device's whole memory this engine may hold;
    what it holds already (its weights) counts against it, another process's memory does not, as
    long as the cache fits in what is free."""
    folder = tiny_model_factory("qwen3")
    free, total, held = 5 * 2**27, 2**30, 2**27  # ours an eighth, another process's half the rest
    monkeypatch.setattr(builder.torch.cuda, "mem_get_info", lambda: (free, total))
    monkeypatch.setattr(builder.torch.cuda, "memory_reserved", lambda: held)
    config = builder.build_engine_config(folder, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.45)
    per_block = config.model.kv_bytes_per_token(config.kv_dtype) * config.cache.block_size
    expected = (int(0.45 * total) - held) // per_block
    assert builder.resolve_num_blocks(config).cache.num_blocks == expected
    greedy = builder.build_engine_config(folder, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match="are free"):  # 0.9 of the device is more than is free
        builder.resolve_num_blocks(greedy)
    default = builder.build_engine_config(folder, device="cuda", dtype="bfloat16")
    assert (
        builder.resolve_num_blocks(default).cache.num_blocks
        == int(free * builder._GPU_KV_FRACTION) // per_block
    )
    for options, message in (
        ({"device": "cuda", "gpu_memory_utilization": 0}, "must be in"),
        ({"device": "cuda", "gpu_memory_utilization": 1.5}, "must be in"),
        ({"device": "cuda", "gpu_memory_utilization": 0.9, "kv_cache_memory": "1GiB"}, "not both"),
        ({"device": "cpu", "gpu_memory_utilization": 0.9}, "on the CPU"),
    ):
        with pytest.raises(ValueError, match=message):
            builder.build_engine_config(folder, dtype="bfloat16", **options)
