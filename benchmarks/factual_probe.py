"""Does a decoding method keep simple facts right? A guard beside the separation report.

Guidance against a neutral row amplifies what the persona prefixes change, which can push
an answer away from the plain fact as well (on SmolLM2, strength 1.5 answered "What is the
capital of France?" with "La femme au pays de France"). The separation report's fluency guard
(repeated 3-grams, perplexity) does not see that, so this probe asks short factual questions
with one accepted answer, for two preference sets, several seeds each, and reports how often
the answer contains it, per method.

    python -m benchmarks.factual_probe --methods direct,default,pool@0,pool@1.5 \\
        --out docs/factual-probe/smollm2

Methods are those of ``pj eval separation`` (``<method>[@<strength>]``). Seeds are fixed, so a
rerun gives the same table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France? Answer in one short sentence.", "paris"),
    ("What is the capital of Japan? Answer in one short sentence.", "tokyo"),
    ("How many legs does a spider have?", "eight|8"),
    ("What is 2 + 2?", "four|4"),
    ("Which planet is known as the Red Planet?", "mars"),
    ("What gas do plants take in from the air to make food?", "carbon dioxide|co2"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the freezing point of water in degrees Celsius?", "zero|0"),
)
SETS: tuple[tuple[str, ...], ...] = (
    ("concise", "elementary", "friendly"),
    ("informative", "expert", "unfriendly"),
)
SEEDS = 3
MAX_NEW_TOKENS = 48


def correct(answer: str, accepted: str) -> bool:
    """Whether ``answer`` contains one of the ``|``-separated accepted words (case-blind,
    whole words for the short ones).

    Example:
        >>> correct("The capital is Paris.", "paris"), correct("Four legs", "eight|8")
        (True, False)
    """
    import re

    text = answer.lower()
    return any(
        re.search(rf"(?<![\w.]){re.escape(word)}(?![\w])", text) for word in accepted.split("|")
    )


def run(methods: list[str], model: str, out: Path, threads: int | None) -> dict[str, dict]:
    """Answer every question for both sets and every seed with each method; write
    ``factual.md`` and ``factual.json`` under ``out``."""
    import torch

    from pj_core.engine import PersonaJudge
    from pj_core.eval.separation import SeparationConfig, engine_generate_fn, method_personas

    if threads:
        torch.set_num_threads(threads)
    config = SeparationConfig(methods=tuple(methods), max_new_tokens=MAX_NEW_TOKENS)
    engine = PersonaJudge.from_pretrained(model)
    generate = engine_generate_fn(engine, config)
    results: dict[str, dict] = {}
    rows = []
    total = len(methods) * len(QUESTIONS) * len(SETS) * SEEDS
    with tqdm(total=total, desc="factual probe", unit="answer") as bar:
        for method in methods:
            hits = 0
            for question, accepted in QUESTIONS:
                for preferences in SETS:
                    personas, _ = method_personas(method, preferences)
                    for seed in range(SEEDS):
                        answer = generate(question, method, personas, seed)
                        text = answer if isinstance(answer, str) else answer.text
                        ok = correct(text, accepted)
                        hits += ok
                        rows.append(
                            {
                                "method": method,
                                "question": question,
                                "set": list(preferences),
                                "seed": seed,
                                "correct": ok,
                                "text": text,
                            }
                        )
                        bar.update(1)
            asked = len(QUESTIONS) * len(SETS) * SEEDS
            results[method] = {"correct": hits, "asked": asked, "share": hits / asked}
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| method | correct | share |", "| --- | --- | --- |"]
    lines += [
        f"| {m} | {r['correct']}/{r['asked']} | {r['share']:.2f} |" for m, r in results.items()
    ]
    table = "\n".join(lines) + "\n"
    (out / "factual.md").write_text(table, encoding="utf-8")
    (out / "factual.json").write_text(
        json.dumps({"model": model, "summary": results, "answers": rows}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(table, end="")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="direct,default", help="comma-separated")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path("docs/factual-probe/smollm2"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    run([m for m in args.methods.split(",") if m], args.model, args.out, args.threads)


if __name__ == "__main__":
    main()
