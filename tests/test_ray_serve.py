"""inferd replicas behind Ray Serve: the builder's arguments, the health check, and a live local
Ray cluster on 127.0.0.1 serving two replicas through Ray's HTTP proxy."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray.serve")

from inferd.deploy.ray_serve import (  # noqa: E402
    ReplicaOptions,
    build_app,
    build_replica_app,
    check_replica_health,
    inferd_deployment,
    replica_serve_args,
)


def _deployment_of(app: Any) -> Any:
    return app._bound_deployment  # the Application's one deployment; Ray has no public accessor


def test_builder_arguments_become_deployment_options(tiny_llama: Path) -> None:
    """As `serve run` passes them: every value a string."""
    app = build_app({"model": str(tiny_llama), "serve_args": "--max-num-seqs 8 --shutdown-timeout 7",
                     "num_replicas": "3", "num_cpus": "0.5"})  # fmt: skip
    deployment = _deployment_of(app)
    assert deployment.num_replicas == 3
    # A replica holds as many requests as its engine batches; more wait in Ray's queue.
    assert deployment.max_ongoing_requests == 8
    assert deployment.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert deployment._deployment_config.graceful_shutdown_timeout_s == 7


def test_max_ongoing_requests_defaults_to_the_engine_default(tiny_llama: Path) -> None:
    assert inferd_deployment([str(tiny_llama)]).max_ongoing_requests == 128
    chosen = inferd_deployment([str(tiny_llama)], ReplicaOptions(max_ongoing_requests=5))
    assert chosen.max_ongoing_requests == 5


def test_autoscaling_keeps_one_replica_and_scales_on_half_a_batch(tiny_llama: Path) -> None:
    app = build_app({"model": str(tiny_llama), "serve_args": "--max-num-seqs 32", "max_replicas": "4"})
    config = _deployment_of(app)._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 4, 16)
    chosen = inferd_deployment([str(tiny_llama)], ReplicaOptions(min_replicas=0, max_replicas=2,
                                                                 target_ongoing_requests=5))  # fmt: skip
    config = chosen._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (0, 2, 5)


def test_replicas_without_a_gpu_stay_on_the_cpu_and_keep_the_api_key(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERD_API_KEY", "from-the-driver")
    argv = replica_serve_args([str(tiny_llama)], ReplicaOptions())
    assert argv == [str(tiny_llama), "--device", "cpu", "--api-key", "from-the-driver"]
    # A GPU from Ray, an explicit device or an explicit key are left as they are.
    explicit = [str(tiny_llama), "--device=cuda:0", "--api-key=own"]
    assert replica_serve_args(explicit, ReplicaOptions(num_gpus=1)) == explicit
    monkeypatch.delenv("INFERD_API_KEY")
    assert replica_serve_args([str(tiny_llama)], ReplicaOptions(num_gpus=1)) == [str(tiny_llama)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"replicas": "2"}, "unknown argument"),
        ({"num_replicas": "two"}, "num_replicas must be a whole number"),
        ({"num_replicas": 2.5}, "num_replicas must be a whole number"),
        ({"num_replicas": True}, "num_replicas must be a whole number"),
        ({"num_cpus": "many"}, "num_cpus must be a number"),
        ({"num_gpus": "nan"}, "num_gpus must be a number"),
        ({"health_check_period_s": "inf"}, "health_check_period_s must be a number"),
        ({"num_replicas": "0"}, "at least 1"),
        ({"max_replicas": "2", "target_ongoing_requests": "0"}, "target_ongoing_requests must be at least 1"),
        ({"min_replicas": "1"}, "needs max_replicas"),
        ({"min_replicas": "3", "max_replicas": "2"}, "min_replicas <= max_replicas"),
        ({"serve_args": "--port 9000"}, "--port is Ray's"),
        ({"serve_args": "--host=0.0.0.0"}, "--host is Ray's"),
        ({"serve_args": "--grpc-port 8001"}, "not served under Ray"),
        ({"serve_args": "--max-num-seqs lots"}, "invalid inferd serve arguments"),
    ],
)
def test_bad_builder_arguments_are_refused_on_the_driver(
    tiny_llama: Path, args: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_app({"model": str(tiny_llama), **args})


def test_health_check_fails_once_the_engine_is_dead(tiny_llama: Path) -> None:
    app = build_replica_app([str(tiny_llama), "--max-num-seqs", "4"])
    llm = app.state.frontend.llm
    llm.start()
    try:
        check_replica_health(app)
    finally:
        llm.shutdown()
    with pytest.raises(RuntimeError, match="engine is not running"):
        check_replica_health(app)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    import ray
    from ray import serve

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine
    # Ray gives its node 30 s to register, which a loaded 2-core machine has missed (a CI run with
    # other tests running beside it): one more try, after shutting the half-started node down.
    for attempt in range(2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
            break
        except Exception as exc:
            ray.shutdown()
            if attempt == 1 or "timed out during startup" not in str(exc):
                raise
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _replica_actor_names() -> set[str]:
    import ray

    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in actor["name"]}  # fmt: skip


@pytest.mark.timeout(240)
def test_two_replicas_serve_every_protocol_through_rays_proxy(tiny_llama: Path, ray_url: str) -> None:
    from ray import serve

    options = ReplicaOptions(num_replicas=2, num_cpus=0.25, health_check_period_s=1.0)
    deployment = inferd_deployment([str(tiny_llama), "--max-num-seqs", "4", "--served-model-name", "tiny"],
                                   options)  # fmt: skip
    serve.run(deployment.bind(), name="inferd", route_prefix="/")
    status = serve.status().applications["inferd"].deployments["inferd"]
    assert status.replica_states.get("RUNNING") == 2
    replicas = _replica_actor_names()
    assert len(replicas) == 2

    with httpx.Client(base_url=ray_url, timeout=60) as client:
        body = {"model": "tiny", "prompt": "To be, or not", "max_tokens": 6, "temperature": 0}
        # Greedy: every replica holds the same weights, so every answer is the same.
        texts = {client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(6)}
        assert len(texts) == 1

        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        streamed = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
        assert streamed == texts.pop()

        tgi = client.post("/generate", json={"inputs": "To be", "parameters": {"max_new_tokens": 3}})
        assert tgi.status_code == 200 and "generated_text" in tgi.json()

        # Bad input keeps the protocol's own error format through Ray's proxy.
        bad = client.post("/v1/completions", json={**body, "max_tokens": -1})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "max_tokens"
        assert client.get("/health").status_code == 200

    # Ray has run the health check about once a second on each replica; a failing check would
    # have replaced the replicas under new names.
    time.sleep(3)
    assert _replica_actor_names() == replicas
    serve.delete("inferd")


def test_the_example_serve_config_builds(tiny_llama: Path) -> None:
    import yaml

    config_file = Path(__file__).parent.parent / "deploy" / "ray" / "serve-config.yaml"
    config = yaml.safe_load(config_file.read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "inferd.deploy.ray_serve:build_app"
    # Config files pass typed values; the example's model is the built-in one, here the tiny one.
    deployment = _deployment_of(build_app({**application["args"], "model": str(tiny_llama)}))
    assert deployment.num_replicas == 2
    assert deployment.max_ongoing_requests == 64  # its --max-num-seqs
    assert deployment.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0.0}


def test_config_file_values_null_and_flag_lists(tiny_llama: Path) -> None:
    app = build_app({"model": str(tiny_llama), "max_replicas": None, "num_replicas": 2.0,
                     "serve_args": ["--max-num-seqs", "16"]})  # fmt: skip
    deployment = _deployment_of(app)
    assert (deployment.num_replicas, deployment.max_ongoing_requests) == (2, 16)
