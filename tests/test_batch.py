"""generate_batch: every request's result equals its own single run with the same seed.

Exactness is checked token for token. Batched and single forwards may differ in the last
float bits (padding and batch shape change the order of additions), which can in principle
flip a sampled token; on the tiny float32 model we require every token to match, on
SmolLM2 we require it for every request of the tested batch and report it if that ever
changes (the tolerance is stated in the test).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pj_core.backends.hf.backend import HFBackend
from pj_core.backends.hf.kv import BatchedContexts
from pj_core.backends.hf.models import LoadedModel
from pj_core.batch import BatchRequest, generate_batch
from pj_core.decoding.batched import SharedRows
from pj_core.decoding.logits import LogitTransform, Position
from pj_core.engine import PersonaJudge
from pj_core.errors import (
    ContextOverflowError,
    InvalidGenerationConfigError,
    InvalidPersonaError,
    PersonaJudgeError,
)
from pj_core.results import GenerationResult
from pj_core.settings import PAPER

CONVERSATIONS = ["hello", "why cat", "the dog be funny", "a", "yes no why", "hello world"]
PERSONA_SETS = [
    ["be funny", "be brief"],
    ["be brief", "the cat"],
    ["be funny", "be brief", "a dog"],  # three personas: round-robin roles
]


@pytest.fixture(scope="module")
def tiny_engine(
    tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> PersonaJudge:
    return PersonaJudge(tiny_model, tiny_tokenizer, defaults=PAPER)


def _tiny_requests(count: int, base_seed: int) -> list[dict[str, Any]]:
    requests = []
    for i in range(count):
        request: dict[str, Any] = {
            "conversation": CONVERSATIONS[i % len(CONVERSATIONS)],
            "personas": PERSONA_SETS[i % len(PERSONA_SETS)],
            "seed": base_seed + i,
            "max_new_tokens": 3 + (5 * i) % 11,  # different budgets: rows leave at different steps
            "lookahead": 1 + i % 5,
            "temperature": [0.7, 1.0, 0.0][i % 3],
        }
        if i % 2 == 0:
            request["stop"] = ["funny", "no"]
        if i % 5 == 4 and len(request["personas"]) == 2:
            request["alternate"] = False
        requests.append(request)
    return requests


def _assert_same(batched: Any, single: Any, index: int) -> None:
    assert batched.token_ids == single.token_ids, f"request {index}: tokens differ"
    assert batched.text == single.text, f"request {index}: text differs"
    assert batched.finish_reason == single.finish_reason, f"request {index}"
    assert [t.outcome for t in batched.trace] == [t.outcome for t in single.trace]
    assert (batched.stats.drafted, batched.stats.accepted) == (
        single.stats.drafted,
        single.stats.accepted,
    )


@pytest.mark.parametrize("base_seed", [0, 100])
def test_batch_equals_single_runs_on_tiny_model(tiny_engine: PersonaJudge, base_seed: int) -> None:
    requests = _tiny_requests(8, base_seed)
    batched = tiny_engine.generate_batch(requests)
    assert len(batched) == len(requests)
    for index, (request, result) in enumerate(zip(requests, batched, strict=True)):
        for strategy in ("speculative", "lockstep"):
            _assert_same(result, tiny_engine.generate(**request, strategy=strategy), index)
        assert result.stats.strategy == "lockstep"


def test_requests_prefilled_in_several_groups_stay_exact(
    tiny_engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch's prompts are prefilled in groups of similar length (padding costs as much as
    # real tokens); with a tiny group budget every request gets its own prefill forward, and
    # each joins the shared cache beside the others: tokens must not change.
    import pj_core.decoding.batched as batched_module

    requests = _tiny_requests(6, 7)
    prepared = {i: [[1] * (3 + i), [1] * (4 + i)] for i in range(len(requests))}
    assert len(batched_module.prefill_groups(prepared, budget=1)) == len(requests)
    monkeypatch.setattr(batched_module, "PREFILL_GROUP_TOKENS", 1)
    spy = {"prefills": 0}
    original = BatchedContexts.add_rows

    def counting_add_rows(self: BatchedContexts, prefixes: Any) -> None:
        spy["prefills"] += 1
        original(self, prefixes)

    monkeypatch.setattr(BatchedContexts, "add_rows", counting_add_rows)
    batched = tiny_engine.generate_batch(requests)
    assert spy["prefills"] == len(requests) - 1  # the first group creates the cache
    for index, (request, result) in enumerate(zip(requests, batched, strict=True)):
        _assert_same(result, tiny_engine.generate(**request, strategy="lockstep"), index)


def test_batch_covers_every_way_to_finish(tiny_engine: PersonaJudge) -> None:
    # Over these seeds the tiny model ends answers by budget, stop string and EOS; the
    # exactness test above is only meaningful if all three occur.
    reasons = set()
    for base_seed in (0, 100):
        reasons |= {
            r.finish_reason for r in tiny_engine.generate_batch(_tiny_requests(8, base_seed))
        }
    assert reasons == {"length", "stop", "eos"}, reasons


def test_batch_accepts_dataclass_requests_and_keeps_order(tiny_engine: PersonaJudge) -> None:
    requests = [
        BatchRequest("hello", ["be funny", "be brief"], seed=7, max_new_tokens=9),
        BatchRequest("why cat", ["be brief", "be funny"], seed=8, max_new_tokens=2),
    ]
    results = generate_batch(tiny_engine, requests)
    assert all(len(r.token_ids) <= n for r, n in zip(results, [9, 2], strict=True))
    single = tiny_engine.generate("why cat", ["be brief", "be funny"], seed=8, max_new_tokens=2)
    assert results[1].token_ids == single.token_ids
    assert results[1].stats.forward_passes == len(single.token_ids) + 1  # prefill + one per token


def test_single_request_batch_and_empty_batch(tiny_engine: PersonaJudge) -> None:
    assert generate_batch(tiny_engine, []) == []
    request: dict[str, Any] = {"conversation": "hello", "personas": ["be funny", "be brief"]}
    request["seed"] = 3
    [result] = generate_batch(tiny_engine, [request])
    assert result.token_ids == tiny_engine.generate(**request).token_ids


def test_bad_requests_name_the_request(tiny_engine: PersonaJudge) -> None:
    good = {"conversation": "hello", "personas": ["be funny", "be brief"]}
    with pytest.raises(InvalidGenerationConfigError, match="request 1: lookahead"):
        generate_batch(tiny_engine, [good, {**good, "lookahead": 0}])
    with pytest.raises(InvalidGenerationConfigError, match=r"^request 0 has unknown key") as info:
        generate_batch(tiny_engine, [{**good, "max_tokens": 5}])
    assert info.value.request_index == 0
    with pytest.raises(InvalidGenerationConfigError, match="request 0 lacks personas"):
        generate_batch(tiny_engine, [{"conversation": "hi"}])
    with pytest.raises(InvalidGenerationConfigError, match="list of requests"):
        generate_batch(tiny_engine, good)  # type: ignore[call-overload]
    with pytest.raises(InvalidGenerationConfigError, match="request 1 is a str"):
        generate_batch(tiny_engine, [good, "hello"])  # type: ignore[list-item]
    with pytest.raises(InvalidPersonaError, match="request 1:"):
        generate_batch(tiny_engine, [good, {**good, "personas": []}])
    with pytest.raises(ContextOverflowError, match="request 1:") as overflow:
        generate_batch(tiny_engine, [good, {**good, "max_new_tokens": 10_000}])
    assert overflow.value.request_index == 1


def test_return_exceptions_gives_each_bad_request_its_own_error(
    tiny_engine: PersonaJudge,
) -> None:
    good = _tiny_requests(4, 7)
    bad: list[Any] = [
        {**good[0], "lookahead": 0},
        {**good[1], "personas": []},
        {**good[2], "max_new_tokens": 10_000},
        "hello",
        {**good[3], "max_tokens": 5},
    ]
    requests = [bad[0], good[0], bad[1], good[1], bad[2], good[2], bad[3], good[3], bad[4]]
    # Message of each bad slot: a single generate call's (only the dict checks, which a
    # single call has no counterpart of, name the request themselves).
    expected: dict[int, tuple[type[Exception], str]] = {
        0: (InvalidGenerationConfigError, r"lookahead"),
        2: (InvalidPersonaError, r"(?!request)"),
        4: (ContextOverflowError, r"the prompt takes"),
        6: (InvalidGenerationConfigError, r"request 6 is a str"),
        8: (InvalidGenerationConfigError, r"request 8 has unknown key"),
    }
    outcomes = generate_batch(tiny_engine, requests, return_exceptions=True)
    assert len(outcomes) == len(requests)
    for index, outcome in enumerate(outcomes):
        if index in expected:
            kind, message = expected[index]
            assert isinstance(outcome, kind), (index, outcome)
            assert re.match(message, str(outcome)), (index, str(outcome))
            assert isinstance(outcome, PersonaJudgeError)
            assert outcome.request_index == index
        else:
            assert isinstance(outcome, GenerationResult), (index, outcome)
            _assert_same(outcome, tiny_engine.generate(**requests[index]), index)
    # Without return_exceptions the first bad request raises, named.
    with pytest.raises(InvalidGenerationConfigError, match=r"^request 0: lookahead"):
        generate_batch(tiny_engine, requests)


def test_return_exceptions_with_every_request_bad_decodes_nothing(
    tiny_engine: PersonaJudge,
) -> None:
    good = {"conversation": "hello", "personas": ["be funny", "be brief"]}
    outcomes = tiny_engine.generate_batch(
        [{**good, "top_p": 2.0}, {**good, "personas": ["x"]}], return_exceptions=True
    )
    assert isinstance(outcomes[0], InvalidGenerationConfigError)
    assert isinstance(outcomes[1], InvalidPersonaError)


class FailsAfterTwoTokens(LogitTransform):
    """Leaves no finite logit once two answer tokens exist: the request fails mid-decode."""

    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        if len(position.tokens) >= 2:
            return torch.full_like(logits, float("-inf"))
        return logits


def test_a_request_failing_while_decoding_leaves_the_others_exact(
    tiny_engine: PersonaJudge,
) -> None:
    requests = _tiny_requests(5, 21)
    for request in requests:
        request.pop("stop", None)  # no early stop: the failing one must reach two tokens
        request["max_new_tokens"] = 8
    # A seed whose answer (without the transform) is longer than two tokens.
    seed = next(
        s
        for s in range(100)
        if len(tiny_engine.generate(**{**requests[1], "seed": s}).token_ids) > 2
    )
    failing = {**requests[1], "seed": seed, "logit_transforms": [FailsAfterTwoTokens]}
    batch = [requests[0], failing, *requests[2:]]
    outcomes = tiny_engine.generate_batch(batch, return_exceptions=True)
    assert isinstance(outcomes[1], InvalidGenerationConfigError)
    assert "no finite logit" in str(outcomes[1])
    assert outcomes[1].request_index == 1
    for index in (0, 2, 3, 4):
        result = outcomes[index]
        assert isinstance(result, GenerationResult), (index, result)
        _assert_same(result, tiny_engine.generate(**batch[index]), index)
    with pytest.raises(
        InvalidGenerationConfigError, match=r"^request 1: .*no finite logit"
    ) as info:
        tiny_engine.generate_batch(batch)
    assert info.value.request_index == 1


def test_shared_rows_drop_leaves_the_other_rows_exact(tiny_model: LlamaForCausalLM) -> None:
    prefixes = [[[5, 6, 7, 8, 9, 10], [11]], [[12, 13], [14, 15, 16]]]
    shared = SharedRows(HFBackend(tiny_model), prefixes)
    alone = BatchedContexts(tiny_model, prefixes[1])
    with torch.inference_mode():
        shared.step({0: [3, 3], 1: [4, 4]})
        alone.step([4, 4])
        shared.drop(0)  # also cuts the padding columns only request 0 needed
        for token in (5, 6, 7):
            got = shared.step({1: [token, token]})[1]
            want = alone.step([token, token])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="step needs tokens for requests"):
        shared.step({0: [1, 1]})


@pytest.mark.real_model
def test_batch_equals_single_runs_on_smollm2(smollm2: LoadedModel) -> None:
    # Tolerance: every request must match its single run token for token (float32 on CPU).
    engine = PersonaJudge(
        smollm2.model,
        smollm2.tokenizer,
        context_window=smollm2.context_window,
        eos_token_ids=smollm2.eos_token_ids,
    )
    prompts = ["Give me a name for a cat.", "What is rain?", "Say hi.", "Tell a joke."]
    requests: list[dict[str, Any]] = [
        {
            "conversation": prompt,
            "personas": ["Answer with humour.", "Answer concisely."],
            "seed": i,
            "max_new_tokens": 12 + 4 * i,
            "lookahead": 4,
        }
        for i, prompt in enumerate(prompts)
    ]
    batched = engine.generate_batch(requests)
    for index, (request, result) in enumerate(zip(requests, batched, strict=True)):
        assert result.token_ids == engine.generate(**request).token_ids, f"request {index}"
