"""``pj info``: load a model and show what persona-judge knows about it.

Prints the name, backend, device, dtype (or llama.cpp's quantisation), context window,
end-of-turn token ids and load time, then the exact prompt text each persona prefix would
decode from.

Examples::

    pj info
    pj info gemma3-270m --persona "Answer with playful humour." --persona "Be concise."
    pj info ./my-model-dir --prompt "Explain RAG in one paragraph." --device cpu
    pj info smollm2-135m-instruct --backend llama.cpp
"""

from __future__ import annotations

import argparse
import time

from pj_core.backends.hf.model_cache import cache_root

DEFAULT_PROMPT = "Hello! What can you do?"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pj info`` to the ``pj`` command."""
    from pj_core.backends.hf.models import (  # light: no weights are read
        BUILTIN_MODELS,
        DEFAULT_MODEL,
    )

    aliases = "\n".join(f"  {m.alias:24} {m.description}" for m in BUILTIN_MODELS.values())
    parser = subparsers.add_parser(
        "info",
        help="load a model and show its settings and rendered persona prompts",
        description="Load a model (alias, directory, .gguf file or cached hub id) and show its "
        "settings and the prompt each persona prefix decodes from.",
        epilog=f"built-in models:\n{aliases}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--persona",
        action="append",
        default=[],
        metavar="TEXT",
        help="a persona's preference text; repeat for several",
    )
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"the user message to render (default: {DEFAULT_PROMPT!r})",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument(
        "--backend",
        default=None,
        help="transformers (default) or llama.cpp (the GGUF file as it is, quantised)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run code shipped with the model (only for models you trust)",
    )
    parser.set_defaults(func=run)


def _kernels(packed_layers: int) -> str:
    if packed_layers:
        return (
            f"oneDNN, {packed_layers} layers with pre-packed weights "
            "(pj_core.backends.hf.cpu_linear)"
        )
    return "PyTorch default"


def run(args: argparse.Namespace) -> int:
    """Load the model, print its settings and one rendered prompt per persona."""
    from pj_core.backends.hf.cpu_linear import weight_count
    from pj_core.backends.hf.models import LoadedModel
    from pj_core.backends.loading import load_model
    from pj_core.prompts import has_chat_template, render_ids, render_text, supports_system_role

    start = time.perf_counter()
    loaded = load_model(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    seconds = time.perf_counter() - start
    tokenizer = loaded.tokenizer
    if not has_chat_template(tokenizer):
        layout = "plain text (no chat template): 'User: ...' / 'Assistant:' turns"
    elif supports_system_role(tokenizer):
        layout = "chat template, persona in the system message"
    else:
        layout = "chat template without a system role, persona in the first user message"
    eos = ", ".join(f"{i} ({tokenizer.convert_ids_to_tokens(i)})" for i in loaded.eos_token_ids)
    if isinstance(loaded, LoadedModel):
        model_rows = [
            ("backend", "transformers"),
            ("class", type(loaded.model).__name__),
            ("parameters", f"{weight_count(loaded.model) / 1e6:.1f} M"),
            ("linear kernels", _kernels(loaded.packed_linear_layers)),
            ("device", str(loaded.device)),
            ("dtype", str(loaded.dtype).removeprefix("torch.")),
        ]
    else:
        backend = loaded.backend
        model_rows = [
            ("backend", f"llama.cpp ({backend.description})"),
            ("file", str(loaded.path)),
            ("parameters", f"{backend.parameters / 1e6:.1f} M"),
            ("device", f"cpu, {backend.n_threads} threads"),
            ("kv cache", f"{backend.n_ctx} cells, shared by all calls at once"),
        ]
    rows = [
        ("model", loaded.name),
        *model_rows,
        ("context window", f"{loaded.context_window} tokens"),
        ("eos token ids", eos),
        ("load time", f"{seconds:.2f} s"),
        ("prompt layout", layout),
        ("cache dir", str(cache_root())),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for index, persona in enumerate(args.persona or [None], start=1):
        tokens = len(render_ids(tokenizer, args.prompt, persona))
        title = persona if persona is not None else "(no persona)"
        print(f"\n--- persona {index}: {title} [{tokens} tokens] ---")
        print(render_text(tokenizer, args.prompt, persona))
    return 0
