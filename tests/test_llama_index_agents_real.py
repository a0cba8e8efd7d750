"""LlamaIndex's function-calling pipelines on PersonaJudgeLLM with the packaged SmolLM2:
FunctionAgent (streaming and not), FunctionCallingProgram, PydanticSingleSelector and
structured_predict run for real (no mocks). Each call or object is valid by construction; an
answer cut short by its budget raises LlamaIndex's parsing error. Like the other real-model
tests, these check mechanics, not the 135M model's wisdom."""

from __future__ import annotations

from typing import Any, Literal, cast

import pytest
from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ToolCallResult
from llama_index.core.output_parsers.base import OutputParserException
from llama_index.core.program import FunctionCallingProgram
from llama_index.core.prompts import PromptTemplate
from llama_index.core.selectors import PydanticSingleSelector
from llama_index.core.tools import FunctionTool, ToolMetadata
from pydantic import BaseModel

from pj_integrations.llama_index import PersonaJudgeLLM
from tests.test_llama_index import record_engine_calls

pytestmark = pytest.mark.real_model

PREFERENCES = ["concise", "expert"]


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


class Fruit(BaseModel):
    """A fruit and its colour."""

    name: str
    colour: Literal["red", "yellow", "green", "orange", "purple"]


@pytest.fixture(scope="module")
def llm() -> PersonaJudgeLLM:
    return PersonaJudgeLLM(preferences=PREFERENCES, max_tokens=64, seed=0)


@pytest.fixture
def calls(llm: PersonaJudgeLLM, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    return record_engine_calls(llm.get_engine(), monkeypatch)


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_calls_the_tool_then_answers(
    llm: PersonaJudgeLLM, calls: list[dict[str, Any]], streaming: bool
) -> None:
    used: list[tuple[int, int]] = []

    def tracked_multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        used.append((a, b))
        return multiply(a, b)

    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(tracked_multiply, name="multiply")],
        llm=llm.model_copy(update={"tool_choice_after_tool": "none"}),
        initial_tool_choice="multiply",
        streaming=streaming,
    )
    handler = agent.run("What is 12 times 7?")
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    output = cast(AgentOutput, await handler)
    # One valid call (two integers), its result handed back, then a text answer.
    assert len(used) == 1 and all(isinstance(n, int) for n in used[0])
    assert [r.tool_output.content for r in results] == [str(multiply(*used[0]))]
    assert str(output.response.content or "").strip()
    first, second = calls
    assert (
        first["tool_choice"] == "multiply" and first["tools"][0]["function"]["name"] == "multiply"
    )
    assert second["tool_choice"] == "none"
    assert second["conversation"][-1] == {
        "role": "tool",
        "content": str(multiply(*used[0])),
        "name": "multiply",
    }


def test_function_calling_program_gives_a_valid_object(
    llm: PersonaJudgeLLM, calls: list[dict[str, Any]]
) -> None:
    program = FunctionCallingProgram.from_defaults(
        output_cls=Fruit, prompt_template_str="Name a {kind} fruit.", llm=llm
    )
    fruit = program(kind="yellow")
    assert isinstance(fruit, Fruit) and fruit.name
    assert calls[-1]["tool_choice"] == "required"


def test_pydantic_single_selector_picks_one_of_the_choices(llm: PersonaJudgeLLM) -> None:
    choices = [
        ToolMetadata(name="weather", description="Answers questions about the weather."),
        ToolMetadata(name="cooking", description="Answers questions about recipes and baking."),
    ]
    # from_defaults is annotated with LlamaIndex's OpenAI class, but takes any function-calling LLM
    selector = PydanticSingleSelector.from_defaults(llm=llm)  # type: ignore[arg-type]
    result = selector.select(choices, query="How do I bake bread?")
    assert len(result.selections) == 1 and result.selections[0].index in (0, 1)


def test_structured_predict_returns_the_object(llm: PersonaJudgeLLM) -> None:
    """The issue's case: the small model used to write out the schema ("Invalid JSON")."""
    fruit = llm.structured_predict(Fruit, PromptTemplate("Name a {kind} fruit."), kind="red")
    assert isinstance(fruit, Fruit) and fruit.name


def test_a_budget_that_ends_early_raises_the_parsing_error(llm: PersonaJudgeLLM) -> None:
    prompt = PromptTemplate("Name a {kind} fruit.")
    with pytest.raises(OutputParserException):
        llm.structured_predict(Fruit, prompt, llm_kwargs={"max_tokens": 4}, kind="red")
    program = FunctionCallingProgram.from_defaults(
        output_cls=Fruit, prompt=prompt, llm=llm.model_copy(update={"max_tokens": 4})
    )
    with pytest.raises(OutputParserException, match="inside a tool call"):
        program(kind="red")
