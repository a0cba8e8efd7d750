"""The benchmark harness (benchmarks/ and ``pj bench``), on the tiny model.

Speed targets are never checked here (timed tests on a shared machine would be noise); these
tests check that the harness measures what it says: the reference loop is the same algorithm
as the engine, forwards are counted, memory peaks are per cell, targets are computed from
the right cells, and ``pj bench`` runs end to end and writes its reports.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.batch_speed import batch_sizes, requests_for
from benchmarks.bench_config import BenchConfig, Cell
from benchmarks.memory import PeakMemory
from benchmarks.methods import ForwardCounter, run_plain, run_reference
from benchmarks.prompt_source import load_prompts
from benchmarks.reference_loop import reference_generate
from benchmarks.report import markdown_table, write_report
from benchmarks.summary import summarise
from pj_core.cli import main
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError, InvalidPromptError
from pj_core.settings import PAPER
from tests._tiny import make_tiny_model


def test_presets_and_cells() -> None:
    full = BenchConfig.preset("full")
    assert len(full.cells("speculative")) == 12  # λ 1..6 × 64, 256
    assert [c.label for c in full.cells("plain")] == ["plain n=64", "plain n=256"]
    assert [c.label for c in full.cells("lockstep")] == ["lockstep n=64", "lockstep n=256"]
    targets = BenchConfig.preset("targets", reference_prompts=1)
    assert {c.max_new_tokens for c in targets.cells("auto")} == {128, 256}
    assert targets.prompt_count("reference") == 1 and targets.prompt_count("plain") == 3
    assert BenchConfig.from_json(targets.to_json()) == targets


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"methods": ("plain", "fast")}, "unknown benchmark method"),
        ({"lookaheads": (0,)}, "lookaheads"),
        ({"token_budgets": ()}, "token budgets"),
        ({"repeats": 0}, "repeats must be"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidGenerationConfigError, match=message):
        BenchConfig.preset("quick", **overrides)


def test_prompts_come_from_koala_and_too_many_is_an_error() -> None:
    prompts, source = load_prompts(16)
    assert len(prompts) == 16 and "koala" in source
    with pytest.raises(InvalidPromptError, match="--prompts"):
        load_prompts(10_000)


@pytest.mark.parametrize("lookahead", [1, 3, 5])
def test_reference_loop_emits_the_engines_tokens(
    tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast, lookahead: int
) -> None:
    # Same rounds, same draws: without a KV cache the tokens must not change.
    engine = PersonaJudge(tiny_model, tiny_tokenizer, eos_token_ids=(), defaults=PAPER)
    prompts = [[2, 4, 9, 10, 11], [2, 4, 12, 13]]
    copies = [tiny_model, copy.deepcopy(tiny_model)]
    for seed in range(4):
        want = engine.generate_from_ids(prompts, lookahead=lookahead, max_new_tokens=13, seed=seed)
        got = reference_generate(
            copies,
            prompts,
            lookahead=lookahead,
            max_new_tokens=13,
            temperature=0.7,
            top_k=20,
            top_p=0.9,
            generator=torch.Generator().manual_seed(seed),
        )
        assert got.token_ids == want.token_ids
        assert (got.drafted, got.accepted) == (want.stats.drafted, want.stats.accepted)


def test_reference_loop_recomputes_everything(tiny_model: LlamaForCausalLM) -> None:
    config = BenchConfig.preset("quick", temperature=0.0)  # greedy: every draft accepted
    copies = [tiny_model, copy.deepcopy(tiny_model)]  # same weights: every token is accepted
    sample = run_reference(copies, [[5, 6, 7], [5, 6, 7]], Cell("reference", 4, 10), config, 0)
    # Rounds of 4 drafts + 1 verify emit 5 tokens: 10 tokens = 2 rounds = 10 forwards.
    assert sample.tokens == 10 and sample.forward_passes == 10
    assert sample.accepted == sample.drafted == 8


def test_authors_loop_projects_every_position_and_emits_the_reference_tokens(
    tiny_model: LlamaForCausalLM,
) -> None:
    config = BenchConfig.preset("quick")
    copies = [tiny_model, copy.deepcopy(tiny_model)]
    prompts = [[5, 6, 7], [8, 9, 5, 6]]
    seen: list[tuple[int, int]] = []  # (context length of a forward, rows it projected)

    def context(_model: object, _args: object, kwargs: dict[str, torch.Tensor]) -> None:
        seen.append((kwargs["input_ids"].shape[1], 0))

    def projected(_module: object, _inputs: object, out: torch.Tensor) -> None:
        seen[-1] = (seen[-1][0], out.shape[1])

    hooks = [m.register_forward_pre_hook(context, with_kwargs=True) for m in copies]
    hooks += [m.lm_head.register_forward_hook(projected) for m in copies]
    try:
        reference = run_reference(copies, prompts, Cell("reference", 3, 8), config, seed=5)
        reference_seen, seen[:] = list(seen), []
        authors = run_reference(copies, prompts, Cell("authors", 3, 8), config, seed=5)
    finally:
        for hook in hooks:
            hook.remove()
    assert authors.token_ids == reference.token_ids
    assert authors.forward_passes == reference.forward_passes == len(seen)
    # The authors' loop projects the whole context onto the vocabulary in every forward;
    # the reference only the rows it samples from (1 per draft step, λ+1 per verify).
    assert all(rows == length for length, rows in seen)
    assert all(rows <= 4 and rows < length for length, rows in reference_seen)


def test_plain_generate_runs_the_full_budget(
    tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    config = BenchConfig.preset("quick")
    sample = run_plain(tiny_model, [2, 4, 9, 10], Cell("plain", None, 12), config, seed=0)
    assert sample.tokens == 12 and len(sample.token_ids) == 12
    assert sample.forward_passes == 12  # one per token, the prefill giving the first
    assert 0 < sample.first_token_seconds <= sample.seconds


def test_forward_counter_removes_its_hooks(tiny_model: LlamaForCausalLM) -> None:
    ids = torch.tensor([[5, 6]])
    with ForwardCounter([tiny_model]) as counter:
        tiny_model(input_ids=ids)
        tiny_model(input_ids=ids)
    tiny_model(input_ids=ids)
    assert counter.count == 2


def test_peak_memory_is_per_window() -> None:
    tracker = PeakMemory()
    if not tracker.resettable:
        pytest.skip("no resettable peak RSS here (not Linux)")
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    del big
    tracker.reset()
    quiet_peak = tracker.peak_rss_mb()
    again = torch.ones(96 * 1024 * 1024 // 4)
    loud_peak = tracker.peak_rss_mb()
    del again
    assert loud_peak - quiet_peak > 80


def _worker(method: str, tps: float, rss: float, lookahead: int | None, n: int) -> dict[str, Any]:
    sample = {
        "method": method,
        "lookahead": lookahead,
        "max_new_tokens": n,
        "prompt_index": 0,
        "round": 0,
        "seed": 0,
        "tokens": n,
        "seconds": n / tps,
        "first_token_seconds": 0.1,
        "forward_passes": n,
        "drafted": None if method == "plain" else n,
        "accepted": None if method == "plain" else n // 2,
        "strategy": None,
        "token_ids": [1] * n,
        "tokens_per_second": tps,
        "peak_rss_mb": rss,
        "peak_gpu_mb": None,
    }
    return {
        "method": method,
        "round": 0,
        "load_seconds": 1.0,
        "load_peak_rss_mb": rss,
        "process_peak_rss_mb": rss,
        "exact_cell_peaks": True,
        "samples": [sample],
    }


def test_targets_come_from_the_right_cells() -> None:
    config = BenchConfig.preset("targets", methods=("plain", "reference", "authors", "speculative"))
    workers = [
        _worker("plain", 20.0, 1000.0, None, 128),
        _worker("speculative", 15.0, 1100.0, 4, 128),  # 0.75x speed: met; 1.1x RSS: met
        _worker("reference", 2.0, 1900.0, 4, 256),
        _worker("authors", 0.5, 1900.0, 4, 256),
        _worker("speculative", 10.0, 1300.0, 4, 256),  # 5x the reference, 20x the authors'
    ]
    summary = summarise(config, workers)
    met = {(t["target"].split(" (λ")[0], t["met"]) for t in summary["targets"]}
    assert ("tokens/s vs plain generate", True) in met
    assert ("tokens/s vs reference loop", False) in met
    assert ("tokens/s vs authors' loop (full logits)", True) in met
    speed = next(t for t in summary["targets"] if t["target"].startswith("tokens/s vs plain"))
    assert speed["value"] == pytest.approx(0.75)
    # The process peak of the method is the max over its workers: 1300 / 1000.
    rss = next(t for t in summary["targets"] if t["target"].startswith("process peak"))
    assert rss["value"] == pytest.approx(1.3) and not rss["met"]
    spec = next(c for c in summary["cells"] if c["method"] == "speculative" and c["lookahead"])
    assert spec["acceptance_rate"] == pytest.approx(0.5)


def test_the_shipped_defaults_are_compared_with_strength_zero() -> None:
    config = BenchConfig.preset("targets", methods=("speculative", "defaults"))
    workers = [
        _worker("speculative", 20.0, 1000.0, 4, 128),
        _worker("defaults", 17.0, 1000.0, 4, 128),  # 0.85x: met
        _worker("speculative", 20.0, 1000.0, 4, 256),
        _worker("defaults", 15.0, 1000.0, 4, 256),  # 0.75x: missed
    ]
    targets = {
        t["target"]: (t["value"], t["met"])
        for t in summarise(config, workers)["targets"]
        if t["engine"] == "defaults"
    }
    assert targets == {
        "tokens/s vs speculative at strength 0 (λ=4, n=128)": (pytest.approx(0.85), True),
        "tokens/s vs speculative at strength 0 (λ=4, n=256)": (pytest.approx(0.75), False),
    }


def test_engine_methods_pin_strength_zero_and_defaults_leave_it_to_the_engine() -> None:
    from benchmarks.bench_config import Cell
    from benchmarks.methods import run_engine

    seen: list[dict[str, Any]] = []

    class Engine:
        model = torch.nn.Linear(1, 1)

        def stream(self, conversation: str, personas: Any, **settings: Any) -> Any:
            seen.append(settings)
            result = SimpleNamespace(
                token_ids=[1, 2], stats=SimpleNamespace(drafted=0, accepted=0, strategy="x")
            )
            yield SimpleNamespace(token_ids=[], result=result)

    config = BenchConfig.preset("quick")
    run_engine(Engine(), "hi", Cell("speculative", 4, 2), config, 0)
    run_engine(Engine(), "hi", Cell("defaults", 4, 2), config, 0)
    assert seen[0]["strength"] == 0.0 and seen[0]["decoder"] == "persona-judge"
    assert seen[0]["strategy"] == "speculative"
    assert not {"strength", "decoder", "strategy"} & set(seen[1])


def test_constrained_is_compared_with_the_same_decoding_unconstrained() -> None:
    config = BenchConfig.preset("targets", methods=("defaults", "constrained"))
    constrained = _worker("constrained", 18.0, 1000.0, 4, 128)  # 0.9x: met
    constrained["samples"][0]["constraint_seconds"] = 0.256  # 2 ms per token
    workers = [_worker("defaults", 20.0, 1000.0, 4, 128), constrained]
    summary = summarise(config, workers)
    (target,) = [t for t in summary["targets"] if t["engine"] == "constrained"]
    assert target["value"] == pytest.approx(0.9) and target["met"]
    assert target["threshold"] == 0.85
    cell = next(c for c in summary["cells"] if c["method"] == "constrained")
    assert cell["constraint_ms_per_token"] == pytest.approx(2.0)
    plain = next(c for c in summary["cells"] if c["method"] == "defaults")
    assert plain["constraint_ms_per_token"] is None


def test_the_constrained_method_times_its_mask_and_runs_the_full_budget() -> None:
    """On a tiny model whose tokenizer the grammar engine reads: the tool-call schema cannot
    finish within the budget, every token parses as a prefix of it, and the mask is timed."""
    from benchmarks.bench_config import Cell
    from benchmarks.methods import TOOL_CALLS_SCHEMA, run_engine
    from pj_core.engine import PersonaJudge
    from tests._bpe import make_bpe_tokenizer

    tokenizer = make_bpe_tokenizer()
    engine = PersonaJudge(make_tiny_model(len(tokenizer), seed=4), tokenizer, eos_token_ids=())
    config = BenchConfig.preset("quick")
    sample = run_engine(engine, "hello", Cell("constrained", 4, 24), config, 0)
    assert sample.tokens == 24
    assert sample.constraint_seconds is not None and 0 < sample.constraint_seconds < sample.seconds
    text = str(tokenizer.decode(sample.token_ids))
    assert text.startswith('[{"name": "')
    matcher = engine.compile_constraint(TOOL_CALLS_SCHEMA).matcher()  # type: ignore[union-attr]
    for token in sample.token_ids:
        matcher.consume(token)  # raises if any token broke the schema
    assert not matcher.is_finished()


def test_report_files(tmp_path: Path) -> None:
    config = BenchConfig.preset("targets", methods=("plain", "speculative"))
    summary = summarise(
        config,
        [_worker("plain", 20.0, 1000.0, None, 128), _worker("speculative", 15.0, 1100.0, 4, 128)],
    )
    meta = {
        "command": "pj bench --targets",
        "started": "now",
        "wall_seconds": 60.0,
        "git_commit": "abc",
        "platform": "linux",
        "cpu_count": 2,
        "torch_threads": 2,
        "model": "m",
        "device": "cpu",
        "dtype": "float32",
        "load_average_before": [1.0, 1.0, 1.0],
        "load_average_after": [2.0, 1.0, 1.0],
        "prompt_source": "koala",
        "config": config.to_json(),
    }
    report = {"meta": meta, **summary}
    paths = write_report(report, tmp_path, tmp_path / "img", "targets")
    assert {p.name for p in paths} == {
        "targets.json",
        "targets.md",
        "bench_targets_tokens_per_second.png",
        "bench_targets_forwards.png",
        "bench_targets_memory.png",
    }
    assert all(p.stat().st_size > 0 for p in paths)
    table = markdown_table(report)
    assert (
        "| tokens/s vs plain generate (λ=4, n=128) | speculative | 0.75x | ≥ 0.7x | yes |" in table
    )
    assert json.loads((tmp_path / "targets.json").read_text())["meta"]["command"] == meta["command"]


def test_batch_suite_helpers() -> None:
    assert batch_sizes(8) == [1, 2, 4, 8] and batch_sizes(6) == [1, 2, 4, 6]
    requests = requests_for(["a?", "b?"], max_new_tokens=5, seed=10)
    assert [r["seed"] for r in requests] == [10, 11]
    assert requests[0]["personas"] != requests[1]["personas"]


@pytest.fixture(scope="module")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_pj_bench_runs_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Real worker processes on the tiny model (plain generate is covered above in-process).
    code = main(
        [
            "bench",
            "--quick",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--methods",
            "reference",
            "speculative",
            "defaults",
            "--tokens",
            "6",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "quick.json").read_text())
    assert [c["method"] for c in report["cells"]] == ["reference", "speculative", "defaults"]
    assert all(c["samples"] == 1 and c["peak_rss_mb"] > 0 for c in report["cells"])
    assert report["meta"]["torch_threads"] == 1
    # Same seed, same rounds: the no-cache reference loop emits the engine's tokens.
    assert report["agreement"] == [{"method": "reference", "identical": 1, "compared": 1}]
    assert (tmp_path / "quick.md").read_text().startswith("# Persona-judge speed and memory")
    assert (tmp_path / "bench_quick_tokens_per_second.png").stat().st_size > 0


def test_pj_bench_batch_suite(tiny_model_dir: Path, tmp_path: Path) -> None:
    code = main(
        [
            "bench",
            "--quick",
            "--suite",
            "batch",
            "--model",
            str(tiny_model_dir),
            "--requests",
            "3",
            "--batch-tokens",
            "5",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "quick_batch.json").read_text())
    assert [r["requests"] for r in report["rows"]] == [1, 2, 3]
    assert report["exactness"] == {"identical": 3, "compared": 3}
