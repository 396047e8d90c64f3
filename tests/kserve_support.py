"""Test support for the KServe tests: a live classic-model server in a subprocess, the test double for
the `llm` runtime, and tiny random-weight BERT folders for the Hugging Face runtimes.

The server runs in its own process because the server's generated `inference` protobuf modules and
tritonclient's own copy cannot share one descriptor pool. Run as a script, this module starts
`inferd.server.kserve.launch.serve` with the fake LLM runtime registered through the public registry.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from server_process import stop_process

from inferd.serving.config import ModelConfig
from inferd.serving.runtimes.base import GenerationParams, GenerationResult

STARTUP_TIMEOUT_S = 120.0


class FakeGenerationStream:
    """Yields the prompt's words upper-cased, one delta per word, at most `max_tokens` of them."""

    def __init__(self, text: str, params: GenerationParams) -> None:
        self._words = text.upper().split()
        self._limit = params.max_tokens if params.max_tokens is not None else len(self._words)
        self._emitted: list[str] = []

    async def __aiter__(self) -> AsyncIterator[str]:
        for index, word in enumerate(self._words[: self._limit]):
            await asyncio.sleep(0)
            delta = word if index == 0 else " " + word
            self._emitted.append(delta)
            yield delta

    def result(self) -> GenerationResult:
        finish = "length" if self._limit < len(self._words) else "stop"
        return GenerationResult("".join(self._emitted), finish, len(self._words), len(self._emitted))

    @property
    def prompt_tokens(self) -> int:
        return len(self._words)

    @property
    def completion_tokens(self) -> int:
        return len(self._emitted)

    @property
    def cumulative_logprob(self) -> float | None:
        return None


class FakeTextGenerator:
    """A deterministic stand-in for the LLM engine: tests of the v2 generate paths only."""

    def generate(self, text: str, params: GenerationParams) -> FakeGenerationStream:
        return FakeGenerationStream(text, params)


def expected_fake_output(text: str, max_tokens: int | None = None) -> str:
    words = text.upper().split()
    return " ".join(words[:max_tokens] if max_tokens is not None else words)


def load_fake_llm(model_dir: Path, config: ModelConfig) -> FakeTextGenerator:
    return FakeTextGenerator()


_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "movie", "great", "awful", "the", "a", "is"]


def build_tiny_bert(folder: Path, head: str) -> Path:
    """A random BERT saved with `save_pretrained` (safetensors) plus a word-level tokenizer.

    head: "embedding" for a bare encoder (AutoModel), "classification" for a 2-label classifier.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(_VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
    )
    model_class = (
        transformers.BertModel if head == "embedding" else transformers.BertForSequenceClassification
    )
    model_class(config).eval().save_pretrained(folder)
    vocab = {word: index for index, word in enumerate(_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LiveServer:
    http_url: str
    grpc_url: str

    @property
    def http_address(self) -> str:
        return self.http_url.removeprefix("http://")


def _wait_until_ready(process: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server did not become ready")


@contextmanager
def running_server(repository: Path, *flags: str) -> Iterator[LiveServer]:
    """The server on free 127.0.0.1 ports for the duration of the block (``flags``: more of its
    command line, such as --allow-client-shm)."""
    http_port, grpc_port = free_port(), free_port()
    command = [
        sys.executable,
        __file__,
        "--model-repository",
        str(repository),
        "--port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        *flags,
    ]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        server = LiveServer(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
        _wait_until_ready(process, server.http_url)
        yield server
    finally:
        stop_process(process)


def _serve(argv: list[str]) -> None:
    from prometheus_client import CollectorRegistry

    from inferd.server.kserve.launch import build_app, open_repository, serve
    from inferd.serving.runtimes.registry import default_runtime_registry

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--allow-client-shm", action="store_true")
    args = parser.parse_args(argv)
    runtimes = default_runtime_registry()
    runtimes.register("llm", load_fake_llm, platform="fake_llm")
    metrics_registry = CollectorRegistry()
    repository = open_repository(args.model_repository, metrics_registry, runtimes, args.allow_client_shm)
    app = build_app(repository, metrics_registry)
    asyncio.run(serve(repository, app, "127.0.0.1", args.port, args.grpc_port))


if __name__ == "__main__":
    _serve(sys.argv[1:])
