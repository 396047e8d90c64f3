"""Bench report: percentiles, TPOT and ITL definitions, goodput, the table, JSON, PNG, and compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inferd.bench.client import RequestRecord
from inferd.bench.compare import comparison_rows, format_comparison, ratio
from inferd.bench.plot import token_throughput_over_time, write_png
from inferd.bench.report import Slo, format_table, latency_stats, summarize, write_json
from inferd.cli import main


def _record(index: int, ttft_s: float, gap_s: float, tokens: int, start_s: float = 0.0) -> RequestRecord:
    """A request whose tokens arrive one a chunk: first after `ttft_s`, then every `gap_s`."""
    chunks = [start_s + ttft_s + i * gap_s for i in range(tokens)]
    return RequestRecord(
        index=index,
        start_s=start_s,
        max_tokens=tokens,
        ttft_s=ttft_s,
        e2e_s=ttft_s + (tokens - 1) * gap_s,
        chunk_times_s=chunks,
        prompt_tokens=10,
        output_tokens=tokens,
        tokens_from_usage=True,
    )


def test_latency_stats_are_milliseconds_with_interpolated_percentiles() -> None:
    stats = latency_stats([i / 1000 for i in range(1, 101)])
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert latency_stats([]) == {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None}


def test_tpot_and_itl_follow_the_vllm_definitions() -> None:
    record = _record(0, ttft_s=0.5, gap_s=0.1, tokens=5)
    record.output_tokens = 9  # a server that packs two tokens in some chunks
    assert record.itl_s == pytest.approx([0.1] * 4)
    assert record.tpot_s == pytest.approx((0.9 - 0.5) / 8)
    assert _record(1, ttft_s=0.5, gap_s=0.1, tokens=1).tpot_s is None


def test_summary_throughput_and_goodput() -> None:
    records = [
        _record(0, ttft_s=0.1, gap_s=0.01, tokens=11),  # meets both SLOs
        _record(1, ttft_s=0.3, gap_s=0.01, tokens=11),  # TTFT too slow
        _record(2, ttft_s=0.1, gap_s=0.05, tokens=11),  # TPOT too slow
        RequestRecord(index=3, start_s=0.0, max_tokens=5, error="http_503"),
    ]
    summary = summarize(records, duration_s=2.0, slo=Slo(ttft_ms=200, tpot_ms=20))
    assert summary["completed"] == 3 and summary["failed"] == 1
    assert summary["errors"] == {"http_503": 1}
    assert summary["request_throughput"] == pytest.approx(1.5)
    assert summary["output_throughput"] == pytest.approx(33 / 2.0)
    assert summary["total_token_throughput"] == pytest.approx((33 + 30) / 2.0)
    assert summary["goodput"] == pytest.approx(0.5)
    assert summary["ttft_ms"]["p50"] == pytest.approx(100)
    assert summary["tpot_ms"]["mean"] == pytest.approx((10 + 10 + 50) / 3)
    assert summarize(records, 2.0)["goodput"] is None
    assert summarize(records, 2.0, Slo(ttft_ms=200))["goodput"] == pytest.approx(1.0)


def test_table_shows_every_section() -> None:
    records = [_record(0, 0.1, 0.01, 5), RequestRecord(index=1, start_s=0.0, max_tokens=5, error="timeout")]
    records[0].tokens_from_usage = False
    table = format_table(summarize(records, 1.0, Slo(tpot_ms=50)))
    for expected in (
        "Goodput (req/s; tpot_ms <= 50)",
        "timeout",
        "no usage",
        "TTFT",
        "TPOT",
        "ITL",
        "E2E",
        "P99",
    ):
        assert expected in table


def test_json_holds_config_summary_and_every_request(tmp_path: Path) -> None:
    records = [_record(i, 0.1, 0.01, 4) for i in range(3)]
    summary = summarize(records, 1.0)
    write_json(tmp_path / "run.json", {"model": "m"}, summary, records)
    document = json.loads((tmp_path / "run.json").read_text())
    assert document["config"] == {"model": "m"}
    assert document["summary"]["completed"] == 3
    assert len(document["requests"]) == 3
    first = document["requests"][0]
    assert first["itl_s"] == pytest.approx([0.01] * 3)
    assert first["tpot_s"] == pytest.approx(0.01)
    assert first["chunk_times_s"] == pytest.approx([0.1, 0.11, 0.12, 0.13])


def test_throughput_over_time_spreads_usage_tokens_over_chunks() -> None:
    record = _record(0, ttft_s=0.0, gap_s=0.5, tokens=4)  # chunks at 0, 0.5, 1.0, 1.5
    record.output_tokens = 8
    centers, tokens_per_s = token_throughput_over_time([record], duration_s=2.0)
    bin_width = 2.0 / len(centers)
    assert float(np.sum(tokens_per_s) * bin_width) == pytest.approx(8)


def test_png_is_written(tmp_path: Path) -> None:
    records = [_record(i, 0.1 + i / 100, 0.01, 6, start_s=i / 10) for i in range(5)]
    write_png(tmp_path / "run.png", records, duration_s=1.0, title="test")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_ratios_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ratio(2.0, 3.0) == pytest.approx(1.5)
    assert ratio(0.0, 3.0) is None and ratio(None, 1.0) is None
    fast = summarize([_record(0, 0.1, 0.01, 11)], duration_s=1.0)
    slow = summarize([_record(0, 0.2, 0.02, 11)], duration_s=2.0)
    rows = {label: (a, b) for label, a, b in comparison_rows(fast, slow)}
    assert rows["TTFT mean (ms)"] == pytest.approx((100, 200))
    assert rows["Output throughput (tok/s)"] == pytest.approx((11, 5.5))
    table = format_comparison(fast, slow, "A: fast", "B: slow")
    assert "Goodput" not in table  # neither run had an SLO
    ttft_line = next(line for line in table.splitlines() if line.startswith("TTFT mean"))
    assert ttft_line.split()[-1] == "2.000"

    write_json(tmp_path / "fast.json", {}, fast, [])
    write_json(tmp_path / "slow.json", {}, slow, [])
    assert main(["bench", "compare", str(tmp_path / "fast.json"), str(tmp_path / "slow.json")]) == 0
    printed = capsys.readouterr().out
    assert "A: fast" in printed and "B: slow" in printed
    throughput_line = next(line for line in printed.splitlines() if line.startswith("Output throughput"))
    assert throughput_line.split()[-1] == "0.500"
