"""`inferd serve --engine-process`: the core in a child process answers like the thread engine, and
its loss or a signal meant for the server is handled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from server_process import run_server

from inferd import LLM, SamplingParams
from inferd.engine.async_llm import AsyncLLM
from inferd.structured.spec import StructuredOutput


def test_engine_process_serves_the_same_greedy_text(tiny_llama) -> None:
    prompt = "To be, or not"
    expected = LLM(tiny_llama, kv_cache_memory="8MiB").generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0)
    )
    with run_server(tiny_llama, "--engine-process", "--kv-cache-memory", "8MiB") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        reply = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0)
        streamed = "".join(
            chunk.choices[0].text
            for chunk in client.completions.create(
                model=server.model, prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
            if chunk.choices
        )
        # Prompt log-probabilities cross the process boundary too (echo with logprobs).
        scored = (
            client.completions.create(
                model=server.model, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1
            )
            .choices[0]
            .logprobs
        )
        samples = server.wait_for_metrics(lambda s: s.get("inferd:kv_cache_usage_perc", 1.0) == 0.0)
    assert reply.choices[0].text == streamed == expected[0].text
    local = (
        LLM(tiny_llama, kv_cache_memory="8MiB")
        .generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
        .prompt_logprobs
    )
    assert scored is not None and local is not None
    assert scored.token_logprobs[: len(local)] == [None if e is None else e.logprob for e in local]
    assert samples["inferd:num_requests_running"] == 0


async def _until(condition, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


async def _generate(llm: AsyncLLM, request_id: str, max_tokens: int = 8) -> list:  # type: ignore[type-arg]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [out async for out in llm.generate(request_id, "To be", params)]


async def test_an_engine_process_lost_between_requests_is_noticed_at_once(tiny_llama) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=True, kv_cache_memory="8MiB")
    llm.start()
    try:
        assert (await _generate(llm, "before"))[-1].finish_reason == "length"
        os.kill(llm.engine._process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        # Idle, nobody asking: the loop notices by itself, so /health can say so.
        await _until(lambda: not llm.is_alive)
        assert "engine process exited" in str(llm.dead_reason)
    finally:
        llm.shutdown()


async def test_signals_to_the_process_group_let_the_generation_in_flight_end(tiny_llama) -> None:
    llm = AsyncLLM.from_options(tiny_llama, engine_process=True, kv_cache_memory="8MiB")
    llm.start()
    try:
        running = asyncio.ensure_future(_generate(llm, "running", max_tokens=200))
        await asyncio.sleep(0.2)
        process = llm.engine._process  # type: ignore[union-attr]
        # What Ctrl-C sends it beside the server process, which drains and then stops the core.
        os.kill(process.pid, signal.SIGINT)
        await asyncio.sleep(0.1)
        assert process.is_alive()
        # A service manager's SIGTERM: the core finishes what it has, then ends.
        os.kill(process.pid, signal.SIGTERM)
        outputs = await asyncio.wait_for(running, 60)
        assert outputs[-1].finish_reason == "length" and outputs[-1].error is None
        await _until(lambda: not process.is_alive())
        assert process.exitcode == 0
    finally:
        llm.shutdown()


def test_a_script_that_exits_without_shutdown_does_not_hang(tiny_llama, tmp_path) -> None:
    # multiprocessing ends a daemon child at exit with SIGTERM and then waits for it.
    script = tmp_path / "forgets_shutdown.py"
    script.write_text(
        "import sys\n"
        "from inferd.engine.async_llm import AsyncLLM\n"
        "if __name__ == '__main__':  # the spawned engine process imports this file again\n"
        f"    llm = AsyncLLM.from_options({str(tiny_llama)!r}, engine_process=True, kv_cache_memory='8MiB')\n"
        "    sys.exit(3)\n"
    )
    finished = subprocess.run([sys.executable, str(script)], timeout=120, capture_output=True, text=True)
    assert finished.returncode == 3, finished.stderr


def test_an_idle_engine_process_ends_when_the_server_process_is_gone() -> None:
    import threading

    import msgspec
    import zmq

    from inferd.engine.core_process import _serve

    class IdleCore:
        def has_unfinished(self) -> bool:
            return False

    class BusyCore:  # mid-work: its steps would go to nobody
        def has_unfinished(self) -> bool:
            return True

    context = zmq.Context()
    inbox, outbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inbox.bind("inproc://parent-gone-in")
    outbox.bind("inproc://parent-gone-out")
    not_our_parent = os.getppid() + 1  # as if the server had died and the process were adopted
    returned: list[str] = []

    def serve(core: object) -> None:
        _serve(core, inbox, outbox, msgspec.msgpack.Encoder(), not_our_parent)  # type: ignore[arg-type]
        returned.append(type(core).__name__)

    for core in (IdleCore(), BusyCore()):
        serving = threading.Thread(target=serve, args=(core,), daemon=True)
        serving.start()
        serving.join(10)
    assert returned == ["IdleCore", "BusyCore"]  # each returned (not raised) once it saw the parent gone
    inbox.close(linger=0)
    outbox.close(linger=0)
    context.term()


async def test_a_request_the_core_refuses_ends_alone_with_the_reason(tiny_llama) -> None:
    """A constraint that compiles only without the tokenizer fails when the core queues it: that
    request ends with the error, and the core goes on serving."""
    llm = AsyncLLM.from_options(tiny_llama, engine_process=True, kv_cache_memory="8MiB")
    llm.start()
    try:
        spec = StructuredOutput(grammar='start: "a" <|no_such_token|>')
        params = SamplingParams(max_tokens=8, structured_output=spec)
        refused = [out async for out in llm.generate("refused", "To be", params)]
        assert refused[-1].finish_reason == "error" and "no_such_token" in str(refused[-1].error)
        assert (await _generate(llm, "after"))[-1].finish_reason == "length"
    finally:
        llm.shutdown()


def test_reset_prefix_cache_reaches_the_engine_process(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """vLLM's POST /reset_prefix_cache: the next prompt finds nothing cached, in the core's process."""
    with run_server(tiny_llama, "--kv-cache-memory", "8MiB", "--engine-process") as server:
        body = {"model": server.model, "prompt": list(range(100, 164)), "max_tokens": 1}

        def hits() -> float:
            before = server.metrics()["inferd:prefix_cache_hits_total"]
            assert httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30).status_code == 200
            return server.metrics()["inferd:prefix_cache_hits_total"] - before

        hits()
        assert hits() > 0
        assert httpx.post(f"{server.base_url}/reset_prefix_cache", timeout=30).status_code == 200
        assert hits() == 0
        assert hits() > 0


def _step_fault(max_tokens: int, message: str, once: bool) -> str:
    """A sitecustomize module, loaded by every Python process the test starts: from the first request
    asking for ``max_tokens`` tokens on, the engine core's step raises ``message``, once (a bug in
    the step) or every time (a broken device, say)."""
    return f"""
from inferd.engine import core

_add, _step = core.EngineCore.add_request, core.EngineCore.step
armed = []


def add_request(self, request):
    if request.params.max_tokens == {max_tokens}:
        armed.append(True)
    return _add(self, request)


def step(self):
    if armed:
        if {once}:
            armed.clear()
        raise RuntimeError({message!r})
    return _step(self)


core.EngineCore.add_request, core.EngineCore.step = add_request, step
"""


def _server_with(tiny_llama, tmp_path, fault: str, *args: str):  # type: ignore[no-untyped-def]
    (tmp_path / "sitecustomize.py").write_text(fault)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return run_server(tiny_llama, *args, "--kv-cache-memory", "8MiB", env={"PYTHONPATH": path})


def test_a_failing_step_fails_its_batch_and_the_engine_process_serves_on(tiny_llama, tmp_path) -> None:
    """As the engine thread does: the step's requests end with a 500, and the engine process (and
    with it the server) goes on serving; it used to die, taking every request with it."""
    fault = _step_fault(7, "injected step failure", once=True)
    with _server_with(tiny_llama, tmp_path, fault, "--engine-process") as server:
        url = f"{server.base_url}/v1/completions"
        failed = httpx.post(url, json={"model": server.model, "prompt": "To be", "max_tokens": 7}, timeout=60)
        assert failed.status_code == 500 and "injected step failure" in failed.json()["error"]["message"]
        served = httpx.post(url, json={"model": server.model, "prompt": "To be", "max_tokens": 4}, timeout=60)
        assert served.status_code == 200, served.text
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
        assert server.process.poll() is None


# A fault after the scheduler's update has finished a request (the one asking for 5 tokens) while
# another still runs: the step fails with a request it already ended.
_FAULT_AFTER_UPDATE = """
from inferd.sched import scheduler

_update = scheduler.Scheduler.update
fired = []


def update(self, output, sampled):
    advanced = _update(self, output, sampled)
    ended = [seq.request for seq in output.sequences if seq.request.finish_reason is not None]
    if not fired and any(r.params.max_tokens == 5 for r in ended) and self.requests:
        fired.append(True)
        raise RuntimeError("injected fault after the update")
    return advanced


scheduler.Scheduler.update = update
"""


@pytest.mark.parametrize("engine_process", [True, False], ids=["process", "thread"])
def test_a_request_the_failed_step_had_finished_is_answered_too(tiny_llama, tmp_path, engine_process) -> None:
    """The engine process failed only the requests its scheduler still held: one that the failing
    step had just finished was never answered (its client hung)."""
    args = ("--engine-process",) if engine_process else ()
    with _server_with(tiny_llama, tmp_path, _FAULT_AFTER_UPDATE, *args) as server:
        url = f"{server.base_url}/v1/completions"
        body = {"model": server.model, "prompt": "To be, or not to be", "temperature": 0, "ignore_eos": True}

        def send(max_tokens: int, delay: float) -> int:
            time.sleep(delay)
            return httpx.post(url, json={**body, "max_tokens": max_tokens}, timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long, short = pool.submit(send, 200, 0.0), pool.submit(send, 5, 0.05)
            assert (short.result(), long.result()) == (500, 500)
        assert httpx.post(url, json={**body, "max_tokens": 3}, timeout=30).status_code == 200


@pytest.mark.parametrize("engine_process", [True, False], ids=["process", "thread"])
def test_a_fault_that_stays_makes_the_engine_dead(tiny_llama, tmp_path, engine_process) -> None:
    """Failing every batch forever (a /health of 200 meanwhile) helps no one: after a few steps in a
    row fail, the engine counts as dead, /health turns 503 and the process exits 1 for a
    supervisor to restart it."""
    from inferd.engine.async_llm import MAX_FAILED_STEPS_IN_A_ROW

    args = ("--engine-process",) if engine_process else ()
    with _server_with(
        tiny_llama, tmp_path, _step_fault(9, "the device is gone", once=False), *args
    ) as server:
        url = f"{server.base_url}/v1/completions"
        for _ in range(MAX_FAILED_STEPS_IN_A_ROW):
            answer = httpx.post(
                url, json={"model": server.model, "prompt": "To be", "max_tokens": 9}, timeout=30
            )
            assert answer.status_code == 500 and "device is gone" in answer.json()["error"]["message"]
        assert server.process.wait(timeout=60) == 1


async def test_an_engine_process_that_stops_answering_is_killed_and_its_requests_fail(tiny_llama) -> None:
    """A stopped engine process (SIGSTOP here; a deadlock or a device that no longer answers
    alike) shows no progress: past the step timeout it is killed and the engine counts as dead,
    where it used to be waited for forever behind a /health of 200."""
    llm = AsyncLLM.from_options(tiny_llama, engine_process=True, kv_cache_memory="8MiB", step_timeout_s=2.0)
    llm.start()
    try:
        process = llm.engine._process  # type: ignore[union-attr]
        assert (await _generate(llm, "before"))[-1].finish_reason == "length"
        await asyncio.sleep(3.0)  # idle longer than the timeout: its idle beats keep it alive
        assert llm.is_alive
        running = asyncio.ensure_future(_generate(llm, "running", max_tokens=400))
        await _until(lambda: llm.stats().num_running == 1)
        os.kill(process.pid, signal.SIGSTOP)
        outputs = await asyncio.wait_for(running, 30)
        assert outputs[-1].finish_reason == "error" and "hung" in (outputs[-1].error or "")
        assert "engine process hung" in str(llm.dead_reason) and not llm.is_alive
        await _until(lambda: not process.is_alive())
        assert process.exitcode == -signal.SIGKILL
    finally:
        llm.shutdown()


async def test_an_engine_thread_stuck_in_a_step_makes_the_engine_dead(tiny_llama, monkeypatch) -> None:
    """The thread engine's step cannot be stopped from outside: a watchdog notices it has run past
    the timeout, fails its requests and marks the engine dead, so the server stops for a
    supervisor to restart it."""
    import threading

    from inferd.engine.llm_engine import LLMEngine

    llm = AsyncLLM.from_options(tiny_llama, engine_process=False, kv_cache_memory="8MiB", step_timeout_s=1.0)
    released = threading.Event()
    step = LLMEngine.step

    def stuck_on_long_requests(self: LLMEngine) -> list:  # type: ignore[type-arg]
        if any(r.params.max_tokens == 77 for r in self.core.scheduler.requests.values()):
            released.wait(60)
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", stuck_on_long_requests)
    llm.start()
    try:
        assert (await _generate(llm, "before"))[-1].finish_reason == "length"
        await asyncio.sleep(1.5)  # idle past the timeout is no hang
        assert llm.is_alive
        outputs = await asyncio.wait_for(_generate(llm, "stuck", max_tokens=77), 30)
        assert outputs[-1].finish_reason == "error" and "engine hung" in (outputs[-1].error or "")
        assert "engine hung: one step has run" in str(llm.dead_reason) and not llm.is_alive
    finally:
        released.set()
        llm.shutdown()


_HANGING_STEP = """
import time

from inferd.engine import core

_add, _step = core.EngineCore.add_request, core.EngineCore.step
armed = []


def add_request(self, request):
    if request.params.max_tokens == 9:
        armed.append(True)
    return _add(self, request)


def step(self):
    if armed:
        time.sleep(3600)
    return _step(self)


core.EngineCore.add_request, core.EngineCore.step = add_request, step
"""


@pytest.mark.parametrize("engine_process", [True, False], ids=["process", "thread"])
def test_a_hung_step_fails_its_request_and_the_server_exits(tiny_llama, tmp_path, engine_process) -> None:
    """The request answers with why, and the server stops (exit 1) for a supervisor to restart."""
    args = ("--engine-process",) if engine_process else ()
    with _server_with(tiny_llama, tmp_path, _HANGING_STEP, "--engine-step-timeout", "2", *args) as server:
        url = f"{server.base_url}/v1/completions"
        answer = httpx.post(url, json={"model": server.model, "prompt": "To be", "max_tokens": 9}, timeout=60)
        assert answer.status_code >= 500 and "hung" in answer.json()["error"]["message"]
        assert server.process.wait(timeout=60) == 1


def test_an_engine_process_whose_server_is_gone_at_its_start_ends(tiny_llama, tmp_path) -> None:
    """The core is told its server's pid: one killed while the core loaded left it adopted (its
    parent then reads as init), waiting for work forever with the model in memory. As it ends it
    removes the folder of the server's sockets, which the server, killed, could not."""
    import multiprocessing

    import msgspec
    import zmq

    from inferd.engine.builder import build_engine_config
    from inferd.engine.core_process import FromCore, ReadyMsg, run_core_process

    gone = subprocess.Popen(["true"])
    gone.wait()
    sockets = tmp_path / "inferd-sockets"
    sockets.mkdir()
    context = zmq.Context()
    to_core, from_core = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    to_core.bind(f"ipc://{sockets}/in")
    from_core.bind(f"ipc://{sockets}/out")
    config = build_engine_config(tiny_llama, kv_cache_memory="8MiB")
    core = multiprocessing.get_context("spawn").Process(
        target=run_core_process,
        args=(config, f"ipc://{sockets}/in", f"ipc://{sockets}/out", None, gone.pid),
        daemon=True,
    )
    core.start()
    try:
        assert from_core.poll(120_000), "the core never became ready"
        assert isinstance(msgspec.msgpack.decode(from_core.recv(), type=FromCore), ReadyMsg)
        core.join(30)
        assert core.exitcode == 0
        assert not sockets.exists()
    finally:
        if core.is_alive():
            core.kill()
        to_core.close(linger=0)
        from_core.close(linger=0)
        context.term()


def test_an_engine_process_engine_that_fails_to_start_leaves_no_process(tiny_llama, monkeypatch) -> None:
    """What the client builds besides the core (its input processor, which reads the folder's
    generation config) is built first: it failed after the core was up, and the core lived on."""
    import multiprocessing

    from inferd.engine import process_engine

    def unreadable(*args: object) -> None:
        raise ValueError("generation_config.json is not JSON")

    monkeypatch.setattr(process_engine, "InputProcessor", unreadable)
    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="not JSON"):
        AsyncLLM.from_options(tiny_llama, engine_process=True, kv_cache_memory="8MiB")
    assert set(multiprocessing.active_children()) == before
