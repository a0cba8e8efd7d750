"""Choosing the llama.cpp backend: ``load_model(spec, backend="llama.cpp")``, the engine, the
CLI, both adapters and the server, on the embedded models.

Skipped when llama-cpp-python is not installed, unless ``PJ_REQUIRE_LLAMACPP=1`` (CI sets it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pj_core.backends import backend_name
from pj_core.backends.hf.models import LoadedModel
from pj_core.backends.llamacpp.backend import LlamaCppBackend
from pj_core.backends.llamacpp.loading import LoadedLlamaCpp
from pj_core.backends.loading import load_model
from pj_core.errors import BackendNotInstalledError, InvalidModelOptionError
from pj_core.prompts import has_chat_template, render_ids

if os.environ.get("PJ_REQUIRE_LLAMACPP") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

pytestmark = pytest.mark.real_model

SMOLLM2 = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one word."
PERSONAS = ["Answer concisely.", "Answer politely."]
GREEDY_ANSWER = "The capital of France is Paris."  # also the transformers backend's


def _llama_tokens(loaded: LoadedLlamaCpp, text: str, *, add_special: bool) -> list[int]:
    """llama.cpp's own tokenizer (``llama_tokenize``, special tokens parsed)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(loaded.path), vocab_only=True, verbose=False)
    return list(vocab.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))


CONVERSATIONS: list[Any] = [
    "Hello! What can you do?",
    "Ünïcödé, emoji 😀 and  two spaces,\ttabs\nand lines.",
    [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?  <b>tags</b> & {braces}"},
    ],
]


@pytest.mark.parametrize("alias", [SMOLLM2, "gemma3-270m"])
def test_llama_cpps_tokenizer_gives_the_ids_of_the_rendered_prompts(alias: str) -> None:
    """The prompts are rendered by the transformers tokenizer converted from the GGUF; the
    rows llama.cpp decodes hold those ids, which must be its own tokens of the same text."""
    from pj_core.prompts import render_text

    loaded = load_model(alias, backend="llama.cpp")
    tokenizer = loaded.tokenizer
    checked = 0
    for conversation in CONVERSATIONS:
        for persona in (None, "Answer with playful humour, über-précis."):
            text = render_text(tokenizer, conversation, persona)
            ids = render_ids(tokenizer, conversation, persona)
            own = _llama_tokens(loaded, text, add_special=not has_chat_template(tokenizer))
            assert ids == own, (alias, text)
            checked += 1
    assert checked == 6


def test_load_model_on_llama_cpp_shares_one_backend_per_file() -> None:
    loaded = load_model(SMOLLM2, backend="llama.cpp")
    assert isinstance(loaded, LoadedLlamaCpp) and isinstance(loaded.backend, LlamaCppBackend)
    assert load_model(SMOLLM2, backend="llamacpp") is loaded  # spellings of the backend
    by_path = load_model(str(loaded.path), backend="llama.cpp")
    assert by_path.backend is loaded.backend and by_path.name == str(loaded.path)
    assert loaded.context_window == 8192 and 2 in loaded.eos_token_ids
    assert isinstance(load_model(SMOLLM2), LoadedModel)  # transformers stays the default
    assert backend_name(None) == "transformers"


def test_options_of_the_other_backend_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelOptionError, match="CPU"):
        load_model(SMOLLM2, backend="llama.cpp", device="cuda")
    with pytest.raises(InvalidModelOptionError, match="quantisation"):
        load_model(SMOLLM2, backend="llama.cpp", dtype="float16")
    with pytest.raises(InvalidModelOptionError, match=r"backend='llama\.cpp'"):
        load_model(SMOLLM2, n_ctx=4096)
    with pytest.raises(InvalidModelOptionError, match=r"transformers, llama\.cpp"):
        load_model(SMOLLM2, backend="vllm")
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(InvalidModelOptionError, match="not a GGUF file"):
        load_model(str(folder), backend="llama.cpp")


def test_without_llama_cpp_python_loading_says_how_to_install_it(no_llama_cpp: None) -> None:
    from pj_core.calls import shared_engine

    with pytest.raises(BackendNotInstalledError, match="pip install"):
        load_model(SMOLLM2, backend="llama.cpp")
    with pytest.raises(BackendNotInstalledError, match="pip install"):
        shared_engine(SMOLLM2, "llama.cpp")


def test_the_engine_loads_on_llama_cpp() -> None:
    from pj_core.engine import PersonaJudge

    pj = PersonaJudge.from_pretrained(SMOLLM2, backend="llama.cpp", n_ctx=4096)
    assert isinstance(pj.backend, LlamaCppBackend) and pj.backend.n_ctx == 4096
    assert pj.generate(QUESTION, PERSONAS, temperature=0.0).text == GREEDY_ANSWER


def test_both_adapters_take_the_backend() -> None:
    from pj_core.calls import shared_engine
    from pj_integrations.langchain import ChatPersonaJudge
    from pj_integrations.llama_index import PersonaJudgeLLM

    chat = ChatPersonaJudge(backend="llama.cpp", preferences=PERSONAS, temperature=0.0)
    assert chat.invoke(QUESTION).content == GREEDY_ANSWER
    engine = shared_engine(SMOLLM2, "llama.cpp").engine
    assert isinstance(engine.backend, LlamaCppBackend)
    assert shared_engine(SMOLLM2).engine is not engine  # one engine per backend
    assert chat._identifying_params["backend"] == "llama.cpp"  # LangChain's cache key
    llm = PersonaJudgeLLM(backend="llama.cpp", preferences=PERSONAS, temperature=0.0)
    assert llm.complete(QUESTION).text == GREEDY_ANSWER
    assert llm.get_engine() is engine
    with pytest.raises(InvalidModelOptionError, match="unknown backend"):
        ChatPersonaJudge(backend="llama")
    with pytest.raises(InvalidModelOptionError, match="unknown backend"):
        PersonaJudgeLLM(backend="llama")


def test_the_cli_and_the_server_take_the_backend(capsys: pytest.CaptureFixture[str]) -> None:
    import httpx

    from pj_core.cli import main
    from pj_core.server import ServerConfig, create_app
    from tests._server import serving

    assert main(["info", SMOLLM2, "--backend", "llama.cpp"]) == 0
    shown = capsys.readouterr().out
    assert "llama.cpp (llama" in shown and "Q4_1" in shown and "8192 cells" in shown
    argv = ["generate", QUESTION, "--backend", "llama.cpp", "--temperature", "0"]
    argv += [arg for persona in PERSONAS for arg in ("--persona", persona)]
    assert main(argv) == 0
    assert GREEDY_ANSWER in capsys.readouterr().out
    app = create_app(ServerConfig(backend="llama.cpp", preferences=PERSONAS))
    with serving(app) as base_url:
        body = {
            "model": SMOLLM2,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
        }
        response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == GREEDY_ANSWER


def test_pj_bench_compares_the_backends(tmp_path: Path) -> None:
    """``pj bench --backend llama.cpp``: every method in its own worker process, the ratios
    against transformers and llama.cpp's plain generation, a table and a chart."""
    import json

    from pj_core.cli import main

    argv = ["bench", "--backend", "llama.cpp", "--quick", "--methods", "auto"]
    argv += ["--tokens", "6", "--threads", "1", "--out-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "backends-quick.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == [
        "transformers:plain",
        "transformers:auto",
        "llama.cpp:plain",
        "llama.cpp:auto",
    ]
    assert all(row["tokens_per_second"] > 0 and row["peak_rss_mb"] > 0 for row in rows.values())
    assert rows["llama.cpp:auto"]["vs_transformers"] is not None
    assert rows["llama.cpp:auto"]["strategies"][0] in ("speculative", "lockstep")
    assert "Q4_1" in rows["llama.cpp:plain"]["weights"] and report["meta"]["threads"] == 1
    assert (tmp_path / "backends-quick.png").stat().st_size > 0
    assert "| llama.cpp:auto |" in (tmp_path / "backends-quick.md").read_text()


def test_a_requantised_copy_for_the_benchmark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmarks.backend_speed as backend_speed
    from pj_core.errors import BenchmarkError

    monkeypatch.setenv("PJ_CACHE_DIR", str(tmp_path))
    path = backend_speed.quantized_copy(SMOLLM2, "q8_0")
    assert path.parent == tmp_path / "requantized"
    assert "Q8_0" in LlamaCppBackend(path, n_ctx=256).description
    assert backend_speed.quantized_copy(SMOLLM2, "q8_0") == path  # kept
    with pytest.raises(BenchmarkError, match="no quantisation type"):
        backend_speed.quantized_copy(SMOLLM2, "q3_x")
