"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/responses` (create,
in the background too, read back, cancel, delete), `/v1/models`, `/tokenize`, `/detokenize`, and
vLLM's `/v1/score` and `/v1/rerank` (``score.py``). They translate between the protocol and the
Frontend, nothing more."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from inferd.engine.tokenizer import InvalidTextError
from inferd.server.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    protocol_route_class,
)
from inferd.server.frontend import TIMEOUT_HEADER, Frontend
from inferd.server.openai.beam_search import beam_complete, stream_beam_completion
from inferd.server.openai.chat import (
    beam_chat,
    chat,
    prepare_chat,
    refuse_request_template,
    render_conversation,
    stream_beam_chat,
    stream_chat,
)
from inferd.server.openai.classify import add_classify_routes
from inferd.server.openai.common import error_response
from inferd.server.openai.completions import complete, prepare_completion, stream_completion
from inferd.server.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    SimpleToken,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
)
from inferd.server.openai.response_store import ResponseStore
from inferd.server.openai.responses import (
    BackgroundResponses,
    ResponseJob,
    ResponseNotFoundError,
    input_items_page,
    prepare_response,
    previous_response,
    respond,
    stream_response,
)
from inferd.server.openai.responses_protocol import ResponsesRequest
from inferd.server.openai.score import add_score_routes
from inferd.server.request_id import HEADER as REQUEST_ID_HEADER
from inferd.server.request_id import client_request_id
from inferd.server.streaming import sse_response, started_sse_response, unless_disconnected

# Background responses answered at once: each holds an engine request but no connection, so a
# gateway's concurrency limit does not see them, and one client could queue hundreds in a second. As
# many as the engine runs at once by default (its max_num_seqs); one more is a 429 until one ends.
DEFAULT_MAX_BACKGROUND_RESPONSES = 128

# Seconds a client refused for the background limit is told to wait (Retry-After).
_BACKGROUND_RETRY_AFTER_S = 1


class BoundedBackgroundResponses(BackgroundResponses):
    """Background responses, at most ``max_running`` of them being answered at once."""

    def __init__(self, frontend: Frontend, store: ResponseStore, max_running: int) -> None:
        super().__init__(frontend, store)
        self.max_running = max_running

    def check_room(self) -> None:
        """A 429 in OpenAI's shape (``rate_limit_exceeded``, ``Retry-After``) while full."""
        if self.num_running >= self.max_running:
            raise OverloadedError(
                f"background: {self.num_running} background responses are being answered, the most this "
                "server runs at once; retry once one has ended, or send the request without background",
                _BACKGROUND_RETRY_AFTER_S,
            )

    def start(self, job: ResponseJob) -> dict[str, Any]:
        self.check_room()
        return super().start(job)


def build_router(
    frontend: Frontend,
    dependencies: Sequence[Callable[..., Any]] = (),
    response_store: ResponseStore | None = None,
    max_background_responses: int = DEFAULT_MAX_BACKGROUND_RESPONSES,
) -> APIRouter:
    """``response_store`` keeps the Responses API's stored responses (a new one by default);
    ``max_background_responses``: how many ``background`` responses may be answered at once."""
    store = response_store if response_store is not None else ResponseStore()
    background = BoundedBackgroundResponses(frontend, store, max_background_responses)
    router = APIRouter(
        route_class=protocol_route_class(error_response),
        dependencies=[Depends(dependency) for dependency in dependencies],
        tags=["openai"],
    )

    add_score_routes(router, frontend)
    add_classify_routes(router, frontend)

    def model_cards() -> list[ModelCard]:
        names = (frontend.model_name, *frontend.aliases)
        base = [ModelCard(id=name, max_model_len=frontend.max_model_len) for name in names]
        adapters = [
            ModelCard(id=name, max_model_len=frontend.max_model_len, parent=frontend.model_name)
            for name in frontend.adapters
        ]
        return [*base, *adapters]

    @router.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=model_cards())

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> ModelCard:
        """The OpenAI SDK's `models.retrieve` (an adapter's name may hold a slash)."""
        for card in model_cards():
            if card.id == model_id:
                return card
        raise ModelNotFoundError(f"the model {model_id!r} does not exist", "model")

    if frontend.llm.config.allow_runtime_lora_updating:

        @router.post("/v1/load_lora_adapter", response_model=None)
        async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
            await frontend.load_adapter(body.lora_name, body.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter {body.lora_name!r} loaded.")

        @router.post("/v1/unload_lora_adapter", response_model=None)
        async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
            await frontend.unload_adapter(body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter {body.lora_name!r} unloaded.")

    @router.post("/v1/completions", response_model=None)
    async def create_completion(body: CompletionRequest, request: Request) -> CompletionResponse | Response:
        _check_completion_fan_out(frontend, body)  # before its prompts are tokenized
        job = await frontend.off_loop(prepare_completion, frontend, body, _client_id(request, body))
        job.timeout_s = frontend.timeout_s(request.headers.get(TIMEOUT_HEADER), body.timeout)
        frontend.check_ready(job.prompts, job.best_of)
        if job.length_penalty is not None:
            if body.stream:
                return sse_response(stream_beam_completion(frontend, job))
            return await unless_disconnected(request, beam_complete(frontend, job))
        if body.stream:
            return await started_sse_response(request, stream_completion(frontend, job))
        return await unless_disconnected(request, complete(frontend, job))

    @router.post("/v1/chat/completions", response_model=None)
    async def create_chat_completion(
        body: ChatCompletionRequest, request: Request
    ) -> ChatCompletionResponse | Response:
        job = await frontend.off_loop(prepare_chat, frontend, body, _client_id(request, body))
        job.timeout_s = frontend.timeout_s(request.headers.get(TIMEOUT_HEADER), body.timeout)
        frontend.check_ready([job.prompt], job.n)
        if job.length_penalty is not None:
            if body.stream:
                return sse_response(stream_beam_chat(frontend, job))
            return await unless_disconnected(request, beam_chat(frontend, job))
        if body.stream:
            return await started_sse_response(request, stream_chat(frontend, job))
        return await unless_disconnected(request, chat(frontend, job))

    @router.post("/v1/responses", response_model=None)
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        if body.background:
            background.check_room()  # before the conversation is rendered and tokenized
        body.refuse_unsupported()
        job = await frontend.off_loop(prepare_response, frontend, body, previous_response(body, store))
        job.chat.timeout_s = frontend.timeout_s(request.headers.get(TIMEOUT_HEADER), body.timeout)
        frontend.check_ready([job.chat.prompt])
        if body.background:
            queued = background.start(job)
            if body.stream:  # the answer goes on if this reader goes away
                return sse_response(background.events(job.response_id, -1))
            return JSONResponse(queued)
        if body.stream:
            return await started_sse_response(request, stream_response(frontend, job, store))
        return JSONResponse(await unless_disconnected(request, respond(frontend, job, store)))

    @router.get("/v1/responses/{response_id}")
    async def read_response(
        response_id: str, stream: bool = False, starting_after: int | None = None
    ) -> Response:
        """The stored response; with ``stream``, a streamed background response's events past
        ``starting_after`` (all without it), live until it ends."""
        stored = store.get(response_id)
        if stored is None:
            raise ResponseNotFoundError(f"no stored response {response_id!r}")
        if stream:
            if starting_after is not None and starting_after < 0:
                message = "starting_after: must be a sequence number, 0 or more"
                raise InvalidRequestError(message, "starting_after")
            after = -1 if starting_after is None else starting_after
            return sse_response(background.events(response_id, after))
        return Response(stored.body_json, media_type="application/json")

    @router.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(
        response_id: str, after: str | None = None, limit: int = 20, order: Literal["asc", "desc"] = "desc"
    ) -> JSONResponse:
        """The conversation the stored response answered, as items with ids, a page at a time
        (``include`` is taken and ignored: the items carry what they have)."""
        stored = store.get(response_id)
        if stored is None:
            raise ResponseNotFoundError(f"no stored response {response_id!r}")
        return JSONResponse(input_items_page(stored, after, limit, order))

    @router.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> Response:
        stored = store.get(response_id)
        if stored is None:
            raise ResponseNotFoundError(f"no stored response {response_id!r}")
        if not json.loads(stored.body_json)["background"]:
            raise InvalidRequestError(f"response {response_id!r} was not created in the background; only "
                                      "background responses can be cancelled")  # fmt: skip
        await background.cancel(response_id)
        stored = store.get(response_id)
        if stored is None:  # deleted meanwhile
            raise ResponseNotFoundError(f"no stored response {response_id!r}")
        return Response(stored.body_json, media_type="application/json")

    @router.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> JSONResponse:
        await background.cancel(response_id)  # one still being answered stops: nothing would read it
        background.forget(response_id)
        if not store.delete(response_id):
            raise ResponseNotFoundError(f"no stored response {response_id!r}")
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    @router.post("/reset_prefix_cache", response_model=None, response_class=Response)
    async def reset_prefix_cache() -> Response:
        """vLLM's: the prefix cache forgets every prefix (a benchmark's runs start cold)."""
        await frontend.llm.reset_prefix_cache()
        return Response(status_code=200)

    @router.post("/tokenize", response_model=None)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse | list[SimpleToken]:
        """vLLM's tokenizer endpoint; TGI's, which shares its path, for a body of TGI's ``inputs``."""
        return await frontend.off_loop(_tokenized, frontend, body)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        frontend.check_model(body.model)
        # On the preparing thread, as /tokenize: 4M tokens held the event loop 3.7 s.
        return await frontend.off_loop(_detokenized, frontend, body.tokens)

    return router


def _detokenized(frontend: Frontend, tokens: list[int]) -> DetokenizeResponse:
    frontend.check_token_ids(tokens, "tokens")
    return DetokenizeResponse(prompt=frontend.tokenizer.decode(tokens))


def _tokenized(frontend: Frontend, body: TokenizeRequest) -> TokenizeResponse | list[SimpleToken]:
    """The /tokenize answer, a text the tokenizer refuses (too long, a lone surrogate) a 400 naming
    the field it came in."""
    if body.inputs is not None and body.prompt is None and body.messages is None:
        field = "inputs"
    else:
        field = "messages" if body.messages is not None else "prompt"
    try:
        return _tokenized_text(frontend, body)
    except InvalidTextError as exc:
        raise InvalidRequestError(str(exc), field) from None


def _tokenized_text(frontend: Frontend, body: TokenizeRequest) -> TokenizeResponse | list[SimpleToken]:
    """A chat rendered and tokenized as the chat route does it, a prompt, or TGI's ``inputs`` with
    each token's span."""
    frontend.check_model(body.model)
    if body.inputs is not None and body.prompt is None and body.messages is None:
        spans = frontend.tokenizer.encode_spans(body.inputs, body.add_special_tokens)
        truncate = body.parameters.truncate if body.parameters is not None else None
        if truncate is not None:  # TGI keeps the last tokens
            spans = spans[-truncate:]
        return [SimpleToken(id=i, text=body.inputs[start:stop], start=start, stop=stop)
                for i, start, stop in spans]  # fmt: skip
    if body.messages is not None:
        refuse_request_template(body.chat_template)
        text = render_conversation(frontend, body, body.tools)
    elif body.prompt is not None:
        text = body.prompt
    else:  # not an empty prompt's zero tokens
        raise InvalidRequestError(
            "prompt: give the text to tokenize as prompt, or messages (or TGI's inputs)", "prompt"
        )
    # A chat is tokenized as the chat route does: its template writes the special tokens.
    add_special = (
        body.add_special_tokens if "add_special_tokens" in body.model_fields_set else body.messages is None
    )
    tokens = frontend.tokenizer.encode(text, add_special_tokens=add_special)
    strs = [frontend.tokenizer.id_to_token(t) or "" for t in tokens] if body.return_token_strs else None
    return TokenizeResponse(
        count=len(tokens), max_model_len=frontend.max_model_len, tokens=tokens, token_strs=strs
    )


def _check_completion_fan_out(frontend: Frontend, body: CompletionRequest) -> None:
    """A 400 where the prompts times the samples each (``n``, or ``best_of`` where larger) are more
    engine requests than one request may make, naming the field to lower."""
    prompt = body.prompt
    # A string or one list of token ids is one prompt; a list of strings or of token lists, many.
    prompts = 1 if isinstance(prompt, str) or all(isinstance(item, int) for item in prompt) else len(prompt)
    samples = max(body.n, body.best_of or 1)
    if prompts > frontend.max_engine_requests:
        field = "prompt"
    else:
        field = "best_of" if samples > body.n else "n"
    frontend.check_fan_out(prompts, samples, field)


def _client_id(request: Request, body: CompletionRequest | ChatCompletionRequest) -> str | None:
    """The client's id for the answer, as vLLM takes it: the X-Request-Id header, else the body's."""
    return client_request_id(request.headers.get(REQUEST_ID_HEADER)) or body.request_id
