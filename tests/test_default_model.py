"""The built-in model: inferd and transformers agree on it, and it is the default everywhere."""

from __future__ import annotations

import torch
import transformers

from inferd import LLM, SamplingParams
from inferd.engine.builder import default_model_path


def test_default_model_greedy_text_matches_transformers() -> None:
    llm = LLM()  # no path: the built-in model
    assert llm.engine.config.model_path == default_model_path()
    prompts = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "To be, or not to be"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0))

    folder = default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == out.prompt_token_ids
        with torch.inference_mode():
            generated = model.generate(ids, max_new_tokens=40, do_sample=False)
        expected_ids = generated[0, ids.shape[1] :].tolist()
        assert out.token_ids == expected_ids
        assert out.text == tokenizer.decode(expected_ids, skip_special_tokens=True)


def test_default_model_writes_english_words() -> None:
    out = LLM().generate(["ROMEO:"], SamplingParams(max_tokens=60, temperature=0.8, seed=0))[0]
    words = [w.strip(".,;:!?'\"").lower() for w in out.text.split()]
    common = {"the", "and", "i", "to", "of", "my", "you", "a", "that", "in", "is", "not", "me", "it", "with"}
    assert sum(w in common for w in words) >= 5, out.text
