"""Sequence classification on the CPU: ``LLM.classify`` against transformers' classifier, batched.

    python benchmarks/classification.py [--prompts 128] [--rounds 3]

A random-weight ``Qwen3ForSequenceClassification`` of the built-in model's size (4 layers, width
256, 3 labels) written to a scratch folder; prompts of random token ids, lengths uniform in
[16, 128] (``random.seed(0)``). inferd classifies them all in one call (continuous batching,
prompts packed without padding); transformers runs them in batches of ``--batch`` padded on the
left, as a classification pipeline would. Median seconds of the rounds, prompts per second, and the
largest difference between the two's logits.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import save_tokenizer  # noqa: E402

from inferd import LLM  # noqa: E402


def build_classifier(folder: Path) -> Path:
    folder.mkdir(parents=True)
    vocab = save_tokenizer(folder)
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    config.architectures = ["Qwen3ForSequenceClassification"]
    torch.manual_seed(0)
    transformers.Qwen3ForSequenceClassification(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = build_classifier(Path(scratch) / "classifier")
        random.seed(0)
        # Ids from 1: 0 is the pad token, which transformers' pooling would skip at a prompt's end.
        prompts = [
            [random.randrange(1, 250) for _ in range(random.randint(16, 128))] for _ in range(args.prompts)
        ]
        llm = LLM(folder, kv_cache_memory="64MiB", enable_prefix_caching=False)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=torch.float32
        ).eval()

        def ours() -> list[list[float]]:
            return [out.logits for out in llm.classify(prompts)]

        def theirs() -> list[list[float]]:
            logits = []
            with torch.inference_mode():
                for start in range(0, len(prompts), args.batch):
                    batch = prompts[start : start + args.batch]
                    width = max(len(p) for p in batch)
                    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
                    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
                    logits.extend(model(input_ids=ids, attention_mask=mask).logits.tolist())
            return logits

        ours(), theirs()  # first-call costs out of the timing
        times: dict[str, list[float]] = {"inferd": [], "transformers": []}
        results = {}
        for _ in range(args.rounds):
            for name, run in (("inferd", ours), ("transformers", theirs)):
                start = time.perf_counter()
                results[name] = run()
                times[name].append(time.perf_counter() - start)
        pairs = zip(results["inferd"], results["transformers"], strict=True)
        diff = max(abs(a - b) for x, y in pairs for a, b in zip(x, y, strict=True))
        tokens = sum(len(p) for p in prompts)
        for name, runs in times.items():
            median = statistics.median(runs)
            each = ", ".join(f"{t:.3f}" for t in runs)
            print(f"{name}: {len(prompts)} prompts ({tokens} tokens) in {median:.3f} s "
                  f"({len(prompts) / median:.0f} prompts/s; runs {each})")  # fmt: skip
        print(f"largest logit difference: {diff:.2e}")


if __name__ == "__main__":
    main()
