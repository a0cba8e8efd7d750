"""The engine on the llama.cpp backend, with real models (SmolLM2, Gemma 3 270M).

* Statistical: sequences the engine samples on llama.cpp follow the exactly computed
  distribution (``tests/_engine_reference.py``'s enumeration of the round process, over
  llama.cpp's own whole-sequence logits): with fixed roles, the judge's own distribution;
  alternating, the round-wise composition. Tolerance and power as in
  ``tests/test_engine_distribution.py``.
* Greedy with fixed roles equals llama.cpp's own greedy decoding of the judge's prompt.
* Stop strings and EOS, batches whose rows leave as they finish, strength (the neutral row)
  and a JSON-schema constraint all run on llama.cpp.

Skipped when llama-cpp-python is not installed, unless ``PJ_REQUIRE_LLAMACPP=1`` (CI sets it).
"""

from __future__ import annotations

import os
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pj_core.backends.llamacpp.backend import LlamaCppBackend
from pj_core.backends.loading import load_model
from pj_core.engine import PersonaJudge
from pj_core.prompts import render_ids
from pj_core.settings import PAPER
from tests._engine_reference import (
    autoregressive_distribution,
    exact_sequence_distribution,
    total_variation,
    tv_tolerance,
)

if os.environ.get("PJ_REQUIRE_LLAMACPP") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

pytestmark = pytest.mark.real_model

SMOLLM2, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
SETTINGS: dict[str, Any] = {"temperature": 1.0, "top_k": 2, "top_p": 1.0}
LENGTH, LOOKAHEAD, SAMPLES = 2, 2, 600


class LlamaReference:
    """llama.cpp's own whole-sequence forward, called like a transformers model with
    ``use_cache=False`` (what ``tests/_engine_reference.py`` calls)."""

    def __init__(self, path: str) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, verbose=False)
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        tokens = tuple(int(t) for t in input_ids[0])
        if tokens not in self.memo:
            self.llm.reset()
            self.llm.eval(list(tokens))
            self.memo[tokens] = torch.from_numpy(self.llm.scores[: len(tokens)].copy())
        return SimpleNamespace(logits=self.memo[tokens][None])


@pytest.fixture(scope="module")
def smollm2_llama() -> tuple[PersonaJudge, LlamaReference, list[list[int]]]:
    """The engine on llama.cpp, the reference, and two persona prompts that disagree."""
    loaded = load_model(SMOLLM2, backend="llama.cpp")
    # The prefix cache lends each call the two prompts' cells (prefilled once), so the 600
    # samples cost their answers only; and every sample checks the lent cells too.
    backend = LlamaCppBackend(loaded.path, n_ctx=2048, n_seq_max=8).with_prefix_cache(4096)
    pj = PersonaJudge.from_backend(backend, loaded.tokenizer, defaults=PAPER)
    # Chosen for power: the two personas' first tokens differ, so the role schedule shapes
    # the output (TV 0.90 between alternating and fixed roles, 1.0 between the personas).
    prompts = [
        render_ids(loaded.tokenizer, "Say hello.", "Speak only French."),
        render_ids(loaded.tokenizer, "Say hello.", "Speak only German."),
    ]
    return pj, LlamaReference(str(loaded.path)), prompts


def _empirical(pj: PersonaJudge, prompts: list[list[int]], **settings: Any) -> dict[Any, float]:
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(SAMPLES):
        out = pj.generate_from_ids(
            prompts, lookahead=LOOKAHEAD, max_new_tokens=LENGTH, seed=seed, **SETTINGS, **settings
        )
        counts[tuple(out.token_ids)] += 1
    return {sequence: n / SAMPLES for sequence, n in counts.items()}


def _exact(case: Any, alternate: bool) -> dict[tuple[int, ...], float]:
    pj, reference, prompts = case
    return exact_sequence_distribution(
        reference,
        prompts,
        lookahead=LOOKAHEAD,
        alternate=alternate,
        length=LENGTH,
        eos_ids=frozenset(pj.eos_token_ids),
        **SETTINGS,
    )


@pytest.mark.slow
def test_fixed_roles_follow_the_judge_on_llama_cpp(smollm2_llama: Any) -> None:
    pj, reference, prompts = smollm2_llama
    exact = _exact(smollm2_llama, alternate=False)
    eos = frozenset(pj.eos_token_ids)
    judge_alone = autoregressive_distribution(
        reference, prompts[1], length=LENGTH, eos_ids=eos, **SETTINGS
    )
    draft_alone = autoregressive_distribution(
        reference, prompts[0], length=LENGTH, eos_ids=eos, **SETTINGS
    )
    assert total_variation(exact, judge_alone) < 1e-6
    tolerance = tv_tolerance(exact, SAMPLES)
    assert total_variation(draft_alone, exact) > 3 * tolerance  # the test has power
    empirical = _empirical(pj, prompts, alternate=False)
    assert total_variation(empirical, exact) < tolerance


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["speculative", "lockstep"])
def test_alternating_roles_follow_the_composition_on_llama_cpp(
    smollm2_llama: Any, strategy: str
) -> None:
    pj, _, prompts = smollm2_llama
    exact = _exact(smollm2_llama, alternate=True)
    tolerance = tv_tolerance(exact, SAMPLES)
    assert total_variation(exact, _exact(smollm2_llama, alternate=False)) > 2 * tolerance
    empirical = _empirical(pj, prompts, alternate=True, strategy=strategy)
    assert total_variation(empirical, exact) < tolerance


@pytest.mark.parametrize("alias", [SMOLLM2, GEMMA])
def test_greedy_fixed_roles_equal_llama_cpps_own_greedy_decoding(alias: str) -> None:
    """Greedy, a token is accepted iff the judge's argmax is the draft's, else the judge's
    argmax replaces it: the answer is the judge's own greedy decoding."""
    from llama_cpp import Llama

    loaded = load_model(alias, backend="llama.cpp")
    pj = PersonaJudge.from_backend(loaded.backend, loaded.tokenizer, defaults=PAPER)
    question = "What is the capital of France? Answer in one word."
    prompts = [
        render_ids(loaded.tokenizer, question, "Answer with playful humour."),
        render_ids(loaded.tokenizer, question, "Answer like a poet."),
    ]
    ours = pj.generate_from_ids(prompts, alternate=False, temperature=0.0, max_new_tokens=20)
    llm = Llama(model_path=str(loaded.path), n_ctx=512, verbose=False)
    own: list[int] = []
    for token in llm.generate(prompts[1], temp=0.0, top_k=1, reset=True):
        own.append(int(token))
        if len(own) == len(ours.token_ids) or token in pj.eos_token_ids:
            break
    assert ours.token_ids == own
    assert len(own) > 5


@pytest.fixture(scope="module")
def smollm2_engine() -> PersonaJudge:
    loaded = load_model(SMOLLM2, backend="llama.cpp")
    return PersonaJudge.from_backend(loaded.backend, loaded.tokenizer)


QUESTION = "What is the capital of France? Answer in one word."
PERSONAS = ["Answer concisely.", "Answer politely."]


def test_stop_strings_and_eos_end_answers_on_llama_cpp(smollm2_engine: PersonaJudge) -> None:
    stopped = smollm2_engine.generate(QUESTION, PERSONAS, temperature=0.0, stop=["Paris"])
    assert stopped.text == "The capital of France is " and stopped.finish_reason == "stop"
    ended = smollm2_engine.generate(QUESTION, PERSONAS, temperature=0.0, max_new_tokens=40)
    assert ended.finish_reason == "eos" and ended.text.endswith("Paris.")


def test_a_batch_whose_rows_leave_as_they_finish(smollm2_engine: PersonaJudge) -> None:
    """Requests of different lengths in one batch: the finished ones' rows leave (their
    sequences go back to the context) and the others go on as alone."""
    requests: list[dict[str, Any]] = [
        {"conversation": QUESTION, "personas": PERSONAS, "max_new_tokens": n, "temperature": 0.0}
        for n in (2, 5, 30)
    ]
    context: Any = smollm2_engine.backend._context  # type: ignore[attr-defined]
    free = len(context._free_seqs) + len(context._released)
    alone = [smollm2_engine.generate(**request).token_ids for request in requests]
    batch = smollm2_engine.generate_batch(requests)
    assert [result.token_ids for result in batch] == alone
    assert [len(ids) for ids in alone][:2] == [2, 5]
    assert len(context._free_seqs) + len(context._released) == free  # every row gave its id back


def test_strength_and_a_json_schema_run_on_llama_cpp(smollm2_engine: PersonaJudge) -> None:
    """Strength adds the neutral row (extend_together on llama.cpp); a constraint masks p and
    q alike. Greedy, both strategies give the same tokens."""
    guided = [
        smollm2_engine.generate(
            QUESTION, PERSONAS, temperature=0.0, strength=1.0, strategy=strategy
        )
        for strategy in ("speculative", "lockstep")
    ]
    assert guided[0].token_ids == guided[1].token_ids and "Paris" in guided[0].text
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    structured = smollm2_engine.generate(
        QUESTION, PERSONAS, temperature=0.0, max_new_tokens=40, response_format=schema
    )
    assert isinstance(structured.parsed, dict) and "Paris" in structured.parsed["city"]
