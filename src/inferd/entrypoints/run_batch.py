"""`inferd run-batch MODEL -i requests.jsonl -o results.jsonl`: a file of requests in OpenAI's batch
format, answered offline by the same routes the server serves (vLLM's ``run_batch``).

Each input line is ``{"custom_id", "method": "POST", "url", "body"}``; each output line, in input
order, ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``, as
OpenAI's batch output files: an answer of any status is a ``response`` (its body the route's own
answer or error), and ``error`` is set only for a line that could not be sent at all (not JSON, no
``custom_id``, a method or URL no batch takes, a streamed body), with ``response`` null.

The requests go to an in-process app (``create_app``) through ASGI, never a socket: validation,
error formats and metrics are the server's. At most ``--max-concurrency`` are in flight at once; a
429 (a queue limit) is tried again after its ``Retry-After``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from inferd.entrypoints.engine_args import add_engine_args, add_model_argument, engine_options, positive_int
from inferd.writable import is_writable_text

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

# The routes a batch line may name: those whose answer is one JSON body.
BATCH_URLS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/score", "/score", "/v1/rerank",
    "/rerank", "/v2/rerank", "/classify", "/pooling",
})  # fmt: skip
# How often one line is sent again while the server says 429 (a queue limit), before its 429 stands.
MAX_TRIES = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run-batch", help="answer a file of requests in OpenAI's batch format (JSON lines) offline"
    )
    add_model_argument(parser)
    parser.add_argument(
        "-i", "--input-file", required=True, help="the requests, one JSON object a line ('-': stdin)"
    )
    parser.add_argument("-o", "--output-file", required=True, help="where the results go ('-': stdout)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model name(s) the requests' bodies give (default: the folder name)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=256,
        help="most requests in flight at once (default 256; the engine batches them)",
    )
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from inferd.engine.async_llm import AsyncLLM
    from inferd.server import event_loop
    from inferd.server.app import create_app
    from inferd.server.config import ServerConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = args.served_model_name or ()
    config = ServerConfig(
        served_model_name=names[0] if names else None,
        model_aliases=tuple(names[1:]),
        log_stats_interval_s=0.0,
    )
    with _opened(args.input_file, "r") as source:
        lines = [line for line in source if line.strip()]
    _check_writable(args.output_file)  # before the model loads, not once every line is answered
    llm = AsyncLLM.from_options(Path(args.model) if args.model else None, **engine_options(args))
    app = create_app(llm, config)
    results = event_loop.run(answer_lines(app, lines, args.max_concurrency, show_progress=True))
    with _opened(args.output_file, "w") as sink:
        for result in results:
            line = json.dumps(result, ensure_ascii=False)
            # A lone surrogate no line should hold: written as its escape, not the run's end.
            sink.write((line if is_writable_text(line) else json.dumps(result)) + "\n")
    failed = sum(1 for r in results if r["error"] is not None or r["response"]["status_code"] >= 400)
    print(f"run-batch: {len(results)} requests, {len(results) - failed} answered, {failed} failed",
          file=sys.stderr)  # fmt: skip
    return 0


async def answer_lines(
    app: FastAPI, lines: Iterable[str], max_concurrency: int, show_progress: bool = False
) -> list[dict[str, Any]]:
    """Every line's result, in the lines' order, from ``app`` (started and stopped here)."""
    import httpx
    from tqdm import tqdm

    lines = list(lines)
    slots = asyncio.Semaphore(max_concurrency)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://run-batch", timeout=None
        ) as client:
            with tqdm(total=len(lines), desc="run-batch", unit="req", disable=not show_progress) as bar:

                async def answer(line: str) -> dict[str, Any]:
                    async with slots:
                        result = await _answer_line(client, line)
                    bar.update(1)
                    return result

                return list(await asyncio.gather(*(answer(line) for line in lines)))


async def _answer_line(client: Any, line: str) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:  # an integer past 4,300 digits is a plain ValueError
        return _failed(None, f"the line is not JSON: {exc}")
    if not isinstance(request, dict):
        return _failed(None, "the line is not a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str):
        return _failed(None, "custom_id: a batch request needs a string custom_id")
    if not is_writable_text(custom_id):  # the output line repeats it: writing it failed the run
        return _failed(None, "custom_id: must be valid text (a lone surrogate, \\ud800, is not)")
    method, url, body = request.get("method"), request.get("url"), request.get("body")
    if method != "POST":
        return _failed(custom_id, f"method: a batch request is a POST, got {method!r}")
    if url not in BATCH_URLS:
        return _failed(custom_id, f"url: a batch takes {', '.join(sorted(BATCH_URLS))}; got {url!r}")
    if not isinstance(body, dict):
        return _failed(custom_id, "body: a batch request's body is a JSON object")
    if body.get("stream"):
        return _failed(custom_id, "body.stream: a batch answer is one body, not a stream")
    try:
        content = json.dumps(body, allow_nan=False)
    except ValueError as exc:  # NaN or Infinity, which JSON readers took but JSON does not have
        return _failed(custom_id, f"body: {exc}")
    headers = {"Content-Type": "application/json"}
    try:
        for _ in range(MAX_TRIES):
            response = await client.post(url, content=content, headers=headers)
            if response.status_code != 429:
                break
            await asyncio.sleep(float(response.headers.get("Retry-After", 1)))
    except Exception as exc:  # one line's failure must not lose the others' answers
        logger.exception("batch request %r failed", custom_id)
        return _failed(custom_id, f"the request failed: {exc}")
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": {"message": response.text, "type": "server_error"}}
    request_id = answer.get("id") if isinstance(answer, dict) else None
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {
            "status_code": response.status_code,
            "request_id": request_id if isinstance(request_id, str) else f"req_{uuid.uuid4().hex}",
            "body": answer,
        },
        "error": None,
    }


def _failed(custom_id: str | None, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": "invalid_request", "message": message},
    }


def _check_writable(path: str) -> None:
    """Make the output file's folder and check that the file can be written there, without
    opening it (a named pipe's reader would take an open for the end), or fail with a usage
    error."""
    if path == "-":
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--output-file: cannot write {path!r}: {exc}") from None
    writable = os.access(target, os.W_OK) if target.exists() else os.access(target.parent, os.W_OK)
    if target.is_dir() or not writable:
        raise ValueError(f"--output-file: cannot write {path!r}")


@contextmanager
def _opened(path: str, mode: str) -> Iterator[IO[str]]:
    """A file, or stdin / stdout for '-'."""
    if path == "-":
        yield sys.stdin if mode == "r" else sys.stdout
        return
    with open(path, mode, encoding="utf-8") as handle:
        yield handle
