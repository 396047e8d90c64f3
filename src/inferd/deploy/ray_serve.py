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
import math
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
    # With max_replicas set, Ray autoscales between min_replicas (default 1, so a loaded model is
    # always up) and max_replicas instead, adding replicas while each holds more than
    # target_ongoing_requests (default: half of max_ongoing_requests).
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: int | None = None
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
        for name in ("max_ongoing_requests", "target_ongoing_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
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


def replica_serve_args(serve_argv: list[str], options: ReplicaOptions) -> list[str]:
    """The `inferd serve` flags each replica runs with: ``serve_argv`` made independent of the
    replica's machine. A replica without a GPU from Ray still sees the node's GPUs (Ray leaves
    them visible), so it is pinned to the CPU unless ``--device`` says otherwise. An API key
    taken from this process's environment is passed on: the replicas' environment may lack it,
    and they would serve without one."""
    args = parse_serve_args(serve_argv)
    argv = list(serve_argv)
    if options.num_gpus == 0 and args.device is None:
        argv += ["--device", "cpu"]
    if args.api_key and not any(token.split("=", 1)[0] == "--api-key" for token in argv):
        argv += ["--api-key", args.api_key]
    return argv


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
    argv = replica_serve_args(serve_argv, options)

    # Ray calls a builder with no arguments on each replica; the closure carries the flags.
    def build() -> FastAPI:
        return build_replica_app(argv)

    @serve.ingress(build)
    class InferdReplica:
        def check_health(self) -> None:
            check_replica_health(self.app)  # type: ignore[attr-defined]  # set by serve.ingress

    max_ongoing = options.max_ongoing_requests or _engine_max_num_seqs(args)
    scaling: dict[str, Any]
    if options.max_replicas is not None:
        min_replicas = 1 if options.min_replicas is None else options.min_replicas
        target = options.target_ongoing_requests or max(1, max_ongoing // 2)
        scaling = {"autoscaling_config": {"min_replicas": min_replicas, "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": target}}  # fmt: skip
    else:
        scaling = {"num_replicas": options.num_replicas}
    return serve.deployment(
        name=options.name,
        max_ongoing_requests=max_ongoing,
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
        if key in known and value is not None:  # a config file's null: the default
            values[key] = _convert(key, value, str(known[key]))
    raw_serve_args = builder_args.get(_SERVE_ARGS_KEY) or ""
    # One string from `serve run`; a string or a list of flags from a config file.
    serve_argv = (
        [str(a) for a in raw_serve_args]
        if isinstance(raw_serve_args, list)
        else shlex.split(str(raw_serve_args))
    )
    if builder_args.get(_MODEL_KEY):
        serve_argv.insert(0, str(builder_args[_MODEL_KEY]))
    return inferd_deployment(serve_argv, ReplicaOptions(**values)).bind()


def _convert(key: str, value: Any, type_name: str) -> Any:
    """Builder arguments come as strings from `serve run` and typed from config files."""
    if type_name.startswith("str"):
        return str(value)
    kind = "a whole number" if type_name.startswith("int") else "a number"
    if isinstance(value, bool):  # a YAML true/false is no count
        raise ValueError(f"{key} must be {kind}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key} must be {kind}, got {value!r}") from exc
    if not math.isfinite(number):
        raise ValueError(f"{key} must be {kind}, got {value!r}")
    if kind == "a number":
        return number
    if not number.is_integer():
        raise ValueError(f"{key} must be {kind}, got {value!r}")
    return int(number)


def _engine_max_num_seqs(args: argparse.Namespace) -> int:
    from inferd.engine.builder import DEFAULT_MAX_NUM_SEQS

    return int(args.max_num_seqs or DEFAULT_MAX_NUM_SEQS)
