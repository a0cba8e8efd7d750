"""Tokens per second of the engine (speculative, lockstep) next to plain ``model.generate``.

One process, one model, one prompt, measured back to back so the three numbers share the
machine's conditions (print the load average next to them: on a shared machine it matters).
EOS is suppressed in all three, so each generates exactly ``--tokens`` tokens; tokens per
second count decoding only (prefill excluded) for all three. It also prints the step timings
that ``strategy="auto"`` measures and what it would choose.

Usage::

    .venv/bin/python benchmarks/engine_speed.py                      # SmolLM2, λ=4, 128 tokens
    .venv/bin/python benchmarks/engine_speed.py --tokens 64 --repeats 3 --threads 1
    .venv/bin/python benchmarks/engine_speed.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pj_core.backends.hf.models import load_model
from pj_core.decoding.strategy_choice import predicted_seconds_per_token
from pj_core.engine import PersonaJudge
from pj_core.personas import Persona
from pj_core.prompts import render_ids
from pj_core.settings import DEFAULTS

PROMPT = "Got any creative ideas for a 10 year old's birthday?"
PERSONAS = [
    Persona(text="Answer with playful humour."),
    Persona(text="Answer concisely, in at most five sentences."),
]
SAMPLING: dict[str, Any] = {
    "temperature": DEFAULTS.temperature,
    "top_k": DEFAULTS.top_k,
    "top_p": DEFAULTS.top_p,
}


def plain_generate_seconds(loaded: Any, tokens: int, seed: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of ``model.generate`` with the first persona's prompt."""
    ids = torch.tensor([render_ids(loaded.tokenizer, PROMPT, PERSONAS[0].text)])
    mask = torch.ones_like(ids)
    settings = {"do_sample": True, "pad_token_id": loaded.tokenizer.pad_token_id, **SAMPLING}
    torch.manual_seed(seed)
    with torch.inference_mode():
        started = time.perf_counter()
        loaded.model.generate(
            ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **settings
        )
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        loaded.model.generate(
            ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, **settings
        )
        total = time.perf_counter() - started
    # generate's total includes its own prefill; subtract the measured one-token run.
    return prefill, max(total - prefill, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="PyTorch's default linear kernels instead of oneDNN-packed weights",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device="cpu", pack_cpu_weights=not args.no_pack)
    # No EOS: every run generates exactly --tokens tokens, as the plain run does.
    pj = PersonaJudge(
        loaded.model,
        loaded.tokenizer,
        name=loaded.name,
        context_window=loaded.context_window,
        eos_token_ids=(),
    )
    pj.generate(PROMPT, PERSONAS, max_new_tokens=4, seed=0)  # warm-up
    results: dict[str, Any] = {
        "model": loaded.name,
        "tokens": args.tokens,
        "lookahead": args.lookahead,
        "threads": torch.get_num_threads(),
        "packed_linear_layers": loaded.packed_linear_layers,
        "load_average_before": os.getloadavg(),
    }
    rates: dict[str, list[float]] = {"plain generate": [], "speculative": [], "lockstep": []}
    acceptance: list[float] = []
    for repeat in range(args.repeats):
        _, decode = plain_generate_seconds(loaded, args.tokens, seed=repeat)
        # The one-token run that was subtracted also produced the first token.
        rates["plain generate"].append((args.tokens - 1) / decode)
        for strategy in ("speculative", "lockstep"):
            out = pj.generate(
                PROMPT,
                PERSONAS,
                lookahead=args.lookahead,
                strategy=strategy,
                max_new_tokens=args.tokens,
                seed=repeat,
                **SAMPLING,
            )
            assert out.stats.tokens == args.tokens
            rates[strategy].append(out.stats.tokens_per_second)
            if strategy == "speculative":
                acceptance.append(out.stats.acceptance_rate)
                results.setdefault("forward_passes", {})["speculative"] = out.stats.forward_passes
            else:
                results.setdefault("forward_passes", {})["lockstep"] = out.stats.forward_passes
    timings = pj.backend.step_timings(n_personas=2, lookahead=args.lookahead)
    alpha = statistics.mean(acceptance)
    predicted = predicted_seconds_per_token(
        timings, lookahead=args.lookahead, acceptance_rate=alpha
    )
    results.update(
        tokens_per_second={name: statistics.median(v) for name, v in rates.items()},
        acceptance_rate=alpha,
        step_timings_ms={k: 1000 * v for k, v in vars(timings).items()},
        auto_predicted_ms_per_token={k: 1000 * v for k, v in predicted.items()},
        auto_choice=min(predicted, key=lambda k: predicted[k]),
        load_average_after=os.getloadavg(),
    )
    print(
        f"| method | tokens/s ({args.tokens} tokens, λ={args.lookahead}, "
        f"median of {args.repeats}) |"
    )
    print("| --- | --- |")
    for name, value in results["tokens_per_second"].items():
        print(f"| {name} | {value:.2f} |")
    print(json.dumps({k: v for k, v in results.items() if k != "tokens_per_second"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
