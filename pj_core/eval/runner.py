"""Run an evaluation into a resumable JSONL: generate every method's answers, then judge them.

What is compared: on each dimension ``d``, ``persona-judge``, ``persona-judge-base`` and
``single:d`` against ``direct`` (the other single-persona answers are generated, not judged
on ``d``, to keep the number of judgments down).

Resume: each record's key names what it is the result of; a task whose key is already in the
file is skipped, so an interrupted run (Ctrl-C, a crash, a killed job) continues where it
stopped when the same command is run again. Models are loaded only when some task needs them.

Example (the tiny run the tests do, with injected backends):
    >>> from pj_core.eval.judges import PairwiseJudge
    >>> backends = Backends(
    ...     generate=lambda prompt, method, seed: GeneratedAnswer(method.name + " says hi"),
    ...     pairwise=lambda: PairwiseJudge(lambda system, user: (0.6, 0.4)))
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "results.jsonl"
    >>> config = EvalConfig(limit=2, judges=("pairwise",), dimensions=("humor",))
    >>> log = run_evaluation(config, out, backends=backends, progress=False)
    >>> sum(1 for _ in log.of_kind("pairwise"))   # 2 prompts x 3 methods x 2 orders
    12
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from pj_core.errors import EvaluationError
from pj_core.eval.aspects import Aspect, aspect_for
from pj_core.eval.config import EvalConfig
from pj_core.eval.data import EvalPrompt, load_prompts
from pj_core.eval.judges import PairwiseJudge, PointwiseJudge, ScoreItem
from pj_core.eval.methods import (
    DIRECT,
    PERSONA_JUDGE,
    PERSONA_JUDGE_BASE,
    SINGLE_PREFIX,
    Method,
    plan_methods,
    resolve_dimensions,
)
from pj_core.eval.objective import FluencyScorer, has_proxy
from pj_core.eval.records import (
    CONFIG_KEY,
    Record,
    ResultsLog,
    calibration_key,
    fluency_key,
    generation_key,
    pairwise_key,
    score_key,
)

ORDERS: tuple[str, ...] = ("ab", "ba")


@dataclass(frozen=True)
class GeneratedAnswer:
    """What a generation backend returns for one (prompt, method, seed)."""

    text: str
    finish_reason: str = "length"
    stats: dict[str, Any] = field(default_factory=dict)


GenerateFn = Callable[[str, Method, int], GeneratedAnswer]
"""``(prompt, method, seed) -> GeneratedAnswer``."""


@dataclass
class Backends:
    """The models behind an evaluation, created on first use (a finished run loads nothing).

    Each field is a factory or function; :func:`default_backends` builds the real ones.
    """

    generate: GenerateFn | None = None
    pairwise: Callable[[], PairwiseJudge] | None = None
    pointwise: dict[str, Callable[[], PointwiseJudge]] = field(default_factory=dict)
    fluency: Callable[[], FluencyScorer] | None = None


def compared_methods(dimension: str, methods: list[Method]) -> list[str]:
    """Methods judged against ``direct`` on ``dimension``, among those that ran.

    Example:
        >>> from pj_core.eval.methods import plan_methods
        >>> compared_methods("humor", plan_methods(["humor", "vivid"]))
        ['persona-judge', 'persona-judge-base', 'single:humor']
    """
    names = [m.name for m in methods]
    wanted = [PERSONA_JUDGE, PERSONA_JUDGE_BASE, SINGLE_PREFIX + dimension]
    return [name for name in wanted if name in names]


def check_config(log: ResultsLog, config: EvalConfig) -> None:
    """Refuse to resume a results file written with other settings; record them if new."""
    stored = log.records.get(CONFIG_KEY)
    if stored is None:
        log.append(
            {
                "kind": "config",
                "key": CONFIG_KEY,
                "fingerprint": config.fingerprint(),
                "settings": config.as_dict(),
            }
        )
        return
    different = sorted(
        name
        for name in set(stored["fingerprint"]) | set(config.fingerprint())
        if stored["fingerprint"].get(name) != config.fingerprint().get(name)
    )
    if different:
        raise EvaluationError(
            f"{log.path} was written with other settings ({', '.join(different)} differ): "
            "rerun with the same settings to resume, or choose a new --out directory"
        )


def run_evaluation(
    config: EvalConfig,
    results_path: str | os.PathLike[str],
    *,
    backends: Backends,
    on_record: Callable[[Record], None] | None = None,
    progress: bool = True,
) -> ResultsLog:
    """Generate and judge everything ``config`` asks for that ``results_path`` lacks.

    Args:
        config: the run's settings.
        results_path: the JSONL file; created, or resumed when it exists.
        backends: the models (see :func:`default_backends`).
        on_record: called after each record is written (progress hooks, tests).
        progress: show a tqdm progress bar.

    Returns:
        The results log with every record of the run.

    Raises:
        EvaluationError: the file holds another run's settings, or is damaged.
    """
    log = ResultsLog(results_path)
    check_config(log, config)
    prompts = load_prompts(config.prompts, limit=config.limit, max_chars=config.max_prompt_chars)
    methods = plan_methods(
        config.dimensions,
        methods=config.methods,
        k=config.k,
        one_per_preference=config.one_per_preference,
    )
    aspects = [aspect_for(p) for p in resolve_dimensions(config.dimensions)]
    tasks = _Tasks(config, log, prompts, methods, aspects, backends, on_record)
    total = tasks.count()
    done = tasks.count(done_only=True)
    with tqdm(
        total=total,
        initial=done,
        disable=not progress,
        desc="pj eval",
        unit="task",
        dynamic_ncols=True,
    ) as bar:
        tasks.run(bar)
    return log


class _Tasks:
    """The run's task list, in execution order: generations, pairwise, then pointwise."""

    def __init__(
        self,
        config: EvalConfig,
        log: ResultsLog,
        prompts: list[EvalPrompt],
        methods: list[Method],
        aspects: list[Aspect],
        backends: Backends,
        on_record: Callable[[Record], None] | None,
    ) -> None:
        self.config, self.log, self.prompts = config, log, prompts
        self.methods, self.aspects, self.backends = methods, aspects, backends
        self.on_record = on_record
        self._pairwise: PairwiseJudge | None = None
        self._fluency: FluencyScorer | None = None
        self._pointwise: dict[str, PointwiseJudge] = {}

    # ------------------------------------------------------------------ task enumeration
    def _generation_keys(self, prompt: EvalPrompt) -> Iterator[tuple[str, Method]]:
        seed = self.config.prompt_seed(prompt.id)
        for method in self.methods:
            yield generation_key(prompt.id, method.name, seed), method

    def _pairwise_keys(self, prompt: EvalPrompt) -> Iterator[tuple[str, Aspect, str, str]]:
        if "pairwise" not in self.config.judges:
            return
        for aspect in self.aspects:
            for method in compared_methods(aspect.dimension, self.methods):
                for order in ORDERS:
                    key = pairwise_key(
                        "pairwise", aspect.dimension, prompt.id, method, DIRECT, order
                    )
                    yield key, aspect, method, order

    def _score_keys(self, judge: str, prompt: EvalPrompt) -> Iterator[tuple[str, Aspect, str]]:
        for aspect in self.aspects:
            if judge == "objective" and not has_proxy(aspect.dimension):
                continue  # no objective measure of this dimension (humour, ...)
            for method in [DIRECT, *compared_methods(aspect.dimension, self.methods)]:
                yield score_key(judge, aspect.dimension, prompt.id, method), aspect, method

    def _fluency_keys(self, prompt: EvalPrompt) -> Iterator[tuple[str, str]]:
        if "fluency" not in self.config.judges:
            return
        seed = self.config.prompt_seed(prompt.id)
        for method in self.methods:
            yield fluency_key(prompt.id, method.name, seed), method.name

    def _pointwise_judges(self) -> list[str]:
        return [j for j in self.config.judges if j not in ("pairwise", "fluency")]

    def _keys(self, prompt: EvalPrompt) -> list[str]:
        keys = [k for k, _ in self._generation_keys(prompt)]
        keys += [k for k, _ in self._fluency_keys(prompt)]
        keys += [k for k, *_ in self._pairwise_keys(prompt)]
        if prompt is self.prompts[0]:  # one content-free calibration per judged dimension
            judged = dict.fromkeys(
                aspect.dimension for _, aspect, *_ in self._pairwise_keys(prompt)
            )
            keys += [calibration_key("pairwise", dimension) for dimension in judged]
        for judge in self._pointwise_judges():
            keys += [k for k, *_ in self._score_keys(judge, prompt)]
        return keys

    def count(self, *, done_only: bool = False) -> int:
        return sum(
            1
            for prompt in self.prompts
            for key in self._keys(prompt)
            if not done_only or key in self.log
        )

    # ------------------------------------------------------------------ execution
    def _write(self, record: Record, bar: tqdm) -> None:
        self.log.append(record)
        bar.update(1)
        if self.on_record is not None:
            self.on_record(record)

    def _answer(self, prompt_id: str, method: str) -> str:
        key = generation_key(prompt_id, method, self.config.prompt_seed(prompt_id))
        return str(self.log.records[key]["text"])

    def run(self, bar: tqdm) -> None:
        # Prompt by prompt: answers, then every judgment of them. An interrupted run then
        # holds complete comparisons for the prompts it finished, and its report is usable.
        for prompt in self.prompts:
            self._run_generations(prompt, bar)
            self._run_fluency(prompt, bar)
            self._run_pairwise(prompt, bar)
            for judge in self._pointwise_judges():
                self._run_pointwise(judge, prompt, bar)

    def _run_generations(self, prompt: EvalPrompt, bar: tqdm) -> None:
        for key, method in self._generation_keys(prompt):
            if key in self.log:
                continue
            if self.backends.generate is None:
                raise EvaluationError("no generation backend: give Backends(generate=...)")
            seed = self.config.prompt_seed(prompt.id)
            bar.set_postfix_str(f"{prompt.id} generate {method.name}")
            answer = self.backends.generate(prompt.prompt, method, seed)
            self._write(
                {
                    "kind": "generation",
                    "key": key,
                    "prompt_id": prompt.id,
                    "method": method.name,
                    "seed": seed,
                    "text": answer.text,
                    "finish_reason": answer.finish_reason,
                    "stats": answer.stats,
                    "personas": [p.text for p in method.personas],
                    "alternate": method.alternate,
                },
                bar,
            )

    def _run_fluency(self, prompt: EvalPrompt, bar: tqdm) -> None:
        for key, method in self._fluency_keys(prompt):
            if key in self.log:
                continue
            if self._fluency is None:
                if self.backends.fluency is None:
                    raise EvaluationError("no fluency scorer: give Backends(fluency=...)")
                self._fluency = self.backends.fluency()
            bar.set_postfix_str(f"{prompt.id} fluency {method}")
            guard = self._fluency.score(prompt.prompt, self._answer(prompt.id, method))
            self._write(
                {
                    "kind": "fluency",
                    "key": key,
                    "prompt_id": prompt.id,
                    "method": method,
                    "seed": self.config.prompt_seed(prompt.id),
                    **asdict(guard),
                },
                bar,
            )

    def _pairwise_judge(self) -> PairwiseJudge:
        if self._pairwise is None:
            if self.backends.pairwise is None:
                raise EvaluationError("no pairwise judge: give Backends(pairwise=...)")
            self._pairwise = self.backends.pairwise()
        return self._pairwise

    def _calibrate(self, aspect: Aspect, bar: tqdm) -> None:
        key = calibration_key("pairwise", aspect.dimension)
        if key in self.log:
            return
        bar.set_postfix_str(f"calibrate pairwise {aspect.dimension}")
        verdict = self._pairwise_judge().content_free(aspect)
        self._write(
            {
                "kind": "calibration",
                "key": key,
                "judge": "pairwise",
                "dimension": aspect.dimension,
                **asdict(verdict),
            },
            bar,
        )

    def _run_pairwise(self, prompt: EvalPrompt, bar: tqdm) -> None:
        # Every judged dimension is calibrated once, also in a run resumed from a file that
        # holds all its judgments but no calibration (written by an older version).
        for aspect in {a.dimension: a for _, a, *_ in self._pairwise_keys(prompt)}.values():
            self._calibrate(aspect, bar)
        for key, aspect, method, order in self._pairwise_keys(prompt):
            if key in self.log:
                continue
            ours, baseline = self._answer(prompt.id, method), self._answer(prompt.id, DIRECT)
            first, second = (ours, baseline) if order == "ab" else (baseline, ours)
            bar.set_postfix_str(f"{prompt.id} pairwise {aspect.dimension}")
            verdict = self._pairwise_judge().verdict(prompt.prompt, aspect, first, second)
            self._write(
                {
                    "kind": "pairwise",
                    "key": key,
                    "judge": "pairwise",
                    "dimension": aspect.dimension,
                    "prompt_id": prompt.id,
                    "method_a": method,
                    "method_b": DIRECT,
                    "order": order,
                    **asdict(verdict),
                },
                bar,
            )

    def _pointwise_judge(self, name: str) -> PointwiseJudge:
        if name not in self._pointwise:
            factory = self.backends.pointwise.get(name)
            if factory is None:
                raise EvaluationError(
                    f"no {name} judge: give Backends(pointwise={{{name!r}: ...}})"
                )
            self._pointwise[name] = factory()
        return self._pointwise[name]

    def _run_pointwise(self, name: str, prompt: EvalPrompt, bar: tqdm) -> None:
        # All of one prompt's items in one call: the scorer batches them.
        pending = [t for t in self._score_keys(name, prompt) if t[0] not in self.log]
        if not pending:
            return
        bar.set_postfix_str(f"{prompt.id} {name}")
        items = [
            ScoreItem(prompt.prompt, self._answer(prompt.id, method), aspect)
            for _, aspect, method in pending
        ]
        scores = self._pointwise_judge(name).score(items)
        for (key, aspect, method), score in zip(pending, scores, strict=True):
            self._write(
                {
                    "kind": "score",
                    "key": key,
                    "judge": name,
                    "dimension": aspect.dimension,
                    "prompt_id": prompt.id,
                    "method": method,
                    "score": score,
                },
                bar,
            )
