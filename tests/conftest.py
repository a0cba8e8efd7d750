"""Shared pytest fixtures.

Real models load once per test session (they take seconds even from the cache) and use the
normal persona-judge cache, so CI converts each GGUF file only once. Tests that check the
cache itself point ``PJ_CACHE_DIR`` at a temporary directory of their own.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pj_core.backends.hf.models import BUILTIN_MODELS, LoadedModel, load_model
from tests._postgres import INSTALL_HINT, PostgresServer, postgres_binaries
from tests._tiny import make_tiny_model, make_tiny_tokenizer

# ---------------------------------------------------------------------------------------------
# Tiny random models (fast unit tests)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of tests/_tiny.py, with its ChatML-like template."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A random 2-layer Llama sized to ``tiny_tokenizer`` (seed 0)."""
    return make_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module: tiny matrices gain nothing from threads, and on a
    shared 2-core machine OpenMP spinning makes them ~10x slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Real packaged models (marked real_model in the tests that use them)


def _load_builtin(alias: str) -> LoadedModel:
    package = BUILTIN_MODELS[alias].package
    if importlib.util.find_spec(package) is None:
        pytest.skip(
            f"the weights package of '{alias}' is not installed: "
            f"{BUILTIN_MODELS[alias].install_command}"
        )
    return load_model(alias, device="cpu")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2 135M Instruct on CPU, float32 (skipped only if its package is missing)."""
    return _load_builtin("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma() -> LoadedModel:
    """Gemma 3 270M base on CPU, float32 (skipped only if its package is missing)."""
    return _load_builtin("gemma3-270m")


@pytest.fixture
def no_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """llama-cpp-python looks uninstalled: ``import llama_cpp`` raises ImportError."""
    for name in [m for m in sys.modules if m == "llama_cpp" or m.startswith("llama_cpp.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    yield


# ---------------------------------------------------------------------------------------------
# A real PostgreSQL server (Debian's package), started once per session


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster on loopback; skips (fails under
    ``PJ_REQUIRE_POSTGRES=1``) where the package is not installed."""
    binaries = postgres_binaries()
    missing = [m for m in ("sqlalchemy", "psycopg") if importlib.util.find_spec(m) is None]
    if binaries is None or missing:
        reason = (
            f"PostgreSQL is not installed: {INSTALL_HINT}"
            if binaries is None
            else f"{' and '.join(missing)} missing: pip install 'persona-judge[postgres]'"
        )
        if os.environ.get("PJ_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PJ_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    server = PostgresServer(binaries)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database on the session's server (dropped afterwards)."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
