"""`inferd bench serve` against a real `inferd serve` (tiny model) on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

from server_process import run_server

from inferd.cli import main


def test_bench_against_a_live_inferd_server(tiny_llama: Path, tmp_path: Path) -> None:
    # Completions only: under its chat template the random tiny model emits nothing but special tokens,
    # which leave the streamed text empty, so there would be no token times to measure.
    prefix = tmp_path / "live"
    argv = ["bench", "serve", "--tokenizer", str(tiny_llama), "--num-prompts", "4"]
    argv += ["--input-len", "8:16", "--output-len", "6", "--ignore-eos", "--max-concurrency", "3"]
    argv += ["--output-prefix", str(prefix), "--no-progress", "--no-plot"]
    with run_server(tiny_llama) as server:
        assert main([*argv, "--base-url", server.base_url, "--model", server.model]) == 0
        # --extra-body reaches the server with every request: here a structured output, counted there.
        extra = ["--extra-body", '{"guided_regex": "[a-z]{3}"}', "--output-prefix", str(tmp_path / "regex")]
        assert main([*argv, *extra, "--base-url", server.base_url, "--model", server.model]) == 0
        samples = server.wait_for_metrics(
            lambda s: s.get("inferd:structured_output_requests_total{kind=regex}") == 4
        )
        assert samples["inferd:structured_output_requests_total{kind=regex}"] == 4
    document = json.loads(prefix.with_suffix(".json").read_text())
    summary = document["summary"]
    # --ignore-eos reached the engine: every reply is full length, as the server's usage reports.
    assert summary["completed"] == 4 and summary["errors"] == {}
    assert summary["tokens_from_usage"] == 4 and summary["total_output_tokens"] == 4 * 6
    assert summary["total_input_tokens"] > 0
    for record in document["requests"]:
        assert 0 < record["ttft_s"] <= record["e2e_s"]
        assert record["chunk_times_s"] and record["tpot_s"] is not None
