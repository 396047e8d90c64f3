"""Per-request records into a summary (latency percentiles, throughput, goodput, errors), a table, a JSON."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.bench.client import RequestRecord

PERCENTILES = (50, 90, 95, 99)
LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
# Terminal table layout: total width, label column, latency cell (fits 9,999,999.99 ms).
_WIDTH, _LABEL, _CELL = 71, 47, 11


@dataclass(frozen=True)
class Slo:
    """Service-level objectives a request must all meet to count toward goodput; None means no bound."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def any(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok:
            return False
        if self.ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > self.ttft_ms):
            return False
        # A one-token reply has no TPOT, so it cannot miss that bound.
        tpot = record.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1000 <= self.tpot_ms


def latency_stats(values_s: list[float]) -> dict[str, float | None]:
    """Mean and P50/P90/P95/P99 in milliseconds (linear interpolation between samples)."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    values_ms = np.asarray(values_s, dtype=float) * 1000.0
    stats: dict[str, float | None] = {"mean": float(values_ms.mean())}
    for p in PERCENTILES:
        stats[f"p{p}"] = float(np.percentile(values_ms, p))
    return stats


def summarize(records: list[RequestRecord], duration_s: float, slo: Slo = Slo()) -> dict[str, Any]:
    """The run's headline numbers; throughputs divide by the whole run's wall time."""
    done = [record for record in records if record.ok]
    output_tokens = sum(record.output_tokens for record in done)
    input_tokens = sum(record.prompt_tokens or 0 for record in done)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": dict(Counter(record.error for record in records if record.error is not None)),
        "tokens_from_usage": sum(record.tokens_from_usage for record in done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "slo": asdict(slo),
        "goodput": sum(slo.met_by(record) for record in done) / duration_s if slo.any else None,
        "ttft_ms": latency_stats([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": latency_stats([tpot for r in done if (tpot := r.tpot_s) is not None]),
        "itl_ms": latency_stats([gap for r in done for gap in r.itl_s]),
        "e2e_ms": latency_stats([r.e2e_s for r in done if r.e2e_s is not None]),
    }


def format_table(summary: dict[str, Any], title: str = "inferd bench") -> str:
    """A plain-text report for the terminal."""
    lines = [f"{f' {title} ':=^{_WIDTH}}"]
    rows = [
        ("Completed requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Duration (s)", f"{summary['duration_s']:.2f}"),
        ("Input tokens", f"{summary['total_input_tokens']}"),
        ("Output tokens", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    if summary.get("goodput") is not None:
        bounds = ", ".join(
            f"{name} <= {value:g}" for name, value in summary["slo"].items() if value is not None
        )
        rows.append((f"Goodput (req/s; {bounds})", f"{summary['goodput']:.2f}"))
    lines += [f"{label:<{_LABEL}}{value:>{_WIDTH - _LABEL}}" for label, value in rows]
    if summary["errors"]:
        lines.append(f"{' Errors ':-^{_WIDTH}}")
        lines += [
            f"{kind:<{_LABEL}}{count:>{_WIDTH - _LABEL}}" for kind, count in sorted(summary["errors"].items())
        ]
    if summary["completed"] and summary["tokens_from_usage"] < summary["completed"]:
        missing = summary["completed"] - summary["tokens_from_usage"]
        lines.append(f"note: {missing} replies had no usage; their tokens were counted one per chunk")
    lines.append(f"{' Latency (ms) ':-^{_WIDTH}}")
    lines.append(
        f"{'':<16}" + "".join(f"{name:>{_CELL}}" for name in ("mean", *(f"P{p}" for p in PERCENTILES)))
    )
    for metric in LATENCY_METRICS:
        stats = summary[metric]
        cells = "".join(_cell(stats[key]) for key in ("mean", *(f"p{p}" for p in PERCENTILES)))
        lines.append(f"{metric.removesuffix('_ms').upper():<16}{cells}")
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{'-':>{_CELL}}" if value is None else f"{value:>{_CELL}.2f}"


def record_to_json(record: RequestRecord) -> dict[str, Any]:
    """A record with its derived TPOT and ITL spelled out, so the JSON stands on its own."""
    return {**asdict(record), "tpot_s": record.tpot_s, "itl_s": record.itl_s}


def write_json(
    path: str | Path, config: dict[str, Any], summary: dict[str, Any], records: list[RequestRecord]
) -> None:
    document = {
        "config": config,
        "summary": summary,
        "requests": [record_to_json(record) for record in records],
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
