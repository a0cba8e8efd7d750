"""Write a benchmark report: JSON (everything), a Markdown table, and PNG plots.

Example:
    >>> format_number(1234.5678), format_number(0.01234), format_number(None)
    ('1235', '0.0123', '—')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.bench_config import METHOD_TITLES

PLOT_KINDS = ("tokens_per_second", "forwards", "memory")
COLORS = {
    "plain": "black",
    "reference": "tab:red",
    "authors": "tab:purple",
    "speculative": "tab:blue",
    "lockstep": "tab:green",
    "auto": "tab:orange",
    "defaults": "tab:brown",
    "constrained": "tab:pink",
}


def format_number(value: float | None) -> str:
    """Three significant digits or so; an em dash for a missing value."""
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _lookahead(cell: dict[str, Any]) -> str:
    # Plain generate has no λ; lockstep's cost does not depend on it (it runs with λ = 4).
    if cell["lookahead"] is not None:
        return str(cell["lookahead"])
    return "(4)" if cell["method"] == "lockstep" else "—"


def kernels_text(meta: dict[str, Any]) -> str:
    """Which linear kernels a report's runs used, from its ``meta`` (older reports: default)."""
    packed = meta.get("packed_linear_layers", 0)
    return f"{packed} linear layers oneDNN-packed" if packed else "default linear kernels"


def markdown_table(report: dict[str, Any]) -> str:
    """The Markdown page of one report: how it was made, the targets, every cell."""
    meta = report["meta"]
    config = meta["config"]
    gpu = any(c["peak_gpu_mb"] is not None for c in report["cells"])
    lines = [
        "# Persona-judge speed and memory",
        "",
        f"Command: `{meta['command']}`  ",
        f"Run: {meta['started']} ({meta['wall_seconds'] / 60:.1f} min), commit "
        f"`{meta['git_commit']}`, {meta['platform']}, {meta['cpu_count']} CPUs, "
        f"torch threads {meta['torch_threads']}  ",
        f"Model: `{meta['model']}` on {meta['device']} ({meta['dtype']}, "
        f"{kernels_text(meta)}); "
        f"T={config['temperature']}, top-k {config['top_k']}, top-p {config['top_p']}; "
        "every generation runs to its full budget (EOS ignored)  ",
        f"Load average (1, 5, 15 min) before: {meta['load_average_before']}, "
        f"after: {meta['load_average_after']} (other jobs share this machine)  ",
        f"Samples: {config['prompts']} prompts × {config['repeats']} repeats per cell "
        f"(reference loop: {min(config['prompts'], config['reference_prompts'])} × "
        f"{min(config['repeats'], config['reference_repeats'])}), medians, warm-up excluded; "
        f"prompts from `{meta['prompt_source']}`",
        "",
    ]
    if report["targets"]:
        lines += [
            "## Targets",
            "",
            "| target | engine | measured | needed | met |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t in report["targets"]:
            needed = ("≤ " if "RSS" in t["target"] else "≥ ") + f"{t['threshold']}x"
            lines.append(
                f"| {t['target']} | {t['engine']} | {format_number(t['value'])}x | {needed} | "
                f"{'yes' if t['met'] else '**no**'} |"
            )
        lines.append("")
    header = (
        "| method | λ | new tokens | tokens/s | first token (s) | forwards/token | "
        "acceptance | peak RSS generating (MiB) | process peak RSS (MiB) |"
    )
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    if gpu:
        header += " GPU peak (MiB) |"
        rule += " --- |"
    lines += ["## All cells", "", header + " samples |", rule + " --- |"]
    for c in report["cells"]:
        row = (
            f"| {METHOD_TITLES[c['method']]} | {_lookahead(c)} | {c['max_new_tokens']} | "
            f"{format_number(c['tokens_per_second'])} | "
            f"{format_number(c['first_token_seconds'])} | "
            f"{format_number(c['forward_passes_per_token'])} | "
            f"{format_number(c['acceptance_rate'])} | {format_number(c['peak_rss_mb'])} | "
            f"{format_number(c['process_peak_rss_mb'])} |"
        )
        if gpu:
            row += f" {format_number(c['peak_gpu_mb'])} |"
        strategies = ", ".join(f"{k} {v}" for k, v in sorted(c["strategies"].items()))
        row += f" {c['samples']}{f' ({strategies})' if c['method'] == 'auto' else ''} |"
        lines.append(row)
    masks = [c for c in report["cells"] if c.get("constraint_ms_per_token") is not None]
    if masks:
        lines += [
            "",
            "Constraint mask (compute, apply, move the matcher), per token: "
            + "; ".join(
                f"λ={_lookahead(c)} n={c['max_new_tokens']}: "
                f"{format_number(c['constraint_ms_per_token'])} ms"
                for c in masks
            )
            + ".",
        ]
    if report["agreement"]:
        lines += [
            "",
            "Same tokens as the speculative engine (same seed, prompt, λ, budget): "
            + "; ".join(
                f"{a['method']} {a['identical']}/{a['compared']}" for a in report["agreement"]
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def _plot_tokens_per_second(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    cells = report["cells"]
    budgets = sorted({c["max_new_tokens"] for c in cells})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        here = [c for c in cells if c["max_new_tokens"] == budget]
        lookaheads = sorted({c["lookahead"] for c in here if c["lookahead"] is not None})
        for method in METHOD_TITLES:
            mine = [c for c in here if c["method"] == method and c["tokens_per_second"]]
            if not mine:
                continue
            if mine[0]["lookahead"] is None:  # λ-free: a horizontal line
                ax.axhline(
                    mine[0]["tokens_per_second"],
                    linestyle="--",
                    label=METHOD_TITLES[method],
                    color=COLORS[method],
                )
            else:
                xs = [c["lookahead"] for c in mine]
                ax.plot(
                    xs,
                    [c["tokens_per_second"] for c in mine],
                    marker="o",
                    label=METHOD_TITLES[method],
                    color=COLORS[method],
                )
        ax.set_yscale("log")
        ax.set_xticks(lookaheads)
        ax.set_xlabel("lookahead λ")
        ax.set_ylabel("tokens per second (log)")
        ax.set_title(f"{budget} new tokens")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _finish(fig, report, path)


def _plot_forwards(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    cells = [c for c in report["cells"] if c["lookahead"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHOD_TITLES:
        for budget in sorted({c["max_new_tokens"] for c in cells}):
            mine = [c for c in cells if c["method"] == method and c["max_new_tokens"] == budget]
            if not mine:
                continue
            xs = [c["lookahead"] for c in mine]
            label = f"{METHOD_TITLES[method]}, n={budget}"
            style = {"marker": "o", "label": label, "color": COLORS[method]}
            style["linestyle"] = "-" if budget == min(c["max_new_tokens"] for c in cells) else ":"
            left.plot(xs, [c["forward_passes_per_token"] for c in mine], **style)
            right.plot(xs, [c["acceptance_rate"] for c in mine], **style)
    left.axhline(1.0, color="black", linestyle="--", label="plain generate / lockstep: 1")
    left.set(xlabel="lookahead λ", ylabel="forward passes per token")
    right.set(xlabel="lookahead λ", ylabel="acceptance rate", ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    _finish(fig, report, path)


def _plot_memory(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    peaks: dict[str, float] = {}
    for c in report["cells"]:
        if c["process_peak_rss_mb"] is not None:
            peaks[c["method"]] = c["process_peak_rss_mb"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(peaks)
    ax.barh(
        [METHOD_TITLES[n] for n in names],
        [peaks[n] for n in names],
        color=[COLORS[n] for n in names],
    )
    for i, n in enumerate(names):
        ax.text(peaks[n], i, f" {peaks[n]:.0f}", va="center", fontsize=8)
    ax.set_xlabel("process peak RSS (MiB), all cells of the method")
    ax.invert_yaxis()
    _finish(fig, report, path)


def _finish(fig: Any, report: dict[str, Any], path: Path) -> None:
    meta = report["meta"]
    fig.suptitle(
        f"{meta['model']} on {meta['device']} ({meta['dtype']}), load avg "
        f"{meta['load_average_before'][0]}→{meta['load_average_after'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path, img_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and the plots; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(markdown_table(report))
    written = [json_path, md_path]
    prefix = "bench" if stem == "latest" else f"bench_{stem}"
    for kind, draw in (
        ("tokens_per_second", _plot_tokens_per_second),
        ("forwards", _plot_forwards),
        ("memory", _plot_memory),
    ):
        path = img_dir / f"{prefix}_{kind}.png"
        draw(report, path)
        written.append(path)
    return written
