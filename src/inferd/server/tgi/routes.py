"""TGI-compatible routes: `/generate`, `/generate_stream`, `/info`, and `POST /` (TGI's compat route,
which is what `huggingface_hub.InferenceClient(base_url).text_generation` posts to)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from inferd.server.errors import protocol_route_class
from inferd.server.frontend import TIMEOUT_HEADER, Frontend
from inferd.server.streaming import started_sse_response, unless_disconnected
from inferd.server.tgi.generation import (
    DEFAULT_MAX_BEST_OF,
    MAX_STOP_SEQUENCES,
    TgiJob,
    error_response,
    generate,
    max_input_tokens,
    prepare_generate,
    stream_generate,
)
from inferd.server.tgi.protocol import GenerateRequest, GenerateResponse, Info
from inferd.version import package_version


def build_router(
    frontend: Frontend,
    dependencies: Sequence[Callable[..., Any]] = (),
    max_best_of: int = DEFAULT_MAX_BEST_OF,
) -> APIRouter:
    """``max_best_of``: the most candidates one request's ``best_of`` may ask for."""
    router = APIRouter(
        route_class=protocol_route_class(error_response),
        dependencies=[Depends(dependency) for dependency in dependencies],
        tags=["tgi"],
    )

    @router.get("/info")
    async def info() -> Info:
        config = frontend.llm.config
        return Info(
            model_id=frontend.model_name,
            model_dtype=config.dtype,
            model_device_type=config.device,
            max_concurrent_requests=config.scheduler.max_num_seqs,
            max_best_of=max_best_of,
            max_stop_sequences=MAX_STOP_SEQUENCES,
            max_input_tokens=max_input_tokens(frontend),
            max_total_tokens=frontend.max_model_len,
            version=package_version(),
        )

    async def ready_job(body: GenerateRequest, request: Request, stream: bool) -> TgiJob:
        """The checked job, with its timeout; raises before any response starts."""
        job = await frontend.off_loop(prepare_generate, frontend, body, stream, max_best_of)
        job = dataclasses.replace(job, timeout_s=frontend.timeout_s(request.headers.get(TIMEOUT_HEADER)))
        frontend.check_ready([job.prompt], job.best_of)
        return job

    @router.post("/generate", response_model=GenerateResponse)
    async def generate_text(body: GenerateRequest, request: Request) -> Response:
        job = await ready_job(body, request, stream=False)
        generated = await unless_disconnected(request, generate(frontend, job))
        return _json(generated.response.model_dump_json(), generated.headers)

    @router.post("/generate_stream", response_model=None)
    async def generate_stream(body: GenerateRequest, request: Request) -> Response:
        job = await ready_job(body, request, stream=True)
        return await started_sse_response(request, stream_generate(frontend, job))

    @router.post("/", response_model=list[GenerateResponse])
    async def compat_generate(body: GenerateRequest, request: Request) -> Response:
        job = await ready_job(body, request, stream=bool(body.stream))
        if body.stream:
            return await started_sse_response(request, stream_generate(frontend, job))
        generated = await unless_disconnected(request, generate(frontend, job))
        return _json(f"[{generated.response.model_dump_json()}]", generated.headers)

    return router


def _json(body: str, headers: dict[str, str]) -> Response:
    """An answer already serialized, with its headers (TGI's timings)."""
    return Response(body, media_type="application/json", headers=headers)
