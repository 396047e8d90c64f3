"""Train inferd's built-in default model: a small Llama on Tiny Shakespeare, on the CPU.

Steps: train a byte-level BPE tokenizer, train a `LlamaForCausalLM` from scratch under a wall-clock
budget, save a standard Hugging Face folder to `src/inferd/data/default_model/`, then load that folder
back with `transformers` to write samples and the numbers into `docs/default-model.md`.

    python scripts/train_default_model.py --threads 1 --max-minutes 30
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUTPUT = REPO_ROOT / "src" / "inferd" / "data" / "default_model"
DEFAULT_DOC = REPO_ROOT / "docs" / "default-model.md"

SPECIAL_TOKEN = "<|endoftext|>"
SAMPLE_PROMPT = "ROMEO:"
# Play-script chat format: every message becomes a speaker block, as in the training text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation knobs; the model shape lives in the LlamaConfig."""

    batch_size: int
    context: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    eval_interval: int
    budget_s: float


@dataclass
class TrainResult:
    steps: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = math.inf
    best_step: int = 0
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train, val)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="training text file")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Hugging Face folder to write")
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="markdown report to write")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock budget for the whole run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-interval", type=int, default=100, help="steps between validation passes")
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args(argv)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every string round-trips, whatever its script, with no unknown token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """Split by position, so validation is unseen continuous text (the end of the file)."""
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)


def build_config(args: argparse.Namespace, special_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
    )


def random_batch(
    ids: torch.Tensor, batch_size: int, context: int, generator: torch.Generator
) -> torch.Tensor:
    """`batch_size` windows of `context + 1` tokens: inputs are [:-1], targets [1:]."""
    starts = torch.randint(0, len(ids) - context - 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + context + 1] for s in starts.tolist()])


def next_token_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model: LlamaForCausalLM, ids: torch.Tensor, context: int, batch_size: int) -> float:
    """Mean loss per token over the whole validation split, in non-overlapping windows."""
    model.eval()
    count = (len(ids) - 1) // context
    windows = torch.stack([ids[i * context : i * context + context + 1] for i in range(count)])
    total = 0.0
    for chunk in windows.split(batch_size):
        total += next_token_loss(model, chunk).item() * chunk.size(0)
    model.train()
    return total / count


def learning_rate(step: int, elapsed_fraction: float, settings: TrainSettings) -> float:
    """Linear warmup by steps, then cosine decay over *time*: the number of steps that fit the
    wall-clock budget is unknown up front, and this way the decay always ends when the budget does."""
    if step < settings.warmup_steps:
        return settings.peak_lr * (step + 1) / settings.warmup_steps
    progress = min(1.0, elapsed_fraction)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.min_lr + (settings.peak_lr - settings.min_lr) * cosine


def make_optimizer(model: LlamaForCausalLM, settings: TrainSettings) -> torch.optim.AdamW:
    # Decay matrices only; norms' gains stay free, as is usual for transformers.
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    free = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": settings.weight_decay},
        {"params": free, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.peak_lr, betas=(0.9, 0.95), eps=1e-8)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(max(0.0, seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def train(
    model: LlamaForCausalLM,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
) -> TrainResult:
    """Train until the budget runs out; leave the model holding its best-validation weights."""
    optimizer = make_optimizer(model, settings)
    result = TrainResult()
    best_state = copy.deepcopy(model.state_dict())
    start = time.monotonic()
    window_start, window_tokens, running_loss = start, 0, 0.0
    # Time kept back for the last validation pass; refined after the first pass is timed.
    eval_reserve = 30.0
    model.train()
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= settings.budget_s - eval_reserve:
            break
        lr = learning_rate(result.steps, elapsed / (settings.budget_s - eval_reserve), settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        windows = random_batch(train_ids, settings.batch_size, settings.context, generator)
        loss = next_token_loss(model, windows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        result.steps += 1
        result.tokens_seen += windows.size(0) * settings.context
        window_tokens += windows.size(0) * settings.context
        running_loss = loss.item() if result.steps == 1 else 0.9 * running_loss + 0.1 * loss.item()
        if result.steps % 10 == 0:
            now = time.monotonic()
            rate = window_tokens / (now - window_start)
            remaining = settings.budget_s - (now - start)
            print(
                f"step {result.steps:5d} | train loss {running_loss:.4f} | lr {lr:.2e} | "
                f"{rate:,.0f} tok/s | elapsed {format_duration(now - start)} | "
                f"ETA {format_duration(remaining)}",
                flush=True,
            )
            window_start, window_tokens = now, 0
        if result.steps % settings.eval_interval == 0:
            eval_start = time.monotonic()
            val = validation_loss(model, val_ids, settings.context, settings.batch_size * 2)
            eval_reserve = 2.0 * (time.monotonic() - eval_start) + 10.0
            result.history.append((result.steps, running_loss, val))
            if val < result.best_val_loss:
                result.best_val_loss, result.best_step = val, result.steps
                best_state = copy.deepcopy(model.state_dict())
            best = result.best_val_loss
            print(f"step {result.steps:5d} | val loss {val:.4f} | best {best:.4f}", flush=True)
            window_start = time.monotonic()
    final_val = validation_loss(model, val_ids, settings.context, settings.batch_size * 2)
    result.history.append((result.steps, running_loss, final_val))
    print(f"step {result.steps:5d} | final val loss {final_val:.4f}", flush=True)
    if final_val < result.best_val_loss:
        result.best_val_loss, result.best_step = final_val, result.steps
    else:
        model.load_state_dict(best_state)
    result.train_seconds = time.monotonic() - start
    return result


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_folder(model: LlamaForCausalLM, tokenizer: Tokenizer, output: Path, context: int) -> None:
    """Write config, weights, tokenizer and generation config as a standard Hugging Face folder."""
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    # transformers 5 writes `dtype` and `rope_parameters`; older readers (and other engines) look
    # for the flat `torch_dtype` and `rope_theta` keys, so write both spellings.
    config = json.loads((output / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = "float32"
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    write_json(output / "config.json", config)
    special_id = tokenizer.token_to_id(SPECIAL_TOKEN)
    write_json(
        output / "generation_config.json",
        {"bos_token_id": special_id, "eos_token_id": special_id, "pad_token_id": special_id},
    )
    tokenizer.save(str(output / "tokenizer.json"))
    write_json(
        output / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKEN,
            "eos_token": SPECIAL_TOKEN,
            "pad_token": SPECIAL_TOKEN,
            "model_max_length": context,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(
        output / "special_tokens_map.json",
        {"bos_token": SPECIAL_TOKEN, "eos_token": SPECIAL_TOKEN, "pad_token": SPECIAL_TOKEN},
    )


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def generate_samples(folder: Path, seed: int) -> tuple[str, str]:
    """Greedy and temperature-0.8 continuations of SAMPLE_PROMPT, from the saved folder alone."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    inputs = tokenizer(SAMPLE_PROMPT, return_tensors="pt")
    common = {"max_new_tokens": 120, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        greedy = model.generate(**inputs, do_sample=False, **common)
        torch.manual_seed(seed)
        sampled = model.generate(**inputs, do_sample=True, temperature=0.8, top_k=0, top_p=1.0, **common)
    return (
        tokenizer.decode(greedy[0], skip_special_tokens=True),
        tokenizer.decode(sampled[0], skip_special_tokens=True),
    )


def render_doc(
    args: argparse.Namespace,
    config: LlamaConfig,
    parameters: int,
    token_counts: tuple[int, int],
    result: TrainResult,
    samples: tuple[str, str],
) -> str:
    train_tokens, val_tokens = token_counts
    command = "python scripts/train_default_model.py " + shlex.join(sys.argv[1:])
    history = "\n".join(f"| {step} | {train:.3f} | {val:.3f} |" for step, train, val in result.history)
    rope_theta = config.rope_parameters["rope_theta"]
    return f"""# The built-in default model

`src/inferd/data/default_model/` holds a small Llama-architecture model that inferd trains itself
(`scripts/train_default_model.py`) on Tiny Shakespeare. It is the default model of every command
and a real-weights test fixture: a standard Hugging Face folder that `transformers` loads as is.

## Architecture and size

| | |
|---|---|
| architecture | `LlamaForCausalLM` (RMSNorm, RoPE theta {rope_theta:g}, SwiGLU MLP, tied embeddings) |
| layers | {config.num_hidden_layers} |
| hidden size | {config.hidden_size} |
| attention heads / KV heads | {config.num_attention_heads} / {config.num_key_value_heads} \
(grouped-query, head dim {config.hidden_size // config.num_attention_heads}) |
| MLP intermediate size | {config.intermediate_size} |
| context (`max_position_embeddings`) | {config.max_position_embeddings} |
| vocabulary | {config.vocab_size} byte-level BPE tokens; `<|endoftext|>` (id {config.bos_token_id}) \
is BOS, EOS and PAD |
| parameters | {parameters:,} |
| folder size | {folder_megabytes(args.output):.2f} MB (float32 safetensors + tokenizer) |

The tokenizer does not add BOS by itself (the model was trained on running text without it).
The chat template renders each message as a play-script speech, `ROLE:\\ncontent\\n\\n`, and
`add_generation_prompt` appends `ASSISTANT:\\n`.

## Training

- Data: `tinyshakespeare.txt` split by position, first 90% for training ({train_tokens:,} tokens),
  last 10% for validation ({val_tokens:,} tokens). The tokenizer is trained on the training part only.
- Optimiser: AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak learning
  rate {args.lr:g}, {args.warmup_steps} warmup steps, then cosine decay to {args.min_lr:g} over the
  wall-clock budget; gradient clipping at 1.0; batches of {args.batch_size} random windows of
  {args.context} tokens. The weights kept are those of the best validation pass (step {result.best_step}).
- Command: `{command}`
- Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, \
{args.threads} CPU thread(s).
- Time: {result.train_seconds / 60:.1f} minutes, {result.steps:,} steps, {result.tokens_seen:,} tokens seen
  ({result.tokens_seen / max(1, train_tokens):.1f} epochs).

**Final validation loss: {result.best_val_loss:.3f} nats per token (perplexity \
{math.exp(result.best_val_loss):.1f}).**

| step | train loss (smoothed) | validation loss |
|---|---|---|
{history}

## Samples

Generated with `transformers` from the saved folder, prompt `{SAMPLE_PROMPT}`, 120 new tokens.

Greedy:

```text
{samples[0]}
```

Temperature 0.8 (no top-k/top-p, seed {args.seed}):

```text
{samples[1]}
```
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_start = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_text, val_text = split_text(args.data.read_text(encoding="utf-8"))
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; train {len(train_ids):,} / val {len(val_ids):,}")

    config = build_config(args, tokenizer.token_to_id(SPECIAL_TOKEN))
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {parameters:,} parameters ({parameters * 4 / 1e6:.1f} MB in float32)", flush=True)

    # Keep back time for saving the folder and generating the doc samples.
    budget_s = args.max_minutes * 60 - (time.monotonic() - run_start) - 30.0
    settings = TrainSettings(
        batch_size=args.batch_size,
        context=args.context,
        peak_lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        eval_interval=args.eval_interval,
        budget_s=budget_s,
    )
    result = train(model, train_ids, val_ids, settings, generator)
    print(f"best val loss {result.best_val_loss:.4f} (perplexity {math.exp(result.best_val_loss):.1f})")

    save_folder(model, tokenizer, args.output, args.context)
    samples = generate_samples(args.output, args.seed)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    doc = render_doc(args, config, parameters, (len(train_ids), len(val_ids)), result, samples)
    args.doc.write_text(doc, encoding="utf-8")
    print(f"saved {args.output} ({folder_megabytes(args.output):.2f} MB) and {args.doc}")
    print(f"greedy sample:\n{samples[0]}\n\nsampled (T=0.8):\n{samples[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
