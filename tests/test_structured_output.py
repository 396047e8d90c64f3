"""Structured outputs in the engine: constraints checked up front, masks applied per row, grammars
advanced by every token, and requests ended when their output is whole."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from inferd import LLM, SamplingParams
from inferd.sampling_params import SamplingParamsError
from inferd.server.errors import InvalidRequestError
from inferd.server.forced_tool_calls import forced_calls
from inferd.server.reasoning import REASONING_FORMATS, prompt_closes_thinking
from inferd.server.structured_request import response_format
from inferd.structured.matcher import GrammarCompiler, apply_bitmask, bitmask_words
from inferd.structured.spec import StructuredOutput, StructuredOutputError

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}
PROMPTS = ["To be, or not", "The quick", "Café", "0123"]


@pytest.fixture(scope="module")
def llm(tiny_model_factory) -> LLM:
    return LLM(tiny_model_factory("qwen3"), kv_cache_memory="32MiB", block_size=8)


def _params(spec: StructuredOutput, **fields: object) -> SamplingParams:
    defaults: dict[str, object] = {"max_tokens": 64, "temperature": 1.0, "seed": 3}
    return SamplingParams(structured_output=spec, **{**defaults, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (StructuredOutput(json=json.dumps({"type": "bogus"})), "bogus"),
        (StructuredOutput(json="[1, 2]"), "must be an object"),
        (
            StructuredOutput(json=json.dumps({"x-guidance": {"whitespace_flexible": "yes"}})),
            "expected a boolean",
        ),
        (StructuredOutput(regex="a(b"), "unclosed group"),
        (StructuredOutput(grammar="start: undefined_rule"), "undefined_rule"),
        (StructuredOutput(grammar="root ::= x{2,1}"), "GBNF"),  # the converter's own errors
        (StructuredOutput(grammar="root ::= [\\"), "GBNF"),
        (StructuredOutput(grammar="root ::= " + "(" * 3000 + '"a"' + ")" * 3000), "GBNF"),
        (StructuredOutput(choice=[]), "non-empty"),
        (StructuredOutput(), "exactly one"),
        (StructuredOutput(regex="a", choice=["a"]), "exactly one"),
    ],
)
def test_a_constraint_that_cannot_compile_is_refused_with_the_reason(
    spec: StructuredOutput, words: str
) -> None:
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(structured_output=spec)
    assert caught.value.field == "structured_output"
    assert words in str(caught.value)


def test_a_grammar_naming_tokens_the_tokenizer_lacks_is_refused_when_queued(llm: LLM) -> None:
    """It compiles without a tokenizer (SamplingParams' check) but not over this one."""
    params = _params(StructuredOutput(grammar='start: "a" <|no_such_token|>'))
    with pytest.raises(ValueError, match="no_such_token"):
        llm.generate(["To be"], params)
    assert llm.generate(["To be"], _params(StructuredOutput(choice=["ok"])))[0].text == "ok"  # still serving


def _accepts(folder: Path, spec: StructuredOutput, text: str) -> bool:
    """Whether the grammar takes ``text``'s tokens whole, to the end."""
    grammar = GrammarCompiler(folder / "tokenizer.json", 4096).matcher_for(spec, frozenset([0]))
    token_ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    return all(grammar.accept(t) is None for t in token_ids) and grammar.complete


def test_objects_with_listed_properties_take_no_others_unless_the_schema_says(tiny_model_factory) -> None:
    folder = tiny_model_factory("qwen3")
    listed = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert _accepts(folder, StructuredOutput(json=json.dumps(listed)), '{"a":1}')
    assert not _accepts(folder, StructuredOutput(json=json.dumps(listed)), '{"a":1,"b":2}')
    nested = {"type": "array", "items": {"anyOf": [listed]}}
    assert not _accepts(folder, StructuredOutput(json=json.dumps(nested)), '[{"a":1,"b":2}]')
    open_ = {**listed, "additionalProperties": True}
    assert _accepts(folder, StructuredOutput(json=json.dumps(open_)), '{"a":1,"b":2}')
    assert _accepts(folder, StructuredOutput(json_object=True), '{"b":2}')
    # Objects others add properties to stay open: allOf branches are merged, and a property listed
    # beside anyOf branches is the branches' too.
    merged = {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}  # fmt: skip
    assert _accepts(folder, StructuredOutput(json=json.dumps(merged)), '{"a":1,"b":2}')
    beside = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "anyOf": [{"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}  # fmt: skip
    assert _accepts(folder, StructuredOutput(json=json.dumps(beside)), '{"a":1,"b":2}')
    # So do definitions others extend: an allOf branch's reference, or one beside properties.
    defs = {"Base": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}}
    extended = {"$defs": defs, "allOf": [{"$ref": "#/$defs/Base"},
                {"properties": {"extra": {"type": "integer"}}, "required": ["extra"]}]}  # fmt: skip
    assert _accepts(folder, StructuredOutput(json=json.dumps(extended)), '{"id":1,"extra":2}')
    beside_ref = {"$defs": defs, "$ref": "#/$defs/Base", "properties": {"a": {"type": "integer"}}}
    assert _accepts(folder, StructuredOutput(json=json.dumps(beside_ref)), '{"id":1,"a":2}')
    plain_ref = {"$defs": defs, "type": "array", "items": {"$ref": "#/$defs/Base"}}
    assert not _accepts(folder, StructuredOutput(json=json.dumps(plain_ref)), '[{"id":1,"b":2}]')
    # Annotations beside a reference (Pydantic writes a field's description there, or wraps the
    # reference in a one-branch allOf) add nothing: its target is still closed.
    noted = {"$defs": defs, "type": "object", "required": ["a", "b"], "properties": {
        "a": {"$ref": "#/$defs/Base", "description": "first"},
        "b": {"allOf": [{"$ref": "#/$defs/Base"}], "default": {"id": 0}}}}  # fmt: skip
    assert _accepts(folder, StructuredOutput(json=json.dumps(noted)), '{"a":{"id":1},"b":{"id":2}}')
    assert not _accepts(folder, StructuredOutput(json=json.dumps(noted)), '{"a":{"id":1,"x":1},"b":{"id":2}}')
    assert not _accepts(folder, StructuredOutput(json=json.dumps(noted)), '{"a":{"id":1},"b":{"id":2,"x":1}}')
    # Compact JSON unless the schema's x-guidance says otherwise.
    spaced = '{ "a": 1 }'
    assert not _accepts(folder, StructuredOutput(json=json.dumps(listed)), spaced)
    flexible = {**listed, "x-guidance": {"whitespace_flexible": True}}
    assert _accepts(folder, StructuredOutput(json=json.dumps(flexible)), spaced)
    # A required name the properties do not list is another property: the object stays open.
    unlisted = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}
    assert _accepts(folder, StructuredOutput(json=json.dumps(unlisted)), '{"a":1,"b":2}')
    # A property named "properties" is a property, not a place where subschemas are listed.
    named = {"type": "object", "properties": {"properties": {"type": "integer"}}, "required": ["properties"]}
    assert _accepts(folder, StructuredOutput(json=json.dumps(named)), '{"properties":5}')


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": float("nan")}}},
         "response_format.json_schema.schema.const"),
        ({"type": "json", "value": {"type": "number", "maximum": float("inf")}},
         "response_format.value.maximum"),
        # A schema given as text: Python's reader takes NaN there too.
        ({"type": "json", "value": '{"enum": [1, NaN]}'}, "response_format.value.enum[1]"),
    ],
)  # fmt: skip
def test_a_schema_with_a_number_json_cannot_hold_is_refused(value: dict[str, Any], where: str) -> None:
    """The schema's text carried NaN on to the compiler, which read it as null: the answer was
    held to {"const": null}, a schema the client never sent."""
    with pytest.raises(InvalidRequestError, match=re.escape(f"{where}: a JSON schema cannot hold NaN")):
        response_format(value)


def test_a_schema_given_offline_with_a_number_json_cannot_hold_is_refused() -> None:
    """The LLM API and `inferd generate --json-schema` give the schema's text straight to the
    compiler, which read NaN as null."""
    for text, where in (('{"const": NaN}', "schema.const"), ('{"maximum": Infinity}', "schema.maximum")):
        problem = StructuredOutput(json=text).problem()
        assert problem is not None and problem.startswith(f"{where}: a JSON schema cannot hold NaN"), problem


def test_forced_calls_refuse_a_tool_schema_with_a_number_json_cannot_hold() -> None:
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
        {
            "type": "function",
            "function": {"name": "b", "parameters": {"properties": {"n": {"const": float("nan")}}}},
        },
    ]
    for choice in ("required", {"type": "function", "function": {"name": "a"}}):
        with pytest.raises(
            InvalidRequestError, match=re.escape("tools[1].function.parameters.properties.n.const")
        ):
            forced_calls(tools, choice, one_call=False)


def test_formats_the_compiler_does_not_implement_are_left_out() -> None:
    """Pydantic writes formats such as "password" and "binary" for SecretStr and bytes fields."""
    for fmt in ("password", "binary", "uri-reference"):
        assert StructuredOutput(json=json.dumps({"type": "string", "format": fmt})).problem() is None


def test_huge_constraints_are_not_kept_in_the_caches() -> None:
    from inferd.structured import spec as spec_module

    def sizes() -> tuple[int, int]:
        return spec_module._grammar_text.cache_info().currsize, spec_module._validate.cache_info().currsize

    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(8000)}}
    before = sizes()
    assert StructuredOutput(json=json.dumps(big)).problem() is None
    assert sizes() == before
    assert StructuredOutput(json=json.dumps({"type": "object", "title": "fresh"})).problem() is None
    assert sizes() == (before[0] + 1, before[1] + 1)  # a small one is kept


def test_a_tokenizer_llguidance_cannot_read_is_refused_once_and_remembered(
    tiny_model_factory, tmp_path
) -> None:
    config = json.loads((tiny_model_factory("qwen3") / "tokenizer.json").read_text())
    config["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    compiler = GrammarCompiler(tmp_path / "tokenizer.json", 4096)
    for _ in range(2):
        with pytest.raises(StructuredOutputError, match="not available for this model's tokenizer"):
            compiler.check_tokenizer(frozenset([0]))
    (tmp_path / "tokenizer.json").unlink()  # not read again: the reason is remembered
    with pytest.raises(StructuredOutputError, match="not available"):
        compiler.matcher_for(StructuredOutput(regex="a"), frozenset([0]))


def test_required_calls_keep_each_tools_own_references(tiny_model_factory) -> None:
    """Each tool's schema moves under the array schema's $defs; its "#..." references move with it."""
    folder = tiny_model_factory("qwen3")
    tree = {
        "type": "object",
        "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["kids"],
    }
    unit = {"$defs": {"U": {"enum": ["C", "F"]}}, "type": "object",
            "properties": {"u": {"$ref": "#/$defs/U"}}, "required": ["u"]}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "tree", "parameters": tree}},
             {"type": "function", "function": {"name": "unit", "parameters": unit}}]  # fmt: skip
    forced, schema = forced_calls(tools, "required", one_call=False)
    spec = StructuredOutput(json=json.dumps(schema))
    assert _accepts(folder, spec, '[{"name":"tree","parameters":{"kids":[{"kids":[]}]}}]')
    assert not _accepts(folder, spec, '[{"name":"tree","parameters":{"kids":[[]]}}]')
    assert _accepts(folder, spec, '[{"name":"unit","parameters":{"u":"F"}}]')
    assert not _accepts(folder, spec, '[{"name":"unit","parameters":{"u":"K"}}]')
    # Older drafts: "definitions", "items" as a list; a schema's own "$id" is dropped when embedded.
    older = {"$id": "https://example.com/pair", "type": "object", "required": ["p"],
             "properties": {"p": {"type": "array", "items": [{"$ref": "#/definitions/N"}]}},
             "definitions": {"N": {"type": "integer"}}}  # fmt: skip
    pair_tools = [{"type": "function", "function": {"name": "pair", "parameters": older}}]
    pair = StructuredOutput(json=json.dumps(forced_calls(pair_tools, "required", one_call=True)[1]))
    assert pair.problem() is None
    deep: dict[str, object] = {"type": "integer"}
    for _ in range(3000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        forced_calls([{"type": "function", "function": {"name": "d", "parameters": deep}}], "required", False)
    calls = forced.read('[{"name":"unit","parameters":{"u":"F"}}]')
    assert calls is not None and [(c.name, json.loads(c.arguments)) for c in calls] == [("unit", {"u": "F"})]
    # Text that is not calls' JSON (a constraint that never started, say) is no calls.
    for text in ("5", "[1]", "[]", '[{"name":"x"}]', '{"a":1}', "[{"):
        assert forced.read(text) is None


def test_only_the_end_of_the_prompt_or_its_prefill_closes_the_thinking() -> None:
    form = REASONING_FORMATS["qwen3"]
    disabled = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert prompt_closes_thinking(disabled, form)  # Qwen3's template with enable_thinking false
    # Tags earlier in the prompt say nothing about this answer.
    system = "<|im_start|>system\nReason inside <think> </think> tags.<|im_end|>\n<|im_start|>assistant\n"
    assert not prompt_closes_thinking(system, form)
    history = "<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>\n<|im_start|>assistant\n"
    assert not prompt_closes_thinking(history, form)
    # A continued answer: its own tags decide.
    assert prompt_closes_thinking("...<think>x</think>{", form, prefill="<think>x</think>{")
    assert not prompt_closes_thinking("...<think>still", form, prefill="<think>still")
    assert not prompt_closes_thinking(
        "...</think> then <think>again", form, prefill="</think> then <think>again"
    )


def test_apply_bitmask_keeps_exactly_the_allowed_tokens_of_the_chosen_rows() -> None:
    vocab, rows = 77, [0, 2]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((3, vocab), generator=generator)
    original = logits.clone()
    allowed = torch.rand((len(rows), vocab), generator=generator) < 0.3
    bitmask = torch.zeros((len(rows), bitmask_words(vocab)), dtype=torch.int32)
    for row in range(len(rows)):
        for token in allowed[row].nonzero().flatten().tolist():
            word, bit = divmod(token, 32)
            bitmask[row, word] |= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)
    apply_bitmask(logits, torch.tensor(rows), bitmask)
    for k, row in enumerate(rows):
        assert torch.equal(logits[row][allowed[k]], original[row][allowed[k]])
        assert torch.isneginf(logits[row][~allowed[k]]).all()
    assert torch.equal(logits[1], original[1])  # a row not chosen is untouched


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_parse_and_follow_the_schema(llm: LLM, temperature: float) -> None:
    spec = StructuredOutput(json=json.dumps(SCHEMA))
    outs = llm.generate(PROMPTS, _params(spec, temperature=temperature))
    for out in outs:
        value = json.loads(out.text)  # the closing brace is text: the last token is kept
        assert set(value) == {"ok", "color"} and isinstance(value["ok"], bool)
        assert value["color"] in ("red", "green", "blue")
        assert out.finish_reason == "stop"


def test_json_object_output_is_an_object(llm: LLM) -> None:
    out = llm.generate(["To be"], _params(StructuredOutput(json_object=True), max_tokens=200))[0]
    # A random model may run out of budget inside a string; whatever it wrote is an object's start.
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.startswith("{")


def test_regex_choice_and_grammars_bound_the_text(llm: LLM) -> None:
    choices = ["alpha", "beta gamma", 'quo"te']
    cases = [
        (StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}"), lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)),
        (StructuredOutput(choice=choices), lambda text: text in choices),
        (
            StructuredOutput(grammar='start: "x" D D\nD: /[0-9]/'),
            lambda text: re.fullmatch(r"x[0-9]{2}", text),
        ),
        (StructuredOutput(grammar='root ::= "y" [a-c]+ "."'), lambda text: re.fullmatch(r"y[a-c]+\.", text)),
    ]
    for spec, matches in cases:
        # A penalty or two on the way: the mask comes after them and still decides.
        params = [_params(spec, max_tokens=40, repetition_penalty=1.0 + i % 2 / 2, presence_penalty=i / 4)
                  for i in range(len(PROMPTS))]  # fmt: skip
        for out in llm.generate(PROMPTS, params):
            assert out.finish_reason == "stop", (spec, out.text)
            assert matches(out.text), (spec, out.text)


def test_a_whole_output_stops_even_when_eos_is_ignored(llm: LLM) -> None:
    spec = StructuredOutput(choice=["done"])
    out = llm.generate(["To be"], _params(spec, ignore_eos=True, max_tokens=30))[0]
    assert out.text == "done" and out.finish_reason == "stop"


def test_ignore_eos_keeps_eos_out_where_the_grammar_would_take_it(llm: LLM) -> None:
    # EOS (id 0) made the likeliest token: the grammar would let it end the output after a letter.
    eager = {0: 100.0}
    spec = StructuredOutput(regex="[ab]+")
    ended = llm.generate(["To be"], _params(spec, logit_bias=eager, max_tokens=12))[0]
    assert ended.finish_reason == "stop" and len(ended.token_ids) == 2 and re.fullmatch("[ab]", ended.text)
    out = llm.generate(["To be"], _params(spec, logit_bias=eager, ignore_eos=True, max_tokens=12))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12 and 0 not in out.token_ids
    assert re.fullmatch("[ab]+", out.text)


def test_a_constraint_that_starts_after_a_trigger_leaves_the_output_free_until_it(llm: LLM) -> None:
    """As after a reasoning model's "</think>": here the trigger is two tokens, which a bias and a
    frequency penalty make greedy decoding write first, one after the other (x, y, x, y, ...)."""
    first, second = (llm.tokenizer.encode(c, add_special_tokens=False)[0] for c in "xy")
    steer = {"logit_bias": {first: 100.0, second: 99.0}, "frequency_penalty": 2.0, "temperature": 0.0}
    spec = StructuredOutput(regex="[0-9]{3}", starts_after=[first, second])
    out = llm.generate(["To be"], _params(spec, max_tokens=20, **steer))[0]
    assert out.token_ids[:2] == [first, second] and re.fullmatch("xy[0-9]{3}", out.text), out.text
    assert out.finish_reason == "stop"
    # Half the trigger does not start it: the free output goes on to its budget.
    late = StructuredOutput(regex="[0-9]{3}", starts_after=[first, first])
    free = llm.generate(["To be"], _params(late, max_tokens=8, **steer))[0]
    assert free.finish_reason == "length" and free.text.startswith("xyxy")
    assert StructuredOutput(regex="a", starts_after=[]).problem() is not None


def test_a_stop_string_in_the_token_that_completes_the_output_still_cuts_it(llm: LLM) -> None:
    out = llm.generate(["To be"], _params(StructuredOutput(choice=["yes.", "no."]), stop=["."]))[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_a_later_refused_prompt_leaves_nothing_of_the_call_queued(llm: LLM) -> None:
    good = _params(StructuredOutput(choice=["ok"]))
    bad = _params(StructuredOutput(grammar='start: "a" <|no_such_token|>'))
    with pytest.raises(ValueError, match="no_such_token"):
        llm.generate(["To be", "Or not"], [good, bad])
    assert not llm.engine.has_unfinished()
    assert [out.text for out in llm.generate(["To be"], good)] == ["ok"]


def test_a_budget_that_runs_out_leaves_a_prefix_of_a_match(llm: LLM) -> None:
    out = llm.generate(["To be"], _params(StructuredOutput(regex=r"[a-z]{40}"), max_tokens=3))[0]
    assert out.finish_reason == "length"
    assert re.fullmatch(r"[a-z]+", out.text) and len(out.token_ids) == 3


def test_unconstrained_rows_beside_constrained_ones_are_unchanged(llm: LLM) -> None:
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [out.token_ids for out in llm.generate(PROMPTS, plain)]
    guided = _params(StructuredOutput(json=json.dumps(SCHEMA)), temperature=0.0)
    mixed = llm.generate(PROMPTS * 2, [plain] * len(PROMPTS) + [guided] * len(PROMPTS))
    assert [out.token_ids for out in mixed[: len(PROMPTS)]] == alone
    assert all(json.loads(out.text) for out in mixed[len(PROMPTS) :])


def test_constraints_hold_with_asynchronous_scheduling(tiny_model_factory) -> None:
    """Asynchronous scheduling launches a step before the last one's tokens are read; a grammar's
    next mask needs that token, so its request waits for it. (No request here has penalties,
    which would make every step wait.)"""
    folder = tiny_model_factory("qwen3")
    spec = StructuredOutput(regex=r"(ab|cd){6}")
    params = [
        _params(spec, temperature=0.0, max_tokens=40),
        _params(spec, temperature=1.0, max_tokens=40),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    ]
    texts = {}
    for async_scheduling in (False, True):
        llm = LLM(folder, kv_cache_memory="32MiB", block_size=8, async_scheduling=async_scheduling)
        outs = llm.generate(PROMPTS[:3], params)
        llm.shutdown()
        for out in outs[:2]:
            assert re.fullmatch(r"(ab|cd){6}", out.text) and out.finish_reason == "stop", out.text
        texts[async_scheduling] = [out.token_ids for out in outs]
    assert texts[True] == texts[False]


def test_a_constraint_the_token_limits_leave_nothing_to_ends_with_an_error(llm: LLM) -> None:
    """allowed_token_ids without a digit against a regex of digits: the row has no token left,
    whatever comes out breaks the constraint (an EOS here), and the request ends with an error
    instead of a "stop" that looks like an answer."""
    vocab = llm.tokenizer.vocab_size
    letters = [t for t in range(5, vocab) if llm.tokenizer.decode([t]).strip().isalpha()][:5]
    spec = StructuredOutput(regex="[0-9]{3}")
    (broken,) = llm.generate("0123", _params(spec, allowed_token_ids=letters), raise_on_error=False)
    assert broken.finish_reason == "error" and "structured-output constraint" in (broken.error or "")
    (fine,) = llm.generate("0123", _params(spec))  # the same constraint alone: whole
    assert fine.finish_reason == "stop" and fine.text.isdigit() and len(fine.text) == 3


def test_a_grammar_that_fails_fails_its_own_request_alone(llm: LLM, monkeypatch) -> None:
    """A matcher that raises (a bug in it, or in the engine's use of it) ends its request with an
    error; the batch's other constrained requests go on to their answers."""
    from inferd.structured import matcher

    accept = matcher.RequestGrammar.accept
    compile_for = matcher.GrammarCompiler.matcher_for

    def marked(self, spec, eos_token_ids):  # type: ignore[no-untyped-def]
        grammar = compile_for(self, spec, eos_token_ids)
        grammar.explodes = spec.regex == "[a-z]+"  # type: ignore[attr-defined]
        return grammar

    def failing(self, token_id):  # type: ignore[no-untyped-def]
        if getattr(self, "explodes", False):
            raise RuntimeError("matcher broke")
        return accept(self, token_id)

    monkeypatch.setattr(matcher.GrammarCompiler, "matcher_for", marked)
    monkeypatch.setattr(matcher.RequestGrammar, "accept", failing)
    digits = StructuredOutput(regex="[0-9]{3}")
    outs = llm.generate(
        ["0123", "0123"],
        [_params(StructuredOutput(regex="[a-z]+")), _params(digits)],
        raise_on_error=False,
    )
    assert outs[0].finish_reason == "error" and "matcher broke" in (outs[0].error or "")
    assert outs[1].finish_reason == "stop" and outs[1].text.isdigit() and len(outs[1].text) == 3
