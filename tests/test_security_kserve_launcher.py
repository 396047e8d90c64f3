"""The standalone v2 server (`python -m inferd.server.kserve`) takes an API key as `inferd serve` does
(audit #8): `--api-key`, else `INFERD_API_KEY`, else `VLLM_API_KEY`, checked on every REST path but
the open ones and on every gRPC call but the health ones; its `--max-body-bytes` bounds gRPC
messages and shared memory BYTES inputs too (#9, #11); a gRPC load by path reaches nothing (#6); the
KServe runtimes that bind 0.0.0.0 take a key; and docs/kserve.md says which routes are open (#14).

The live server runs in a subprocess, and is called over gRPC with hand-encoded messages: the
server's generated protobuf modules cannot share a process with tritonclient's."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from kserve_support import free_port
from prometheus_client import CollectorRegistry
from server_process import stop_process

from inferd.server.kserve import launch
from inferd.server.kserve.launch import build_app, build_arg_parser, open_repository
from inferd.serving.errors import InvalidInputError
from inferd.serving.shared_memory import SHM_ROOT, read_input

KEY = "sesame"
AUTHORIZED = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90.0
SERVICE = "/inference.GRPCInferenceService/"
KEY_VARIABLES = ("INFERD_API_KEY", "VLLM_API_KEY")


@pytest.fixture
def no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in KEY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.usefixtures("no_key_in_environment")
@pytest.mark.parametrize(
    ("environment", "argv", "expected"),
    [
        ({}, [], None),
        ({"INFERD_API_KEY": "a"}, [], "a"),
        ({"VLLM_API_KEY": "v"}, [], "v"),  # a deployment moved over from vLLM keeps its key
        ({"INFERD_API_KEY": "a", "VLLM_API_KEY": "v"}, [], "a"),
        ({"INFERD_API_KEY": "", "VLLM_API_KEY": "v"}, [], "v"),
        ({"INFERD_API_KEY": "a"}, ["--api-key", "flag"], "flag"),
    ],
)
def test_the_key_comes_from_the_flag_else_the_variables_inferd_serve_reads(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], argv: list[str], expected: str | None
) -> None:
    from inferd.cli import build_parser

    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    launcher = build_arg_parser().parse_args(["--model-repository", "r", *argv])
    served = build_parser().parse_args(["serve", *argv])  # `inferd serve` reads the same, in that order
    assert launcher.api_key == served.api_key == expected


@pytest.mark.parametrize("size", ["0", "-1"])
def test_the_body_limit_is_positive(size: str) -> None:
    with pytest.raises(SystemExit):  # gRPC would read -1 as no limit at all
        build_arg_parser().parse_args(["--model-repository", "r", "--max-body-bytes", size])


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    registry = CollectorRegistry()
    app = build_app(open_repository(tmp_path, registry), registry, api_key=KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://v2") as client:
        yield client


PROTECTED = [
    ("GET", "/v2"),
    ("GET", "/v2/models/stats"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/digits/load"),
    ("POST", "/v2/repository/models/digits/unload"),
    ("POST", "/v2/models/digits/infer"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("POST", "/v1/embeddings"),  # docs/kserve.md read as if it were open (#14)
    ("GET", "/openapi.json"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_route_but_the_open_ones_needs_the_key(
    keyed: httpx.AsyncClient, method: str, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        refused = await keyed.request(method, path, headers=headers, content=b"{}")
        assert refused.status_code == 401, (path, headers, refused.text)
    answered = await keyed.request(method, path, headers=AUTHORIZED, content=b"{}")
    assert answered.status_code != 401


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/metrics"])
async def test_the_probes_and_metrics_stay_open(keyed: httpx.AsyncClient, path: str) -> None:
    assert (await keyed.get(path)).status_code == 200


async def test_without_a_key_the_routes_stay_open(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    app = build_app(open_repository(tmp_path, registry), registry)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://v2") as client:
        assert (await client.get("/v2")).status_code == 200


@pytest.fixture
def shm_object() -> Iterator[str]:
    """A 2000-byte object in /dev/shm, named as a client would name it."""
    name = f"inferd-test-{uuid.uuid4().hex}"
    path = SHM_ROOT / name
    path.write_bytes(bytes(2000))
    yield "/" + name
    path.unlink()


def test_shared_memory_bytes_inputs_are_held_to_the_body_limit(tmp_path: Path, shm_object: str) -> None:
    repository = open_repository(tmp_path, CollectorRegistry(), allow_client_shm=True, max_body_bytes=1000)
    regions = repository.shared_memory
    assert regions is not None
    regions.register("r", shm_object, 0, 2000)
    try:
        placed = {"shared_memory_region": "r", "shared_memory_byte_size": 1001}
        with pytest.raises(InvalidInputError, match="over the 1000 bytes"):
            read_input(regions, "text", "BYTES", [1], placed)
    finally:
        regions.close()


def _main_wiring(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str
) -> tuple[dict[str, Any], list[type]]:
    """What `main` hands the server: `serve`'s arguments and the app's middleware, unstarted."""
    handed: dict[str, Any] = {}

    def run(serving: Any) -> None:
        handed.update(serving.cr_frame.f_locals)  # the coroutine's arguments, before it runs
        serving.close()

    monkeypatch.setattr(launch.event_loop, "run", run)
    assert launch.main(["--model-repository", str(tmp_path), *argv]) == 0
    return handed, [middleware.cls for middleware in handed["app"].user_middleware]


@pytest.mark.usefixtures("no_key_in_environment")
def test_main_gives_the_key_and_the_limit_to_both_servers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from inferd.server.auth import RequireApiKey

    monkeypatch.setenv("INFERD_API_KEY", KEY)
    with caplog.at_level(logging.WARNING, logger="inferd.server.kserve"):
        handed, middleware = _main_wiring(
            monkeypatch, tmp_path, "--host", "0.0.0.0", "--max-body-bytes", "4096"
        )
    assert handed["api_key"] == KEY and handed["max_body_bytes"] == 4096  # gRPC's interceptor and limit
    assert RequireApiKey in middleware
    assert caplog.text == ""  # a key: nothing to warn of


@pytest.mark.usefixtures("no_key_in_environment")
def test_main_warns_when_it_serves_every_address_without_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from inferd.server.auth import RequireApiKey

    with caplog.at_level(logging.WARNING, logger="inferd.server.kserve"):
        handed, middleware = _main_wiring(monkeypatch, tmp_path, "--host", "0.0.0.0")
        assert "serving 0.0.0.0 without an API key" in caplog.text
        caplog.clear()
        _main_wiring(monkeypatch, tmp_path, "--host", "127.0.0.1")
        assert caplog.text == ""
    assert handed["api_key"] is None and RequireApiKey not in middleware


def test_every_runtime_serving_every_address_takes_a_key_from_a_secret() -> None:
    """The shipped v2 runtime bound 0.0.0.0 with no key: load and unload were open to the cluster."""
    documents = [
        yaml.safe_load(path.read_text()) for path in sorted((ROOT / "deploy" / "kserve").glob("*.yaml"))
    ]
    runtimes = [doc for doc in documents if doc["kind"] == "ServingRuntime"]
    assert runtimes
    for runtime in runtimes:
        (container,) = runtime["spec"]["containers"]
        if "--host=0.0.0.0" not in container["args"]:
            continue
        env = {variable["name"]: variable for variable in container.get("env", [])}
        secret = env["INFERD_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert secret["name"] and secret["key"] and not secret.get("optional")


def test_the_docs_list_no_guarded_route_as_open() -> None:
    text = (ROOT / "docs" / "kserve.md").read_text()
    (paragraph,) = [p for p in text.split("\n\n") if "every call but `ServerLive` and `ServerReady`" in p]
    assert "/v1/embeddings" in paragraph and "(and `/v1/embeddings`)" not in paragraph
    assert "python -m inferd.server.kserve" in paragraph and "INFERD_API_KEY" in paragraph


# The live launcher, over gRPC.


def _field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field (a string or bytes)."""
    tag, length, encoded = (number << 3) | 2, len(value), bytearray()
    encoded.append(tag)
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(encoded) + value


class Launcher:
    def __init__(self, http_url: str, grpc_address: str) -> None:
        self.http_url = http_url
        self.channel = grpc.insecure_channel(
            grpc_address, options=[("grpc.max_send_message_length", 64 << 20)]
        )

    def call(self, method: str, message: bytes = b"", key: str | None = None) -> grpc.StatusCode:
        metadata = [("authorization", f"Bearer {key}")] if key else []
        try:
            self.channel.unary_unary(SERVICE + method)(message, metadata=metadata, timeout=30)
        except grpc.RpcError as failed:
            self.details = failed.details()
            return failed.code()
        return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """`python -m inferd.server.kserve` with its key from INFERD_API_KEY and a 1 MiB body limit."""
    repository = tmp_path_factory.mktemp("repository")
    http_port, grpc_port = free_port(), free_port()
    ports = ["--port", str(http_port), "--grpc-port", str(grpc_port)]
    command = [sys.executable, "-m", "inferd.server.kserve", "--model-repository", str(repository), *ports]
    command += ["--max-body-bytes", str(1 << 20)]
    environment = {**os.environ, "INFERD_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    environment.pop("VLLM_API_KEY", None)
    process = subprocess.Popen(command, env=environment)
    try:
        http_url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers(http_url + "/v2/health/ready"):
            assert process.poll() is None, "the launcher exited"
            assert time.monotonic() < deadline, "the launcher never became ready"
            time.sleep(0.2)
        served = Launcher(http_url, f"127.0.0.1:{grpc_port}")
        yield served
        served.channel.close()
    finally:
        stop_process(process)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_the_launchers_grpc_calls_need_the_key(launcher: Launcher) -> None:
    assert launcher.call("ServerLive") == launcher.call("ServerReady") == grpc.StatusCode.OK
    for method in ("ServerMetadata", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
        assert launcher.call(method) == grpc.StatusCode.UNAUTHENTICATED, method
        assert launcher.call(method, key="wrong") == grpc.StatusCode.UNAUTHENTICATED, method
    assert launcher.call("ServerMetadata", key=KEY) == grpc.StatusCode.OK
    assert httpx.get(launcher.http_url + "/v2").status_code == 401
    assert httpx.get(launcher.http_url + "/v2", headers=AUTHORIZED).status_code == 200


def test_the_launchers_grpc_requests_are_held_to_its_body_limit(launcher: Launcher) -> None:
    def infer(raw_bytes: int) -> grpc.StatusCode:
        # ModelInferRequest: model_name "m" (no such model), then one raw_input_contents entry.
        return launcher.call("ModelInfer", _field(1, b"m") + _field(7, bytes(raw_bytes)), key=KEY)

    assert infer(1000) == grpc.StatusCode.NOT_FOUND  # decoded, then refused: no such model
    assert infer(2 << 20) == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused undecoded
    assert "larger than max" in launcher.details


def test_a_grpc_load_by_path_reaches_nothing_and_tells_nothing(launcher: Launcher, tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    answers = set()
    for name in (str(tmp_path / "exists"), str(tmp_path / "missing"), "/etc", "../../../../etc"):
        load = _field(2, name.encode())  # RepositoryModelLoadRequest.model_name
        assert launcher.call("RepositoryModelLoad", load, key=KEY) == grpc.StatusCode.NOT_FOUND
        answers.add(launcher.details.replace(repr(name), "NAME"))
    assert answers == {"the model repository has no model folder NAME"}
    assert json.loads(httpx.post(launcher.http_url + "/v2/repository/index", headers=AUTHORIZED).text) == []
