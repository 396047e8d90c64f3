"""The engine flags every engine-building command shares, and the options they become."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from inferd.entrypoints.engine_args import add_engine_args, engine_options


def parse(*flags: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return engine_options(parser.parse_args(list(flags)))


def test_unset_flags_leave_the_engine_defaults() -> None:
    assert parse() == {}


@pytest.mark.parametrize(
    "switch",
    [
        "async-scheduling",
        "triton-ops",
        "triton-linear",
        "triton-fused-linear",
        "triton-tiled-linear",
        "triton-decode-rotary",
        "triton-pdl",
        "triton-sampling",
        "warm-up",
    ],
)
def test_on_off_switches(switch: str) -> None:
    option = switch.replace("-", "_")
    assert parse(f"--{switch}") == {option: True}
    assert parse(f"--no-{switch}") == {option: False}


def test_the_other_flags() -> None:
    options = parse("--enforce-eager", "--no-prefix-caching", "--block-size", "32", "--seed", "7", "-tp", "2",
                    "--quantization", "fp8", "--hf-overrides", '{"method": "x"}',
                    "--fused-sampler", "inverse_cdf", "--long-prefill-token-threshold", "64",
                    "--tokenizer", "/some/folder")  # fmt: skip
    assert options == {"enforce_eager": True, "enable_prefix_caching": False, "block_size": 32, "seed": 7,
                       "tensor_parallel_size": 2, "quantization": "fp8",
                       "hf_overrides": '{"method": "x"}', "fused_sampler": "inverse_cdf",
                       "long_prefill_token_threshold": 64, "tokenizer": "/some/folder"}  # fmt: skip
    assert parse("--enable-prefix-caching") == {}  # the default, said as vLLM's flag says it
    # vLLM's spellings: its negative prefix-caching flag, its dtype names.
    assert parse("--no-enable-prefix-caching") == {"enable_prefix_caching": False}
    assert parse("--dtype", "half") == {"dtype": "half"} and parse("--dtype", "auto") == {"dtype": "auto"}
    with pytest.raises(ValueError, match="contradict"):
        parse("--enable-prefix-caching", "--no-prefix-caching")


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hi", "--block-size", "0"],
        ["generate", "hi", "--max-num-seqs", "-1"],
        ["generate", "hi", "--max-model-len", "0"],
        ["generate", "hi", "--long-prefill-token-threshold", "-1"],
        ["serve", "--port", "99999"],
    ],
)
def test_out_of_range_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from inferd.cli import build_parser

    with pytest.raises(SystemExit) as exited:  # parsing only: nothing is started if a flag passes
        build_parser().parse_args(argv)
    assert exited.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_zero_sizes_are_refused_not_replaced_by_the_defaults(tiny_llama) -> None:
    from inferd.engine.builder import build_engine_config

    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        with pytest.raises(ValueError, match=f"{name} must be at least 1"):
            build_engine_config(tiny_llama, **{name: 0})
    # The long-prefill threshold's 0 is "no limit" (vLLM's); it reaches the scheduler as given.
    assert (
        build_engine_config(tiny_llama, long_prefill_token_threshold=8).scheduler.long_prefill_token_threshold
        == 8
    )
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be at least 0"):
        build_engine_config(tiny_llama, long_prefill_token_threshold=-1)
    for wrong in (0.5, "64", True):  # a KServe model.json may hold any JSON value
        with pytest.raises(ValueError, match="long_prefill_token_threshold must be a whole number"):
            build_engine_config(tiny_llama, long_prefill_token_threshold=wrong)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "--max-tokens", "0"], "max_tokens: must be at least 1"),
        (["generate", "hi", "--kv-cache-memory", "abc"], "cannot read memory size 'abc'"),
        (["serve", "/no/such/folder"], "model folder /no/such/folder does not exist"),
    ],
)
def test_bad_values_end_with_a_message_not_a_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferd.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"inferd: error: {message}" in err and "Traceback" not in err


# A consistent model shape (config.json fields), for one field at a time to break.
SHAPE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON: Expecting property name"),
        ("[1, 2]", "must hold a JSON object, not a list"),
        ('{"architectures": ["LlamaForCausalLM"]}', "has no 'num_attention_heads'"),
        ('{"num_attention_heads": "many", "hidden_size": 64}', "has a field the engine cannot read"),
        ('{"num_attention_heads": 0, "hidden_size": 64}', "num_attention_heads (0) must be at least 1"),
        (
            json.dumps({**SHAPE, "num_key_value_heads": 3}),
            "num_key_value_heads (3) must divide num_attention_heads (4)",
        ),
        (
            json.dumps({**SHAPE, "hidden_size": 66}),
            "hidden_size (66) must be a multiple of num_attention_heads (4)",
        ),
        (
            json.dumps({**SHAPE, "num_hidden_layers": 0, "vocab_size": 0}),
            "vocab_size (0), num_hidden_layers (0) must be",
        ),
        (
            json.dumps({**SHAPE, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
            "rope scaling type 'dynamic' is not supported; supported: default, linear, llama3, yarn",
        ),
        (
            json.dumps({**SHAPE, "rope_scaling": {"rope_type": "yarn"}}),
            "the yarn rope scaling needs a factor",
        ),
        (json.dumps({**SHAPE, "rope_scaling": {"rope_type": "linear", "factor": 0}}), "must be positive"),
        (
            json.dumps({**SHAPE, "rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4}}),
            "needs low_freq_factor < high_freq_factor",
        ),
        (json.dumps({**SHAPE, "hidden_act": "gelu"}), "hidden_act 'gelu' is not supported"),
        (
            json.dumps(
                {
                    **SHAPE,
                    "architectures": ["Phi3ForCausalLM"],
                    "rope_scaling": {"type": "linear", "factor": 2},
                }
            ),
            "Phi-3's rope scaling (linear) is not supported: LongRoPE is not built",
        ),
        (json.dumps({**SHAPE, "partial_rotary_factor": 0.5}), "partial_rotary_factor other than 1"),
        ('{"architectures": [1]}', "'architectures' must be a list of names"),
        ('{"architectures": {}}', "'architectures' must be a list of names"),
        ("[" * 100_000 + "]" * 100_000, "is nested too deeply to read"),
    ],
)
def test_a_malformed_config_json_is_named_in_the_message(
    content: str, message: str, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a KeyError or ValueError traceback from deep in the config parser."""
    from inferd.cli import main

    (tmp_path / "config.json").write_text(content)
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    err = capsys.readouterr().err
    config = tmp_path / "config.json"
    assert f"inferd: error: {config}" in err and message in err
    assert "Traceback" not in err


def test_an_unknown_torch_dtype_in_config_json_is_warned_about(tiny_llama, tmp_path, caplog) -> None:
    """It falls back to the device's default dtype, as before, but no longer silently."""
    import shutil

    from inferd.engine.builder import build_engine_config

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float8"}))
    with caplog.at_level("WARNING"):
        assert build_engine_config(folder, device="cuda").dtype == "bfloat16"
    assert "torch_dtype 'float8' is not one inferd computes in" in caplog.text
    for dtype in ("float32", "auto"):  # the folder's own, and "auto"
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}))
        caplog.clear()
        with caplog.at_level("WARNING"):
            build_engine_config(folder, device="cuda")
        assert "torch_dtype" not in caplog.text


def test_generate_takes_a_structured_output(tiny_llama, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from inferd.cli import main

    common = ["generate", "--model", str(tiny_llama), "--max-tokens", "30", "--kv-cache-memory", "8MiB"]
    assert main([*common, "To be", "--regex", "[0-9]{4}"]) == 0
    assert re.fullmatch(r"To be[0-9]{4}\n", capsys.readouterr().out)
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    )
    assert main([*common, "To be", "--json-schema", f"@{schema}"]) == 0
    assert json.loads(capsys.readouterr().out.removeprefix("To be"))["ok"] in (True, False)
    assert main([*common, "To be", "--choice", "left", "right"]) == 0
    assert capsys.readouterr().out in ("To beleft\n", "To beright\n")
    assert main([*common, "To be", "--regex", "a(b"]) == 2  # a message, not a traceback
    err = capsys.readouterr().err
    assert "inferd: error: structured_output:" in err and "unclosed group" in err and "Traceback" not in err
    # A budget past the context stops there, as the offline API's does.
    past = ["generate", "--model", str(tiny_llama), "--max-tokens", "100000", "--kv-cache-memory", "8MiB"]
    assert main([*past, "To be"]) == 0
    assert re.search(r"finish: (length|stop)", capsys.readouterr().err)


def test_generate_takes_the_penalties_and_min_tokens(tiny_llama, capsys: pytest.CaptureFixture[str]) -> None:
    from inferd import LLM, SamplingParams
    from inferd.cli import main

    common = ["generate", "--model", str(tiny_llama), "--max-tokens", "12", "--kv-cache-memory", "8MiB",
              "--temperature", "0"]  # fmt: skip
    asked = {"repetition_penalty": 3.0, "presence_penalty": 0.5, "frequency_penalty": 0.25, "min_tokens": 12}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in asked.items()]
    assert main([*common, "To be", *flags]) == 0
    printed = capsys.readouterr().out
    llm = LLM(tiny_llama, kv_cache_memory="8MiB")
    (expected,) = llm.generate(["To be"], SamplingParams(max_tokens=12, temperature=0, **asked))
    (plain,) = llm.generate(["To be"], SamplingParams(max_tokens=12, temperature=0))
    assert printed == f"To be{expected.text}\n" and expected.text != plain.text
    assert main([*common, "To be", "--presence-penalty", "3"]) == 2  # a message, not a traceback
    err = capsys.readouterr().err
    assert "inferd: error: presence_penalty" in err and "Traceback" not in err


def test_vllms_dtype_names_resolve_to_ours(tiny_llama) -> None:
    from inferd import LLM

    assert (
        LLM(tiny_llama, dtype="half", device="cpu", kv_cache_memory="4MiB").engine.config.dtype == "float16"
    )
    assert (
        LLM(tiny_llama, dtype="auto", kv_cache_memory="4MiB").engine.config.dtype == "float32"
    )  # on the CPU


@pytest.mark.parametrize("command", [["serve"], ["run-batch", "-i", "in.jsonl", "-o", "out.jsonl"],
                                     ["bench", "offline"]])  # fmt: skip
def test_the_model_folder_is_taken_as_vllms_model_option(command: list[str]) -> None:
    """``--model FOLDER`` as vLLM spells it names the model (argparse's abbreviations read it as
    ``--model-repository`` and served the built-in model), and no abbreviated option is taken."""
    from inferd.cli import _take_model_option, build_parser

    parser = build_parser()
    args = parser.parse_args([*command, "--model", "/models/m"])
    _take_model_option(args, parser)
    assert args.model == "/models/m"
    assert getattr(args, "model_repository", None) is None
    args = parser.parse_args([*command, "/models/m", "--model", "/models/m"])
    _take_model_option(args, parser)
    assert args.model == "/models/m"
    with pytest.raises(SystemExit):
        _take_model_option(parser.parse_args([*command, "/models/a", "--model", "/models/b"]), parser)
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--max-num-se", "4"])
