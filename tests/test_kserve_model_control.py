"""Model control (Triton's --model-control-mode and --load-model): with `none` every model loads at
start-up and clients can neither load nor unload one; with `explicit` (the default) they can, and
--load-model chooses the models loaded at start-up, the others listed unloaded."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from inferd.server.kserve import launch
from inferd.server.kserve.launch import build_app, open_repository
from inferd.serving.errors import InvalidInputError
from inferd.serving.model_control import ModelControl, ModelControlError
from inferd.serving.repository import ModelRepository

CONFIG = {
    "runtime": "echo",
    "max_batch_size": 0,
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [2]}],
}


class Echo:
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text(json.dumps(CONFIG))
    return tmp_path


def _repository(root: Path, control: ModelControl) -> ModelRepository:
    from inferd.serving.runtimes.registry import default_runtime_registry

    runtimes = default_runtime_registry()
    runtimes.register("echo", lambda folder, config: Echo(), platform="python")
    return open_repository(root, CollectorRegistry(), runtimes, control=control)


@pytest.mark.parametrize(
    ("mode", "load_models", "expected"),
    [
        ("explicit", [], ModelControl(explicit=True, startup=None)),
        ("explicit", ["*"], ModelControl(explicit=True, startup=None)),
        ("explicit", ["a", "b", "a"], ModelControl(explicit=True, startup=frozenset({"a", "b"}))),
        ("none", [], ModelControl(explicit=False, startup=None)),
    ],
)
def test_the_flags_read_as_triton_reads_them(
    mode: str, load_models: list[str], expected: ModelControl
) -> None:
    assert ModelControl.from_flags(mode, load_models) == expected


@pytest.mark.parametrize(
    ("mode", "load_models", "message"),
    [
        ("none", ["a"], "--load-model needs --model-control-mode explicit"),
        ("explicit", ["*", "a"], "give it alone"),
        ("poll", [], "one of explicit, none"),
    ],
)
def test_flags_that_do_not_go_together_are_refused(mode: str, load_models: list[str], message: str) -> None:
    with pytest.raises(ModelControlError, match=message):
        ModelControl.from_flags(mode, load_models)


async def test_with_control_off_every_model_serves_and_none_loads_or_unloads(root: Path) -> None:
    repository = _repository(root, ModelControl(explicit=False))
    assert [entry.name for entry in repository if entry.ready] == ["a", "b"]
    for change in (repository.load, repository.unload):
        with pytest.raises(InvalidInputError, match="--model-control-mode none"):
            await change("a")
    assert repository.get("a").ready
    await repository.close()


async def test_load_model_loads_only_the_named_folders_at_start_up(root: Path) -> None:
    repository = _repository(root, ModelControl(startup=frozenset({"b"})))
    assert repository.get("b").ready
    assert repository.get("a").failure == "unloaded"
    assert (await repository.load("a")).ready  # a client loads it when wanted
    await repository.close()


def test_a_model_to_load_that_is_not_in_the_repository_stops_start_up(root: Path) -> None:
    with pytest.raises(ValueError, match="no model folder c"):
        _repository(root, ModelControl(startup=frozenset({"a", "c"})))


@pytest.fixture
async def uncontrolled(root: Path) -> AsyncIterator[httpx.AsyncClient]:
    registry = CollectorRegistry()
    app = build_app(_repository(root, ModelControl(explicit=False)), registry)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://v2") as client:
        yield client


@pytest.mark.parametrize("change", ["load", "unload"])
async def test_a_refused_load_or_unload_is_a_400_in_the_v2_shape(
    uncontrolled: httpx.AsyncClient, change: str
) -> None:
    answer = await uncontrolled.post(f"/v2/repository/models/a/{change}")
    assert answer.status_code == 400
    assert "--model-control-mode none" in answer.json()["error"]
    index = (await uncontrolled.post("/v2/repository/index")).json()
    assert [(m["name"], m["state"]) for m in index] == [("a", "READY"), ("b", "READY")]


def test_the_launcher_hands_its_flags_to_the_repository(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    handed: dict[str, Any] = {}

    def run(serving: Any) -> None:
        handed.update(serving.cr_frame.f_locals)  # the coroutine's arguments, before it runs
        serving.close()

    monkeypatch.setattr(launch.event_loop, "run", run)
    assert launch.main(["--model-repository", str(root), "--load-model", "a"]) == 0
    repository = handed["repository"]
    assert repository.explicit_control and repository.get("b").failure == "unloaded"
    assert launch.main(["--model-repository", str(root), "--model-control-mode", "none"]) == 0
    assert not handed["repository"].explicit_control
    with pytest.raises(SystemExit):  # a usage error, before anything loads
        launch.main(["--model-repository", str(root), "--model-control-mode", "none", "--load-model", "a"])


def test_inferd_serve_takes_the_same_flags() -> None:
    from inferd.cli import build_parser
    from inferd.server.serve_cli import server_config

    args = build_parser().parse_args(["serve", "--model-control-mode", "none"])
    assert server_config(args).model_control == ModelControl(explicit=False)
    args = build_parser().parse_args(["serve", "--load-model", "a", "--load-model", "b"])
    assert server_config(args).model_control == ModelControl(startup=frozenset({"a", "b"}))
