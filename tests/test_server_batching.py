"""``pj serve`` batches concurrent requests continuously: a request that arrives while another
streams joins the running batch (and gets its own run's answer), and a client that goes away
frees its rows at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError
from pj_core.personas import resolve_personas
from pj_core.server import ServerConfig, create_app
from tests._server import serving
from tests._tiny import long_seed, make_tiny_engine, slow_down

MODEL = "tiny-chat"
PREFERENCES = ["be funny", "be brief"]
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    return make_tiny_engine(MODEL, context_window=200)


@pytest.fixture(scope="module")
def app(engine: PersonaJudge, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    store = tmp_path_factory.mktemp("batching") / "profiles.db"
    return create_app(ServerConfig(engine=engine, profile_store=store, preferences=PREFERENCES))


@pytest.fixture(scope="module")
def base_url(app: FastAPI) -> Iterator[str]:
    with serving(app) as url:
        yield url


def _body(seed: int, tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": HELLO,
        "seed": seed,
        "max_tokens": tokens,
        "temperature": 1.0,
        **extra,
    }


def _wait_idle(app: FastAPI) -> None:
    deadline = time.monotonic() + 20
    while app.state.batcher.active_requests and time.monotonic() < deadline:
        time.sleep(0.005)
    assert app.state.batcher.active_requests == 0


def test_a_request_joins_a_running_stream(
    base_url: str, app: FastAPI, engine: PersonaJudge
) -> None:
    seed = long_seed(engine, 60)
    joined_before = app.state.batcher.stats.joined_running
    url = f"{base_url}/v1/chat/completions"
    answers: dict[str, Any] = {}
    with httpx.stream("POST", url, json=_body(seed, 60, stream=True), timeout=60) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the long one is decoding
        short = httpx.post(url, json=_body(3, 6), timeout=60)  # arrives meanwhile
        answers["short"] = short.json()
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert app.state.batcher.stats.joined_running > joined_before  # it joined, not waited
    expected = engine.generate(
        HELLO, resolve_personas(PREFERENCES), seed=3, max_new_tokens=6, temperature=1.0
    )
    assert answers["short"]["choices"][0]["message"]["content"] == expected.text
    _wait_idle(app)


def test_a_client_that_goes_away_frees_its_rows(
    base_url: str, app: FastAPI, engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = long_seed(engine, 60)
    slow_down(engine, monkeypatch, 0.02)  # 60 steps take >= 1.2 s
    url = f"{base_url}/v1/chat/completions"
    steps = app.state.batcher.stats.steps
    with httpx.stream("POST", url, json=_body(seed, 60, stream=True), timeout=60) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    # the response is closed: the stream is cancelled within a few steps, not 60
    _wait_idle(app)
    assert app.state.batcher.stats.steps - steps < 30
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_many_concurrent_clients_each_get_their_own_answer(
    base_url: str, engine: PersonaJudge
) -> None:
    url = f"{base_url}/v1/chat/completions"
    results: dict[int, str] = {}

    def client(seed: int) -> None:
        answer = httpx.post(url, json=_body(seed, 10), timeout=60).json()
        results[seed] = answer["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for seed in range(8):
        expected = engine.generate(
            HELLO, resolve_personas(PREFERENCES), seed=seed, max_new_tokens=10, temperature=1.0
        )
        assert results[seed] == expected.text


def test_batching_can_be_turned_off(engine: PersonaJudge, tmp_path: Path) -> None:
    app = create_app(
        ServerConfig(
            engine=engine, profile_store=tmp_path / "p.db", preferences=PREFERENCES, batching=False
        )
    )
    assert app.state.batcher is None
    with serving(app) as url:
        answer = httpx.post(f"{url}/v1/chat/completions", json=_body(2, 6), timeout=60).json()
    expected = engine.generate(
        HELLO, resolve_personas(PREFERENCES), seed=2, max_new_tokens=6, temperature=1.0
    )
    assert answer["choices"][0]["message"]["content"] == expected.text
    with pytest.raises(InvalidGenerationConfigError, match="batching"):
        create_app(
            ServerConfig(
                engine=engine, profile_store=tmp_path / "p.db", batching=False, request_timeout=5
            )
        )


def test_a_full_queue_answers_429_with_retry_after(
    engine: PersonaJudge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = long_seed(engine, 40)
    config = ServerConfig(
        engine=engine,
        profile_store=tmp_path / "p.db",
        preferences=PREFERENCES,
        max_batch_rows=3,
        max_queue=1,
    )  # one request decodes, one waits
    slow_down(engine, monkeypatch, 0.03)  # the first decodes >= 1.2 s
    app = create_app(config)
    with serving(app) as base_url:
        url = f"{base_url}/v1/chat/completions"
        waiting: dict[str, httpx.Response] = {}
        with httpx.stream("POST", url, json=_body(seed, 40, stream=True), timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            second = threading.Thread(
                target=lambda: waiting.setdefault(
                    "r", httpx.post(url, json=_body(2, 4), timeout=60)
                )
            )
            second.start()
            deadline = time.monotonic() + 10
            while app.state.batcher.active_requests < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            refused = httpx.post(url, json=_body(3, 4), timeout=60)
            rest = [line for line in lines if line.startswith("data: ")]
        second.join(timeout=60)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "server_busy"
    assert int(refused.headers["retry-after"]) >= 1
    assert rest[-1] == "data: [DONE]"
    assert waiting["r"].status_code == 200  # the waiting one was served once rows freed


def test_a_request_past_its_time_limit_gets_a_504(
    engine: PersonaJudge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = long_seed(engine, 60)
    config = ServerConfig(
        engine=engine, profile_store=tmp_path / "p.db", preferences=PREFERENCES, request_timeout=0.3
    )
    slow_down(engine, monkeypatch, 0.02)  # 60 steps take >= 1.2 s
    app = create_app(config)
    with serving(app) as base_url:
        url = f"{base_url}/v1/chat/completions"
        late = httpx.post(url, json=_body(seed, 60), timeout=60)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        streamed = httpx.post(url, json=_body(seed, 60, stream=True), timeout=60)
        data = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert '"code": "timeout"' in data[-1] and "[DONE]" not in data[-1]
        assert app.state.batcher.stats.timed_out == 2
        assert httpx.get(f"{base_url}/health").status_code == 200
    with pytest.raises(InvalidGenerationConfigError):
        create_app(ServerConfig(engine=engine, profile_store=tmp_path / "p.db", request_timeout=0))
