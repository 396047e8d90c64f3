"""`inferd bench serve` and `inferd bench offline` end to end: arguments in, report files out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from bench_stub_server import STUB_MODEL, StubScript, running_stub

from inferd.cli import main


def test_serve_random_workload_writes_json_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = StubScript(first_token_s=0.01, inter_token_s=0.005)
    prefix = tmp_path / "results" / "run"  # its folder made for it
    argv = ["bench", "serve", "--num-prompts", "5", "--input-len", "3:6", "--output-len", "4", "--seed", "7"]
    argv += ["--request-rate", "50", "--max-concurrency", "2", "--slo-ttft-ms", "5000", "--ignore-eos"]
    argv += [
        "--output-prefix",
        str(prefix),
        "--no-progress",
        "--random-prefix-len",
        "2",
        "--burstiness",
        "0.5",
    ]
    with running_stub(script) as base_url:
        assert main([*argv, "--base-url", base_url]) == 0

    # No --model: the first of /v1/models. No tokenizer: random prompts go out as token ids, each
    # after the shared prefix.
    assert {body["model"] for body in script.received} == {STUB_MODEL}
    assert all(isinstance(body["prompt"], list) and 5 <= len(body["prompt"]) <= 8 for body in script.received)
    assert len({tuple(body["prompt"][:2]) for body in script.received}) == 1
    assert all(body["max_tokens"] == 4 and body["ignore_eos"] for body in script.received)
    document = json.loads(prefix.with_suffix(".json").read_text())
    assert document["config"]["model"] == STUB_MODEL and document["config"]["request_rate"] == 50
    assert document["config"]["burstiness"] == 0.5 and document["config"]["random_prefix_len"] == 2
    summary = document["summary"]
    assert summary["completed"] == 5 and summary["total_output_tokens"] == 20
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    assert len(document["requests"]) == 5
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "Goodput" in capsys.readouterr().out


def test_an_output_folder_that_cannot_be_made_is_a_usage_error_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    script = StubScript(first_token_s=0.01, inter_token_s=0.005)
    argv = ["bench", "serve", "--num-prompts", "2", "--input-len", "3", "--output-len", "2", "--no-progress"]
    with running_stub(script) as base_url:
        code = main([*argv, "--base-url", base_url, "--output-prefix", str(tmp_path / "file" / "run")])
    assert code == 2 and "--output-prefix: cannot make the folder" in capsys.readouterr().err
    assert not script.received  # nothing was run


def test_serve_chat_with_a_jsonl_dataset(tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(
        '{"prompt": "one two", "max_tokens": 3}\n{"prompt": "status=500 please", "max_tokens": 3}\n'
    )
    script = StubScript(first_token_s=0.01, inter_token_s=0.005)
    prefix = tmp_path / "chat"
    argv = ["bench", "serve", "--endpoint", "chat", "--dataset", "jsonl", str(dataset), "--model", STUB_MODEL]
    argv += ["--output-prefix", str(prefix), "--no-progress", "--no-plot"]
    with running_stub(script) as base_url:
        assert main([*argv, "--base-url", base_url + "/v1"]) == 1  # one request failed: the run fails
    # Both are sent at once, so they may arrive in either order.
    contents = sorted(message["content"] for body in script.received for message in body["messages"])
    assert contents == ["one two", "status=500 please"]
    summary = json.loads(prefix.with_suffix(".json").read_text())["summary"]
    assert summary["completed"] == 1 and summary["errors"] == {"http_500": 1}
    assert not prefix.with_suffix(".png").exists()


def test_serve_rejects_token_prompts_on_chat_and_bad_dataset_args(capsys: pytest.CaptureFixture[str]) -> None:
    """Usage errors: exit status 2, the one-line message (1 is for a run whose requests failed)."""
    base = ["--model", "m", "--base-url", "http://127.0.0.1:9"]
    assert main(["bench", "serve", "--endpoint", "chat", *base]) == 2
    assert "text prompts" in capsys.readouterr().err
    assert main(["bench", "serve", "--dataset", "sharegpt", *base]) == 2
    assert "--dataset takes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-concurrency", "0"),
        ("--max-concurrency", "-1"),
        ("--request-rate", "nan"),
        ("--request-rate", "0"),
        ("--timeout-s", "0"),
        ("--num-prompts", "0"),
        ("--num-prompts", "-2"),
        ("--extra-body", "{not json"),
        ("--extra-body", "[1]"),
        ("--extra-body", '{"temperature": NaN}'),  # accepted, then the run's first send failed
        ("--slo-ttft-ms", "-5"),
        ("--slo-tpot-ms", "0"),
        ("--input-len", "0"),
        ("--input-len", "9:3"),
        ("--output-len", "x"),
        ("--token-id-limit", "0"),
        ("--random-prefix-len", "-1"),
        ("--max-concurrency", "two"),
        ("--num-prompts", "1.5"),
    ],  # fmt: skip
)
def test_serve_refuses_out_of_range_numbers(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["bench", "serve", "--model", "m", "--base-url", "http://127.0.0.1:9", flag, value])
    error = capsys.readouterr().err
    # Our own words, not argparse's "invalid <type> value", which says nothing of the range.
    assert usage.value.code == 2 and flag in error and not re.search(r"invalid \w+ value", error)


def test_compare_names_a_file_that_is_not_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"config": {}, "summary": {"completed": 1, "output_throughput": 10.0}}))
    for name, content in (
        ("cut.json", '{"summary": {'),
        ("bare.json", '{"config": {}}'),
        ("list.json", "[1, 2]"),
        ("odd_latency.json", '{"summary": {"ttft_ms": 5}}'),
        ("odd_number.json", '{"summary": {"completed": "many"}}'),
    ):
        (tmp_path / name).write_text(content)
        assert main(["bench", "compare", str(good), str(tmp_path / name)]) == 2
        assert f"inferd: error: {tmp_path / name}" in capsys.readouterr().err
    assert main(["bench", "compare", str(good), str(tmp_path)]) == 2  # a folder
    assert f"inferd: error: {tmp_path} cannot be read" in capsys.readouterr().err
    assert main(["bench", "compare", str(good), str(good)]) == 0


def test_offline_runs_the_engine_and_writes_json(tiny_llama: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "offline"
    argv = [
        "bench",
        "offline",
        str(tiny_llama),
        "--num-prompts",
        "3",
        "--input-len",
        "8:16",
        "--output-len",
        "4",
    ]
    argv += ["--max-model-len", "64", "--output-prefix", str(prefix), "--no-progress"]
    assert main(argv) == 0
    document = json.loads(prefix.with_suffix(".json").read_text())
    assert document["config"]["temperature"] == 0.0
    summary = document["summary"]
    assert summary["completed"] == 3 and summary["total_output_tokens"] == 12
    assert 3 * 8 <= summary["total_input_tokens"] <= 3 * 16
    assert summary["output_throughput"] > 0
    assert all(
        record["ttft_s"] is not None and record["e2e_s"] >= record["ttft_s"]
        for record in document["requests"]
    )


def test_offline_samples_at_the_asked_temperature_and_nanovllms_by_default(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nano-vllm's bench.py samples at 0.6, so its preset does too; --temperature overrides any default."""
    from inferd.bench import offline
    from inferd.cli import build_parser
    from inferd.llm import LLM

    def parsed(*flags: str) -> float:
        return offline.temperature_for(build_parser().parse_args(["bench", "offline", *flags]))

    assert parsed("--preset", "nanovllm") == 0.6 and parsed() == 0.0
    assert parsed("--preset", "nanovllm", "--temperature", "0") == 0.0
    with pytest.raises(SystemExit):
        parsed("--temperature", "-1")
    temperatures: list[float] = []
    generate = LLM.generate

    def spy(self, prompts, params, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(params, list):
            temperatures.extend(p.temperature for p in params)
        return generate(self, prompts, params, **kwargs)

    monkeypatch.setattr(LLM, "generate", spy)
    prefix = tmp_path / "hot"
    argv = ["bench", "offline", str(tiny_llama), "--num-prompts", "2", "--input-len", "8"]
    argv += ["--output-len", "3"]
    argv += ["--temperature", "0.8", "--max-model-len", "64", "--output-prefix", str(prefix), "--no-progress"]
    assert main(argv) == 0
    assert temperatures == [0.8, 0.8]
    assert json.loads(prefix.with_suffix(".json").read_text())["config"]["temperature"] == 0.8
