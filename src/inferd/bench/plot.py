"""The report picture: latency distributions and throughput over time, as a PNG (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inferd.bench.client import RequestRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Throughput bins: at most 60, each at least half a second wide once the run is long enough.
_MAX_TIME_BINS, _MIN_TIME_BINS, _MIN_BIN_S = 60, 10, 0.5


def token_throughput_over_time(
    records: list[RequestRecord], duration_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bin centers (s) and output tokens/s in each bin.

    A chunk may carry several tokens, so each request's usage count is spread evenly over its chunks.
    """
    num_bins = int(min(_MAX_TIME_BINS, max(_MIN_TIME_BINS, duration_s / _MIN_BIN_S)))
    edges = np.linspace(0.0, max(duration_s, 1e-9), num_bins + 1)
    times, weights = [], []
    for record in records:
        if record.ok and record.chunk_times_s:
            times += record.chunk_times_s
            weights += [record.output_tokens / len(record.chunk_times_s)] * len(record.chunk_times_s)
    counts, _ = np.histogram(times, bins=edges, weights=weights)
    return (edges[:-1] + edges[1:]) / 2, counts / np.diff(edges)


def in_flight_over_time(records: list[RequestRecord]) -> tuple[list[float], list[int]]:
    """A step function: after each send or last byte (s), how many requests are in flight."""
    events = []
    for record in records:
        if record.e2e_s is not None:
            # At equal times the end sorts first (-1 < +1): a slot handed on is not two in flight.
            events += [(record.start_s, 1), (record.start_s + record.e2e_s, -1)]
    events.sort()
    times, counts, in_flight = [0.0], [0], 0
    for time_s, change in events:
        in_flight += change
        times.append(time_s)
        counts.append(in_flight)
    return times, counts


def write_png(path: str | Path, records: list[RequestRecord], duration_s: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [record for record in records if record.ok]
    distributions = {
        "TTFT (ms)": [r.ttft_s * 1000 for r in done if r.ttft_s is not None],
        "TPOT (ms)": [tpot * 1000 for r in done if (tpot := r.tpot_s) is not None],
        "ITL (ms)": [gap * 1000 for r in done for gap in r.itl_s],
        "E2E latency (ms)": [r.e2e_s * 1000 for r in done if r.e2e_s is not None],
    }
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), layout="constrained")
    for axis, (label, values) in zip(axes.flat[:4], distributions.items(), strict=True):
        _histogram(axis, label, values)
    centers, tokens_per_s = token_throughput_over_time(records, duration_s)
    throughput_axis, flight_axis = axes.flat[4], axes.flat[5]
    throughput_axis.plot(centers, tokens_per_s)
    throughput_axis.set(title="Output throughput over time", xlabel="time (s)", ylabel="tokens/s")
    flight_axis.step(*in_flight_over_time(records), where="post")
    flight_axis.set(title="Requests in flight", xlabel="time (s)", ylabel="requests")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _histogram(axis: Axes, label: str, values: list[float]) -> None:
    axis.set(title=label, xlabel=label, ylabel="count")
    if not values:
        axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
        return
    low, high = min(values), max(values)
    # Equal (to float precision) values, e.g. a stub's fixed delays, cannot be split into 40 bins.
    if high - low <= 1e-9 * max(1.0, abs(high)):
        low, high = low - 0.5, high + 0.5
    axis.hist(values, bins=40, range=(low, high))
    for p, style in ((50, "-"), (99, "--")):
        axis.axvline(float(np.percentile(values, p)), color="black", linestyle=style, label=f"P{p}")
    axis.legend()
