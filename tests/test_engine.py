"""The decoding engine on tiny random models: caches, strategies, stopping, errors, threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from pj_core.backends.hf.kv import BatchedContexts, forward_logits, prefill_split
from pj_core.decoding.strategy_choice import StepTimings, choose_strategy, expected_tokens_per_round
from pj_core.engine import PersonaJudge
from pj_core.errors import (
    ContextOverflowError,
    InvalidGenerationConfigError,
    InvalidPromptError,
)
from pj_core.results import GenerationResult, StreamEvent
from pj_core.settings import PAPER
from tests._engine_reference import (
    PERSONA_TEXTS,
    TOKENIZER,
    next_token_probs,
    reference_generate,
    tiny_prompt,
)
from tests._tiny import make_tiny_model
from tests._toy_backend import ToyBackend, ToyLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLED: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
FILTERED: dict[str, Any] = {"temperature": 0.8, "top_k": 6, "top_p": 0.9}


@pytest.fixture(scope="module")
def pj() -> PersonaJudge:
    return PersonaJudge(make_tiny_model(len(TOKENIZER), seed=1), TOKENIZER, defaults=PAPER)


@pytest.fixture(scope="module", params=["transformers", "toy"])
def engine_and_lm(request: pytest.FixtureRequest, pj: PersonaJudge) -> tuple[PersonaJudge, Any]:
    """The engine on each backend, with the model its references run full forwards of."""
    if request.param == "transformers":
        return pj, pj.model
    lm = ToyLM(len(TOKENIZER), seed=1)
    return PersonaJudge.from_backend(ToyBackend(lm), TOKENIZER, defaults=PAPER), lm


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return [tiny_prompt(text) for text in PERSONA_TEXTS]


def test_split_prefill_caches_equal_separately_prefilled_caches(pj: PersonaJudge) -> None:
    prefixes = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    with torch.inference_mode():
        caches, forwards = prefill_split(pj.model, prefixes)
        assert forwards == 1
        for prefix, cache in zip(prefixes, caches, strict=True):
            assert cache.get_seq_length() == len(prefix)
            alone = DynamicCache()
            forward_logits(pj.model, torch.tensor([prefix]), alone, keep=1)
            new = torch.tensor([[18, 19]])
            split_logits = forward_logits(pj.model, new, cache, keep=2)
            alone_logits = forward_logits(pj.model, new, alone, keep=2)
            assert torch.allclose(split_logits, alone_logits, atol=1e-4)


def test_batched_contexts_give_each_rows_own_next_token_logits(pj: PersonaJudge) -> None:
    prefixes = [[5, 6, 7, 8, 9], [10], []]
    continuation = [3, 12, 4]
    with torch.inference_mode():
        contexts = BatchedContexts(pj.model, prefixes)
        for token in continuation:
            logits = contexts.step([token] * len(prefixes))
        for row, prefix in enumerate(prefixes):
            full = pj.model(input_ids=torch.tensor([prefix + continuation])).logits[0, -1]
            assert torch.allclose(logits[row], full, atol=1e-4)


@pytest.mark.parametrize(
    ("n_personas", "lookahead", "alternate", "settings"),
    [
        (2, 3, True, SAMPLED),
        (2, 2, False, FILTERED),
        (3, 2, True, FILTERED),
        (2, 1, True, SAMPLED),
    ],
)
def test_cached_engine_emits_the_tokens_of_a_no_cache_reference_loop(
    engine_and_lm: tuple[PersonaJudge, Any],
    prompts: list[list[int]],
    n_personas: int,
    lookahead: int,
    alternate: bool,
    settings: dict[str, Any],
) -> None:
    pj, lm = engine_and_lm
    used = prompts[:n_personas]
    for seed in range(6):
        expected = reference_generate(
            lm,
            used,
            lookahead=lookahead,
            alternate=alternate,
            max_new_tokens=9,
            seed=seed,
            eos_ids=pj.eos_token_ids,
            **settings,
        )
        out = pj.generate_from_ids(
            used,
            lookahead=lookahead,
            alternate=alternate,
            max_new_tokens=9,
            seed=seed,
            **settings,
        )
        assert out.token_ids == expected, f"seed {seed}"


def test_speculative_and_lockstep_emit_identical_tokens_for_the_same_seed(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    configs = [
        {"lookahead": 4, "alternate": True, **SAMPLED},
        {"lookahead": 2, "alternate": False, **FILTERED},
        {"lookahead": 3, "alternate": True, "temperature": 0.0, "top_k": 0, "top_p": 1.0},
    ]
    compared = 0
    for config in configs:
        for n_personas in (2, 3):
            if not config["alternate"] and n_personas == 3:
                continue
            for seed in range(8):
                runs = [
                    pj.generate_from_ids(
                        prompts[:n_personas],
                        strategy=strategy,
                        max_new_tokens=12,
                        seed=seed,
                        **config,
                    )
                    for strategy in ("speculative", "lockstep")
                ]
                assert runs[0].token_ids == runs[1].token_ids
                assert [t.outcome for t in runs[0].trace] == [t.outcome for t in runs[1].trace]
                assert runs[0].stats.strategy == "speculative"
                assert runs[1].stats.strategy == "lockstep"
                compared += 1
    assert compared == 40


def test_greedy_with_fixed_roles_is_the_judges_greedy_decoding(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    greedy: dict[str, Any] = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    out = pj.generate_from_ids(prompts[:2], alternate=False, max_new_tokens=12, **greedy)
    judge_prompt = torch.tensor([prompts[1]])
    model: Any = pj.model  # a LlamaForCausalLM: it has generate()
    with torch.inference_mode():
        reference = model.generate(
            judge_prompt,
            attention_mask=torch.ones_like(judge_prompt),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=1,
            pad_token_id=0,
        )[0, len(prompts[1]) :].tolist()
    assert out.token_ids == reference
    draft_alone = model.generate(
        torch.tensor([prompts[0]]),
        attention_mask=torch.ones(1, len(prompts[0]), dtype=torch.long),
        do_sample=False,
        max_new_tokens=12,
        eos_token_id=1,
        pad_token_id=0,
    )[0, len(prompts[0]) :].tolist()
    assert draft_alone != reference  # otherwise this test could not tell judge from draft


def test_stats_and_trace_are_consistent(pj: PersonaJudge, prompts: list[list[int]]) -> None:
    out = pj.generate_from_ids(
        prompts[:3],
        lookahead=3,
        max_new_tokens=20,
        seed=3,
        persona_names=["a", "b", "c"],
        **SAMPLED,
    )
    stats = out.stats
    assert stats.tokens == len(out.token_ids) == len(out.trace)
    assert stats.accepted + stats.resampled == stats.drafted
    assert stats.accepted + stats.resampled + stats.bonus == stats.tokens
    assert 0.0 <= stats.acceptance_rate <= 1.0
    assert stats.forward_passes >= stats.rounds + 1
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    assert [t.token_id for t in out.trace] == out.token_ids
    rounds = [t.round for t in out.trace]
    assert rounds == sorted(rounds) and len(set(rounds)) == stats.rounds
    for entry in out.trace:  # round-robin roles with three personas
        assert entry.draft_persona == entry.round % 3
        assert entry.judge_persona == (entry.round + 1) % 3
        assert entry.draft_name == "abc"[entry.draft_persona]
    for entry, next_entry in zip(out.trace, out.trace[1:], strict=False):
        if entry.outcome != "accepted":  # resampled and bonus tokens end their round
            assert next_entry.round == entry.round + 1


def test_seeded_calls_are_reproducible_and_seeds_matter(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    first = pj.generate_from_ids(prompts[:2], max_new_tokens=15, seed=11, **SAMPLED)
    again = pj.generate_from_ids(prompts[:2], max_new_tokens=15, seed=11, **SAMPLED)
    assert first.token_ids == again.token_ids
    others = {
        tuple(pj.generate_from_ids(prompts[:2], max_new_tokens=15, seed=s, **SAMPLED).token_ids)
        for s in range(12, 16)
    }
    assert len(others | {tuple(first.token_ids)}) > 1
    state = torch.get_rng_state()
    pj.generate_from_ids(prompts[:2], max_new_tokens=5, **SAMPLED)  # unseeded
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never touched


def test_budget_is_never_exceeded(pj: PersonaJudge, prompts: list[list[int]]) -> None:
    for budget in (1, 2, 5):
        for strategy in ("speculative", "lockstep"):
            out = pj.generate_from_ids(
                prompts[:2],
                lookahead=4,
                max_new_tokens=budget,
                seed=budget,
                strategy=strategy,
                **SAMPLED,
            )
            assert len(out.token_ids) <= budget
            if 1 not in out.token_ids:
                assert len(out.token_ids) == budget and out.finish_reason == "length"


def test_generation_ends_at_every_eos_id_and_text_excludes_it(prompts: list[list[int]]) -> None:
    model = make_tiny_model(len(TOKENIZER), seed=1)
    free = PersonaJudge(model, TOKENIZER, eos_token_ids=[1], defaults=PAPER)
    tokens = free.generate_from_ids(prompts[:2], max_new_tokens=12, seed=5, **SAMPLED).token_ids
    # Declare the 4th free-running token an EOS too: generation must end right there.
    stopper = tokens[3]
    pj = PersonaJudge(model, TOKENIZER, eos_token_ids=[1, stopper], defaults=PAPER)
    for strategy in ("speculative", "lockstep"):
        out = pj.generate_from_ids(
            prompts[:2], max_new_tokens=12, seed=5, strategy=strategy, **SAMPLED
        )
        first = tokens.index(stopper)
        assert out.token_ids == tokens[: first + 1]
        assert out.finish_reason == "eos"
        assert out.text == TOKENIZER.decode(tokens[:first], skip_special_tokens=True)


def _collect(events: Iterator[StreamEvent]) -> tuple[str, GenerationResult]:
    shown = ""
    result = None
    for event in events:
        shown += event.text
        if event.done:
            result = event.result
    assert result is not None
    return shown, result


def test_stop_strings_end_the_answer_and_are_never_streamed(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    # The first seed whose free-running answer has six words or more.
    seed = next(
        s
        for s in range(100)
        if len(
            pj.generate_from_ids(prompts[:2], max_new_tokens=20, seed=s, **SAMPLED).text.split(" ")
        )
        >= 6
    )
    free = pj.generate_from_ids(prompts[:2], max_new_tokens=20, seed=seed, **SAMPLED)
    words = free.text.split(" ")
    stop = f"{words[3]} {words[4][:2]}"  # spans a token boundary, ends mid-token
    cut = free.text.index(stop)
    shown, result = _collect(
        pj.stream_from_ids(prompts[:2], max_new_tokens=20, seed=seed, stop=[stop, "zzz"], **SAMPLED)
    )
    assert result.finish_reason == "stop"
    assert result.text == free.text[:cut]
    assert shown == result.text
    assert result.token_ids == free.token_ids[: len(result.token_ids)]
    # Streaming without a matching stop string shows the whole text.
    shown, result = _collect(
        pj.stream_from_ids(prompts[:2], max_new_tokens=20, seed=seed, stop=["zzz"], **SAMPLED)
    )
    assert shown == result.text == free.text


def test_stream_yields_one_event_per_token_then_a_final_one(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    events = list(pj.stream_from_ids(prompts[:2], max_new_tokens=7, seed=4, **SAMPLED))
    result = events[-1].result
    assert events[-1].done and result is not None
    assert all(not e.done and e.result is None for e in events[:-1])
    assert [e.token_ids[0] for e in events[:-1]] == result.token_ids
    assert [e.trace[0] for e in events[:-1]] == result.trace


def test_threads_generate_concurrently_like_sequential_calls(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    seeds = list(range(20, 26))
    sequential = {
        s: pj.generate_from_ids(prompts[:2], max_new_tokens=10, seed=s, **SAMPLED).token_ids
        for s in seeds
    }
    concurrent: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            strategy = "lockstep" if seed % 2 else "speculative"
            concurrent[seed] = pj.generate_from_ids(
                prompts[:2], max_new_tokens=10, seed=seed, strategy=strategy, **SAMPLED
            ).token_ids
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert concurrent == sequential


def test_auto_runs_one_of_the_two_strategies_from_a_measurement(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    chosen = pj.choose_strategy(n_personas=2, lookahead=4)
    assert chosen in ("speculative", "lockstep")
    out = pj.generate_from_ids(prompts[:2], strategy="auto", max_new_tokens=4, seed=0)
    assert out.stats.strategy == chosen
    assert set(pj._step_timings) >= {(2, 4)}  # measured once, then remembered


def test_strategy_choice_follows_the_predicted_costs() -> None:
    cpu_like = StepTimings(single_step=0.057, verify=0.068, batch_step=0.087)
    gpu_like = StepTimings(single_step=0.010, verify=0.011, batch_step=0.010)
    assert choose_strategy(cpu_like, lookahead=4, acceptance_rate=0.93) == "speculative"
    assert choose_strategy(cpu_like, lookahead=4, acceptance_rate=0.2) == "lockstep"
    assert choose_strategy(gpu_like, lookahead=4, acceptance_rate=0.93) == "lockstep"
    assert expected_tokens_per_round(2, 0.5) == pytest.approx(1.75)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"lookahead": 0}, "lookahead"),
        ({"lookahead": 1000}, "lookahead"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": "\n"}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"strategy": "fast"}, "strategy"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_settings_raise_typed_errors_that_name_the_setting(
    pj: PersonaJudge, prompts: list[list[int]], settings: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidGenerationConfigError, match=fragment):
        pj.generate_from_ids(prompts[:2], **settings)


def test_fixed_roles_with_three_personas_is_refused(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    with pytest.raises(InvalidGenerationConfigError, match="exactly two personas"):
        pj.generate_from_ids(prompts[:3], alternate=False)


def test_prompt_plus_budget_beyond_the_context_window_is_refused(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    window = pj.context_window
    longest = max(len(p) for p in prompts[:2])
    with pytest.raises(ContextOverflowError, match="lower max_new_tokens") as info:
        pj.generate_from_ids(prompts[:2], max_new_tokens=window - longest + 1)
    assert info.value.prompt_tokens == longest and info.value.context_window == window
    out = pj.generate_from_ids(prompts[:2], max_new_tokens=window - longest, seed=0)
    assert out.prompt_tokens == longest


def test_bad_prompt_ids_are_refused(pj: PersonaJudge, prompts: list[list[int]]) -> None:
    with pytest.raises(InvalidPromptError, match="two or more"):
        pj.generate_from_ids([prompts[0]])
    with pytest.raises(InvalidPromptError, match="empty"):
        pj.generate_from_ids([prompts[0], []])
    with pytest.raises(InvalidPromptError, match="outside the vocabulary"):
        pj.generate_from_ids([prompts[0], [5, 10_000]])


def test_judge_distribution_reference_is_sane(pj: PersonaJudge, prompts: list[list[int]]) -> None:
    probs = next_token_probs(pj.model, prompts[0], **FILTERED)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int((probs > 0).sum()) <= 6
