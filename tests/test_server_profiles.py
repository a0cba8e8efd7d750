"""Profiles over HTTP (``/v1/profiles``) on the store ``pj profiles`` uses, and a ``pj serve``
process killed with SIGKILL in the middle of a stream that loses no profile."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pj_core.cli import main
from pj_core.engine import PersonaJudge
from pj_core.personas import PersonaProfile, resolve_personas
from pj_core.personas.store import ProfileStore
from pj_core.server import ServerConfig, create_app
from tests._server import serving
from tests._tiny import make_tiny_engine, make_tiny_model, make_tiny_tokenizer

MODEL = "tiny-chat"
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    return make_tiny_engine(MODEL)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """What ``--store`` / ``ServerConfig.profile_store`` is given: a SQLite file, or a
    PostgreSQL URL (a real server)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return tmp_path / "profiles.db"


@pytest.fixture()
def base_url(engine: PersonaJudge, store_path: Path | str) -> Iterator[str]:
    with serving(create_app(ServerConfig(engine=engine, profile_store=store_path))) as url:
        yield url


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def test_put_get_chat_delete(base_url: str, engine: PersonaJudge) -> None:
    url = f"{base_url}/v1/profiles/bob"
    created = httpx.put(
        url, json={"preferences": ["the cat", "the dog"], "defaults": {"max_new_tokens": 4}}
    )
    assert created.status_code == 201, created.text
    assert created.headers["etag"] == '"1"'
    body = created.json()
    assert body["object"] == "profile" and body["user_id"] == "bob" and body["revision"] == 1
    assert body["preferences"] == ["the cat", "the dog"]
    got = httpx.get(url)
    assert got.status_code == 200 and got.json() == body and got.headers["etag"] == '"1"'

    chat = httpx.post(
        f"{base_url}/v1/chat/completions",
        timeout=60,
        json={"model": MODEL, "messages": HELLO, "user": "bob", "seed": 0},
    )
    assert chat.status_code == 200, chat.text
    expected = engine.generate(
        HELLO, resolve_personas(["the cat", "the dog"]), seed=0, max_new_tokens=4
    )
    assert chat.json()["choices"][0]["message"]["content"] == expected.text
    assert chat.json()["persona_judge"]["persona_source"] == "profile:bob"

    replaced = httpx.put(url, json={"preferences": ["humor", "concise"]})
    assert replaced.status_code == 200 and replaced.json()["revision"] == 2
    assert replaced.json()["preferences"] == ["humor", "concise"]
    assert replaced.json()["defaults"]["max_new_tokens"] is None
    listed = httpx.get(f"{base_url}/v1/profiles").json()
    assert [p["user_id"] for p in listed["data"]] == ["bob"]

    assert httpx.delete(url).status_code == 204
    _error(httpx.get(url), 404, "profile_not_found")
    _error(httpx.delete(url), 404, "profile_not_found")
    _error(
        httpx.post(
            f"{base_url}/v1/chat/completions",
            json={"model": MODEL, "messages": HELLO, "user": "bob"},
        ),
        404,
        "profile_not_found",
    )


def test_a_stale_write_is_refused(base_url: str) -> None:
    url = f"{base_url}/v1/profiles/carol"
    first = httpx.put(url, json={"preferences": ["humor"]}).json()
    # Two clients read revision 1; the first write wins, the second gets a 409.
    mine = {**first, "preferences": ["concise"]}
    theirs = {**first, "preferences": ["expert"]}
    assert httpx.put(url, json=mine).status_code == 200  # echoes GET's body, revision 1
    message = _error(httpx.put(url, json=theirs), 409, "profile_conflict")
    assert "revision" in message
    assert httpx.get(url).json()["preferences"] == ["concise"]
    assert (
        httpx.put(url, json={"preferences": ["vivid"]}, headers={"if-match": '"1"'}).status_code
        == 409
    )
    fresh = httpx.put(url, json={"preferences": ["vivid"]}, headers={"if-match": '"2"'})
    assert fresh.status_code == 200 and fresh.json()["revision"] == 3
    # revision 0: "only if it does not exist yet"
    _error(httpx.put(url, json={"revision": 0, "preferences": ["humor"]}), 409, "profile_conflict")
    assert httpx.put(f"{base_url}/v1/profiles/dave", json={"revision": 0}).status_code == 201


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"preferences": ["humr"]}, 400, "invalid_value", "humor"),
        ({"user_id": "mallory"}, 400, "invalid_value", "mallory"),
        ({"defaults": {"temperature": -1}}, 400, "invalid_value", "temperature"),
        ({"revision": "latest"}, 400, "invalid_value", "revision"),
        ({"revision": -1}, 400, "invalid_value", "revision"),
        ({"colour": "blue"}, 400, "invalid_value", "colour"),
        ({"metadata": {"k": float("inf")}}, 400, "invalid_value", "metadata"),
        ([1, 2], 422, "invalid_request_body", "dict|object"),
    ],
)
def test_bad_profiles_are_refused_and_nothing_is_written(
    base_url: str, body: Any, status: int, code: str, says: str
) -> None:
    import json
    import re

    content = json.dumps(body, allow_nan=True).replace("Infinity", "1e999")
    response = httpx.put(
        f"{base_url}/v1/profiles/erin",
        content=content,
        headers={"content-type": "application/json"},
    )
    message = _error(response, status, code)
    assert re.search(says, message, re.IGNORECASE), message
    _error(httpx.get(f"{base_url}/v1/profiles/erin"), 404, "profile_not_found")


def test_bad_user_ids_in_the_path(base_url: str) -> None:
    long_id = "x" * 300
    for user_id in (long_id, "bad%00id"):
        response = httpx.get(f"{base_url}/v1/profiles/{user_id}")
        _error(response, 400, "invalid_value")
        response = httpx.put(f"{base_url}/v1/profiles/{user_id}", json={})
        _error(response, 400, "invalid_value")


def test_the_cli_and_the_server_share_one_store(
    base_url: str, store_path: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    httpx.put(f"{base_url}/v1/profiles/frank", json={"preferences": ["humor", "concise"]})
    assert main(["profiles", "show", "frank", "--json", "--store", str(store_path)]) == 0
    assert '"humor"' in capsys.readouterr().out
    assert (
        main(["profiles", "add", "grace", "--preference", "expert", "--store", str(store_path)])
        == 0
    )
    assert httpx.get(f"{base_url}/v1/profiles/grace").json()["preferences"] == ["expert"]


# ----------------------------------------------------------------------------- kill -9


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(model_dir: Path, store: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pj_core.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--store",
            str(store),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stderr.read().decode() if process.stderr else "exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("pj serve did not start")


@pytest.mark.timeout(300)
def test_kill_9_during_a_stream_loses_no_profile(tmp_path: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    model_dir = tmp_path / "tiny-model"
    make_tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    store = tmp_path / "profiles.db"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = _start_server(model_dir, store, port)
    try:
        served = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        written = {}
        for i in range(5):
            answer = httpx.put(
                f"{base}/v1/profiles/user{i}",
                json={"preferences": ["humor", "concise"], "metadata": {"i": i}},
            )
            assert answer.status_code == 201, answer.text
            written[f"user{i}"] = answer.json()
        body = {
            "model": served,
            "messages": HELLO,
            "user": "user0",
            "seed": 1,
            "max_tokens": 150,
            "stream": True,
            "persona_judge": {"strategy": "speculative"},
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == -signal.SIGKILL
    restarted = _start_server(model_dir, store, port)
    try:
        for user_id, profile in written.items():
            got = httpx.get(f"{base}/v1/profiles/{user_id}")
            assert got.status_code == 200 and got.json() == profile
    finally:
        restarted.kill()
        restarted.wait(timeout=30)
    with ProfileStore(store) as opened:
        assert opened.corrupt_rows() == []
        assert sorted(opened.list_ids()) == sorted(written)
        assert isinstance(opened.get("user3"), PersonaProfile)
