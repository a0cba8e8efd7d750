"""Tool calling in the core (pj_core.tools and generate(tools=...)), on a tiny model with a
byte-level BPE tokenizer."""

from __future__ import annotations

import re
from typing import Any

import pytest

from pj_core.batch import BatchRequest
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError, InvalidPromptError, InvalidToolError
from pj_core.prompts import normalize_conversation, tool_call_block
from pj_core.tools import Tool, as_tools, check_tool_choice, parse_tool_calls, tool_grammar
from tests._bpe import make_bpe_tokenizer
from tests._tiny import make_tiny_model

PERSONAS = ["be funny", "be brief"]
ADD = Tool(
    "add",
    "Add two small integers.",
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
)
COLOUR = {
    "type": "function",
    "function": {
        "name": "paint",
        "description": "Paint the wall.",
        "parameters": {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "blue"]}},
            "required": ["colour"],
            "additionalProperties": False,
        },
    },
}
TOOLS: list[Any] = [ADD, COLOUR]


@pytest.fixture(scope="module")
def pj() -> PersonaJudge:
    tokenizer = make_bpe_tokenizer()
    # The tools' description is ~700 tokens of this small vocabulary: a longer window (the
    # tiny Llama's rotary positions go beyond its nominal 256).
    return PersonaJudge(
        make_tiny_model(len(tokenizer), seed=5),
        tokenizer,
        eos_token_ids=[tokenizer.eos_token_id],
        context_window=2048,
    )


def _valid(call: Any) -> bool:
    if call.name == "add":
        return set(call.arguments) == {"a", "b"} and all(
            isinstance(v, int) and 0 <= v <= 9 for v in call.arguments.values()
        )
    return call.name == "paint" and call.arguments in ({"colour": "red"}, {"colour": "blue"})


def _accepts(pj: PersonaJudge, grammar: Any, text: str) -> bool:
    """Whether the constraint lets ``text`` through, token by token, to a finished answer."""
    compiled = pj.compile_constraint(grammar)
    assert compiled is not None
    matcher = compiled.matcher()
    for token in pj.tokenizer.encode(text):
        if not bool(matcher.allowed()[token]):
            return False
        matcher.consume(token)
    return matcher.is_finished()


def _generate(pj: PersonaJudge, seed: int, **options: Any) -> Any:
    return pj.generate("hello", PERSONAS, seed=seed, max_new_tokens=80, tools=TOOLS, **options)


@pytest.mark.parametrize("choice", ["required", "any"])
def test_required_gives_valid_calls_only(pj: PersonaJudge, choice: str) -> None:
    for seed in range(5):
        result = _generate(pj, seed, tool_choice=choice)
        assert result.finish_reason == "eos", result.text
        assert len(result.tool_calls) == 1 and _valid(result.tool_calls[0]), result.text
        assert result.parsed is None
        assert len({c.id for c in result.tool_calls}) == len(result.tool_calls)
        assert all(re.fullmatch("call_[0-9a-f]{24}", c.id) for c in result.tool_calls)


def test_parallel_tool_calls_allow_several_calls(pj: PersonaJudge) -> None:
    two = (
        tool_call_block("add", {"a": 1, "b": 2})
        + "\n"
        + tool_call_block("paint", {"colour": "red"})
    )

    def accepts(parallel: bool) -> bool:
        return _accepts(pj, tool_grammar(as_tools(TOOLS), "required", parallel), two)

    assert accepts(parallel=True) and not accepts(parallel=False)
    for seed in range(4):
        result = _generate(pj, seed, tool_choice="required", parallel_tool_calls=True)
        assert result.finish_reason == "eos" and result.tool_calls
        assert all(_valid(c) for c in result.tool_calls)
    with pytest.raises(InvalidToolError, match="parallel_tool_calls was given without tools"):
        pj.generate("hello", PERSONAS, parallel_tool_calls=True)


def test_a_named_tool_gives_one_call_of_it(pj: PersonaJudge) -> None:
    for seed in range(4):
        result = _generate(pj, seed, tool_choice="paint")
        assert [c.name for c in result.tool_calls] == ["paint"] and _valid(result.tool_calls[0])


def test_none_gives_text_and_auto_gives_either(pj: PersonaJudge) -> None:
    for seed in range(4):
        text = _generate(pj, seed, tool_choice="none")
        assert text.tool_calls == [] and not text.text.startswith("<")
    kinds = set()
    for seed in range(12):
        result = _generate(pj, seed)  # auto
        assert result.finish_reason in ("eos", "length")
        if result.finish_reason == "eos":
            assert all(_valid(c) for c in result.tool_calls)
            kinds.add(bool(result.tool_calls))
    assert kinds, "no answer finished"


def test_the_tools_are_described_in_every_persona_prompt(pj: PersonaJudge) -> None:
    conversation, _, tools = pj.prepare_output("hello", None, TOOLS, "auto")
    assert tools is not None and [t.name for t in tools] == ["add", "paint"]
    prompts, _ = pj.render_prompts(conversation, PERSONAS)
    for prompt in prompts:
        text = pj.tokenizer.decode(prompt)
        assert '"name": "add"' in text and '"name": "paint"' in text and "<tool_call>" in text
    # No catalogue when no call may be made (a small model would imitate it).
    quiet, _, _ = pj.prepare_output("hello", None, TOOLS, "none")
    assert quiet == [{"role": "user", "content": "hello"}]


def test_batches_give_each_request_its_own_tools(pj: PersonaJudge) -> None:
    requests = [
        BatchRequest("hello", PERSONAS, seed=1, max_new_tokens=80, tools=TOOLS, tool_choice="add"),
        BatchRequest("hello", PERSONAS, seed=2, max_new_tokens=20),
        BatchRequest("hello", PERSONAS, seed=3, max_new_tokens=80, tools=[COLOUR]),
    ]
    results = pj.generate_batch(requests)
    assert [c.name for c in results[0].tool_calls] == ["add"]
    assert results[1].tool_calls == []
    single = pj.generate(
        "hello", PERSONAS, seed=1, max_new_tokens=80, tools=TOOLS, tool_choice="add"
    )
    assert results[0].token_ids == single.token_ids
    assert results[0].tool_calls[0].arguments == single.tool_calls[0].arguments


def test_calls_and_results_render_back_into_the_conversation() -> None:
    conversation: list[dict[str, Any]] = [
        {"role": "user", "content": "What is 2 + 3?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "call_1"}],
        },
        {"role": "tool", "content": "5", "name": "add", "tool_call_id": "call_1"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [{"function": {"name": "add", "arguments": '{"a": 5, "b": 0}'}}],
        },
        {"role": "tool", "content": "5"},
    ]
    turns = normalize_conversation(conversation)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[1]["content"] == tool_call_block("add", {"a": 2, "b": 3})
    assert turns[2]["content"] == "Tool add returned: 5"
    assert turns[3]["content"] == "Let me check.\n" + tool_call_block("add", {"a": 5, "b": 0})
    assert turns[4]["content"] == "The tool returned: 5"
    with pytest.raises(InvalidPromptError, match="tool call 0 needs"):
        normalize_conversation(
            [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "1"}]}]
        )


@pytest.mark.parametrize(
    ("tools", "fragment"),
    [
        ([], "empty list"),
        ("add", "must be a list"),
        ([ADD, Tool("add", "", {"type": "object"})], "two different tools are called 'add'"),
        ([{"name": "bad name!"}], "has name 'bad name!'"),
        ([{"name": "x", "parameters": {"type": "array"}}], "object"),
        ([3], "tool 0 is a int"),
    ],
)
def test_bad_tools_are_typed_errors(tools: Any, fragment: str) -> None:
    with pytest.raises(InvalidToolError, match=re.escape(fragment)):
        as_tools(tools)


def test_the_same_tool_twice_is_kept_once() -> None:
    titled = Tool(
        "add",
        "Adds.",
        {
            **ADD.parameters,
            "title": "Add",
            "properties": {
                k: {**v, "title": k.upper()} for k, v in ADD.parameters["properties"].items()
            },
        },
    )
    assert as_tools([ADD, titled]) == [ADD]


def test_bad_tool_choices_and_combinations_fail_before_decoding(pj: PersonaJudge) -> None:
    with pytest.raises(InvalidToolError, match="names no tool"):
        check_tool_choice("multiply", as_tools(TOOLS))
    with pytest.raises(InvalidToolError, match="names no tool"):
        pj.generate("hello", PERSONAS, tools=TOOLS, tool_choice="multiply")
    with pytest.raises(InvalidToolError, match="without tools"):
        pj.generate("hello", PERSONAS, tool_choice="required")
    with pytest.raises(InvalidGenerationConfigError, match="not both"):
        pj.generate("hello", PERSONAS, tools=TOOLS, response_format={"type": "integer"})
    unsupported = {"name": "odd", "parameters": {"type": "object", "not": {"required": ["a"]}}}
    with pytest.raises(InvalidToolError, match=r"tool 'odd'.*Unimplemented"):
        pj.generate("hello", PERSONAS, tools=[unsupported])
    for choice in ("add", "none"):  # a tool the answer's grammar leaves out is checked too
        with pytest.raises(InvalidToolError, match=r"tool 'odd'.*Unimplemented"):
            pj.generate("hello", PERSONAS, tools=[ADD, unsupported], tool_choice=choice)
    with pytest.raises(InvalidToolError, match=r"^request 1: "):
        pj.generate_batch(
            [
                BatchRequest("hello", PERSONAS),
                BatchRequest("hello", PERSONAS, tools=TOOLS, tool_choice="nope"),
            ]
        )


def test_parse_tool_calls_rejects_what_the_decoder_would_never_write() -> None:
    tools = as_tools(TOOLS)
    assert parse_tool_calls("plain text", tools) == ("plain text", [])
    with pytest.raises(InvalidToolError, match="not JSON"):
        parse_tool_calls("<tool_call>\n{oops}\n</tool_call>", tools)
    with pytest.raises(InvalidToolError, match="no known tool"):
        parse_tool_calls('<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>', tools)
    with pytest.raises(InvalidToolError, match="none complete"):
        parse_tool_calls('<tool_call>\n{"name": "add"', tools)


def test_arguments_admit_no_undeclared_keys(pj: PersonaJudge) -> None:
    """A schema without additionalProperties is closed, as strict structured output is: a
    small model would otherwise copy the schema's own keys into its arguments."""
    open_tool = Tool("f", "", {"type": "object", "properties": {"x": {"type": "integer"}}})
    grammar = tool_grammar([open_tool], "required")

    def accepts(text: str) -> bool:
        return _accepts(pj, grammar, text)

    assert accepts(tool_call_block("f", {"x": 1}))
    assert not accepts(tool_call_block("f", {"x": 1, "type": "integer"}))
