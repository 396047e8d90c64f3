"""Offline throughput on the CPU: inferd vs transformers' batched `generate` and continuous batching.

A random-weight model in the shape of SmolLM-135M (hidden 576, 30 layers, 9 heads, 3 KV heads,
vocab 49152), 64 prompts with input and output lengths uniform in [32, 256] (random.seed(0)),
ignore_eos. All three engines run in the same process, one after another, on the same weights.

    python benchmarks/offline_throughput.py [--num-prompts 64] [--skip-hf-generate] [--out results.json]

With ``--moe`` the model is a mixture of experts of the same shape (``Qwen3MoeForCausalLM``): each
layer's MLP is 16 experts of 384, 4 a token, so a token runs through as wide an MLP (1,536) as the
dense model's; it shows what routing costs on top of the same arithmetic.

With ``--lora-adapters N`` inferd alone runs the workload with N random LoRA adapters (PEFT's
format, rank ``--lora-rank``, on every q/k/v/o/gate/up/down projection), request ``i`` asking for
adapter ``i % N``: what serving adapters costs beside the same run without them.

transformers' `generate` runs all prompts as one left-padded batch up to the longest output (it
cannot stop rows early with ignore_eos); its throughput counts only the requested output tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

SMOLLM_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}


# --moe: the MLP as routed experts, as wide per token as the dense one (4 x 384 = 1,536).
MOE_EXPERTS = {
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 384,
    "norm_topk_prob": True,
}


def build_model(folder: Path, moe: bool = False) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if moe:
        config = transformers.Qwen3MoeConfig(**SMOLLM_SHAPE, **MOE_EXPERTS, eos_token_id=0, bos_token_id=0)
        config.architectures = ["Qwen3MoeForCausalLM"]
    else:
        config = transformers.LlamaConfig(**SMOLLM_SHAPE, eos_token_id=0, bos_token_id=0)
        config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    getattr(transformers, config.architectures[0])(config).save_pretrained(folder)
    # A word-level vocabulary as large as the model's, so every id detokenizes.
    vocab = {f"w{i}": i for i in range(SMOLLM_SHAPE["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w0"}))


def workload(num_prompts: int, low: int, high: int) -> tuple[list[list[int]], list[int]]:
    random.seed(0)
    prompts = [
        [random.randint(1, SMOLLM_SHAPE["vocab_size"] - 1) for _ in range(random.randint(low, high))]
        for _ in range(num_prompts)
    ]
    output_lens = [random.randint(low, high) for _ in range(num_prompts)]
    return prompts, output_lens


def build_lora_adapters(folder: Path, count: int, rank: int) -> dict[str, str]:
    """``count`` random PEFT adapters of ``rank`` for the model in ``folder``, on every projection."""
    from safetensors.torch import save_file

    hidden, inter = SMOLLM_SHAPE["hidden_size"], SMOLLM_SHAPE["intermediate_size"]
    head_dim = hidden // SMOLLM_SHAPE["num_attention_heads"]
    kv = SMOLLM_SHAPE["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}  # fmt: skip
    adapters = {}
    gen = torch.Generator().manual_seed(1)
    for index in range(count):
        tensors = {}
        for layer in range(SMOLLM_SHAPE["num_hidden_layers"]):
            for module, (out_features, in_features) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * 0.01
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.01
        path = folder / f"adapter-{index}"
        path.mkdir()
        save_file(tensors, path / "adapter_model.safetensors")
        config = {"r": rank, "lora_alpha": 2 * rank, "bias": "none", "peft_type": "LORA",
                  "target_modules": [m.split(".")[-1] for m in shapes]}  # fmt: skip
        (path / "adapter_config.json").write_text(json.dumps(config))
        adapters[f"adapter-{index}"] = str(path)
    return adapters


def run_inferd(
    folder: Path, prompts: list[list[int]], output_lens: list[int], adapters: dict[str, str] | None = None
) -> dict[str, float]:
    from inferd import LLM, SamplingParams

    llm = LLM(folder, kv_cache_memory="4GiB", **({"lora_modules": adapters} if adapters else {}))
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4))  # warm-up
    names = list(adapters or {}) or [None]
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, adapter=names[i % len(names)])
        for i, n in enumerate(output_lens)
    ]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.token_ids) for o in outs)
    assert produced == sum(output_lens), "inferd stopped early"
    return {"seconds": elapsed, "output_tokens": produced, "output_tok_s": produced / elapsed}


def run_hf_generate(folder: Path, prompts: list[list[int]], output_lens: list[int]) -> dict[str, float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    longest = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.tensor(p)
        mask[row, longest - len(p) :] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(output_lens),
            min_new_tokens=max(output_lens),
            do_sample=False,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    useful = sum(output_lens)
    return {"seconds": elapsed, "output_tokens": useful, "output_tok_s": useful / elapsed}


def run_hf_continuous(folder: Path, prompts: list[list[int]], output_lens: list[int]) -> dict[str, float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = transformers.GenerationConfig(
        do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=max(output_lens)
    )
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    start = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, output_lens, strict=True)):
        manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
    produced = 0
    done = 0
    while done < len(prompts):
        result = manager.get_result(timeout=600)
        if result is not None and result.is_finished():
            produced += len(result.generated_tokens)
            done += 1
    elapsed = time.perf_counter() - start
    manager.stop(block=True)
    return {"seconds": elapsed, "output_tokens": produced, "output_tok_s": produced / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument(
        "--output-len", type=int, help="every output this long (1: the prompts' prefill alone)"
    )
    parser.add_argument("--moe", action="store_true", help="a mixture of experts of the same shape")
    parser.add_argument("--lora-adapters", type=int, default=0, help="inferd alone, with this many adapters")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--skip-hf-generate", action="store_true")
    parser.add_argument("--skip-hf-continuous", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    prompts, output_lens = workload(args.num_prompts, args.min_len, args.max_len)
    if args.output_len is not None:
        output_lens = [args.output_len] * len(prompts)
    print(f"{len(prompts)} prompts, {sum(map(len, prompts))} prompt tokens, {sum(output_lens)} output tokens")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_model(folder, moe=args.moe)
        if args.lora_adapters:
            adapters = build_lora_adapters(folder, args.lora_adapters, args.lora_rank)
            label = f"inferd, {args.lora_adapters} LoRA adapters of rank {args.lora_rank}"
            runs = [(label, functools.partial(run_inferd, adapters=adapters))]
        else:
            runs = [("inferd", run_inferd)]
        if not args.skip_hf_generate and not args.lora_adapters:
            runs.append(("transformers generate (batched)", run_hf_generate))
        if not args.skip_hf_continuous and not args.lora_adapters:
            runs.append(("transformers generate_batch (continuous)", run_hf_continuous))
        for name, run in runs:
            print(f"running {name} ...", flush=True)
            results[name] = run(folder, prompts, output_lens)
            print(
                f"  {results[name]['output_tok_s']:.1f} output tok/s ({results[name]['seconds']:.1f} s)",
                flush=True,
            )

    peers = [v["output_tok_s"] for k, v in results.items() if k.startswith("transformers")]
    best_peer = max(peers, default=None)
    print("\n| engine | seconds | output tokens | output tok/s |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['output_tokens']:.0f} | {r['output_tok_s']:.1f} |")
    if best_peer:
        print(f"\ninferd / best transformers: {results['inferd']['output_tok_s'] / best_peer:.2f}x")
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "num_prompts": args.num_prompts,
        "model": "Qwen3MoeForCausalLM" if args.moe else "LlamaForCausalLM",
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
