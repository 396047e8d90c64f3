"""inferd's model path against Hugging Face transformers on the same random weights."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from tiny_models import greedy_continuations

from inferd import LLM, SamplingParams
from inferd.engine.request import Request
from inferd.sched.output import SchedulerOutput

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2-moe", "qwen3-moe", "mistral-sliding",
         "qwen2-sliding", "gemma", "gemma2", "gemma3", "granite", "smollm3", "olmo2", "olmo3", "ministral",
         "seed-oss", "exaone4"]  # fmt: skip


def _prompts(vocab: int, count: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Shared heads make prefix caching matter; varied lengths make the batch ragged.
    shared = [rng.randrange(5, vocab) for _ in range(24)]
    prompts = []
    for i in range(count):
        length = rng.randint(3, 60)
        head = shared[: rng.randint(0, 24)] if i % 2 else []
        prompts.append((head + [rng.randrange(5, vocab) for _ in range(length)])[:70])
    return prompts


def _hf_greedy(folder, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return greedy_continuations(model, prompts, max_new_tokens)


@pytest.mark.parametrize(
    "arch",
    [
        *ARCHS,
        "qwen2-yarn",
        "qwen3-yarn-mscale",
        "llama-linear",
        "llama-attention-bias",
        "mistral-attention-bias",
    ],  # fmt: skip
)
def test_logits_match_transformers(tiny_model_factory, arch: str) -> None:
    folder = tiny_model_factory(arch)
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8)
    engine = llm.engine
    prompt = _prompts(engine.config.model.vocab_size, count=1, seed=1)[0]
    request = Request("r", prompt, SamplingParams(max_tokens=1), frozenset(), 1)
    engine.core.add_request(request)
    sched_out: SchedulerOutput = engine.core.scheduler.schedule()
    ours = engine.core.runner.logits_for(sched_out)

    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_each_architecture_reads_attention_bias_as_transformers_builds_it() -> None:
    """q/k/v and o_proj biases per architecture, classifiers as their causal LM: the families
    whose transformers class ignores ``attention_bias`` ignore it here too, and Qwen2's q/k/v biases
    come without an o_proj one."""
    from inferd.config import ModelConfig

    def biases(architecture: str, **fields: object) -> tuple[bool, bool]:
        cfg = {"architectures": [architecture], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 2, **fields}  # fmt: skip
        model = ModelConfig.from_hf_config(cfg)
        return model.attention_bias, model.o_proj_bias

    for family in ("Llama", "Qwen3", "Granite", "SmolLM3", "Gemma"):
        assert biases(f"{family}ForCausalLM", attention_bias=True) == (True, True), family
        assert biases(f"{family}ForCausalLM") == (False, False), family
    for family in ("Mistral", "Ministral", "Phi3"):
        assert biases(f"{family}ForCausalLM", attention_bias=True) == (False, False), family
    # Seed-OSS: q/k/v biased unless said otherwise, o_proj as its own field says.
    assert biases("SeedOssForCausalLM") == (True, False)
    assert biases("SeedOssForCausalLM", attention_bias=False, attention_out_bias=True) == (False, True)
    experts = {"num_local_experts": 4, "num_experts_per_tok": 2}
    assert biases("MixtralForCausalLM", attention_bias=True, **experts) == (False, False)
    assert biases("Qwen2ForCausalLM", attention_bias=True) == (True, False)
    assert biases("Qwen2ForSequenceClassification") == (True, False)
    moe = {"num_experts": 4, "moe_intermediate_size": 12, "num_experts_per_tok": 2}
    assert biases("Qwen2MoeForSequenceClassification", qkv_bias=False, **moe) == (False, False)
    assert biases("LlamaForSequenceClassification", attention_bias=True) == (True, True)


ENGINE_VARIANTS = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "small-chunks": {"max_num_batched_tokens": 7},
    "tiny-pool-preempts": {"num_kv_blocks": 24, "block_size": 4, "max_model_len": 96},
    # Asynchronous scheduling (a GPU's default) forced on: tokens fed from the device, one step late.
    "async": {"async_scheduling": True},
    "async-small-chunks": {"async_scheduling": True, "max_num_batched_tokens": 7},
    "async-tiny-pool-preempts": {
        "async_scheduling": True,
        "num_kv_blocks": 24,
        "block_size": 4,
        "max_model_len": 96,
    },
}


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_matches_transformers_alone(tiny_model_factory, arch: str) -> None:
    folder = tiny_model_factory(arch)
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8)
    prompts = _prompts(llm.engine.config.model.vocab_size)
    expected = _hf_greedy(folder, prompts, max_new_tokens=12)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    assert [o.token_ids for o in outputs] == expected


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_engine_variants_give_same_greedy_outputs(tiny_model_factory, variant: str) -> None:
    folder = tiny_model_factory("qwen3")
    options = {"kv_cache_memory": "16MiB", **ENGINE_VARIANTS[variant]}
    llm = LLM(folder, **options)
    prompts = _prompts(llm.engine.config.model.vocab_size)
    expected = _hf_greedy(folder, prompts, max_new_tokens=12)
    # Run twice: the second pass hits the prefix cache when it is on.
    for _ in range(2):
        outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
        assert [o.token_ids for o in outputs] == expected
    stats = llm.engine.stats()
    if variant.endswith("tiny-pool-preempts"):
        assert stats.num_preemptions > 0
    if variant in ("default", "async"):
        assert stats.prefix_hits > 0
    if variant == "no-prefix-cache":
        assert stats.prefix_hits == 0
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv_usage == 0.0


PROMPT_LOGPROB_VARIANTS = {
    "whole": {},
    # The prompt in chunks of 7 tokens, each chunk's positions scored in its own step.
    "chunked": {"max_num_batched_tokens": 7},
    "async-chunked": {"async_scheduling": True, "max_num_batched_tokens": 9},
}


@pytest.mark.parametrize("variant", list(PROMPT_LOGPROB_VARIANTS))
def test_prompt_logprobs_match_transformers(tiny_model_factory, variant: str, monkeypatch) -> None:
    """Each prompt token's log-probability given the ones before it, and its top alternatives; the
    same prompt twice is scored twice in full (never served from the prefix cache)."""
    from inferd.worker import model_runner

    monkeypatch.setattr(model_runner, "_SCORE_ROWS", 5)  # a chunk's rows scored in several slices
    folder = tiny_model_factory("qwen3")
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8, **PROMPT_LOGPROB_VARIANTS[variant])
    prompt = _prompts(llm.engine.config.model.vocab_size, count=1, seed=3)[0]
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    outputs = llm.generate([prompt, prompt], params)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for out in outputs:
        scored = out.prompt_logprobs
        assert scored is not None and len(scored) == len(prompt) and scored[0] is None
        for position in range(1, len(prompt)):
            entry, row = scored[position], expected[position - 1]
            assert entry is not None and entry.token_id == prompt[position]
            assert abs(entry.logprob - row[prompt[position]].item()) < 1e-4
            assert [token for token, _ in entry.top] == row.topk(3).indices.tolist()
            # The rank: how many tokens are at least as likely (a random model's rows have no ties
            # near the prompt token's value, so the reference's count is the same).
            assert entry.rank == int((row >= row[prompt[position]]).sum())


def test_a_one_token_prompt_scores_as_one_entry_with_nothing_before_it(tiny_model_factory) -> None:
    llm = LLM(tiny_model_factory("qwen3"), kv_cache_memory="16MiB")
    out = llm.generate([[7]], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None]


def test_a_reused_id_does_not_take_the_aborted_requests_prompt_scores(tiny_model_factory) -> None:
    """With a step in flight, an aborted request's scores come back after a new request took its id."""
    from inferd.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_options(
        tiny_model_factory("qwen3"), kv_cache_memory="16MiB", block_size=8, async_scheduling=True
    )
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1)
    engine.add_request("x", list(range(5, 45)), params)
    engine.step()  # launches the 40-token prompt; its results are still unread
    engine.abort(["x"])
    short = [11, 12, 13, 14, 15]
    engine.add_request("x", short, params)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    scored = [out for out in outputs if out.request_id == "x"][-1].prompt_logprobs
    assert scored is not None and [None if e is None else e.token_id for e in scored] == [None, *short[1:]]


def test_sliding_layers_follow_each_architectures_fields() -> None:
    """As transformers builds the layers: Mistral-style models slide in every layer; Qwen's from
    max_window_layers on unless their layer_types say otherwise, and only with use_sliding_window."""
    from inferd.config import ModelConfig

    base = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 2, "sliding_window": 8}  # fmt: skip
    mistral = ModelConfig.from_hf_config({**base, "architectures": ["MistralForCausalLM"]})
    assert mistral.layer_windows == (8, 8, 8, 8) and mistral.max_position_embeddings > 8
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "max_window_layers": 3}
    assert ModelConfig.from_hf_config(qwen).layer_windows == (0, 0, 0, 8)
    types = ["sliding_attention", "full_attention"] * 2
    assert ModelConfig.from_hf_config({**qwen, "layer_types": types}).layer_windows == (8, 0, 8, 0)
    assert ModelConfig.from_hf_config({**qwen, "use_sliding_window": False}).layer_windows == ()
    llama = ModelConfig.from_hf_config(
        {**base, "architectures": ["LlamaForCausalLM"], "sliding_window": None}
    )
    assert llama.layer_windows == ()


def test_gemma3_configs_of_either_transformers_generation_read_alike() -> None:
    """Older hub configs give the sliding layers' rotary base as rope_local_base_freq and the
    layout as sliding_window_pattern; transformers 5 nests both in rope_parameters and layer_types."""
    from inferd.config import ModelConfig

    base = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 6, "num_attention_heads": 2, "head_dim": 8,
            "sliding_window": 4,
            "hidden_activation": "gelu_pytorch_tanh"}  # fmt: skip
    old = ModelConfig.from_hf_config({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                      "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                                      "sliding_window_pattern": 3})  # fmt: skip
    new = ModelConfig.from_hf_config({**base, "layer_types": ["sliding_attention", "sliding_attention",
        "full_attention"] * 2, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})  # fmt: skip
    assert old.layer_windows == new.layer_windows == (4, 4, 0, 4, 4, 0)
    assert old.rope == new.rope and old.rope.rope_type == "linear" and old.rope.factor == 8.0
    assert old.gemma == new.gemma and new.sliding_rope == old.sliding_rope
    assert new.sliding_rope is not None and new.sliding_rope.theta == 1e4
    capped = ModelConfig.from_hf_config({**base, "attn_logit_softcapping": 50.0}).gemma
    assert (
        capped is not None
        and capped.attn_logit_softcapping == 50.0
        and new.gemma.attn_logit_softcapping is None
    )
    with pytest.raises(ValueError, match="attn_logit_softcapping must be positive"):
        ModelConfig.from_hf_config({**base, "attn_logit_softcapping": 0})
    with pytest.raises(ValueError, match="hidden_act 'silu' is not supported"):
        ModelConfig.from_hf_config({**base, "hidden_activation": "silu"})


def test_gemma2_and_gemma1_configs_as_the_hub_ships_them() -> None:
    """Gemma 2's hub configs (transformers 4) have no layer_types: every other layer slides, the
    first among them; its caps and window take transformers' defaults where a config is silent.
    Gemma 1 names its activation by the legacy "gelu", which transformers reads as GELU-tanh."""
    from inferd.config import ModelConfig

    shape = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}  # fmt: skip
    gemma2 = {**shape, "architectures": ["Gemma2ForCausalLM"], "hidden_act": "gelu_pytorch_tanh",
              "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 144, "rope_theta": 10000.0,
              "cache_implementation": "hybrid"}  # fmt: skip
    config = ModelConfig.from_hf_config(gemma2)
    assert config.layer_windows == (4096, 0, 4096, 0)
    assert config.tie_word_embeddings and not config.qk_norm
    assert config.gemma is not None and config.gemma.sandwich_norms
    assert (config.gemma.attn_logit_softcapping, config.gemma.final_logit_softcapping) == (50.0, 30.0)
    assert config.gemma.query_pre_attn_scalar == 144 and config.sliding_rope is None
    uncapped = ModelConfig.from_hf_config({**gemma2, "attn_logit_softcapping": None, "sliding_window": 64,
                                           "final_logit_softcapping": None}).gemma  # fmt: skip
    assert (
        uncapped is not None and uncapped.attn_logit_softcapping is uncapped.final_logit_softcapping is None
    )

    gemma1 = {**shape, "architectures": ["GemmaForCausalLM"], "hidden_act": "gelu"}
    config = ModelConfig.from_hf_config(gemma1)
    assert config.layer_windows == () and config.gemma is not None and not config.gemma.sandwich_norms
    assert config.gemma.query_pre_attn_scalar == 8 and config.gemma.attn_logit_softcapping is None
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        ModelConfig.from_hf_config({**gemma1, "hidden_act": "relu"})


def test_smollm3_configs_as_the_hub_ships_them() -> None:
    """Every fourth layer without the rotary unless no_rope_layers says which; embeddings tied
    unless said otherwise; a window only with use_sliding_window, and then on the NoPE layers."""
    from inferd.config import ModelConfig

    base = {"architectures": ["SmolLM3ForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 8, "num_attention_heads": 2}  # fmt: skip
    config = ModelConfig.from_hf_config({**base, "sliding_window": 64})
    assert config.layer_rope == (True, True, True, False) * 2 and config.layer_windows == ()
    assert config.tie_word_embeddings
    fields = {"use_sliding_window": True, "sliding_window": 64, "no_rope_layers": [1, 0] * 4,
              "tie_word_embeddings": False}  # fmt: skip
    sliding = ModelConfig.from_hf_config({**base, **fields})
    assert sliding.layer_rope == (True, False) * 4 and sliding.layer_windows == (0, 64) * 4
    assert not sliding.tie_word_embeddings
    with pytest.raises(ValueError, match="no_rope_layers"):
        ModelConfig.from_hf_config({**base, "no_rope_layers": [1, 0]})
    longer = ModelConfig.from_hf_config({**base, "no_rope_layers": [1, 0, 0, 1] * 3})  # the first 8 count
    assert longer.layer_rope == (True, False, False, True) * 2
    assert config.rope.theta == 2_000_000.0  # transformers' default for SmolLM3


def test_olmo_configs_as_the_hub_ships_them() -> None:
    """OLMo 3's transformers-4 configs: no layer_types (every fourth layer full), ``rope_theta``
    and a ``rope_scaling`` that only the full layers take, the sliding ones rotating plainly, as
    transformers 5 reads them. OLMo 2 reads no window. Neither splits over tensor-parallel ranks:
    their q and k norms span every head."""
    from inferd.config import ModelConfig, RopeConfig

    shape = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 8,
             "num_attention_heads": 2, "rope_theta": 500000.0, "max_position_embeddings": 65536}  # fmt: skip
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
            "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1}  # fmt: skip
    hub = {**shape, "architectures": ["Olmo3ForCausalLM"], "sliding_window": 4096, "rope_scaling": yarn}
    config = ModelConfig.from_hf_config(hub)
    reference = transformers.Olmo3Config(**{k: v for k, v in hub.items() if k != "architectures"})
    theirs = tuple(4096 if kind == "sliding_attention" else 0 for kind in reference.layer_types)
    assert config.layer_windows == theirs == (4096, 4096, 4096, 0) * 2
    full, sliding = (
        reference.rope_parameters["full_attention"],
        reference.rope_parameters["sliding_attention"],
    )
    assert (config.rope.rope_type, config.rope.factor, config.rope.theta) == (
        full["rope_type"],
        8.0,
        500000.0,
    )
    assert config.rope.attention_factor == full["attention_factor"]
    assert config.sliding_rope == RopeConfig(theta=sliding["rope_theta"], rope_type=sliding["rope_type"],
                                             original_max_position_embeddings=65536)  # fmt: skip
    assert ModelConfig.from_hf_config({**shape, "architectures": ["Olmo2ForCausalLM"],
                                       "sliding_window": 64}).layer_windows == ()  # fmt: skip
    with pytest.raises(ValueError, match="tensor parallelism over OLMo and EXAONE 4 is not supported"):
        config.sharded(2)


def test_exaone4_configs_as_the_hub_ships_them() -> None:
    """EXAONE 4's layers slide by sliding_window_pattern where layer_types are not given: a number
    (every n-th layer global, as transformers fills them in) or the hub's letters ("LLLG"); its
    global layers attend without the rotary only beside sliding ones."""
    from inferd.config import ModelConfig

    shape = {"architectures": ["Exaone4ForCausalLM"], "vocab_size": 32, "hidden_size": 16,
             "intermediate_size": 32, "num_hidden_layers": 8, "num_attention_heads": 2,
             "head_dim": 8}  # fmt: skip
    numbered = ModelConfig.from_hf_config({**shape, "sliding_window": 64, "sliding_window_pattern": 4})
    reference = transformers.Exaone4Config(**{k: v for k, v in shape.items() if k != "architectures"},
                                           sliding_window=64, sliding_window_pattern=4)  # fmt: skip
    assert numbered.layer_windows == tuple(
        64 if t == "sliding_attention" else 0 for t in reference.layer_types
    )
    lettered = ModelConfig.from_hf_config({**shape, "sliding_window": 64, "sliding_window_pattern": "LLLG"})
    assert lettered.layer_windows == numbered.layer_windows == (64, 64, 64, 0) * 2
    assert lettered.layer_rope == (True, True, True, False) * 2 and lettered.qk_norm
    plain = ModelConfig.from_hf_config({**shape, "sliding_window": None})
    assert plain.layer_windows == () and plain.layer_rope == ()  # no sliding: every layer rotates
    with pytest.raises(ValueError, match="sliding_window_pattern"):
        ModelConfig.from_hf_config({**shape, "sliding_window": 64, "sliding_window_pattern": "LLX"})


def test_olmo_norms_multiply_in_float32_before_the_cast() -> None:
    """OLMo's RMSNorm casts after its weight's product (the Llama family's before): in bfloat16
    the two differ, and only the first gives transformers' values."""
    from inferd.models.olmo import OlmoRMSNorm

    torch.manual_seed(0)
    ours, theirs = OlmoRMSNorm(64, 1e-6), transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm(64, 1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64))
        theirs.weight.copy_(ours.weight)
    x = torch.randn(8, 64).to(torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))


def test_a_gemma3_folder_as_the_hub_ships_it_loads_and_matches(tiny_model_factory, tmp_path) -> None:
    """The hub's Gemma 3 configs (written by transformers 4) leave tie_word_embeddings out (tied by
    default) and give the rotary and layout as rope_theta, rope_local_base_freq, rope_scaling and
    sliding_window_pattern: the same model as the test folder's transformers-5 config."""
    import json
    import shutil

    source = tiny_model_factory("gemma3")
    folder = tmp_path / "hub"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("tie_word_embeddings", "layer_types", "rope_parameters"):
        config.pop(key, None)
    config.update({"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window_pattern": 2,
                   "rope_scaling": {"rope_type": "linear", "factor": 4.0}})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    prompt = _prompts(400, count=1, seed=4)[0]
    logits = []
    for path in (source, folder):
        engine = LLM(path, kv_cache_memory="16MiB", block_size=8).engine
        engine.core.add_request(Request("r", prompt, SamplingParams(max_tokens=1), frozenset(), 1))
        logits.append(engine.core.runner.logits_for(engine.core.scheduler.schedule()))
    torch.testing.assert_close(logits[1], logits[0])


def test_qwen_mixtures_of_experts_slide_as_transformers_builds_them() -> None:
    from inferd.config import ModelConfig

    base = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 2, "sliding_window": 8, "use_sliding_window": True, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8}  # fmt: skip
    assert (
        ModelConfig.from_hf_config({**base, "architectures": ["Qwen3MoeForCausalLM"]}).layer_windows
        == (8,) * 4
    )
    qwen2_moe = {**base, "architectures": ["Qwen2MoeForCausalLM"], "max_window_layers": 3}
    assert ModelConfig.from_hf_config(qwen2_moe).layer_windows == (8, 0, 8, 0)
    # A dense Qwen config without max_window_layers: transformers' 28, so 4 layers all full.
    dense = {**base, "architectures": ["Qwen2ForCausalLM"]}
    assert ModelConfig.from_hf_config(dense).layer_windows == (0, 0, 0, 0)


def test_attention_biases_without_output_biases_load_as_transformers_loads_them(
    tiny_model_factory, tmp_path
) -> None:
    """A Llama-architecture checkpoint with q/k/v biases and none on o_proj (Qwen models converted
    to Llama's architecture): o_proj's biases are 0, as transformers makes them; one that only
    some layers lack is still refused."""
    from tiny_models import copy_with_tensors

    from inferd.config import ModelLoadError

    source = tiny_model_factory("llama-attention-bias")

    def without_output_biases(tensors: dict[str, torch.Tensor]) -> None:
        for name in [name for name in tensors if name.endswith("o_proj.bias")]:
            del tensors[name]

    folder = copy_with_tensors(source, tmp_path / "m", without_output_biases)
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=8)
    prompt = _prompts(llm.engine.config.model.vocab_size, count=1, seed=2)[0]
    request = Request("r", prompt, SamplingParams(max_tokens=1), frozenset(), 1)
    llm.engine.core.add_request(request)
    ours = llm.engine.core.runner.logits_for(llm.engine.core.scheduler.schedule())
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = reference(torch.tensor([prompt])).logits[0].float()
    assert (ours - theirs).abs().max().item() < 1e-4
    one_layer = copy_with_tensors(
        source, tmp_path / "one", lambda tensors: tensors.pop("model.layers.1.self_attn.o_proj.bias")
    )
    with pytest.raises(ModelLoadError, match="lacks tensors: model.layers.1.self_attn.o_proj.bias"):
        LLM(one_layer, kv_cache_memory="16MiB")


SLIDING_VARIANTS = {
    "default": {},
    "small-chunks": {"max_num_batched_tokens": 7},
    "async-small-chunks": {"async_scheduling": True, "max_num_batched_tokens": 9},
    "tiny-pool-preempts": {"num_kv_blocks": 24, "max_model_len": 96},
    "ngram-speculation": {"speculative_config": {"num_speculative_tokens": 3, "prompt_lookup_min": 1}},
}


@pytest.mark.parametrize("variant", list(SLIDING_VARIANTS))
def test_a_sliding_window_model_gives_back_blocks_out_of_the_window(
    tiny_model_factory, variant: str, monkeypatch
) -> None:
    """Every layer of mistral-sliding sees its last 12 positions: blocks behind that go back to the
    pool as requests advance (to be taken by others, their old ids still in the tables), and the
    outputs stay transformers' whatever the chunking, scheduling, preemption or guessing."""
    from inferd.kv.manager import KVCacheManager

    held: list[int] = []
    release = KVCacheManager.release_out_of_window

    def recorded_release(self: KVCacheManager, request_id: str, next_position: int) -> int:
        released = release(self, request_id, next_position)
        held.append(self.num_held(request_id))
        return released

    monkeypatch.setattr(KVCacheManager, "release_out_of_window", recorded_release)
    folder = tiny_model_factory("mistral-sliding")
    # A pool small enough that blocks given back are soon taken by other requests.
    options = {"num_kv_blocks": 48, "max_model_len": 96, **SLIDING_VARIANTS[variant]}
    llm = LLM(folder, kv_cache_memory="16MiB", block_size=4, **options)
    assert llm.engine.core.kv.window == 12
    prompts = _prompts(llm.engine.config.model.vocab_size)
    expected = _hf_greedy(folder, prompts, max_new_tokens=20)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
    assert [o.token_ids for o in outputs] == expected
    # After each step a request holds the window's blocks and those of its next positions: at most
    # 12 keys over 4 blocks, plus a step's chunk of up to 70 prompt tokens (or 4 guessed ones).
    assert held and max(held[-len(prompts) :]) <= 5 and max(held) <= -(-(12 + 70) // 4) + 1
    stats = llm.engine.stats()
    assert stats.kv_usage == 0.0 and stats.num_running == 0


def test_giving_back_out_of_window_blocks_spares_preemptions(tiny_model_factory, monkeypatch) -> None:
    """Four 64-token prompts and 30 tokens each in a pool of 40 blocks of 4: holding every block,
    they cannot all run at once (94 tokens need 24 blocks each); holding a window's, they can."""
    from inferd.engine import core

    folder = tiny_model_factory("mistral-sliding")
    options = {"kv_cache_memory": "16MiB", "block_size": 4, "num_kv_blocks": 40, "max_model_len": 96}
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 200) for _ in range(64)] for _ in range(4)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    expected = _hf_greedy(folder, prompts, max_new_tokens=30)
    windowed = LLM(folder, **options)
    assert [o.token_ids for o in windowed.generate(prompts, params)] == expected
    assert windowed.engine.stats().num_preemptions == 0
    monkeypatch.setattr(core, "kv_window", lambda layer_windows: 0)
    holding = LLM(folder, **options)
    assert [o.token_ids for o in holding.generate(prompts, params)] == expected
    assert holding.engine.stats().num_preemptions > 0


@pytest.mark.timeout(300)  # a request that could never hold its blocks would be readmitted forever
def test_a_sliding_window_model_runs_contexts_longer_than_its_pool(tiny_model_factory) -> None:
    """Every layer sees 12 positions and a step runs at most 8 tokens: a request holds at most
    (12 + 8 - 2) // 4 + 2 = 6 blocks of 4 at once, so a pool of 6 (24 tokens) runs 90-token
    contexts, as transformers computes them. A model without windows needs its whole context."""
    folder = tiny_model_factory("mistral-sliding")
    options = {"kv_cache_memory": "16MiB", "block_size": 4, "max_model_len": 96, "max_num_batched_tokens": 8}
    llm = LLM(folder, num_kv_blocks=6, **options)
    rng = random.Random(7)
    prompts = [[rng.randrange(5, 200) for _ in range(60)] for _ in range(2)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, params)] == _hf_greedy(folder, prompts, 30)
    # A later turn that extends a cached one: its prefix hits go back at once where the window
    # leaves them behind, so they never need more blocks than the pool has.
    first = prompts[0][:22]
    llm.generate([first], SamplingParams(max_tokens=1))
    extended = [first[:20] + prompts[1][:30]]
    outputs = llm.generate(extended, params)
    assert [o.token_ids for o in outputs] == _hf_greedy(folder, extended, 30)
    assert outputs[0].metrics.num_cached_tokens > 0
    with pytest.raises(ValueError, match=r"num_kv_blocks 5 of 4 tokens are fewer than .* at once \(6\)"):
        LLM(folder, num_kv_blocks=5, **options)
    with pytest.raises(ValueError, match=r"num_kv_blocks 23 of 4 tokens are fewer than .* at once \(24\)"):
        LLM(tiny_model_factory("qwen3"), num_kv_blocks=23, **options)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_sliding_window_model_reuses_a_turn_whose_head_was_evicted(
    tiny_model_factory, async_scheduling: bool
) -> None:
    """Two 40-token prompts and 30 tokens each in a pool of 30 blocks of 4: each request's head goes
    back behind the window of 12 as it runs, and the other's new blocks evict it. The next turn
    (the first conversation and 8 new tokens) still finds the 68 tokens whose last blocks (those its
    first query sees) are cached, as vLLM's sliding-window lookup does, and answers as
    transformers."""
    folder = tiny_model_factory("mistral-sliding")
    llm = LLM(
        folder,
        kv_cache_memory="16MiB",
        block_size=4,
        num_kv_blocks=30,
        max_model_len=128,
        max_num_batched_tokens=16,
        async_scheduling=async_scheduling,
    )
    rng = random.Random(3)
    first, second = ([rng.randrange(5, 200) for _ in range(40)] for _ in range(2))
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    answers = llm.generate([first, second], params)
    turn = first + list(answers[0].token_ids) + [rng.randrange(5, 200) for _ in range(8)]
    outputs = llm.generate([turn], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert outputs[0].metrics.num_cached_tokens == 68
    assert [o.token_ids for o in outputs] == _hf_greedy(folder, [turn], 10)
    assert llm.engine.stats().kv_usage == 0.0


@pytest.mark.parametrize(("arch", "family"), [("olmo2", "OLMo"), ("gemma", "Gemma")])
def test_models_with_their_own_norms_refuse_the_kernels_of_llamas(tiny_model_factory, arch, family) -> None:
    """The fused-input matmul and the decode-rotary attention compute the Llama family's norm and
    rotary: a model with its own would run them, wrongly, without a word."""
    with pytest.raises(ValueError, match=f"{family} computes its own norms and rotary"):
        LLM(tiny_model_factory(arch), kv_cache_memory="4MiB", triton_linear=True, triton_fused_linear=True)
