"""The default CPU KV budget follows the memory this process may take: inside a container, the
cgroup's limit less its usage, not the host's free memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.engine import builder


def _cgroup(tmp_path: Path, limit: str, usage: str) -> tuple[tuple[Path, Path], ...]:
    limit_file, usage_file = tmp_path / "memory.max", tmp_path / "memory.current"
    limit_file.write_text(limit + "\n")
    usage_file.write_text(usage + "\n")
    return ((tmp_path / "absent.max", tmp_path / "absent.current"), (limit_file, usage_file))


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
