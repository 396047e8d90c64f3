"""Print the summary of a ``gpu.py`` results file: the final JSON, or the ``<out>.partial.json``
that a run ended by its time limit leaves behind, which has no summary of its own.

    python3 benchmarks/gpu_summary.py benchmarks/results/nvidia-h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a gpu.py results JSON, final or partial")
    args = parser.parse_args(argv)
    gpu.print_summary(json.loads(args.results.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
