"""The KServe manifests in deploy/kserve hold together, and each runtime's own command line, run
here on 127.0.0.1 with a real model where KServe would mount one, answers its probes and serves."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from server_process import stop_process

from inferd.cli import build_parser
from inferd.server.kserve.launch import build_arg_parser

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kserve"
EXAMPLE_REPOSITORY = ROOT / "examples" / "models"
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri
STARTUP_TIMEOUT_S = 90.0


def _documents() -> list[dict[str, Any]]:
    docs = [doc for path in sorted(MANIFESTS.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    assert docs, f"no manifests in {MANIFESTS}"
    return docs


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _documents() if doc["kind"] == kind}


RUNTIMES = _by_kind("ServingRuntime")
SERVICES = _by_kind("InferenceService")


def _container(runtime: dict[str, Any]) -> dict[str, Any]:
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe injects the model into
    return container


def _flag(args: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(name + "=")]
    assert len(values) == 1, f"{name}=VALUE must appear once in {args}"
    return values[0]


def _parse(container: dict[str, Any]) -> Any:
    """The container's arguments read by the parser of the command it runs."""
    command, args = container["command"], container["args"]
    if command == ["inferd"]:
        return build_parser().parse_args([arg.replace("{{.Name}}", "model") for arg in args])
    assert command == ["python", "-m", "inferd.server.kserve"], command
    return build_arg_parser().parse_args(args)


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_runtime_arguments_parse_and_match_its_ports_and_mount(name: str) -> None:
    container = _container(RUNTIMES[name])
    parsed = _parse(container)
    port = container["ports"][0]["containerPort"]
    assert parsed.port == port == 8080  # KServe sends REST traffic to 8080
    assert parsed.host == "0.0.0.0"  # reachable from the pod's network
    served = getattr(parsed, "model", None) or str(getattr(parsed, "model_repository", ""))
    assert str(served) == MODEL_MOUNT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port
    # Liveness only counts once the startup probe has passed, whatever the load takes.
    assert "initialDelaySeconds" not in container["livenessProbe"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_inference_service_names_a_runtime_that_takes_its_model(name: str) -> None:
    model = SERVICES[name]["spec"]["predictor"]["model"]
    runtime = RUNTIMES[model["runtime"]]["spec"]
    assert model["modelFormat"]["name"] in {fmt["name"] for fmt in runtime["supportedModelFormats"]}
    if "protocolVersion" in model:
        assert model["protocolVersion"] in runtime["protocolVersions"]
    assert model["storageUri"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_command(container: dict[str, Any], model_dir: Path, service_name: str) -> tuple[list[str], str]:
    """The container's command line with this machine's model, 127.0.0.1 and free ports."""
    http_port = str(_free_port())
    replacements = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=8080": f"--port={http_port}",
                    "--grpc-port=9000": f"--grpc-port={_free_port()}"}  # fmt: skip
    args = [replacements.get(arg, arg).replace(MODEL_MOUNT, str(model_dir)).replace("{{.Name}}", service_name)
            for arg in container["args"]]  # fmt: skip
    command = container["command"]
    python = [sys.executable, "-m", "inferd.cli"] if command == ["inferd"] else [sys.executable, *command[1:]]
    return [*python, *args], f"http://127.0.0.1:{http_port}"


def _wait_until_ready(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"the runtime's command exited:\n{output}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered 200")


def _run_runtime(
    runtime: str, model_dir: Path, service_name: str
) -> tuple[subprocess.Popen[str], str, dict[str, Any]]:
    container = _container(RUNTIMES[runtime])
    command, base_url = _local_command(container, model_dir, service_name)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, base_url, container


@pytest.mark.timeout(180)
def test_llm_runtime_command_serves_the_service_by_its_name(tiny_llama: Path) -> None:
    process, base_url, container = _run_runtime("inferd-llm", tiny_llama, "shakespeare")
    try:
        _wait_until_ready(process, base_url + container["readinessProbe"]["httpGet"]["path"])
        for probe in ("startupProbe", "livenessProbe"):
            assert httpx.get(base_url + container[probe]["httpGet"]["path"]).status_code == 200
        # `{{.Name}}` is the InferenceService's name: clients call the model by it.
        body = {"model": "shakespeare", "prompt": "To be", "max_tokens": 3}
        response = httpx.post(base_url + "/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
    finally:
        stop_process(process)


@pytest.mark.timeout(180)
def test_v2_runtime_command_serves_the_example_repository() -> None:
    process, base_url, container = _run_runtime("inferd-v2", EXAMPLE_REPOSITORY, "classifiers")
    try:
        _wait_until_ready(process, base_url + container["readinessProbe"]["httpGet"]["path"])
        for probe in ("startupProbe", "livenessProbe"):
            assert httpx.get(base_url + container[probe]["httpGet"]["path"]).status_code == 200
        for model in ("digits", "sentiment"):
            assert httpx.get(f"{base_url}/v2/models/{model}/ready").status_code == 200
        image = {"name": "image", "datatype": "FP32", "shape": [1, 8, 8], "data": [0.0] * 64}
        response = httpx.post(f"{base_url}/v2/models/digits/infer", json={"inputs": [image]}, timeout=30)
        assert response.status_code == 200, response.text
        assert {out["name"] for out in response.json()["outputs"]} >= {"label", "probabilities"}
    finally:
        stop_process(process)


def test_image_default_command_serves_on_the_runtimes_port() -> None:
    # Exec-form instructions are JSON lists, which YAML reads too.
    instructions = [line.split(None, 1) for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()]
    (entrypoint,) = [yaml.safe_load(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    (cmd,) = [yaml.safe_load(rest) for word, rest in instructions if word == "CMD"]
    assert entrypoint == ["inferd"]
    parsed = build_parser().parse_args(cmd)
    assert (parsed.host, parsed.port) == ("0.0.0.0", 8080)
