"""Schemathesis against the live server's OpenAPI document: no 5xx and no response outside the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server_process import run_server

# Short answers and a timeout keep every generated request quick; a fixed seed keeps runs comparable.
SERVER_ARGS = ("--kv-cache-memory", "8MiB", "--max-tokens-cap", "16", "--request-timeout", "5")
SCHEMATHESIS_ARGS = (
    "--checks", "not_a_server_error,response_schema_conformance",
    "--max-examples", "15",
    "--seed", "1",
    "--phases", "examples,coverage,fuzzing",
    "--exclude-path-regex", "^/metrics$",  # Prometheus' plain text, no schema
    "--request-timeout", "30",
)  # fmt: skip


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tiny_llama: Path, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).parent / "st"
    with run_server(tiny_llama, *SERVER_ARGS) as server:
        run = subprocess.run(
            [str(schemathesis), "run", f"{server.base_url}/openapi.json", *SCHEMATHESIS_ARGS],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,  # schemathesis leaves a cache folder where it runs
        )
        assert "Traceback" not in server.log_text()
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "generated" in report and " passed" in report, report
