"""The profile behind packed CPU weights: forward costs with PyTorch's default vs oneDNN kernels.

Loads the model twice (``pack_cpu_weights=False`` and the default, packed) and times, with a
``--context``-token cache, the forwards Persona-judge and plain decoding run:

* one row, one new token (a decode or draft step);
* one row, λ+1 new tokens (the judge's verify);
* two rows, one new token each (a lockstep step);
* one row, the whole context (the reference loop's full recomputation, prefill).

It also times the model's largest linear layer alone at 1 to 6 rows, the operator that makes
the difference (on the 2-core AMD EPYC development machine MKL's small-matrix kernel costs
about as much per row as its matrix-vector kernel, oneDNN's packed one does not).

Usage::

    .venv/bin/python benchmarks/linear_kernels.py                  # SmolLM2, λ=4
    .venv/bin/python benchmarks/linear_kernels.py --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from pj_core.backends.hf.cpu_linear import PackedLinear
from pj_core.backends.hf.kv import BatchedContexts, forward_logits
from pj_core.backends.hf.models import LoadedModel, load_model


def median_ms(step: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``step`` in milliseconds, after two untimed warm-up calls."""
    step()
    step()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def forward_costs(
    loaded: LoadedModel, context: int, lookahead: int, repeats: int
) -> dict[str, float]:
    """Milliseconds of the four kinds of forward over a ``context``-token cache."""
    model = loaded.model
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 1000, (1, context), generator=generator)
    cache = DynamicCache()
    forward_logits(model, prompt, cache, keep=1)

    def extend(new_tokens: int) -> Callable[[], None]:
        ids = torch.randint(100, 1000, (1, new_tokens), generator=generator)

        def run() -> None:
            forward_logits(model, ids, cache, keep=new_tokens)
            cache.crop(-new_tokens)

        return run

    rows = BatchedContexts(model, [prompt[0].tolist(), prompt[0, 1:].tolist()])

    def lockstep_step() -> None:
        rows.step([101, 102])

    def full_recompute() -> None:
        forward_logits(model, prompt, DynamicCache(), keep=1)

    return {
        "step (1 row, 1 token)": median_ms(extend(1), repeats),
        f"verify (1 row, {lookahead + 1} tokens)": median_ms(extend(lookahead + 1), repeats),
        "lockstep step (2 rows, 1 token)": median_ms(lockstep_step, repeats),
        f"full recompute (1 row, {context} tokens)": median_ms(
            full_recompute, max(3, repeats // 3)
        ),
    }


def largest_linear(loaded: LoadedModel) -> nn.Linear | PackedLinear:
    """The linear layer with the most weights (the vocabulary projection on small models)."""
    layers = [m for m in loaded.model.modules() if isinstance(m, nn.Linear | PackedLinear)]
    return max(layers, key=lambda m: m.in_features * m.out_features)


def linear_costs(layer: nn.Linear | PackedLinear, repeats: int) -> dict[str, float]:
    """Microseconds of ``layer`` on 1..6 rows."""
    costs = {}
    for rows in range(1, 7):
        x = torch.randn(1, rows, layer.in_features)
        costs[f"{rows} row(s)"] = 1000 * median_ms(lambda: layer(x), repeats)  # noqa: B023
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--context", type=int, default=300, help="tokens already in the cache")
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    kernels = {
        "PyTorch default (MKL)": load_model(args.model, device="cpu", pack_cpu_weights=False),
        "oneDNN packed": load_model(args.model, device="cpu"),
    }
    results: dict[str, Any] = {
        "model": args.model,
        "context": args.context,
        "lookahead": args.lookahead,
        "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(),
        "forward_ms": {},
        "largest_linear_us": {},
    }
    with torch.inference_mode():
        for name, loaded in kernels.items():
            results["forward_ms"][name] = forward_costs(
                loaded, args.context, args.lookahead, args.repeats
            )
            layer = largest_linear(loaded)
            results["largest_linear_us"][name] = linear_costs(layer, 5 * args.repeats)
            results["largest_linear_shape"] = [layer.out_features, layer.in_features]
    results["load_average_after"] = os.getloadavg()

    names = list(kernels)
    print(
        f"Forward costs in ms ({args.model}, {args.context}-token cache, "
        f"{results['threads']} threads, load {results['load_average_before'][0]:.2f})\n"
    )
    print("| forward | " + " | ".join(names) + " | packed / default |")
    print("| --- | " + " | ".join("---" for _ in names) + " | --- |")
    for kind in results["forward_ms"][names[0]]:
        values = [results["forward_ms"][name][kind] for name in names]
        cells = " | ".join(f"{v:.1f}" for v in values)
        print(f"| {kind} | {cells} | {values[1] / values[0]:.2f} |")
    out_features, in_features = results["largest_linear_shape"]
    print(f"\nLargest linear layer ({out_features} x {in_features}) in µs\n")
    print("| rows | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---" for _ in names) + " |")
    for rows in results["largest_linear_us"][names[0]]:
        cells = " | ".join(f"{results['largest_linear_us'][n][rows]:.0f}" for n in names)
        print(f"| {rows} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
