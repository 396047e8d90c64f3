"""Prometheus metrics of the LLM server, on a per-app registry, labelled by model name.

Per-request histograms and token counters are recorded by the Frontend when a request ends.
Gauges and the engine's own counters (preemptions, prefix cache) are read from `AsyncLLM.stats()`
at scrape time by a custom collector, so they are exact rather than sampled.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inferd.config import EngineConfig
from inferd.engine.core import STEP_TOKEN_BUCKETS, EngineStats
from inferd.server.config import DEFAULT_METRICS_PREFIX
from inferd.server.tgi_metrics import TgiMetrics

_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_N_BUCKETS = (1, 2, 5, 10, 20)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


@dataclass(frozen=True)
class FinishedRequest:
    """What the Frontend knows about one engine request when it ends (times in seconds)."""

    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    ttft_s: float | None
    e2e_s: float | None
    queue_s: float | None
    prefill_s: float | None = None
    decode_s: float | None = None
    # What the request asked for (None: not given): its output budget, and for the first sample of
    # a prompt, how many samples the prompt asked for (vLLM's request parameter histograms).
    max_tokens: int | None = None
    n: int | None = None

    @property
    def inference_s(self) -> float | None:
        """First scheduling to last token: the time the request ran (vLLM's inference time)."""
        if self.prefill_s is None:
            return None
        if self.decode_s is None:
            # An embedding's run is its prompt's: it has no output tokens, so no decode.
            return self.prefill_s if self.generation_tokens == 0 else None
        return self.prefill_s + self.decode_s

    @property
    def time_per_output_token_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.generation_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.generation_tokens - 1)


class _MetricFamilies:
    """The request metric families of one registry, shared by every LLM the server serves; every
    name starts with ``prefix`` and a colon (``inferd:``; ``vllm:`` makes them vLLM's names)."""

    def __init__(self, registry: CollectorRegistry, prefix: str = DEFAULT_METRICS_PREFIX) -> None:
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{prefix}:{name}", doc, labels, registry=registry, buckets=buckets)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"{prefix}:{name}", doc, labels, registry=registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS_S)
        self.inter_token = histogram(
            "inter_token_latency_seconds",
            "Gap between consecutive output tokens as the server sees them.",
            _LATENCY_BUCKETS_S,
        )
        self.time_per_output_token = histogram(
            "request_time_per_output_token_seconds",
            "Per request: (end-to-end - time to first token) / (output tokens - 1).",
            _LATENCY_BUCKETS_S,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS_S)
        self.queue = histogram(
            "request_queue_time_seconds", "Arrival to first scheduling.", _LATENCY_BUCKETS_S
        )
        self.prefill = histogram(
            "request_prefill_time_seconds", "First scheduling to first token.", _LATENCY_BUCKETS_S
        )
        self.decode = histogram(
            "request_decode_time_seconds", "First token to last token.", _LATENCY_BUCKETS_S
        )
        self.inference = histogram(
            "request_inference_time_seconds", "First scheduling to last token.", _LATENCY_BUCKETS_S
        )
        self.max_tokens_param = histogram(
            "request_params_max_tokens",
            "The max_tokens a request asked for, where it gave one.",
            _TOKEN_BUCKETS,
        )
        self.n_param = histogram(
            "request_params_n", "The samples (n, or best_of) a prompt asked for.", _N_BUCKETS
        )
        self.prompt_tokens_per_request = histogram(
            "request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS
        )
        self.generation_tokens_per_request = histogram(
            "request_generation_tokens", "Output tokens per request.", _TOKEN_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Output tokens generated.")
        self.finished = Counter(
            f"{prefix}:requests_finished",
            "Finished requests by finish reason (stop, length, abort, timeout, error).",
            ["model_name", "finish_reason"],
            registry=registry,
        )
        self.aborted = counter("requests_aborted", "Requests aborted (client gone or server abort).")
        self.timed_out = counter("requests_timed_out", "Requests that ran out of time.")
        self.rejected = counter(
            "requests_rejected", "Requests refused at once because the queue was full (429)."
        )
        self.prepare_time = histogram(
            "request_prepare_time_seconds",
            "One preparation (checks, chat template, tokenizing) on the preparing thread, its wait included.",
            _LATENCY_BUCKETS_S,
        )
        self.preparing = Gauge(
            f"{prefix}:num_requests_preparing",
            "Requests waiting for the preparing thread or on it.",
            labels,
            registry=registry,
        )
        self.structured_outputs = Counter(
            f"{prefix}:structured_output_requests",
            "Requests whose output is constrained, by kind (json, json_object, regex, choice, grammar).",
            ["model_name", "kind"],
            registry=registry,
        )
        self.lora_requests = Counter(
            f"{prefix}:lora_requests",
            "Finished requests answered with a LoRA adapter, by adapter.",
            ["model_name", "adapter"],
            registry=registry,
        )
        # The settings that change what the numbers above mean, as vLLM's cache_config_info gives
        # its own: the weights' dtype and quantization, the KV cache's dtype and its blocks.
        self.config_info = Gauge(
            f"{prefix}:engine_config_info",
            "The engine's settings, as labels (value 1).",
            ["model_name", "dtype", "quantization", "kv_cache_dtype", "block_size", "num_kv_blocks"],
            registry=registry,
        )
        # vLLM's own: the KV cache's settings under its label names, which the Gateway API's
        # endpoint picker reads the block size from for prefix-aware routing.
        self.cache_config_info = Gauge(
            f"{prefix}:cache_config_info",
            "The KV cache's settings, as labels under vLLM's names (value 1).",
            ["model_name", "block_size", "cache_dtype", "enable_prefix_caching", "num_gpu_blocks",
             "gpu_memory_utilization"],
            registry=registry,
        )  # fmt: skip
        # vLLM's name for the finished requests by reason, beside requests_finished above.
        self.success = Counter(
            f"{prefix}:request_success",
            "Finished requests by finish reason (vLLM's name; the same count as requests_finished).",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        self.engines = _EngineCollector(prefix)
        registry.register(self.engines)
        self.tgi = TgiMetrics(registry)


class ServerMetrics:
    """One LLM's metrics, labelled with its model name. `for_model` adds another LLM to the same
    registry (a model-repository LLM next to the served one)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        model_name: str,
        stats: Callable[[], EngineStats],
        families: _MetricFamilies | None = None,
        prefix: str = DEFAULT_METRICS_PREFIX,
    ) -> None:
        """``prefix``: the names' (``inferd``; ``vllm`` for dashboards and routers that read
        vLLM's); a model added with ``for_model`` shares the first one's families."""
        self.registry = registry
        self._families = families or _MetricFamilies(registry, prefix)
        f = self._families
        self.ttft = f.ttft.labels(model_name)
        self.inter_token = f.inter_token.labels(model_name)
        self.time_per_output_token = f.time_per_output_token.labels(model_name)
        self.e2e = f.e2e.labels(model_name)
        self.queue = f.queue.labels(model_name)
        self.prefill = f.prefill.labels(model_name)
        self.decode = f.decode.labels(model_name)
        self.inference = f.inference.labels(model_name)
        self.max_tokens_param = f.max_tokens_param.labels(model_name)
        self.n_param = f.n_param.labels(model_name)
        self.prompt_tokens_per_request = f.prompt_tokens_per_request.labels(model_name)
        self.generation_tokens_per_request = f.generation_tokens_per_request.labels(model_name)
        self.prompt_tokens = f.prompt_tokens.labels(model_name)
        self.generation_tokens = f.generation_tokens.labels(model_name)
        self._finished = f.finished
        self._model_name = model_name
        self.aborted = f.aborted.labels(model_name)
        self.timed_out = f.timed_out.labels(model_name)
        self.rejected = f.rejected.labels(model_name)
        self.prepare_time = f.prepare_time.labels(model_name)
        self.preparing = f.preparing.labels(model_name)
        self._stats = stats
        f.engines.add(model_name, stats)

    def for_model(self, model_name: str, stats: Callable[[], EngineStats]) -> ServerMetrics:
        return ServerMetrics(self.registry, model_name, stats, self._families)

    def forget_engine(self) -> None:
        """Its engine stopped: its live gauges and counters are no longer scraped."""
        self._families.engines.remove(self._model_name, self._stats)

    def describe_engine(self, config: EngineConfig) -> None:
        """Export the engine's settings (``<prefix>:engine_config_info``, and the KV cache's as
        vLLM's ``cache_config_info``). Quantization reads as the option (``fp8``), or as the
        checkpoint's method and values (``compressed-tensors:int4``)."""
        quant = config.model.quant
        quantization = config.quantization or (f"{quant.method}:{quant.values}" if quant else "none")
        cache = config.cache
        blocks = "unknown" if cache.num_blocks is None else str(cache.num_blocks)
        kv_dtype = str(config.kv_dtype).removeprefix("torch.")
        self._families.config_info.labels(
            self._model_name, config.dtype, quantization, kv_dtype, str(cache.block_size), blocks
        ).set(1)
        # vLLM writes its settings as Python does: True, None.
        self._families.cache_config_info.labels(
            self._model_name, str(cache.block_size), kv_dtype, str(cache.enable_prefix_caching), blocks,
            str(cache.gpu_memory_utilization),
        ).set(1)  # fmt: skip

    def count_structured_output(self, kind: str) -> None:
        self._families.structured_outputs.labels(self._model_name, kind).inc()

    def count_lora_request(self, adapter: str) -> None:
        self._families.lora_requests.labels(self._model_name, adapter).inc()

    def forget_lora_adapter(self, adapter: str) -> None:
        """An unloaded adapter's series goes: one kept per name ever loaded would grow /metrics
        without bound on a server that loads adapters under new names (a reload starts it at 0,
        which rate() reads as a counter reset)."""
        try:
            self._families.lora_requests.remove(self._model_name, adapter)
        except KeyError:  # it answered no request
            pass

    def count_arrived(self) -> None:
        """An engine request about to be queued (TGI's request count counts arrivals)."""
        self._families.tgi.count_arrived(self._model_name)

    def count_rejected(self, arrived: bool = False, whole_request: bool = True) -> None:
        """A request refused at once with a 429: the queue was full. ``arrived``: an engine
        request already counted by ``count_arrived``; else the whole request, refused at the door.
        ``whole_request`` false: another engine request of the same client request, which the
        rejected count has counted already (TGI's counts each engine request that arrived)."""
        if whole_request:
            self.rejected.inc()
        self._families.tgi.count_rejected(self._model_name, arrived)

    def observe_prepared(self, seconds: float) -> None:
        """One preparation (checks, chat template, tokenizing) ended, ``seconds`` after it was
        handed to the preparing thread: TGI's validation time too. Called from that thread."""
        self.prepare_time.observe(seconds)
        self._families.tgi.validation_duration.labels(self._model_name).observe(seconds)

    def observe_inter_token(self, gap_s: float) -> None:
        self.inter_token.observe(gap_s)

    def record_asked(self, max_tokens: int | None, n: int | None) -> None:
        """What a request asked for, whatever came of it (None: not given, or not its to say)."""
        if max_tokens is not None:
            self.max_tokens_param.observe(max_tokens)
        if n is not None:
            self.n_param.observe(n)

    def record_finished(self, request: FinishedRequest) -> None:
        self.prompt_tokens.inc(request.prompt_tokens)
        self.generation_tokens.inc(request.generation_tokens)
        self._finished.labels(self._model_name, request.finish_reason).inc()
        self._families.success.labels(self._model_name, request.finish_reason).inc()
        if request.finish_reason == "abort":
            self.aborted.inc()
        elif request.finish_reason == "timeout":
            self.timed_out.inc()
        self.record_asked(request.max_tokens, request.n)
        self._families.tgi.record_finished(self._model_name, request)
        if request.finish_reason not in ("stop", "length"):
            return  # latencies of cut-short requests would skew the distributions
        self.prompt_tokens_per_request.observe(request.prompt_tokens)
        self.generation_tokens_per_request.observe(request.generation_tokens)
        for histogram, value in (
            (self.ttft, request.ttft_s),
            (self.e2e, request.e2e_s),
            (self.queue, request.queue_s),
            (self.prefill, request.prefill_s),
            (self.decode, request.decode_s),
            (self.inference, request.inference_s),
            (self.time_per_output_token, request.time_per_output_token_s),
        ):
            if value is not None:
                histogram.observe(value)


@dataclass(frozen=True)
class _EngineSource:
    model_name: str
    stats: Callable[[], EngineStats]


class _EngineCollector(Collector):
    """Reads every served engine's live state at each scrape, one sample per model in each family."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._sources: list[_EngineSource] = []

    def _name(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    def add(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        """A model's engine; one loaded again under the same name replaces the one before."""
        self._sources = [s for s in self._sources if s.model_name != model_name]
        self._sources.append(_EngineSource(model_name, stats))

    def remove(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        """That engine's source, if it is still the model's (not replaced by a reload)."""
        self._sources = [s for s in self._sources if s != _EngineSource(model_name, stats)]

    def collect(self) -> Iterator[Metric]:
        snapshots = [(source, source.stats()) for source in self._sources]
        gauges = (
            (self._name("num_requests_running"), "Requests in the running batch.", "num_running"),
            (self._name("num_requests_waiting"), "Requests waiting to be scheduled.", "num_waiting"),
            (self._name("kv_cache_usage_perc"), "Share of KV-cache blocks in use (0-1).", "kv_usage"),
            # TGI's names for the same queues (tgi_metrics.py), as TGI writes them.
            ("tgi_queue_size", "Requests waiting to be scheduled.", "num_waiting"),
            ("tgi_batch_current_size", "Requests in the running batch.", "num_running"),
        )
        for name, doc, field in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            for source, stats in snapshots:
                gauge.add_metric([source.model_name], getattr(stats, field))
            yield gauge
        # Gauges only some engines have (None elsewhere): shown only where one has them.
        optional = (
            ("spec_decode_draft_kv_cache_usage_perc",
             "Share of the draft model's KV-cache blocks in use (0-1; speculative decoding).",
             "draft_kv_usage"),
            ("gpu_memory_used_bytes",
             "Device memory held by the engine's torch allocator (weights, KV cache, CUDA graphs).",
             "device_memory_bytes"),
        )  # fmt: skip
        for name, doc, field in optional:
            values = [(source.model_name, getattr(stats, field)) for source, stats in snapshots]
            present = [(model_name, value) for model_name, value in values if value is not None]
            if present:
                gauge = GaugeMetricFamily(self._name(name), doc, labels=["model_name"])
                for model_name, value in present:
                    gauge.add_metric([model_name], value)
                yield gauge
        counters = (
            ("num_preemptions", "Requests preempted to free KV blocks.", "num_preemptions"),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_queries"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_hits"),
            ("prefix_cache_waits", "Requests held back (once per wait) because a running request was "
             "computing their prompt's next block, to take it from the cache.", "prefix_waits"),
            ("spec_decode_num_drafts", "Steps in which a request ran proposed tokens (speculative "
             "decoding).", "spec_drafts"),
            ("spec_decode_num_draft_tokens", "Proposed tokens run (speculative decoding).",
             "spec_draft_tokens"),
            ("spec_decode_num_accepted_tokens", "Proposed tokens the model accepted (speculative "
             "decoding).", "spec_accepted_tokens"),
        )  # fmt: skip
        for name, doc, field in counters:
            family = CounterMetricFamily(self._name(name), doc, labels=["model_name"])
            for source, stats in snapshots:
                family.add_metric([source.model_name], getattr(stats, field))
            yield family
        adapters = [(source, stats) for source, stats in snapshots if stats.running_adapters is not None]
        if adapters:
            # vLLM's lora_requests_info, which the Gateway API's endpoint picker routes LoRA requests
            # by: the adapters as comma-separated labels, the value when they were read.
            info = GaugeMetricFamily(
                self._name("lora_requests_info"),
                "The LoRA adapters of the running and waiting requests (labels); the value is the time read.",
                labels=["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            for source, stats in adapters:
                labels = [source.model_name, str(stats.num_adapters), ",".join(stats.running_adapters or ()),
                          ",".join(stats.waiting_adapters or ())]  # fmt: skip
                info.add_metric(labels, time.time())
            yield info
        steps = HistogramMetricFamily(
            self._name("iteration_tokens_total"),
            "Tokens computed per engine step (prompt chunks and decode tokens scheduled together).",
            labels=["model_name"],
        )
        bounds = [*(str(float(bound)) for bound in STEP_TOKEN_BUCKETS), "+Inf"]
        for source, stats in snapshots:
            if stats.step_token_counts:  # an engine that reports its steps
                buckets = list(zip(bounds, itertools.accumulate(stats.step_token_counts), strict=True))
                steps.add_metric([source.model_name], buckets, stats.step_tokens)
        yield steps

    def describe(self) -> Iterator[Metric]:
        return iter(())
