"""What structured outputs cost: the same batch generated plain and under constraints, on the
built-in model (or a folder given), with the time spent making and applying the masks.

    python benchmarks/structured_output.py --requests 64 --max-tokens 64 [--device cuda]
    python benchmarks/structured_output.py --mask-only-vocab 151001

Prints, per case, the output tokens, seconds, output tokens per second and the milliseconds per
step the host spends in the sampler's mask pass (`_apply_grammars`: the masks, one copy, one
pass; on a GPU the copy and the pass run on the device behind it),
and checks every output against its constraint (a whole one matches it; one cut off by its budget
is a prefix that still may): exit status 1 when one does not, so on a GPU it is also the check of
the masks' device path (pinned masks, copies without a host wait).
``--mask-only-vocab N`` times only the making of the masks, over a made-up byte-level vocabulary of
N tokens (random strings of 2-9 characters; no hub is reachable here for a real one): 64 JSON-schema
matchers advanced by random allowed tokens, one after another and with llguidance's parallel executor.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import time
from typing import Any

import torch

from inferd import LLM, SamplingParams
from inferd.sample import sampler as sampler_module
from inferd.structured.spec import StructuredOutput

# A schema a small model fills slowly: free text in strings, so the requests run to their budget.
SCHEMA = {
    "type": "object",
    "properties": {"speaker": {"type": "string"}, "line": {"type": "string"}, "act": {"type": "integer"}},
    "required": ["speaker", "line", "act"],
}
LINE = r"[A-Za-z ,.;:!?'\n]+"
CASES: dict[str, StructuredOutput | None] = {
    "plain": None,
    "regex [A-Za-z ,.;:!?'\\n]+": StructuredOutput(regex=LINE),
    "json schema": StructuredOutput(json=json.dumps(SCHEMA)),
}


def matches(spec: StructuredOutput, text: str, whole: bool) -> bool:
    """Whether ``text`` meets ``spec`` (``whole``: the constraint ended it; else cut off by the budget)."""
    if spec.regex is not None:  # one class of characters, repeated: a cut-off text matches it too
        return re.fullmatch(spec.regex, text) is not None
    if whole:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        return isinstance(value, dict) and set(value) == set(SCHEMA["required"])
    return text.startswith('{"speaker":"')


class MaskTimer:
    """Wraps the sampler's mask pass to add up the host time it takes."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._inner = sampler_module._apply_grammars

    def __call__(self, *args: Any) -> None:
        start = time.perf_counter()
        self._inner(*args)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def mask_only(vocab_size: int, rows: int = 64, steps: int = 30) -> None:
    import llguidance
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from inferd.engine.tokenizer import _byte_to_char
    from inferd.structured.matcher import bitmask_words

    rng = random.Random(0)
    alphabet = _byte_to_char()
    vocab = {alphabet[b]: b for b in range(256)}
    letters = string.ascii_letters + '  ,."{}:[]0123456789'
    while len(vocab) < vocab_size - 1:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        vocab.setdefault("".join(alphabet[b] for b in word.encode()), len(vocab))
    source = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    source.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    source.decoder = decoders.ByteLevel()
    source.add_special_tokens(["<eos>"])
    tokenizer = llguidance.LLTokenizer(source.to_str(), eos_token=source.get_vocab_size() - 1)
    grammar = StructuredOutput(json=json.dumps(SCHEMA)).grammar_text()
    words = bitmask_words(tokenizer.vocab_size)
    for parallel in (False, True):
        matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(rows)]
        bitmask = torch.zeros((rows, words), dtype=torch.int32)
        executor = llguidance.LLExecutor()
        seconds = 0.0
        for _ in range(steps):
            live = [(m, i) for i, m in enumerate(matchers) if not m.is_stopped()]
            start = time.perf_counter()
            if parallel:
                executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words * 4, rows)
            else:
                for matcher, i in live:
                    matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
            seconds += time.perf_counter() - start
            for matcher, i in live:
                allowed = np.flatnonzero(np.unpackbits(bitmask[i].numpy().view(np.uint8), bitorder="little"))
                matcher.consume_token(int(rng.choice(allowed)))
        how = "parallel executor" if parallel else "one after another"
        per_step_ms = 1000 * seconds / steps
        print(f"{rows} masks over {tokenizer.vocab_size} tokens, {how}: {per_step_ms:.2f} ms per step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face folder (default: the built-in model)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", help="the engine's device (default: the engine's own choice)")
    parser.add_argument("--mask-only-vocab", type=int, help="time only the masks, over this many tokens")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mask_only_vocab:
        mask_only(args.mask_only_vocab)
        return 0
    llm = LLM(args.model, **({"device": args.device} if args.device else {}))
    prompts = [f"ROMEO {i}:" for i in range(args.requests)]
    llm.generate(prompts[:4], SamplingParams(max_tokens=8))  # warm-up
    print(f"{'case':32} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'mask ms/step':>13}")
    failed = False
    for name, spec in CASES.items():
        params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0, structured_output=spec)
        timer = MaskTimer()
        sampler_module._apply_grammars = timer  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds = time.perf_counter() - start
        finally:
            sampler_module._apply_grammars = timer._inner  # type: ignore[assignment]
        tokens = sum(len(out.token_ids) for out in outs)
        mask_ms = 1000 * timer.seconds / timer.calls if timer.calls else 0.0
        wrong = [
            o.text for o in outs if spec is not None and not matches(spec, o.text, o.finish_reason == "stop")
        ]
        verdict = (
            f"  {len(wrong)} of {len(outs)} outputs break their constraint, e.g. {wrong[0]!r}"
            if wrong
            else ""
        )
        print(f"{name:32} {tokens:7d} {seconds:8.2f} {tokens / seconds:8.1f} {mask_ms:13.2f}{verdict}")
        failed = failed or bool(wrong)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
