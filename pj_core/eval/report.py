"""From records to results: per-prompt outcomes, win rates, summary JSON, table and chart.

Outcome of one prompt, for a method against ``direct`` on one dimension:

- ``pairwise``: :func:`pj_core.eval.judges.combine_orders` of the two orders' verdicts;
- ``reward`` / ``embedding``: the higher score wins, equal within ``1e-6`` is a tie.

A prompt counts only when every record its outcome needs exists, so a partial run reports on
the prompts it finished (``n`` in each row says how many).

Example:
    >>> outcomes_pairwise([
    ...     {"kind": "pairwise", "judge": "pairwise", "dimension": "humor", "prompt_id": "p1",
    ...      "method_a": "persona-judge", "order": "ab", "verdict": "A"},
    ...     {"kind": "pairwise", "judge": "pairwise", "dimension": "humor", "prompt_id": "p1",
    ...      "method_a": "persona-judge", "order": "ba", "verdict": "B"}])
    {('pairwise', 'humor', 'persona-judge'): {'p1': 1.0}}
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from statistics import mean
from typing import Any

from pj_core.errors import EvaluationError
from pj_core.eval.judges import (
    DEFAULT_TIE_MARGIN,
    band,
    calibrated_prob_first,
    combine_orders,
)
from pj_core.eval.methods import DIRECT, PERSONA_JUDGE, PERSONA_JUDGE_BASE, SINGLE_PREFIX
from pj_core.eval.records import Record, ResultsLog
from pj_core.eval.stats import TIE, outcome_from_scores, win_rate_ci

OutcomeKey = tuple[str, str, str]  # (judge, dimension, method)
SCORE_TIE_EPS = 1e-6


def outcomes_pairwise(
    records: Iterable[Record],
    calibrations: Iterable[Record] = (),
    *,
    tie_margin: float = DEFAULT_TIE_MARGIN,
) -> dict[OutcomeKey, dict[str, float]]:
    """Per-prompt outcomes of the pairwise judge; prompts missing an order are left out.

    Readings of the same records:

    - ``<judge>``: the verdicts combined by :func:`combine_orders` (win only if both orders
      agree): the strict reading;
    - ``<judge>-soft``: the judge's probability of preferring the method, averaged over both
      orders, ``(P_ab + 1 - P_ba) / 2`` with ``P = p(A) / (p(A) + p(B))``. A constant position
      bias cancels in the average, so a weak but consistent preference still shows, where
      the strict reading calls it a tie;
    - ``<judge>-calibrated`` (where ``calibrations`` hold the judge's content-free reading of
      that dimension): each order's probabilities with the letter bias divided out
      (:func:`pj_core.eval.judges.calibrated_prob_first`), the ``tie_margin`` band applied,
      then both orders combined as in the strict reading.
    """
    free = {(c["judge"], c["dimension"]): c for c in calibrations}
    orders: dict[tuple[str, str, str, str], dict[str, Record]] = defaultdict(dict)
    for r in records:
        orders[(r["judge"], r["dimension"], r["method_a"], r["prompt_id"])][r["order"]] = r
    out: dict[OutcomeKey, dict[str, float]] = defaultdict(dict)
    for (judge, dimension, method, prompt_id), by_order in orders.items():
        if "ab" in by_order and "ba" in by_order:
            first, swapped = by_order["ab"], by_order["ba"]
            out[(judge, dimension, method)][prompt_id] = combine_orders(
                first["verdict"], swapped["verdict"]
            )
            if "prob_first" in first and "prob_first" in swapped:
                soft = (float(first["prob_first"]) + 1.0 - float(swapped["prob_first"])) / 2.0
                out[(f"{judge}-soft", dimension, method)][prompt_id] = soft
            bias = free.get((judge, dimension))
            if bias is not None and all("p_a" in r for r in (first, swapped)):
                verdicts = [
                    band(
                        calibrated_prob_first(r["p_a"], r["p_b"], bias["p_a"], bias["p_b"]),
                        tie_margin,
                    )
                    for r in (first, swapped)
                ]
                out[(f"{judge}-calibrated", dimension, method)][prompt_id] = combine_orders(
                    verdicts[0], verdicts[1]
                )
    return dict(out)


UNINFORMATIVE_BELOW = 0.2
"""A pairwise reading decisive (both orders agree on a winner) on fewer pairs than this
share is reported as uninformative."""


def pairwise_decisiveness(log: ResultsLog, *, tie_margin: float) -> dict[str, dict[str, Any]]:
    """Per strict reading (``pairwise``, ``pairwise-calibrated``): on how many judged pairs
    both orders agreed on a winner, and whether that makes the judge informative."""
    outcomes = outcomes_pairwise(
        log.of_kind("pairwise"), log.of_kind("calibration"), tie_margin=tie_margin
    )
    out: dict[str, dict[str, Any]] = {}
    for reading in sorted({judge for judge, _, _ in outcomes}):
        if reading.endswith("-soft"):
            continue
        values = [v for (j, _, _), by in outcomes.items() if j == reading for v in by.values()]
        decisive = sum(v != TIE for v in values) / len(values) if values else 0.0
        out[reading] = {
            "pairs": len(values),
            "decisive_share": decisive,
            "informative": decisive >= UNINFORMATIVE_BELOW,
        }
    return out


def outcomes_scores(records: Iterable[Record]) -> dict[OutcomeKey, dict[str, float]]:
    """Per-prompt outcomes of pointwise judges (each method's score against direct's).

    Example:
        >>> rows = [{"judge": "reward", "dimension": "humor", "prompt_id": "p", "method": m,
        ...          "score": s} for m, s in (("direct", 1.0), ("persona-judge", 2.0))]
        >>> outcomes_scores(rows)
        {('reward', 'humor', 'persona-judge'): {'p': 1.0}}
    """
    scores: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for r in records:
        scores[(r["judge"], r["dimension"], r["prompt_id"])][r["method"]] = float(r["score"])
    out: dict[OutcomeKey, dict[str, float]] = defaultdict(dict)
    for (judge, dimension, prompt_id), by_method in scores.items():
        if DIRECT not in by_method:
            continue
        for method, score in by_method.items():
            if method != DIRECT:
                out[(judge, dimension, method)][prompt_id] = outcome_from_scores(
                    score, by_method[DIRECT], eps=SCORE_TIE_EPS
                )
    return dict(out)


def win_rate_rows(
    log: ResultsLog, *, n_resamples: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per (judge, dimension, method): win rate against direct with its 95% CI."""
    outcomes = outcomes_pairwise(
        log.of_kind("pairwise"), log.of_kind("calibration"), tie_margin=_tie_margin(log)
    )
    outcomes.update(outcomes_scores(log.of_kind("score")))
    rows = []
    for (judge, dimension, method), by_prompt in sorted(outcomes.items()):
        ordered = [by_prompt[p] for p in sorted(by_prompt)]
        rate = win_rate_ci(ordered, n_resamples=n_resamples, seed=seed)
        rows.append(
            {
                "judge": judge,
                "dimension": dimension,
                "method": method,
                "baseline": DIRECT,
                **asdict(rate),
            }
        )
    return rows


def _tie_margin(log: ResultsLog) -> float:
    settings = log.records.get("config", {}).get("settings", {})
    return float(settings.get("tie_margin", DEFAULT_TIE_MARGIN))


def generation_summary(log: ResultsLog) -> dict[str, dict[str, Any]]:
    """Per method: answers, mean tokens, mean acceptance rate, finish reasons, mean tokens/s."""
    by_method: dict[str, list[Record]] = defaultdict(list)
    for r in log.of_kind("generation"):
        by_method[r["method"]].append(r)
    summary = {}
    for method, records in sorted(by_method.items()):
        stats = [r.get("stats", {}) for r in records]
        reasons: dict[str, int] = defaultdict(int)
        for r in records:
            reasons[str(r.get("finish_reason"))] += 1
        summary[method] = {
            "answers": len(records),
            "mean_tokens": _mean(s.get("tokens") for s in stats),
            "mean_acceptance_rate": _mean(s.get("acceptance_rate") for s in stats),
            "mean_decode_seconds": _mean(s.get("decode_seconds") for s in stats),
            "finish_reasons": dict(reasons),
        }
    return summary


def fluency_summary(log: ResultsLog) -> dict[str, dict[str, Any]]:
    """Per method: the fluency guard's means (repeated word 3-gram share, perplexity under
    the generator with no persona) over its answers."""
    by_method: dict[str, list[Record]] = defaultdict(list)
    for r in log.of_kind("fluency"):
        by_method[r["method"]].append(r)
    return {method: fluency_means(records) for method, records in sorted(by_method.items())}


def fluency_means(guards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``answers`` and the means of ``repeated_trigrams`` and ``perplexity`` over fluency
    guards (records or :class:`pj_core.eval.objective.Fluency` as dicts); a mean with nothing
    to average (no perplexity for empty answers) is None.

    Example:
        >>> fluency_means([{"repeated_trigrams": 0.0, "perplexity": 4.0},
        ...                {"repeated_trigrams": 0.5, "perplexity": None}])
        {'answers': 2, 'mean_repeated_trigrams': 0.25, 'mean_perplexity': 4.0}
    """
    return {
        "answers": len(guards),
        "mean_repeated_trigrams": _mean(g.get("repeated_trigrams") for g in guards),
        "mean_perplexity": _mean(g.get("perplexity") for g in guards),
    }


def pairwise_position_bias(log: ResultsLog) -> float | None:
    """Share of pairwise verdicts that chose slot A (0.5 is unbiased; None: no verdicts)."""
    verdicts = [r["verdict"] for r in log.of_kind("pairwise") if r["verdict"] != "tie"]
    return sum(v == "A" for v in verdicts) / len(verdicts) if verdicts else None


def build_summary(log: ResultsLog, *, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Everything a reader needs: settings, counts, generation stats and win rates."""
    config = log.records.get("config", {})
    pairwise = list(log.of_kind("pairwise"))
    return {
        "settings": config.get("settings", {}),
        "prompts": len({r["prompt_id"] for r in log.of_kind("generation")}),
        "records": {
            kind: sum(1 for _ in log.of_kind(kind)) for kind in ("generation", "pairwise", "score")
        },
        "generation": generation_summary(log),
        "fluency": fluency_summary(log),
        "pairwise_decisiveness": pairwise_decisiveness(log, tie_margin=_tie_margin(log)),
        "pairwise_content_free_prob_a": _mean(
            r.get("prob_first") for r in log.of_kind("calibration")
        ),
        "pairwise_share_slot_a": pairwise_position_bias(log),
        "pairwise_tie_share": (
            sum(r["verdict"] == "tie" for r in pairwise) / len(pairwise) if pairwise else None
        ),
        "win_rate_definition": "win 1, tie 0.5, loss 0; mean over prompts; 95% percentile "
        f"bootstrap over prompts, B={n_resamples}, seed={seed}",
        "win_rates": win_rate_rows(log, n_resamples=n_resamples, seed=seed),
    }


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, int | float)]
    return mean(numbers) if numbers else None


def _table_methods(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["method"] for r in rows}
    ordered = [m for m in (PERSONA_JUDGE, PERSONA_JUDGE_BASE) if m in present]
    return [*ordered, "single"] if any(m.startswith(SINGLE_PREFIX) for m in present) else ordered


def markdown_table(summary: dict[str, Any]) -> str:
    """Win rates against direct prompting, one row per (dimension, judge).

    The ``single`` column is the single-persona prompt of that row's own dimension.
    """
    rows = summary["win_rates"]
    methods = _table_methods(rows)
    lookup = {(r["dimension"], r["judge"], r["method"]): r for r in rows}
    header = "| dimension | judge | n | " + " | ".join(f"{m} vs direct" for m in methods) + " |"
    lines = [header, "|" + " --- |" * (3 + len(methods))]
    for dimension, judge in sorted({(r["dimension"], r["judge"]) for r in rows}):
        cells = []
        n = 0
        for method in methods:
            name = SINGLE_PREFIX + dimension if method == "single" else method
            row = lookup.get((dimension, judge, name))
            if row is None:
                cells.append("-")
                continue
            n = max(n, row["n"])
            cell = f"{row['rate']:.2f} [{row['low']:.2f}, {row['high']:.2f}]"
            # A soft reading's per-prompt values are probabilities, not wins/ties/losses.
            if not judge.endswith("-soft"):
                cell += f" ({row['wins']}/{row['ties']}/{row['losses']})"
            cells.append(cell)
        lines.append(f"| {dimension} | {judge} | {n} | " + " | ".join(cells) + " |")
    for reading, row in (summary.get("pairwise_decisiveness") or {}).items():
        share = f"{row['decisive_share']:.0%}"
        if row["informative"]:
            lines.append(f"\n{reading}: decisive (both orders agree) on {share} of pairs.")
        else:
            lines.append(
                f"\n{reading}: decisive on only {share} of {row['pairs']} pairs: this judge is "
                "uninformative here; read the objective axes (pj eval separation) instead."
            )
    fluency = summary.get("fluency") or {}
    if fluency:
        lines += [
            "",
            "Fluency guard (means over answers; higher is worse):",
            "",
            "| method | answers | repeated word 3-grams | perplexity, no persona |",
            "| --- | --- | --- | --- |",
        ]
        for method, row in fluency.items():
            share, ppl = row["mean_repeated_trigrams"], row["mean_perplexity"]
            lines.append(
                f"| {method} | {row['answers']} | "
                + ("-" if share is None else f"{share:.3f}")
                + " | "
                + ("-" if ppl is None else f"{ppl:.1f}")
                + " |"
            )
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a typed error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise EvaluationError(
            "drawing the chart needs matplotlib: pip install 'persona-judge[plots]'"
        ) from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def draw_chart(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Grouped bars of win rate vs direct with 95% CIs: one panel per judge."""
    plt = pyplot()

    rows = summary["win_rates"]
    judges = sorted({r["judge"] for r in rows})
    dimensions = sorted({r["dimension"] for r in rows})
    methods = _table_methods(rows)
    lookup = {(r["judge"], r["dimension"], r["method"]): r for r in rows}
    columns = min(max(len(judges), 1), 2)
    grid_rows = -(-max(len(judges), 1) // columns)
    fig, axes = plt.subplots(
        grid_rows, columns, figsize=(5.2 * columns, 3.4 * grid_rows), sharey=True, squeeze=False
    )
    width = 0.8 / max(len(methods), 1)
    for ax in axes.flat[len(judges) :]:
        ax.set_visible(False)
    for ax, judge in zip(axes.flat, judges, strict=False):
        for m_index, method in enumerate(methods):
            xs: list[float] = []
            heights: list[float] = []
            errors: list[list[float]] = [[], []]
            for d_index, dimension in enumerate(dimensions):
                name = SINGLE_PREFIX + dimension if method == "single" else method
                row = lookup.get((judge, dimension, name))
                if row is None:
                    continue
                xs.append(d_index + (m_index - (len(methods) - 1) / 2) * width)
                heights.append(row["rate"])
                errors[0].append(row["rate"] - row["low"])
                errors[1].append(row["high"] - row["rate"])
            ax.bar(xs, heights, width, yerr=errors, capsize=3, label=method)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(dimensions)), dimensions)
        ax.set_ylim(0.0, 1.0)
        ax.set_title(f"judge: {judge}")
    for row_axes in axes:
        row_axes[0].set_ylabel("win rate vs direct")
    axes[0][0].legend(loc="lower left", fontsize=8)
    generator = summary.get("settings", {}).get("generator", "?")
    fig.suptitle(f"{generator}, {summary.get('prompts', '?')} prompts; bars: 95% bootstrap CI")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(
    log: ResultsLog,
    out_dir: str | os.PathLike[str],
    *,
    chart_path: str | os.PathLike[str] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``summary.json``, ``table.md`` and the chart; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(log, n_resamples=n_resamples, seed=seed)
    (out / "summary.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "table.md").write_text(markdown_table(summary), encoding="utf-8")
    if summary["win_rates"]:
        draw_chart(summary, chart_path or out / "chart.png")
    return summary
