"""TGI's metric names (``tgi_request_count``, ``tgi_request_duration``, ``tgi_queue_size``, ...), beside
inferd's own, so dashboards and alerts written for a TGI deployment read this server unchanged.

They count the same engine requests as the ``inferd:`` families (whichever API they came by), each
labelled with its model name as those are. TGI's counters carry no ``_total`` suffix, and
prometheus_client writes any counter's type line with one, so they are exported by a collector
under their exact names as untyped samples (Prometheus's ``rate`` reads them as counters). The queue
and batch gauges (``tgi_queue_size``, ``tgi_batch_current_size``) are read from the engines with
inferd's own, in ``metrics.py``.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from inferd.server.metrics import FinishedRequest

# TGI's failure kinds where they mean the same: a full queue and an engine error. Others (a client
# gone, a timeout, which TGI has not) keep inferd's finish reasons.
_FAILURE_KIND = {"error": "generation"}
OVERLOADED = "overloaded"

_DURATION_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
_LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class TgiMetrics:
    """The ``tgi_*`` families of one registry, shared by every LLM it serves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model_name"], registry=registry, buckets=buckets)

        self.duration = histogram(
            "tgi_request_duration", "Arrival to last token (end-to-end latency).", _DURATION_BUCKETS_S
        )
        self.queue_duration = histogram(
            "tgi_request_queue_duration", "Arrival to first scheduling.", _DURATION_BUCKETS_S
        )
        self.inference_duration = histogram(
            "tgi_request_inference_duration", "First scheduling to last token.", _DURATION_BUCKETS_S
        )
        self.time_per_token = histogram(
            "tgi_request_mean_time_per_token_duration",
            "Per request: the time between its output tokens after the first, on average.",
            _DURATION_BUCKETS_S,
        )
        self.input_length = histogram(
            "tgi_request_input_length", "Prompt tokens per request.", _LENGTH_BUCKETS
        )
        self.generated_tokens = histogram(
            "tgi_request_generated_tokens", "Output tokens per request.", _LENGTH_BUCKETS
        )
        self.max_new_tokens = histogram(
            "tgi_request_max_new_tokens", "The output budget a request asked for.", _LENGTH_BUCKETS
        )
        self.validation_duration = histogram(
            "tgi_request_validation_duration",
            "A request's checks and tokenizing, its wait for the thread doing them included.",
            _DURATION_BUCKETS_S,
        )
        self._counts = _TgiCollector()
        registry.register(self._counts)

    def count_arrived(self, model_name: str) -> None:
        """A request counted as it arrives, as TGI counts it: until it ends, the count less the
        successes and failures is what is in flight."""
        self._counts.requests[model_name] += 1

    def count_rejected(self, model_name: str, arrived: bool) -> None:
        """A request refused with a 429; ``arrived``: already counted as it arrived."""
        if not arrived:
            self.count_arrived(model_name)
        self._counts.failures[model_name, OVERLOADED] += 1

    def record_finished(self, model_name: str, request: FinishedRequest) -> None:
        """One engine request that ended (counted as it arrived): a success or failure, and for a
        success (stop or length), observed in the histograms, as TGI observes only successes."""
        if request.finish_reason not in ("stop", "length"):
            kind = _FAILURE_KIND.get(request.finish_reason, request.finish_reason)
            self._counts.failures[model_name, kind] += 1
            return
        self._counts.successes[model_name] += 1
        if request.max_tokens is not None:
            self.max_new_tokens.labels(model_name).observe(request.max_tokens)
        self.input_length.labels(model_name).observe(request.prompt_tokens)
        self.generated_tokens.labels(model_name).observe(request.generation_tokens)
        for histogram, value in (
            (self.duration, request.e2e_s),
            (self.queue_duration, request.queue_s),
            (self.inference_duration, request.inference_s),
            (self.time_per_token, request.time_per_output_token_s),
        ):
            if value is not None:
                histogram.labels(model_name).observe(value)


class _TgiCollector(Collector):
    """TGI's counters, under their names as TGI exports them."""

    def __init__(self) -> None:
        self.requests: Tally[str] = Tally()
        self.successes: Tally[str] = Tally()
        self.failures: Tally[tuple[str, str]] = Tally()

    def collect(self) -> Iterator[Metric]:
        for name, doc, tally in (
            ("tgi_request_count", "Requests, counted as they arrive.", self.requests),
            ("tgi_request_success", "Requests that ended with stop or length.", self.successes),
        ):
            family = Metric(name, doc, "unknown")
            for model_name, count in sorted(tally.items()):
                family.add_sample(name, {"model_name": model_name}, count)
            yield family
        failures = Metric(
            "tgi_request_failure",
            "Requests that failed, by kind: overloaded (429), generation (engine error), abort, timeout.",
            "unknown",
        )
        for (model_name, kind), count in sorted(self.failures.items()):
            failures.add_sample("tgi_request_failure", {"model_name": model_name, "err": kind}, count)
        yield failures

    def describe(self) -> Iterator[Metric]:
        return iter(())
