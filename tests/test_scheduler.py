"""Scheduler and block manager driven with plain values, no model."""

from __future__ import annotations

import pytest

from inferd.config import SchedulerConfig
from inferd.engine.request import FinishReason, Request, RequestStatus
from inferd.kv.manager import KVCacheManager
from inferd.sampling_params import SamplingParams
from inferd.sched.scheduler import Scheduler


def _request(rid: str, prompt_len: int, max_tokens: int = 4, first: int = 0) -> Request:
    return Request(
        rid,
        list(range(first, first + prompt_len)),
        SamplingParams(max_tokens=max_tokens),
        frozenset({999}),
        max_tokens,
    )


def _scheduler(
    num_blocks: int = 64, block_size: int = 4, budget: int = 32, max_seqs: int = 8, long_prefill: int = 0
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=256,
        long_prefill_token_threshold=long_prefill,
    )
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def _run_step(s: Scheduler, token: int = 7) -> dict[str, int]:
    out = s.schedule()
    sampled = {seq.request.request_id: [token] for seq in out.sequences if seq.sample}
    s.update(out, sampled)
    return {seq.request.request_id: seq.num_tokens for seq in out.sequences}


def test_long_prompt_is_chunked_while_decodes_continue() -> None:
    s = _scheduler(budget=10)
    s.add(_request("short", 3, max_tokens=10))
    assert _run_step(s) == {"short": 3}
    s.add(_request("long", 25, first=100))
    steps = [_run_step(s) for _ in range(3)]
    # The decode (1 token) goes first; the prompt fills the rest of the budget each step.
    assert steps == [{"short": 1, "long": 9}, {"short": 1, "long": 9}, {"short": 1, "long": 7}]
    assert s.requests["long"].output_token_ids == [7]


def test_the_long_prefill_threshold_lets_later_prompts_share_the_step() -> None:
    """Without it the first prompt takes the whole budget and the short one waits a step; with
    it each prompt computes at most the threshold a step, the short one starting at once."""
    steps = {}
    for threshold in (0, 12):
        s = _scheduler(budget=16, long_prefill=threshold)
        s.add(_request("long", 30))
        s.add(_request("short", 4, first=100))
        steps[threshold] = [_run_step(s) for _ in range(3)]
    assert steps[0] == [{"long": 16}, {"long": 14, "short": 2}, {"long": 1, "short": 2}]
    assert steps[12] == [{"long": 12, "short": 4}, {"long": 12, "short": 1}, {"long": 6, "short": 1}]


def test_token_budget_and_seq_cap_are_respected() -> None:
    s = _scheduler(budget=16, max_seqs=2)
    for i in range(4):
        s.add(_request(f"r{i}", 5, first=10 * i))
    out = s.schedule()
    assert [seq.request.request_id for seq in out.sequences] == ["r0", "r1"]
    assert out.num_batched_tokens <= 16
    assert s.num_waiting == 2


def test_requests_finish_on_max_tokens_and_eos_and_free_blocks() -> None:
    s = _scheduler()
    s.add(_request("a", 4, max_tokens=3))
    for _ in range(3):
        _run_step(s)
    assert s.requests.get("a") is None
    s.add(_request("b", 4, max_tokens=10))
    _run_step(s, token=999)  # EOS
    assert not s.has_unfinished()
    assert s.kv.usage() == 0.0


def test_preemption_frees_newest_and_recomputes_later() -> None:
    # 6 blocks of 4 tokens: two requests of 8-token prompts growing to 16 tokens cannot both fit.
    s = _scheduler(num_blocks=6, block_size=4, budget=64)
    old, new = _request("old", 8, max_tokens=8), _request("new", 8, max_tokens=8, first=50)
    s.add(old)
    s.add(new)
    preempted = []
    for _ in range(30):
        out = s.schedule()
        preempted.extend(out.preempted_ids)
        s.update(out, {seq.request.request_id: [7] for seq in out.sequences if seq.sample})
        if not s.has_unfinished():
            break
    assert preempted and set(preempted) == {"new"}
    assert old.output_token_ids == [7] * 8 and new.output_token_ids == [7] * 8
    assert new.num_preemptions >= 1
    assert s.kv.usage() == 0.0


def test_abort_anywhere_frees_blocks() -> None:
    s = _scheduler(budget=4)
    s.add(_request("running", 10))
    s.add(_request("waiting", 10, first=40))
    _run_step(s)
    assert s.kv.usage() > 0
    s.finish("running", FinishReason.ABORT)
    s.finish("waiting", FinishReason.ABORT)
    assert s.kv.usage() == 0.0 and not s.has_unfinished()


def test_prefix_hit_skips_cached_tokens() -> None:
    s = _scheduler(block_size=4, budget=64)
    s.add(_request("a", 12, max_tokens=1))
    _run_step(s)
    b = _request("b", 12, max_tokens=1)
    s.add(b)
    assert _run_step(s) == {"b": 4}
    assert b.num_cached_tokens == 8
    assert b.status == RequestStatus.FINISHED


def test_a_prompt_scored_is_computed_whole_and_flags_its_steps() -> None:
    """Its log-probabilities are read from every position, so no cached block stands in for one
    (the same prompt unscored takes 8 of its 12 tokens from the cache, as above)."""
    s = _scheduler(block_size=4, budget=64)
    s.add(_request("a", 12, max_tokens=1))
    _run_step(s)
    assert not s.schedule().scores_prompts
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    scoring = Request("b", list(range(12)), params, frozenset({999}), 1)
    s.add(scoring)
    out = s.schedule()
    assert out.scores_prompts and [(q.request.request_id, q.num_tokens) for q in out.sequences] == [("b", 12)]
    assert scoring.num_cached_tokens == 0
    s.update(out, {"b": [7]})
    assert not s.schedule().scores_prompts  # finished: later steps look for no prompt to score


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per block key hashed from here on."""
    from inferd.kv import manager

    calls: list[int] = []
    block_hash = manager.block_hash

    def counted(parent: int, token_ids: list[int]) -> int:
        calls.append(1)
        return block_hash(parent, token_ids)

    monkeypatch.setattr(manager, "block_hash", counted)
    return calls


def test_a_waiting_requests_block_keys_are_hashed_once(hashed: list[int]) -> None:
    """A 60-token prompt that cannot be admitted for want of blocks is looked up again each step.
    A sliding-window model's lookup reads every full block's key: its 14 are hashed at the first
    lookup only, and read back after."""
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    s = Scheduler(config, KVCacheManager(num_blocks=12, block_size=4, window=8))
    s.add(_request("running", 40, max_tokens=20))  # holds 10 blocks, then 3 past its window
    s.add(_request("waiting", 60, first=500))
    assert _run_step(s) == {"running": 40}  # the waiting prompt looked up once: no room
    after_first = len(hashed)
    assert [_run_step(s) for _ in range(2)] == [{"running": 1}] * 2  # looked up twice more
    assert len(hashed) == after_first  # no block keys hashed again (the running one fills none)


def test_requests_compare_by_identity() -> None:
    """The scheduler's removals compare a request with the running ones: field by field, as the
    generated __eq__ did, each comparison could walk token lists."""
    twins = [Request("r", [1, 2, 3], SamplingParams(), frozenset({0}), 8) for _ in range(2)]
    assert twins[0] != twins[1] and twins[0] == twins[0]
    running = list(twins)
    running.remove(twins[1])
    assert running[0] is twins[0]


def test_a_prompt_waiting_for_blocks_counts_its_prefix_lookup_once() -> None:
    """A waiting prompt is looked up in the prefix cache at each step until its blocks are free:
    the queries and hits count the lookup that admitted it, not every try (they rose thousands of
    tokens a second on a server short of KV blocks, and the hit rate read from them meant nothing)."""
    s = _scheduler(num_blocks=4, block_size=4)
    s.add(_request("first", 12, max_tokens=4))
    _run_step(s)
    s.add(_request("shares_its_head", 8, max_tokens=2))  # 2 blocks; 1 is free, then none
    waited = 0
    while "shares_its_head" not in _run_step(s):
        waited += 1
        assert waited < 10, "never admitted"
    assert waited >= 2
    assert (s.kv.prefix_queries, s.kv.prefix_hits) == (12 + 8, 4)  # its first block was cached


def test_requests_sharing_a_prompt_head_compute_it_once() -> None:
    """Two prompts of the same 12 tokens arrive together: both missed the cache and both computed
    them. Now the second waits while the first computes them, then takes its 8 cacheable tokens
    from the cache; a different prompt behind it is not held up."""
    s = _scheduler(block_size=4, budget=64)
    first, twin, other = _request("first", 12), _request("twin", 12), _request("other", 12, first=100)
    for request in (first, twin, other):
        s.add(request)
    assert _run_step(s) == {"first": 12, "other": 12}
    assert s.num_prefix_waits == 1 and [r.request_id for r in s.waiting] == ["twin"]
    assert _run_step(s) == {"first": 1, "other": 1, "twin": 4}
    assert twin.num_cached_tokens == 8
    assert (s.kv.prefix_queries, s.kv.prefix_hits) == (36, 8)


def test_a_request_waits_for_a_long_shared_prompt_chunk_by_chunk() -> None:
    """A 40-token prompt computed 8 tokens a step: its twin waits for each of the blocks it would
    compute next, and computes only the last 4 tokens, whose block the cache never holds (both
    computed 8 a step side by side before)."""
    s = _scheduler(block_size=4, budget=16, long_prefill=8)
    s.add(_request("first", 40, max_tokens=8))
    s.add(_request("twin", 40, max_tokens=8))
    twin_tokens = []
    for _ in range(8):
        twin_tokens.append(_run_step(s).get("twin", 0))
    assert twin_tokens[:6] == [0, 0, 0, 0, 0, 4]  # the first's prompt takes five steps
    assert s.requests["twin"].num_cached_tokens == 36


def test_a_request_put_off_goes_once_the_request_computing_its_head_is_gone() -> None:
    """Held back for a block the running request was computing; that request is aborted (or
    preempted): the next step admits the waiting one, with what the cache holds."""
    s = _scheduler(block_size=4, budget=8, long_prefill=4)
    s.add(_request("first", 12))
    s.add(_request("twin", 12))
    assert _run_step(s) == {"first": 4}  # the twin waits, though the budget had room for it
    s.finish("first", FinishReason.ABORT)
    assert _run_step(s) == {"twin": 4}
    assert s.requests["twin"].num_computed_tokens == 8  # the first block was cached before the abort


def test_a_prompts_blocks_are_hashed_once_from_admission_to_the_cache(hashed: list[int]) -> None:
    """Admission hashes the prompt's full blocks (to claim those it computes), and registering them
    in the cache as they fill reads those keys back: 10 blocks, 10 hashes (11 before: the lookup's
    first miss was hashed twice)."""
    s = _scheduler(block_size=4, budget=64)
    s.add(_request("only", 40, max_tokens=1))
    _run_step(s)
    assert len(hashed) == 10


def test_requests_put_off_are_passed_over_without_lookups_until_their_shared_head_is_cached() -> None:
    """A burst sharing a head: the ones put off wait for the last block they share with the
    request computing it, passed over without a prefix-cache lookup until then (each was looked
    up again at every step, and every one of the queue at every step: 20 to 80 ms a step for a
    thousand); a step passes over at most max_num_seqs of them."""
    s = _scheduler(block_size=4, budget=16, long_prefill=4, max_seqs=6, num_blocks=256)
    head = list(range(64))
    burst = [
        Request(f"r{i}", head + [500 + i] * 4, SamplingParams(max_tokens=2), frozenset({999}), 2)
        for i in range(12)
    ]
    for request in burst:
        s.add(request)
    lookups = []
    find = s.kv.find_cached_prefix

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        lookups.append(args[0])
        return find(*args, **kwargs)

    s.kv.find_cached_prefix = counted  # type: ignore[method-assign]
    assert _run_step(s) == {"r0": 4}
    assert lookups == [f"r{i}" for i in range(7)]  # r0 admitted, then six put off: the cap
    assert s.num_prefix_waits == 6
    lookups.clear()
    for _ in range(14):  # r0 computes the head 4 tokens a step: 16 steps in all
        assert _run_step(s) == {"r0": 4}
    assert lookups == []
    for _ in range(4):
        _run_step(s)
    assert {f"r{i}" for i in range(1, 6)} <= set(lookups)  # looked up once the head was cached
    assert [request.num_cached_tokens for request in burst[1:6]] == [64] * 5
