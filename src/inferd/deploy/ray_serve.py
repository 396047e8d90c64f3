"""Replicas of `inferd serve` behind Ray Serve: one engine per replica, Ray's proxy in front.

Ray routes each HTTP request to a replica (its router picks the less busy of two), keeps the
replica count fixed or autoscales it, replaces a replica whose health check fails, and lets a
stopping replica finish its requests. Each replica runs the app `inferd serve` runs: the OpenAI
and TGI APIs and, with `--model-repository`, KServe v2 over REST, with inferd's own limits,
timeouts and error formats. Requests a replica cannot take yet wait in Ray's queue, where any
replica can pick them up.

From the command line (`serve run` comes with `ray[serve]`)::

    serve run inferd.deploy.ray_serve:build_app model=/models/m num_replicas=2 \
        serve_args="--max-num-seqs 64 --request-timeout 60"

or in a Serve config file (`import_path: inferd.deploy.ray_serve:build_app`, `args:` as above),
or from Python with `inferd_deployment(...)`. Ray is imported here only.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application, Deployment

# `inferd serve` flags that Ray owns in a deployment: its proxy listens (host, port), the KServe
# gRPC server would clash between replicas on one node, and draining is Ray's
# (`--shutdown-timeout` becomes the deployment's graceful shutdown timeout).
_RAY_OWNED_FLAGS = ("--host", "--port")
# The builder's own keys; everything else belongs in `serve_args`.
_MODEL_KEY = "model"
_SERVE_ARGS_KEY = "serve_args"


@dataclass(frozen=True)
class ReplicaOptions:
    """How Ray runs the replicas; the engine and server options are `inferd serve` flags."""

    name: str = "inferd"
    num_replicas: int = 1
    # With max_replicas set, Ray autoscales between min_replicas and max_replicas instead.
    min_replicas: int | None = None
    max_replicas: int | None = None
    # Requests one replica holds at once; None: the engine's max_num_seqs, so a replica takes what
    # it can batch and the rest wait where every replica can reach them.
    max_ongoing_requests: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    health_check_period_s: float = 10.0

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("min_replicas needs max_replicas (autoscaling)")
        if self.max_replicas is not None and not 0 <= (self.min_replicas or 0) <= self.max_replicas >= 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas} and {self.max_replicas}")  # fmt: skip
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be at least 1, got {self.max_ongoing_requests}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.health_check_period_s <= 0:
            raise ValueError("num_cpus and num_gpus must be >= 0 and health_check_period_s > 0")


def parse_serve_args(serve_argv: list[str]) -> argparse.Namespace:
    """`serve_argv` read by the `inferd serve` parser, so every engine and server flag means here
    what it means there; the flags Ray owns are refused."""
    from inferd.cli import build_parser

    for token in serve_argv:
        flag = token.split("=", 1)[0]
        if flag == "--grpc-port":
            raise ValueError("--grpc-port: gRPC is not served under Ray (KServe v2 is, over REST)")
        if flag in _RAY_OWNED_FLAGS:
            raise ValueError(f"{flag} is Ray's in a deployment: set Ray Serve's http_options instead")
    try:
        return build_parser().parse_args(["serve", *serve_argv])
    except SystemExit as exc:  # argparse has printed why
        raise ValueError(f"invalid inferd serve arguments: {shlex.join(serve_argv)}") from exc


def build_replica_app(serve_argv: list[str]) -> FastAPI:
    """The app one replica serves: the engine is built and the app made as `inferd serve` does."""
    from inferd.server.app import create_app
    from inferd.server.serve_cli import load_llm, server_config

    args = parse_serve_args(serve_argv)
    return create_app(load_llm(args), server_config(args), args.model_repository)


def check_replica_health(app: FastAPI) -> None:
    """Raise while the replica's engine is dead, so Ray replaces the replica."""
    llm = app.state.frontend.llm
    if not llm.is_alive:
        raise RuntimeError(f"inferd engine is not running: {llm.dead_reason or 'stopped'}")


def inferd_deployment(serve_argv: list[str], options: ReplicaOptions | None = None) -> Deployment:
    """A Ray Serve deployment of `inferd serve` with `serve_argv` (model folder first, or none for
    the built-in model); `.bind()` it and pass it to `serve.run`."""
    from ray import serve

    options = options or ReplicaOptions()
    args = parse_serve_args(serve_argv)  # fail here, on the driver, not in every replica
    argv = list(serve_argv)

    # Ray calls a builder with no arguments on each replica; the closure carries the flags.
    def build() -> FastAPI:
        return build_replica_app(argv)

    @serve.ingress(build)
    class InferdReplica:
        def check_health(self) -> None:
            check_replica_health(self.app)  # type: ignore[attr-defined]  # set by serve.ingress

    scaling: dict[str, Any]
    if options.max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": options.min_replicas or 0,
                                          "max_replicas": options.max_replicas}}  # fmt: skip
    else:
        scaling = {"num_replicas": options.num_replicas}
    return serve.deployment(
        name=options.name,
        max_ongoing_requests=options.max_ongoing_requests or _engine_max_num_seqs(args),
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        health_check_period_s=options.health_check_period_s,
        graceful_shutdown_timeout_s=args.shutdown_timeout,
        **scaling,
    )(InferdReplica)


def build_app(builder_args: Mapping[str, Any]) -> Application:
    """Entry point for `serve run inferd.deploy.ray_serve:build_app key=value ...` and Serve config
    files. Keys: `model` (folder; default the built-in model), `serve_args` (`inferd serve` flags,
    one string), and the fields of `ReplicaOptions`."""
    known = {field.name: field.type for field in fields(ReplicaOptions)}
    unknown = set(builder_args) - set(known) - {_MODEL_KEY, _SERVE_ARGS_KEY}
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; expected {_MODEL_KEY}, {_SERVE_ARGS_KEY} "
                         f"or one of {sorted(known)}")  # fmt: skip
    values: dict[str, Any] = {}
    for key, value in builder_args.items():
        if key in known:
            values[key] = _convert(key, value, str(known[key]))
    serve_argv = shlex.split(str(builder_args.get(_SERVE_ARGS_KEY, "")))
    if builder_args.get(_MODEL_KEY):
        serve_argv.insert(0, str(builder_args[_MODEL_KEY]))
    return inferd_deployment(serve_argv, ReplicaOptions(**values)).bind()


def _convert(key: str, value: Any, type_name: str) -> Any:
    """Builder arguments come as strings from `serve run` and typed from config files."""
    try:
        if type_name.startswith("int"):
            return int(value)
        if type_name.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key} must be a number, got {value!r}") from exc


def _engine_max_num_seqs(args: argparse.Namespace) -> int:
    from inferd.engine.builder import DEFAULT_MAX_NUM_SEQS

    return int(args.max_num_seqs or DEFAULT_MAX_NUM_SEQS)
