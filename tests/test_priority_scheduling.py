"""The priority scheduling policy: the queue, each step's order and preemption by urgency
(``SamplingParams.priority``, lower first, then arrival); first come, first served refuses it."""

from __future__ import annotations

import httpx
import pytest
from server_process import run_server

from inferd import LLM, SamplingParams
from inferd.config import SchedulerConfig
from inferd.engine.builder import build_engine_config
from inferd.engine.llm_engine import PromptError
from inferd.engine.request import Request
from inferd.kv.manager import KVCacheManager
from inferd.sampling_params import SamplingParamsError
from inferd.sched.scheduler import Scheduler


def _request(rid: str, priority: int, arrival: float, prompt_len: int = 4, max_tokens: int = 4) -> Request:
    params = SamplingParams(max_tokens=max_tokens, priority=priority)
    return Request(rid, list(range(1, prompt_len + 1)), params, frozenset({999}), max_tokens, arrival)


def _scheduler(policy: str, num_blocks: int = 64, max_seqs: int = 8) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_seqs, max_num_batched_tokens=64, max_model_len=256, policy=policy
    )
    return Scheduler(config, KVCacheManager(num_blocks, 4))


def _step(s: Scheduler) -> list[str]:
    out = s.schedule()
    s.update(out, {seq.request.request_id: [7] for seq in out.sequences if seq.sample})
    return [seq.request.request_id for seq in out.sequences]


def test_the_queue_admits_the_most_urgent_first_and_equals_by_arrival() -> None:
    s = _scheduler("priority", max_seqs=1)
    for rid, priority, arrival in [
        ("late-low", 5, 1.0),
        ("urgent", -1, 2.0),
        ("mid-a", 0, 3.0),
        ("mid-b", 0, 0.5),
    ]:
        s.add(_request(rid, priority, arrival, max_tokens=1))
    assert [_step(s) for _ in range(4)] == [["urgent"], ["mid-b"], ["mid-a"], ["late-low"]]

    fcfs = _scheduler("fcfs", max_seqs=1)
    for rid, arrival in [("first", 1.0), ("second", 2.0)]:
        fcfs.add(_request(rid, 0, arrival, max_tokens=1))
    assert [_step(fcfs) for _ in range(2)] == [["first"], ["second"]]


def test_the_least_urgent_running_request_is_preempted_and_requeued_by_urgency() -> None:
    # 6 blocks of 4: two 8-token prompts growing to 16 tokens cannot both fit.
    s = _scheduler("priority", num_blocks=6)
    low = _request("low", 3, 0.0, prompt_len=8, max_tokens=8)
    high = _request("high", 1, 1.0, prompt_len=8, max_tokens=8)
    s.add(low)
    assert _step(s) == ["low"]  # running alone before the urgent one arrives
    s.add(high)
    preempted: list[str] = []
    for _ in range(40):
        out = s.schedule()
        preempted.extend(out.preempted_ids)
        s.update(out, {seq.request.request_id: [7] for seq in out.sequences if seq.sample})
        if not s.has_unfinished():
            break
    # Under first come, first served "high" (the newer) would be the one preempted; here it also
    # runs first in each step, ahead of the request admitted before it.
    assert preempted and set(preempted) == {"low"}
    assert high.output_token_ids == low.output_token_ids == [7] * 8


def test_first_come_first_served_refuses_a_priority(tiny_llama) -> None:
    with pytest.raises(PromptError, match="--scheduling-policy priority"):
        LLM(tiny_llama, kv_cache_memory="8MiB").generate(["hi"], SamplingParams(priority=2))
    llm = LLM(tiny_llama, kv_cache_memory="8MiB", scheduling_policy="priority")
    outputs = llm.generate(["hi", "ho"], [SamplingParams(max_tokens=3, priority=p) for p in (2, -2)])
    assert [len(o.token_ids) for o in outputs] == [3, 3]
    # vLLM's priority argument, one a prompt: the sampling params' own are replaced.
    with pytest.raises(PromptError, match="--scheduling-policy priority"):
        LLM(tiny_llama, kv_cache_memory="8MiB").generate(["hi"], SamplingParams(max_tokens=3), priority=[1])
    assert len(llm.generate(["hi", "ho"], SamplingParams(max_tokens=3), priority=[2, -2])) == 2
    with pytest.raises(ValueError, match="2 prompts but 1 priorities"):
        llm.generate(["hi", "ho"], SamplingParams(max_tokens=3), priority=[1])
    with pytest.raises(ValueError, match="unknown"):
        build_engine_config(tiny_llama, scheduling_policy="lottery")
    with pytest.raises(SamplingParamsError, match="64-bit"):
        SamplingParams(priority=2**64)


def test_the_flag_and_the_openai_field(tiny_llama) -> None:
    from inferd.cli import build_parser
    from inferd.entrypoints.engine_args import engine_options

    args = build_parser().parse_args(["generate", "hi", "--scheduling-policy", "priority"])
    assert engine_options(args) == {"scheduling_policy": "priority"}
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 2, "priority": 4}
    with run_server(tiny_llama, "--kv-cache-memory", "8MiB", "--served-model-name", "tiny") as server:
        refused = httpx.post(f"{server.base_url}/v1/completions", json=body)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "priority"
        assert "--scheduling-policy priority" in refused.json()["error"]["message"]
    args = ("--kv-cache-memory", "8MiB", "--served-model-name", "tiny", "--scheduling-policy", "priority")
    with run_server(tiny_llama, *args) as server:
        answer = httpx.post(f"{server.base_url}/v1/completions", json=body)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        chat = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "priority": -1,
        }
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=chat).status_code == 200
        responses = {"model": "tiny", "input": "hi", "max_output_tokens": 2, "priority": 1}
        assert httpx.post(f"{server.base_url}/v1/responses", json=responses).status_code == 200
