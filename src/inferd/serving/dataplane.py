"""The one v2 data plane behind the REST and gRPC adapters: metadata, readiness, inference, generation.

Adapters only translate wire formats to `InferRequest` and errors to status codes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from inferd.serving.classification import classify, top_k_count
from inferd.serving.config import ModelConfig, TensorSpec
from inferd.serving.datatypes import numpy_dtype
from inferd.serving.errors import InferenceError, InvalidInputError, RuntimeFailedError
from inferd.serving.generation import flag, generation_params, timeout_parameter_s
from inferd.serving.llm_io import (
    COUNTS,
    EXTRA_OUTPUT_SPECS,
    FLAG_PARAMETERS,
    OPTIONAL_INPUTS,
    STREAM,
    TEXT_INPUT,
    TEXT_OUTPUT,
    LLMRequest,
    read_llm_request,
)
from inferd.serving.metrics import failure_reason
from inferd.serving.repository import ModelEntry, ModelRepository
from inferd.serving.runtimes.base import GenerationResult, GenerationStream, TensorRuntime, TextGenerator
from inferd.serving.shared_memory import (
    SharedMemoryRegions,
    allowed,
    check_output_places,
    in_shared_memory,
    place_outputs,
)
from inferd.serving.tensor import InferRequest, InferResponse, Parameters, RequestedOutput, Tensor
from inferd.serving.validation import check_requested_outputs, validated_inputs
from inferd.version import package_version

T = TypeVar("T")

SERVER_NAME = "inferd"
EXTENSIONS = (
    "binary_tensor_data",
    "classification",
    "model_repository",
    "generate",
    "model_configuration",
    "statistics",
)


@dataclass(frozen=True)
class GenerationChunk:
    """One text delta of a generation, with the tokens it carries; the last chunk has the result."""

    text: str
    new_tokens: int
    stream: GenerationStream
    result: GenerationResult | None = None


class DataPlane:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def server_metadata(self) -> dict[str, Any]:
        shared = ("system_shared_memory",) if self.repository.shared_memory is not None else ()
        return {"name": SERVER_NAME, "version": package_version(), "extensions": [*EXTENSIONS, *shared]}

    @property
    def shared_memory(self) -> SharedMemoryRegions:
        """The clients' shared memory regions; an error where the server does not take them."""
        return allowed(self.repository.shared_memory)

    def server_unready_reason(self) -> str | None:
        """None when the server is ready (every loaded model serves), else why not."""
        return self.repository.unready_reason()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.repository.get(name, version).ready

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        entry = self.repository.get(name, version)
        config = entry.require_ready()
        inputs, outputs = self._signature(entry, config)
        return {
            "name": entry.name,
            "versions": [entry.version],
            "platform": entry.platform,
            "inputs": [self._tensor_metadata(config, spec) for spec in inputs],
            "outputs": [self._tensor_metadata(config, spec) for spec in outputs],
        }

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The model's configuration as Triton's model configuration extension answers it (the
        JSON form of its ModelConfig): tensors with Triton's `TYPE_*` data types and their dims
        without the batch dimension, the batch size, dynamic batching, and, for an LLM, the optional
        inputs and extra outputs of Triton's vLLM backend (`llm_io.py`) and a decoupled policy (it
        streams several responses a request)."""
        entry = self.repository.get(name, version)
        config = entry.require_ready()
        inputs, outputs = self._signature(entry, config)
        llm = isinstance(entry.runtime, TextGenerator)
        # Triton's versions are numbers (int64): another version string has no version policy.
        numbered = re.fullmatch(r"[0-9]{1,18}", entry.version) is not None
        described: dict[str, Any] = {
            "name": entry.name,
            "platform": entry.platform,
            "backend": config.runtime,
            "max_batch_size": config.max_batch_size,
            "input": [_config_tensor(spec, optional=llm and spec in OPTIONAL_INPUTS) for spec in inputs],
            "output": [_config_tensor(spec) for spec in outputs],
            "model_transaction_policy": {"decoupled": llm},
        }
        if numbered:
            described["version_policy"] = {"specific": {"versions": [int(entry.version)]}}
        if entry.batcher is not None:
            delay_us = int(config.max_queue_delay_ms * 1000)
            described["dynamic_batching"] = {"max_queue_delay_microseconds": delay_us}
            if config.preferred_batch_sizes:
                described["dynamic_batching"]["preferred_batch_size"] = list(config.preferred_batch_sizes)
        return described

    def model_statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """The statistics extension's answer: every loaded model's, or one model's."""
        entries = [self.repository.get(name, version)] if name else list(self.repository)
        if name and entries[0].runtime is None:
            entries[0].require_ready()  # its reason, as a 503
        stats = [
            entry.stats.to_json(entry.name, entry.version) for entry in entries if entry.runtime is not None
        ]
        return {"model_stats": stats}

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        index = []
        for entry in self.repository:
            reason = entry.unready_reason
            if ready_only and reason is not None:
                continue
            item = {
                "name": entry.name,
                "version": entry.version,
                "state": "READY" if reason is None else "UNAVAILABLE",
            }
            if reason is not None:
                item["reason"] = reason
            index.append(item)
        return index

    async def load(self, name: str, parameters: Mapping[str, object]) -> None:
        if parameters:  # Triton's config and file overrides
            raise InvalidInputError(f"load parameters are not supported: {sorted(parameters)}")
        await self.repository.load(name)

    async def unload(self, name: str, parameters: Mapping[str, object]) -> None:
        # There are no ensembles, so `unload_dependents` has nothing to act on.
        unknown = set(parameters) - {"unload_dependents"}
        if unknown:
            raise InvalidInputError(f"unload parameters are not supported: {sorted(unknown)}")
        await self.repository.unload(name)

    @staticmethod
    def _signature(
        entry: ModelEntry, config: ModelConfig
    ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        if isinstance(entry.runtime, TextGenerator):  # with the optional tensors of llm_io.py
            inputs, outputs = (config.inputs or (TEXT_INPUT,)), (config.outputs or (TEXT_OUTPUT,))
            return (*inputs, *OPTIONAL_INPUTS), (*outputs, *EXTRA_OUTPUT_SPECS)
        return config.inputs, config.outputs

    @staticmethod
    def _tensor_metadata(config: ModelConfig, spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": spec.datatype, "shape": config.metadata_shape(spec)}

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        entry = self.repository.get(name, version)
        config = entry.require_ready()
        with self._counted(entry, _inferences(config, request)):
            check_output_places(self.repository.shared_memory, request)
            if isinstance(entry.runtime, TextGenerator):
                outputs = await self._infer_text(entry.runtime, request)
            else:
                outputs = await self._infer_tensors(entry, config, request)
            if any(in_shared_memory(out.parameters) for out in request.outputs):
                place_outputs(self.shared_memory, request, outputs)
        return InferResponse(
            model_name=entry.name, model_version=entry.version, outputs=outputs, id=request.id
        )

    async def _infer_tensors(
        self, entry: ModelEntry, config: ModelConfig, request: InferRequest
    ) -> list[Tensor]:
        inputs = validated_inputs(config, request)
        check_requested_outputs(config, request)
        # Triton's `timeout` (or the REST header's): how long the request may wait in the batcher's
        # queue. A model without one runs each request at once, so it never waits.
        timeout_s = timeout_parameter_s(request.parameters)
        try:
            if entry.batcher is not None:
                results = await entry.batcher.submit(inputs, timeout_s)
            else:
                runtime = entry.runtime
                assert isinstance(runtime, TensorRuntime)
                started = time.monotonic_ns()
                results = await asyncio.to_thread(runtime.infer, inputs)
                took = time.monotonic_ns() - started
                entry.stats.executed(_inferences(config, request), took)
                entry.stats.computed(took)
        except InferenceError:
            raise
        except Exception as exc:
            raise RuntimeFailedError(
                f"model {entry.name!r} failed on this input: {type(exc).__name__}: {exc}"
            ) from exc
        requested = request.outputs or [RequestedOutput(spec.name) for spec in config.outputs]
        specs = {spec.name: spec for spec in config.outputs}
        return [self._output_tensor(config, specs[out.name], results, out.parameters) for out in requested]

    @staticmethod
    def _output_tensor(
        config: ModelConfig, spec: TensorSpec, results: dict[str, np.ndarray], parameters: Parameters
    ) -> Tensor:
        array = np.asarray(results[spec.name])
        _check_output(config, spec, array)
        if "classification" in parameters:
            k = top_k_count(parameters["classification"])
            return Tensor(spec.name, "BYTES", classify(array, k, config.labels, config.batched))
        if spec.datatype != "BYTES":  # within its kind only (_check_output): float64 to FP32, say
            array = np.asarray(array, dtype=numpy_dtype(spec.datatype))
        return Tensor(spec.name, spec.datatype, array)

    async def _infer_text(self, generator: TextGenerator, request: InferRequest) -> list[Tensor]:
        """`text_input` BYTES in, the whole generated text as `text_output` BYTES out (llm_io.py)."""
        llm = read_llm_request(request)
        result, stream = await self.generate(generator, llm)
        return llm.outputs(result.text, stream, result.finish_reason, result.completion_tokens)

    async def infer_stream(
        self, name: str, version: str | None, request: InferRequest
    ) -> AsyncIterator[tuple[InferResponse, bool]]:
        """The responses to one request of a stream, each with whether it is the last: one
        response, or, for an LLM asked with `stream` true (a BOOL input or a parameter), one per
        text delta and a last one with an empty `text_output` and the `finish_reason` parameter."""
        entry = self.repository.get(name, version)
        entry.require_ready()
        llm = None
        with self._counted(entry, counts_success=False):  # one its checks refuse is a failed request
            if not isinstance(entry.runtime, TextGenerator):
                flag(request.parameters, STREAM)  # checked, though a tensor model answers once either way
            else:
                llm = read_llm_request(request)
                if llm.stream and any(in_shared_memory(out.parameters) for out in request.outputs):
                    raise InvalidInputError("a streamed generation's outputs cannot go to shared memory")
        if llm is None or not llm.stream or not isinstance(entry.runtime, TextGenerator):
            yield await self.infer(name, version, request), True
            return
        with self._counted(entry):
            async for chunk in self.generate_stream(entry.runtime, llm):
                result = chunk.result
                parameters = {} if result is None else {"finish_reason": result.finish_reason}
                reason = None if result is None else result.finish_reason
                outputs = llm.outputs(chunk.text, chunk.stream, reason, chunk.new_tokens)
                response = InferResponse(
                    entry.name, entry.version, outputs, id=request.id, parameters=parameters
                )
                yield response, result is not None

    async def decoded(self, name: str, version: str | None, decode: Callable[[], T], off_loop: bool) -> T:
        """A request to model ``name`` decoded from the wire by ``decode``: one whose body the
        protocol's codec refuses (a shape its data does not fill, a malformed binary part) is a
        failed request of that model's, counted as one the model's checks refuse. ``off_loop``:
        decoded on a worker thread (decoding is Python work per element: 60 MB of 2-byte BYTES
        elements took 9.5 s, and every other request of the server waited on the event loop)."""
        entry = self.repository.get(name, version)
        entry.require_ready()
        with self._counted(entry, counts_success=False):
            if not off_loop:
                return decode()  # little to decode: a thread's hand-over would cost more
            return await asyncio.to_thread(decode)

    @contextmanager
    def _counted(self, entry: ModelEntry, inferences: int = 1, counts_success: bool = True) -> Iterator[None]:
        """Counts a request that ends as a success or a failure, in the metrics and the model's
        statistics, with its duration; an LLM's generation that succeeded is its one execution too
        (its engine batches it with others on its own). One the client left (its handler cancelled,
        its stream closed) is counted as ``cancelled`` in the metrics alone: Triton's statistics
        have no such count. ``counts_success`` False: only a failure is counted (a request's first
        part)."""
        metrics, name, started = self.repository.metrics, entry.name, time.monotonic_ns()
        if metrics is not None:
            metrics.in_flight.labels(name).inc()
        try:
            yield
        except Exception as error:
            took = time.monotonic_ns() - started
            if metrics is not None:
                metrics.requests.labels(name, "failure").inc()
                metrics.failures.labels(name, failure_reason(error)).inc()
                metrics.request_seconds.labels(name, "failure").observe(took / 1e9)
            entry.stats.finished(False, took, inferences)
            raise
        except BaseException:  # asyncio's cancellation, or GeneratorExit where a stream was closed
            if metrics is not None and counts_success:
                metrics.requests.labels(name, "cancelled").inc()
                metrics.request_seconds.labels(name, "cancelled").observe(
                    (time.monotonic_ns() - started) / 1e9
                )
            raise
        finally:
            if metrics is not None:
                metrics.in_flight.labels(name).dec()
        if not counts_success:
            return
        took = time.monotonic_ns() - started
        if metrics is not None:
            metrics.requests.labels(name, "success").inc()
            metrics.request_seconds.labels(name, "success").observe(took / 1e9)
        entry.stats.finished(True, took, inferences)
        if isinstance(entry.runtime, TextGenerator):
            entry.stats.executed(1, took)
            entry.stats.computed(took)

    def text_generator(self, name: str, version: str | None = None) -> tuple[ModelEntry, TextGenerator]:
        entry = self.repository.get(name, version)
        entry.require_ready()
        if not isinstance(entry.runtime, TextGenerator):
            raise InvalidInputError(f"model {name!r} does not generate text")
        return entry, entry.runtime

    async def generate_text(
        self, entry: ModelEntry, generator: TextGenerator, llm: LLMRequest
    ) -> tuple[GenerationResult, GenerationStream]:
        """The generate extension's request: counted as an inference request is (Triton makes one
        of it), in the metrics and the model's statistics."""
        with self._counted(entry):
            return await self.generate(generator, llm)

    async def generate_text_stream(
        self, entry: ModelEntry, generator: TextGenerator, llm: LLMRequest
    ) -> AsyncIterator[GenerationChunk]:
        """As ``generate_text``, streamed; a client gone mid-stream is counted as cancelled."""
        with self._counted(entry):
            async for chunk in self.generate_stream(generator, llm):
                yield chunk

    @staticmethod
    def _start(generator: TextGenerator, llm: LLMRequest) -> GenerationStream:
        wants_logprob = "cumulative_logprob" in llm.extras
        params = generation_params(llm.parameters, wants_logprob, FLAG_PARAMETERS)
        stream = generator.generate(llm.prompt, params)
        # A runtime written before the streams counted their tokens serves every other request.
        missing = [name for name in llm.extras if name in COUNTS and not hasattr(stream, COUNTS[name])]
        if missing:
            raise InvalidInputError(f"this model's runtime does not report {', '.join(missing)}")
        return stream

    @classmethod
    async def generate(
        cls, generator: TextGenerator, llm: LLMRequest
    ) -> tuple[GenerationResult, GenerationStream]:
        stream = cls._start(generator, llm)
        async for _ in stream:
            pass
        return stream.result(), stream

    @classmethod
    async def generate_stream(
        cls, generator: TextGenerator, llm: LLMRequest
    ) -> AsyncIterator[GenerationChunk]:
        """A chunk per text delta, then an empty one with the result (and the tokens that followed
        the last text, an EOS say)."""
        stream = cls._start(generator, llm)
        counting = "num_output_tokens" in llm.extras  # the counts are read only where asked for
        counted = 0
        async for delta in stream:
            total = stream.completion_tokens if counting else 0
            yield GenerationChunk(delta, total - counted, stream)
            counted = total
        result = stream.result()
        yield GenerationChunk("", result.completion_tokens - counted if counting else 0, stream, result)


def _inferences(config: ModelConfig, request: InferRequest) -> int:
    """A request's inferences: a batched model's rows (its first input's), one for any other."""
    if config.batched and request.inputs and request.inputs[0].data.ndim > 0:
        return int(request.inputs[0].data.shape[0])
    return 1


# numpy's dtype kinds, by the kind of value they hold: an output is cast within its kind only.
_KINDS = {"b": "bool", "i": "int", "u": "uint", "f": "float", "O": "bytes", "S": "bytes", "U": "bytes"}


def _check_output(config: ModelConfig, spec: TensorSpec, array: np.ndarray) -> None:
    """The runtime's output against its declaration: another kind of value (float where INT64 is
    declared) or another shape is the model's fault, an internal error, never converted."""
    expected = numpy_dtype(spec.datatype)
    if _KINDS.get(array.dtype.kind) != _KINDS.get(expected.kind):
        raise InferenceError(
            f"model {config.name!r}: output {spec.name!r} is {array.dtype} but the configuration "
            f"declares {spec.datatype}"
        )
    declared = config.metadata_shape(spec)
    shape = list(array.shape)
    if len(shape) != len(declared) or any(d not in (-1, n) for d, n in zip(declared, shape, strict=True)):
        raise InferenceError(
            f"model {config.name!r}: output {spec.name!r} has shape {shape} but the configuration "
            f"declares {declared}"
        )


def _config_tensor(spec: TensorSpec, optional: bool = False) -> dict[str, Any]:
    """A tensor as Triton's model configuration writes it (BYTES is its TYPE_STRING)."""
    datatype = "STRING" if spec.datatype == "BYTES" else spec.datatype
    tensor: dict[str, Any] = {"name": spec.name, "data_type": f"TYPE_{datatype}", "dims": list(spec.shape)}
    if optional:
        tensor["optional"] = True
    return tensor
