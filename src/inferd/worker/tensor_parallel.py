"""Tensor parallelism over ``torch.distributed``: one model split across processes (ranks).

Rank ``r`` of ``n`` holds the ``r``-th slice of every layer: its share of the query and KV heads
(so of the KV cache too) and of the MLP's intermediate size. Embeddings, norms and the LM head
are whole on every rank. The attention output and the MLP output projections each end with an
all-reduce (sum), so every rank leaves each layer with the full hidden state; only rank 0, the
engine's own model runner, computes logits and samples.

Rank 0 starts the other ranks as ``python -m inferd.worker.tensor_parallel`` processes. They
connect back to it over an authenticated socket on 127.0.0.1, which carries their orders: load,
allocate the KV cache, run this step's inputs, stop. They meet through a rendezvous file in a
private temporary folder. The collectives go over gloo on the CPU and NCCL on CUDA (rank ``r``
on the ``r``-th GPU from rank 0's), on the loopback interface. A rank waiting for orders blocks
on its socket, not in a collective, so an idle engine never times out, and a rank whose rank 0
has gone sees the socket close and exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import torch
import torch.distributed as dist

from inferd.attention.base import AttentionMetadata
from inferd.attention.kv_dtype import FP8_KV_DTYPE
from inferd.config import EngineConfig, ModelLoadError

logger = logging.getLogger(__name__)

_ADDRESS_ENV = "INFERD_TP_ADDRESS"
_AUTHKEY_ENV = "INFERD_TP_AUTHKEY"
# How long rank 0 waits for the other ranks to connect and to load their shards.
_START_TIMEOUT_S = 600.0
# A collective that waits longer than this has lost a peer: no forward pass takes so long.
_COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def _send(connection: Connection, message: tuple[Any, ...]) -> None:
    # Plain pickle: Connection.send would pickle tensors as file descriptors of shared memory,
    # which only multiprocessing's own children can open.
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(connection: Connection) -> Any:
    return pickle.loads(connection.recv_bytes())


def all_reduce(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` in place over all ranks."""
    dist.all_reduce(tensor)


def rank_device(device: str, rank: int) -> str:
    """Rank ``rank``'s device: on CUDA the ``rank``-th GPU from rank 0's, the CPU otherwise."""
    if not device.startswith("cuda"):
        return device
    first = torch.device(device).index or 0
    return f"cuda:{first + rank}"


def configure_cpu_threads(config: EngineConfig) -> None:
    """On the CPU the ranks share the cores; each takes its share, so none waits on an
    oversubscribed peer inside an all-reduce."""
    if config.tensor_parallel_size > 1 and not config.device.startswith("cuda"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))


@dataclass(frozen=True)
class StepInputs:
    """What another rank needs to run one step's forward pass: host copies of the tensors."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_lens_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]

    @classmethod
    def of(
        cls, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, block_size: int
    ) -> StepInputs:
        # Copies: a view would pickle the whole persistent buffer it points into.
        def host(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True)

        # Only the block-table columns this step's longest context reaches, not the full width.
        tables = meta.block_tables[:, : -(-meta.max_seq_len // block_size)]
        return cls(host(input_ids), host(positions), host(meta.slot_mapping), host(meta.query_start_loc),
                   host(meta.seq_lens), host(tables), meta.max_query_len, meta.max_seq_len,
                   meta.query_lens_host, meta.seq_lens_host)  # fmt: skip

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device),
            query_start_loc=self.query_start_loc.to(device),
            seq_lens=self.seq_lens.to(device),
            block_tables=self.block_tables.to(device),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            query_lens_host=self.query_lens_host,
            seq_lens_host=self.seq_lens_host,
        )
        return self.input_ids.to(device), self.positions.to(device), meta


class TensorParallelGroup:
    """Rank 0's side: starts the other ranks, joins the process group with them, and sends them
    their orders. One group per process: ``torch.distributed``'s default group is global."""

    def __init__(self, config: EngineConfig) -> None:
        if dist.is_initialized():
            raise RuntimeError("this process already runs a tensor-parallel engine (or another "
                               "torch.distributed group); shut it down first")  # fmt: skip
        self.size = config.tensor_parallel_size
        self._processes: list[subprocess.Popen[bytes]] = []
        self._connections: list[Connection] = []
        # The rendezvous store is a file only this user can reach, not a port on every interface.
        self._store_dir = tempfile.mkdtemp(prefix="inferd-tp-")
        try:
            self._start(config)
        except BaseException:
            self.shutdown(timeout_s=5.0)
            raise

    def _start(self, config: EngineConfig) -> None:
        authkey = secrets.token_bytes(32)
        store_path = os.path.join(self._store_dir, "store")
        store = dist.FileStore(store_path, self.size)
        _use_loopback()
        with socket.create_server(("127.0.0.1", 0)) as server:
            env = {**os.environ, _ADDRESS_ENV: f"127.0.0.1:{server.getsockname()[1]}",
                   _AUTHKEY_ENV: authkey.hex()}  # fmt: skip
            for _ in range(1, self.size):
                # Their own session: a Ctrl-C meant for the server reaches rank 0, which stops them.
                command = [sys.executable, "-m", "inferd.worker.tensor_parallel"]
                self._processes.append(subprocess.Popen(command, env=env, start_new_session=True))
            self._connections = self._accept(server, authkey)
        for rank, connection in enumerate(self._connections, start=1):
            _send(connection, ("init", config, rank, store_path))
        # Wait until every rank is at the rendezvous, watching for one that died on the way, so a
        # lost rank fails start-up at once instead of after the collective timeout.
        joined = [_joined_key(rank) for rank in range(1, self.size)]
        self._wait_for(lambda: store.check(joined), "join the process group")
        dist.init_process_group(_backend(config), store=store, rank=0, world_size=self.size,
                                timeout=_COLLECTIVE_TIMEOUT)  # fmt: skip
        logger.info("tensor parallel: %d ranks over %s", self.size, dist.get_backend())

    def _wait_for(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not done():
            self._check_processes()
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks did not {what} in time")
            time.sleep(0.05)

    def _accept(self, server: socket.socket, authkey: bytes) -> list[Connection]:
        server.settimeout(1.0)
        deadline = time.monotonic() + _START_TIMEOUT_S
        connections: list[Connection] = []
        while len(connections) < self.size - 1:
            self._check_processes()
            if time.monotonic() > deadline:
                raise RuntimeError("tensor-parallel ranks did not connect in time")
            try:
                sock, _ = server.accept()
            except TimeoutError:
                continue
            sock.setblocking(True)
            connection = Connection(sock.detach())
            try:
                deliver_challenge(connection, authkey)
                answer_challenge(connection, authkey)
            except (AuthenticationError, OSError, EOFError):
                connection.close()  # not one of ours: drop it and keep waiting for the ranks
                continue
            connections.append(connection)
        return connections

    def _check_processes(self) -> None:
        exited = [p.returncode for p in self._processes if p.poll() is not None]
        if exited:
            raise RuntimeError(f"a tensor-parallel rank exited (exit codes {exited})")

    def _gather(self, what: str) -> None:
        """Wait for every rank's reply to the last order; raise with a rank's error if one failed."""
        for rank, connection in enumerate(self._connections, start=1):
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not connection.poll(1.0):
                self._check_processes()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel rank {rank} did not {what} in time")
            status, detail = _recv(connection)
            if status != "ok":
                raise ModelLoadError(f"tensor-parallel rank {rank} could not {what}: {detail}")

    def wait_loaded(self) -> None:
        self._gather("load its shard")

    def allocate(self, num_blocks: int) -> None:
        for connection in self._connections:
            _send(connection, ("allocate", num_blocks))
        self._gather("allocate its KV cache")

    def run_step(self, inputs: StepInputs) -> None:
        """Send the step to the other ranks; they run it while rank 0 runs its own forward."""
        for connection in self._connections:
            _send(connection, ("step", inputs))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the ranks (killed if they outlast ``timeout_s``) and release the process group."""
        for connection in self._connections:
            try:
                _send(connection, ("stop", None))
                connection.close()
            except OSError:
                pass  # that rank is already gone
        for process in self._processes:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._connections, self._processes = [], []
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._store_dir, ignore_errors=True)


def _joined_key(rank: int) -> str:
    return f"inferd/joined/{rank}"


def _use_loopback() -> None:
    """Collectives between ranks of one machine stay on the loopback interface; gloo and NCCL
    otherwise pick the interface the host name resolves to. Ranks inherit this environment."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def _backend(config: EngineConfig) -> str:
    return "nccl" if config.device.startswith("cuda") else "gloo"


def _serve_orders(connection: Connection) -> None:
    """A rank other than 0: join the group, load its shard, then run what rank 0 sends."""
    from inferd.attention.registry import create_backend
    from inferd.config import parse_dtype
    from inferd.models.loader import enable_configured_kernels, load_model
    from inferd.worker.kv_cache import allocate_kv_caches

    order, config, rank, store_path = _recv(connection)
    assert order == "init"
    size = config.tensor_parallel_size
    device = rank_device(config.device, rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    configure_cpu_threads(config)
    store = dist.FileStore(store_path, size)
    store.set(_joined_key(rank), "1")
    dist.init_process_group(
        _backend(config), store=store, rank=rank, world_size=size, timeout=_COLLECTIVE_TIMEOUT
    )
    local = config.local_model
    dtype = parse_dtype(config.dtype)
    try:
        model = load_model(config.model_path, local, config.scheduler.max_model_len, dtype, device,
                           config.load_format, shard=(rank, size), quantization=config.quantization,
                           kv_cache_scales=config.kv_dtype == FP8_KV_DTYPE,
                           tokenizer_path=config.tokenizer_path)  # fmt: skip
        model.set_all_reduce(all_reduce)
        enable_configured_kernels(model, config)
        backend = create_backend(config.attention_backend, device)
    except Exception:
        _send(connection, ("error", traceback.format_exc(limit=4)))
        raise
    _send(connection, ("ok", None))
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
    handlers: dict[str, Callable[[Any], None]] = {}

    def allocate(num_blocks: int) -> None:
        kv_caches[:] = allocate_kv_caches(
            local, num_blocks, config.cache.block_size, config.kv_dtype, torch.device(device)
        )
        _send(connection, ("ok", None))

    @torch.inference_mode()
    def step(inputs: StepInputs) -> None:
        input_ids, positions, meta = inputs.on(torch.device(device))
        model(input_ids, positions, kv_caches, meta, backend)

    handlers.update(allocate=allocate, step=step)
    while True:
        try:
            order, payload = _recv(connection)
        except EOFError:
            return  # rank 0 has gone
        if order == "stop":
            return
        handlers[order](payload)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank[{os.getpid()}] %(message)s")
    host, port = os.environ[_ADDRESS_ENV].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    connection = Connection(sock.detach())
    authkey = bytes.fromhex(os.environ[_AUTHKEY_ENV])
    answer_challenge(connection, authkey)
    deliver_challenge(connection, authkey)
    try:
        _serve_orders(connection)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
