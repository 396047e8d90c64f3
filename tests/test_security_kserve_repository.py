"""Model control over the repository (audit #6, #7): a load takes a model's name, never a path, and
reaches only the repository's own folders, telling nothing of others; a load that never returns
holds none of the event loop's default executor; and a load or unload whose caller gives up (a gRPC
deadline) still ends with its model served or closed, none left running unlisted."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferd.serving.errors import ModelNotFoundError
from inferd.serving.repository import ModelEntry, ModelRepository, load_repository
from inferd.serving.runtimes.registry import default_runtime_registry

CONFIG = {
    "runtime": "recorded",
    "max_batch_size": 0,
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [2]}],
}
WAIT_S = 10.0


class Engine:
    """A runtime holding resources until closed, as an LLM's engine does."""

    def __init__(self) -> None:
        self.closed = False

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}

    def close(self) -> None:
        self.closed = True


class Loads:
    """The runtime's loader: records each folder it is asked to load, and blocks, once `hold` is
    called, until `release`."""

    def __init__(self) -> None:
        self.folders: list[Path] = []
        self.made: list[Engine] = []
        self.started = threading.Event()
        self._released = threading.Event()
        self._released.set()

    def __call__(self, model_dir: Path, config: Any) -> Engine:
        self.folders.append(model_dir)
        self.started.set()
        assert self._released.wait(WAIT_S), "the test never released the load"
        self.made.append(Engine())
        return self.made[-1]

    def hold(self) -> None:
        self.started.clear()
        self._released.clear()

    def release(self) -> None:
        self._released.set()


@pytest.fixture
def loads() -> Iterator[Loads]:
    recorded = Loads()
    yield recorded
    recorded.release()  # no loader thread outlives its test


def _write_model(root: Path, folder: str) -> Path:
    model_dir = root / folder
    model_dir.mkdir(parents=True)
    (model_dir / "model.json").write_text(json.dumps(CONFIG))
    return model_dir


def _repository(root: Path, loads: Loads) -> ModelRepository:
    runtimes = default_runtime_registry()
    runtimes.register("recorded", loads, platform="python")
    root.mkdir(exist_ok=True)
    return load_repository(root, runtimes)


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.01)


async def _held_load(repository: ModelRepository, loads: Loads, name: str) -> asyncio.Future[ModelEntry]:
    """A load of ``name`` started and held inside its runtime's loader until ``loads.release()``."""
    loads.hold()
    loading = asyncio.ensure_future(repository.load(name))
    await _until(loads.started.is_set)
    return loading


def _served(repository: ModelRepository, name: str) -> Engine | None:
    try:
        runtime = repository.get(name).runtime
    except ModelNotFoundError:
        return None
    assert runtime is None or isinstance(runtime, Engine)
    return runtime


async def test_a_load_by_path_reaches_no_folder_outside_the_repository(tmp_path: Path, loads: Loads) -> None:
    """`/abs/dir` replaced the repository's root and `../x` walked out of it: the folder outside
    was loaded (its runtime parsed its files, an `llm` folder would start an engine) before its
    name was found to differ."""
    root = tmp_path / "repository"
    outside = _write_model(tmp_path / "outside", "evil")
    repository = _repository(root, loads)
    walks_out = ["../outside/evil", "./../outside/evil", "evil/../../outside/evil"]
    for name in [str(outside), *walks_out, "..", ".", "", "a/b"]:
        with pytest.raises(ModelNotFoundError, match="the model repository has no model folder"):
            await repository.load(name)
    assert loads.folders == []  # no runtime was asked to read anything
    await repository.close()


async def test_a_refused_load_tells_nothing_of_folders_outside(tmp_path: Path, loads: Loads) -> None:
    """An existing outside folder got another answer than a missing one: a directory oracle."""
    root = tmp_path / "repository"
    (tmp_path / "exists").mkdir()
    repository = _repository(root, loads)

    async def refusal(name: str) -> str:
        with pytest.raises(ModelNotFoundError) as refused:
            await repository.load(name)
        return str(refused.value).replace(repr(name), "NAME")

    assert await refusal(str(tmp_path / "exists")) == await refusal(str(tmp_path / "missing"))
    assert await refusal("../exists") == await refusal("../missing") == await refusal("missing")
    await repository.close()


async def test_repository_models_still_load_and_unload_by_name(tmp_path: Path, loads: Loads) -> None:
    root = tmp_path / "repository"
    _write_model(root, "kept")
    repository = _repository(root, loads)
    _write_model(root, "added")  # a folder added since start-up
    assert (await repository.load("added")).ready
    assert (await repository.load("kept")).ready
    await repository.unload("kept")
    assert repository.get("kept").failure == "unloaded"
    with pytest.raises(ModelNotFoundError):
        await repository.unload("../kept")
    assert [folder.name for folder in loads.folders] == ["kept", "added", "kept"]
    await repository.close()


async def test_a_load_that_never_returns_leaves_the_default_executor_free(
    tmp_path: Path, loads: Loads
) -> None:
    """A model file that blocks when opened (a FIFO) held its loading thread forever; loads ran in
    the loop's default executor, so a few of them left no worker for the dynamic batchers, and all
    classic inference hung."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
    root = tmp_path / "repository"
    repository = _repository(root, loads)
    _write_model(root, "stuck")
    loading = await _held_load(repository, loads, "stuck")
    # The default executor's one worker is free for the work that needs it.
    assert await asyncio.wait_for(asyncio.to_thread(lambda: "answered"), WAIT_S) == "answered"
    loads.release()
    assert (await loading).ready
    await repository.close()


async def test_a_load_whose_caller_gives_up_is_served_and_the_model_it_replaces_closed(
    tmp_path: Path, loads: Loads
) -> None:
    """A load cancelled by its caller (a gRPC deadline) went on in its thread and started the
    model, an LLM's engine with its KV cache, which was then neither listed nor closed."""
    root = tmp_path / "repository"
    _write_model(root, "llm1")
    repository = _repository(root, loads)
    (first,) = loads.made
    caller = await _held_load(repository, loads, "llm1")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    loads.release()
    await _until(lambda: len(loads.made) == 2 and _served(repository, "llm1") is loads.made[1])
    await _until(lambda: first.closed)
    await repository.close()
    assert all(engine.closed for engine in loads.made)


async def test_a_first_load_whose_caller_gives_up_is_served(tmp_path: Path, loads: Loads) -> None:
    root = tmp_path / "repository"
    repository = _repository(root, loads)
    _write_model(root, "llm1")
    caller = await _held_load(repository, loads, "llm1")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(caller, 0.05)  # the caller's deadline passes during the load
    loads.release()
    await _until(lambda: len(loads.made) == 1 and _served(repository, "llm1") is loads.made[0])
    await repository.close()
    assert loads.made[0].closed


async def test_a_load_still_running_when_the_repository_closes_is_closed_too(
    tmp_path: Path, loads: Loads
) -> None:
    root = tmp_path / "repository"
    repository = _repository(root, loads)
    _write_model(root, "llm1")
    caller = await _held_load(repository, loads, "llm1")
    caller.cancel()
    closing = asyncio.ensure_future(repository.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # it waits for the load, whose model it then closes
    loads.release()
    await asyncio.wait_for(closing, WAIT_S)
    assert [engine.closed for engine in loads.made] == [True]


async def test_an_unload_whose_caller_gives_up_still_closes_the_model(tmp_path: Path, loads: Loads) -> None:
    """The unloaded model is no longer listed: a caller cancelled while it drained left it open."""
    released = asyncio.Event()

    class Draining(Engine):
        async def drain(self) -> None:  # its requests in flight end when the test says so
            await released.wait()

    runtimes = default_runtime_registry()
    runtimes.register("recorded", lambda model_dir, config: Draining(), platform="python")
    _write_model(tmp_path, "llm1")
    repository = load_repository(tmp_path, runtimes)
    engine = _served(repository, "llm1")
    assert engine is not None
    caller = asyncio.ensure_future(repository.unload("llm1"))
    await asyncio.sleep(0.05)  # unlisted, draining
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    released.set()
    await _until(lambda: engine.closed)
    await repository.close()
