"""The model repository: every sub-folder of a directory with a `model.json` is one model.

A model that fails to load stays listed, not ready, with the reason; the others still serve. So does
a folder without `model.json` (a Triton layout's `config.pbtxt` is not read), under its folder's name.
Models of the folder can be loaded again (a new or changed folder) and unloaded while the server
runs, as in Triton's explicit model control.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from inferd.serving.batcher import DynamicBatcher
from inferd.serving.config import (
    CONFIG_FILE_NAME,
    ModelConfig,
    is_valid_model_name,
    missing_config_reason,
    read_model_config,
)
from inferd.serving.errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError
from inferd.serving.metrics import ServingMetrics
from inferd.serving.model_control import ModelControl
from inferd.serving.runtimes.base import Runtime, TensorRuntime, TextGenerator
from inferd.serving.runtimes.registry import RuntimeRegistry
from inferd.serving.shared_memory import SharedMemoryRegions
from inferd.serving.statistics import ModelStatistics

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Loads run one at a time (under the repository's control lock), in a thread of the repository's
# own: a load that never returns (a model file that blocks when opened) must not hold a worker of
# the event loop's default executor, which the dynamic batchers and request inflation run in.
_LOADER_THREADS = 1


@runtime_checkable
class ClosableRuntime(Protocol):
    """A runtime holding threads or processes (an LLM engine); `close` blocks until they stop."""

    def close(self) -> None: ...


@runtime_checkable
class DrainableRuntime(Protocol):
    """A runtime that serves requests outside a batcher (an LLM engine); `drain` returns once the
    ones in flight have ended."""

    async def drain(self) -> None: ...


@runtime_checkable
class HealthReportingRuntime(Protocol):
    """A runtime that can stop serving after it loaded (an LLM whose engine died, or whose server is
    draining); `unready_reason` says why, None while it serves."""

    def unready_reason(self) -> str | None: ...


# The failure of a model unloaded on request (not counted against the server's readiness).
UNLOADED = "unloaded"


@dataclass
class ModelEntry:
    name: str
    config: ModelConfig | None
    platform: str
    runtime: Runtime | None = None
    batcher: DynamicBatcher | None = None
    # Why the model is not ready; None when it loaded.
    failure: str | None = None
    # The repository folder it was loaded from; None for a model served from elsewhere.
    folder: Path | None = None
    # Its inference statistics since it loaded (the statistics extension).
    stats: ModelStatistics = field(default_factory=ModelStatistics)
    # The server is shutting down: no new request (Triton's: it stops taking inference as it exits).
    draining: bool = False

    @property
    def unready_reason(self) -> str | None:
        """Why the model does not serve now; None when it does."""
        if self.runtime is None:
            return self.failure or "not loaded"
        if self.draining:
            return "the server is shutting down"
        if isinstance(self.runtime, HealthReportingRuntime):
            return self.runtime.unready_reason()
        return None

    @property
    def ready(self) -> bool:
        return self.unready_reason is None

    @property
    def version(self) -> str:
        return self.config.version if self.config else "1"

    def require_ready(self) -> ModelConfig:
        reason = self.unready_reason
        if reason is not None or self.config is None:
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {reason}")
        return self.config


class ModelRepository:
    def __init__(
        self,
        entries: list[ModelEntry],
        metrics: ServingMetrics | None = None,
        root: Path | None = None,
        runtimes: RuntimeRegistry | None = None,
        explicit_control: bool = True,
    ) -> None:
        """`root` and `runtimes`: the folder the entries came from and how to load them again;
        ``explicit_control`` false: clients may not load or unload models (`model_control.py`)."""
        self._entries = {entry.name: entry for entry in entries}
        self.explicit_control = explicit_control
        self.metrics = metrics
        self._root = root
        self._runtimes = runtimes
        self._added: set[str] = set()  # served from outside the folder: not loaded or unloaded here
        self._control = asyncio.Lock()  # one load or unload at a time
        self._draining = False  # begin_drain: the server is shutting down
        self._loader = ThreadPoolExecutor(_LOADER_THREADS, thread_name_prefix="inferd-model-load")
        # Loads and closes under way that finish whether or not their caller waits (_finish).
        self._finishing: set[asyncio.Task[Any]] = set()
        # Clients' system shared memory regions, shared by the REST and gRPC servers; None: the
        # server does not take them (Triton's --allow-client-shm, off by default).
        self.shared_memory: SharedMemoryRegions | None = None

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"unknown model {name!r}")
        if version and version != entry.version:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        return entry

    def unready_reason(self) -> str | None:
        """Why the server is not ready (its readiness probe fails): a loaded model that stopped
        serving (an engine that died, a server draining). Models that failed to load or were unloaded
        are each reported as not ready, and leave the others serving; None when all loaded ones serve."""
        for entry in self._entries.values():
            if entry.runtime is not None and (reason := entry.unready_reason) is not None:
                return f"model {entry.name!r}: {reason}"
        return None

    def begin_drain(self) -> None:
        """The server is shutting down: every model refuses new requests (503, UNAVAILABLE) and
        reads as not ready; the requests in flight go on (the server waits for its LLMs')."""
        self._draining = True
        for entry in self._entries.values():
            entry.draining = True

    def add(self, entry: ModelEntry) -> None:
        """Serves a model loaded outside the repository folder (the LLM of `inferd serve`); a folder
        of that name without model.json is no model, and gives the name up."""
        known = self._entries.get(entry.name)
        if known is not None and not _unconfigured(known):
            raise ValueError(f"a model named {entry.name!r} is already in the repository")
        self._entries[entry.name] = entry
        self._added.add(entry.name)

    async def load(self, name: str) -> ModelEntry:
        """Loads folder `name` (again), in the repository's loader thread. The new model serves from
        then on and the one it replaces is closed once its queued requests are answered. A load that
        fails leaves a loaded model serving, and raises with the reason. Once begun, a load runs to
        its end even if its caller gives up (a gRPC deadline): its model is then served or closed,
        never left running unlisted."""
        self._check_control()
        folder, runtimes = self._model_folder(name)
        # A caller that gives up while it waits for the lock has started nothing.
        await self._control.acquire()
        return await self._finish(self._load_holding_control(name, folder, runtimes))

    async def _load_holding_control(self, name: str, folder: Path, runtimes: RuntimeRegistry) -> ModelEntry:
        """The load, entered with the control lock held; it releases the lock."""
        try:
            loop = asyncio.get_running_loop()
            entry = await loop.run_in_executor(self._loader, load_model, folder, runtimes, self.metrics)
            old = self._entries.get(name)
            if entry.name != name:
                await _close(entry)
                raise InvalidInputError(
                    f"folder {folder.name!r} now names its model {entry.name!r}, not {name!r}"
                )
            if not entry.ready and old is not None and old.ready:
                await _close(entry)  # one that started, then stopped serving (an engine that died)
                raise InvalidInputError(
                    f"model {name!r} failed to load ({entry.failure}); the loaded one still serves"
                )
            entry.draining = self._draining  # one loaded during a drain takes no requests either
            self._entries[name] = entry
        finally:
            self._control.release()
        # Out of the lock: the old model (no longer listed, so no other call can reach it) answers
        # what it has taken, an LLM's generations maybe for minutes, while other models' loads
        # and unloads go on.
        if old is not None:
            await _close(old)
        if not entry.ready:
            raise InvalidInputError(f"model {name!r} failed to load: {entry.failure}")
        logger.info("model %r loaded", name)
        return entry

    def _check_control(self) -> None:
        if not self.explicit_control:
            raise InvalidInputError(
                "models cannot be loaded or unloaded on this server (--model-control-mode none): they "
                "load at start-up"
            )

    def _model_folder(self, name: str) -> tuple[Path, RuntimeRegistry]:
        """The folder model `name` loads from (the one it was listed from, else the repository's
        child folder of that name) and the runtimes that load it. The requested name is checked
        before the file system is touched, and a name that could be a path (`/abs`, `../x`, `a/b`)
        gets the answer of a folder that is not there: a load can neither reach a folder outside
        the repository nor tell whether one exists. (A link the operator put in the repository is
        followed, as at start-up.)"""
        if self._root is None or self._runtimes is None or name in self._added:
            raise InvalidInputError(f"model {name!r} is not loaded from a model repository folder")
        missing = ModelNotFoundError(f"the model repository has no model folder {name!r}")
        if not is_valid_model_name(name):
            raise missing
        known = self._entries.get(name)
        folder = known.folder if known is not None and known.folder is not None else self._root / name
        if folder.parent != self._root or not is_valid_model_name(folder.name) or not folder.is_dir():
            raise missing
        return folder, self._runtimes

    async def unload(self, name: str) -> None:
        """Stops serving `name`, listed from then on as unavailable ("unloaded"); the requests
        already queued for it are answered first, and it is closed even if the caller gives up."""
        self._check_control()
        if name in self._added:
            raise InvalidInputError(f"model {name!r} is not loaded from a model repository folder")
        if not is_valid_model_name(name):  # no repository model has such a name
            raise ModelNotFoundError(f"unknown model {name!r}")
        async with self._control:  # read under the lock: a load may be replacing it
            old = self.get(name)
            self._entries[name] = ModelEntry(name, None, old.platform, failure=UNLOADED, folder=old.folder)
        await self._finish(_close(old))  # out of the lock, as in load
        logger.info("model %r unloaded", name)

    async def _finish(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs `work` in a task of the repository's own and waits for it: a caller cancelled
        meanwhile stops waiting, not the work, so no model is left started or half closed."""
        task = asyncio.ensure_future(work)
        self._finishing.add(task)
        task.add_done_callback(self._forget_finished)
        return await asyncio.shield(task)

    def _forget_finished(self, task: asyncio.Task[Any]) -> None:
        self._finishing.discard(task)
        if not task.cancelled():
            task.exception()  # taken: the caller got it through the shield, or left and cannot

    async def close(self) -> None:
        # Loads and closes under way first: a model they install is then closed with the others.
        while self._finishing:
            await asyncio.wait(set(self._finishing))
        for entry in self._entries.values():
            await _close(entry)
        self._loader.shutdown(wait=False)
        if self.shared_memory is not None:
            self.shared_memory.close()


async def _close(entry: ModelEntry) -> None:
    """Closes a model once the requests it has taken are answered."""
    if entry.batcher is not None:
        await entry.batcher.close(drain=True)
    if isinstance(entry.runtime, DrainableRuntime):
        await entry.runtime.drain()
    if isinstance(entry.runtime, ClosableRuntime):
        await asyncio.to_thread(entry.runtime.close)


def _batcher_for(
    config: ModelConfig, runtime: Runtime, metrics: ServingMetrics | None, stats: ModelStatistics
) -> DynamicBatcher | None:
    if not (isinstance(runtime, TensorRuntime) and config.batched and config.dynamic_batching):
        return None
    return DynamicBatcher(
        config.name,
        runtime.infer,
        config.max_batch_size,
        config.max_queue_delay_ms / 1000.0,
        metrics,
        stats=stats,
        preferred_batch_sizes=config.preferred_batch_sizes,
    )


def load_model(model_dir: Path, runtimes: RuntimeRegistry, metrics: ServingMetrics | None) -> ModelEntry:
    """Loads one model folder; any failure is captured in the entry instead of raised."""
    if not (model_dir / CONFIG_FILE_NAME).is_file():
        reason = missing_config_reason(model_dir)
        logger.warning("model folder %r is not loaded: %s", model_dir.name, reason)
        return ModelEntry(
            name=model_dir.name, config=None, platform="unknown", failure=reason, folder=model_dir
        )
    config: ModelConfig | None = None
    try:
        config = read_model_config(model_dir)
        runtime = runtimes.load(model_dir, config)
        if not isinstance(runtime, (TensorRuntime, TextGenerator)):
            raise TypeError(f"runtime {config.runtime!r} returned {type(runtime).__name__}, not a runtime")
    except Exception as exc:
        name = config.name if config else model_dir.name
        logger.warning("model %r failed to load: %s", name, exc)
        platform = runtimes.platform(config.runtime) if config else "unknown"
        failure = f"{type(exc).__name__}: {exc}"
        return ModelEntry(name=name, config=config, platform=platform, failure=failure, folder=model_dir)
    stats = ModelStatistics()
    return ModelEntry(
        name=config.name,
        config=config,
        platform=runtimes.platform(config.runtime),
        runtime=runtime,
        batcher=_batcher_for(config, runtime, metrics, stats),
        folder=model_dir,
        stats=stats,
    )


def _unconfigured(entry: ModelEntry) -> bool:
    """A folder listed without a model.json: it names no model, so a model may take its name."""
    return (
        entry.config is None and entry.folder is not None and not (entry.folder / CONFIG_FILE_NAME).is_file()
    )


def load_repository(
    root: Path,
    runtimes: RuntimeRegistry,
    metrics: ServingMetrics | None = None,
    control: ModelControl | None = None,
) -> ModelRepository:
    """Loads the model folders under `root` that ``control`` names (by default every one; the
    others are listed unloaded). A folder without a config is listed as not ready, with the
    reason, unless a model of the repository has its name; hidden folders are skipped. A name to
    load that is no folder here is a ValueError, as Triton refuses to start."""
    control = control or ModelControl()
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing = sorted((control.startup or set()) - {folder.name for folder in folders})
    if missing:
        raise ValueError(f"--load-model: model repository {root} has no model folder {', '.join(missing)}")
    entries: dict[str, ModelEntry] = {}
    unconfigured: list[ModelEntry] = []
    for model_dir in folders:
        if not is_valid_model_name(model_dir.name):
            logger.warning("skipping model folder with an invalid name: %r", model_dir.name)
            continue
        if control.startup is not None and model_dir.name not in control.startup:
            name = model_dir.name
            entries[name] = ModelEntry(name, None, "unknown", failure=UNLOADED, folder=model_dir)
            continue
        entry = load_model(model_dir, runtimes, metrics)
        if _unconfigured(entry):
            unconfigured.append(entry)
            continue
        if entry.name in entries:
            entry = ModelEntry(
                entry.name, None, entry.platform, failure=f"duplicate model name {entry.name!r}"
            )
        entries[entry.name] = entry
    for entry in unconfigured:
        entries.setdefault(entry.name, entry)
    return ModelRepository(list(entries.values()), metrics, root, runtimes, control.explicit)
