"""Constraints a client may send cannot take the server down: compiling runs on a deep stack, and
a constraint's size is capped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from inferd.structured.spec import MAX_CONSTRAINT_CHARS, StructuredOutput

# Each chain recursed past the 8 MiB stack of an ordinary thread and killed the process (SIGSEGV).
_CHAINS = """
import json, sys
from inferd.structured.spec import MAX_CONSTRAINT_CHARS, StructuredOutput

kind, n = sys.argv[1], int(sys.argv[2])
if kind == "json":
    defs = {f"d{i}": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}}]}
            for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    spec = StructuredOutput(json=json.dumps({"$defs": defs, "$ref": "#/$defs/d0"}))
else:
    rules = "\\n".join(f'r{i}: "x" r{i + 1} | "y"' for i in range(n))
    spec = StructuredOutput(grammar=f'start: r0\\n{rules}\\nr{n}: "z"')
print(spec.problem())
"""


@pytest.mark.parametrize(("kind", "links"), [("json", 700), ("lark", 3000)])
def test_a_deep_chain_of_rules_compiles_instead_of_crashing_the_process(kind: str, links: int) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", _CHAINS, kind, str(links)], capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip() == "None"


def test_a_constraint_over_the_size_cap_is_refused_before_compiling() -> None:
    choices = [f"option {i:06d}" for i in range(MAX_CONSTRAINT_CHARS // 13 + 1)]
    problem = StructuredOutput(choice=choices).problem()
    assert problem is not None and f"at most {MAX_CONSTRAINT_CHARS:,} are taken" in problem


def test_a_value_the_compiler_cannot_represent_is_the_constraints_error() -> None:
    """An integer bound past 64 bits raised a ValueError that reached the client as a 500."""
    schema = {"type": "integer", "minimum": -(10**300)}
    problem = StructuredOutput(json=json.dumps(schema)).problem()
    assert problem is not None and "cannot be compiled" in problem
