"""API keys of ``pj serve``: a user's key acts as that user only, an admin key manages every
profile, no or a wrong key is a 401; keys come hashed from a key file (``pj keys``) or from
``PJ_API_KEYS``; an open server (no keys) is refused on a non-loopback address."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pj_core.cli import main
from pj_core.cli.serve import api_keys, check_host
from pj_core.engine import PersonaJudge
from pj_core.errors import ApiKeyFileError, InvalidGenerationConfigError
from pj_core.personas import PersonaProfile
from pj_core.personas.store import ProfileStore
from pj_core.server import ServerConfig, create_app
from pj_core.server.auth import KeyRing, add_key, hash_key, read_key_file, revoke_key
from tests._server import serving
from tests._tiny import make_tiny_engine

MODEL = "tiny-chat"
HELLO = [{"role": "user", "content": "hello world"}]
ALICE, BOB, ADMIN = "pj-alice-key-0123456789", "pj-bob-key-0123456789", "pj-admin-key-0123456789"


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    return make_tiny_engine(MODEL)


@pytest.fixture()
def base_url(engine: PersonaJudge, tmp_path: Path) -> Iterator[str]:
    store = tmp_path / "profiles.db"
    with ProfileStore(store) as opened:
        opened.put(PersonaProfile(user_id="alice", preferences=["the cat", "the dog"]))
        opened.put(PersonaProfile(user_id="bob", preferences=["be funny", "be brief"]))
    keys = KeyRing.from_env({"PJ_API_KEYS": f"alice={ALICE}, bob={BOB}, *={ADMIN}"})
    app = create_app(ServerConfig(engine=engine, profile_store=store, api_keys=keys))
    with serving(app) as url:
        yield url


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _chat(base_url: str, key: str | None, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": HELLO, "seed": 0, "max_tokens": 4, **fields}
    headers = _auth(key) if key else {}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def _status(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_no_key_or_a_wrong_key_is_a_401(base_url: str) -> None:
    for headers in (
        {},
        _auth("pj-wrong-key-0123456789"),
        {"authorization": ALICE},
        {"authorization": "Basic abc"},
        {"authorization": "Bearer"},
    ):
        for method, path in (
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("GET", "/v1/profiles/alice"),
            ("PUT", "/v1/profiles/alice"),
            ("DELETE", "/v1/profiles/alice"),
            ("GET", "/v1/profiles"),
        ):
            response = httpx.request(method, f"{base_url}{path}", headers=headers, json={})
            _status(response, 401, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
    # a body of any size gets the 401, unread
    big = httpx.post(f"{base_url}/v1/chat/completions", content=b"x" * 10_000_000)
    _status(big, 401, "invalid_api_key")
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.get(f"{base_url}/v1/models", headers=_auth(BOB)).status_code == 200


def test_a_users_key_personalises_as_that_user_only(base_url: str) -> None:
    mine = _chat(base_url, ALICE)  # no `user`: the key's user
    assert mine.status_code == 200, mine.text
    assert mine.json()["persona_judge"]["persona_source"] == "profile:alice"
    assert _chat(base_url, ALICE, user="alice").json()["choices"] == mine.json()["choices"]
    denied = _chat(base_url, ALICE, user="bob")
    _status(denied, 403, "permission_denied")
    assert "alice" in denied.json()["error"]["message"]
    own_preferences = _chat(base_url, ALICE, persona_judge={"preferences": ["humor", "concise"]})
    assert own_preferences.json()["persona_judge"]["persona_source"] == "preferences"
    as_bob = _chat(base_url, ADMIN, user="bob")
    assert as_bob.json()["persona_judge"]["persona_source"] == "profile:bob"
    _status(_chat(base_url, ADMIN), 400, "invalid_value")  # admin, no user: no personas


def test_a_users_key_reaches_only_its_own_profile(base_url: str) -> None:
    profiles = f"{base_url}/v1/profiles"
    assert httpx.get(f"{profiles}/alice", headers=_auth(ALICE)).status_code == 200
    changed = httpx.put(f"{profiles}/alice", headers=_auth(ALICE), json={"preferences": ["humor"]})
    assert changed.status_code == 200 and changed.json()["preferences"] == ["humor"]
    for method in ("GET", "PUT", "DELETE"):
        response = httpx.request(method, f"{profiles}/bob", headers=_auth(ALICE), json={})
        _status(response, 403, "permission_denied")
        response = httpx.request(method, f"{profiles}/carol", headers=_auth(ALICE), json={})
        _status(response, 403, "permission_denied")
    _status(httpx.get(profiles, headers=_auth(ALICE)), 403, "permission_denied")
    assert httpx.get(f"{profiles}/bob", headers=_auth(ADMIN)).json()["preferences"] == [
        "be funny",
        "be brief",
    ]  # untouched
    listed = httpx.get(profiles, headers=_auth(ADMIN)).json()
    assert sorted(p["user_id"] for p in listed["data"]) == ["alice", "bob"]
    created = httpx.put(f"{profiles}/carol", headers=_auth(ADMIN), json={"preferences": ["expert"]})
    assert created.status_code == 201
    assert httpx.delete(f"{profiles}/carol", headers=_auth(ADMIN)).status_code == 204
    assert httpx.delete(f"{profiles}/alice", headers=_auth(ALICE)).status_code == 204


def test_the_openai_client_sends_its_api_key(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=ALICE, max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello world"}], max_tokens=4, seed=0
    )
    assert answer.model_extra is not None
    assert answer.model_extra["persona_judge"]["persona_source"] == "profile:alice"
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="pj-nope-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], user="bob"
        )


# ----------------------------------------------------------------------------- key sources


def test_the_key_file_holds_hashes_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys" / "keys.json"
    assert main(["keys", "add", "alice", "--file", str(path)]) == 0
    alice_key = capsys.readouterr().out.strip()
    assert main(["keys", "add", "--admin", "--file", str(path)]) == 0
    admin_key = capsys.readouterr().out.strip()
    assert alice_key.startswith("pj-") and len(alice_key) >= 40 and alice_key != admin_key
    text = path.read_text()
    assert alice_key not in text and admin_key not in text and hash_key(alice_key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing.from_file(path)
    assert ring.authenticate(f"Bearer {alice_key}").user_id == "alice"
    assert ring.authenticate(f"Bearer {admin_key}").admin
    assert main(["keys", "list", "--json", "--file", str(path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["user_id"], k["admin"]) for k in listed] == [("alice", False), (None, True)]
    assert all("sha256" not in k for k in listed)
    revoke_key(path, listed[0]["id"])
    with pytest.raises(Exception, match="not valid"):
        KeyRing.from_file(path).authenticate(f"Bearer {alice_key}")


def test_serve_reads_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    file_key, _ = add_key(path, "alice")
    monkeypatch.setenv("PJ_API_KEYS", "bob=pj-bob-key-0123456789")
    ring = api_keys(str(path))
    assert len(ring) == 2
    assert ring.authenticate(f"Bearer {file_key}").user_id == "alice"
    assert ring.authenticate("Bearer pj-bob-key-0123456789").user_id == "bob"
    monkeypatch.setenv("PJ_API_KEYS_FILE", str(path))
    assert len(api_keys(None)) == 2
    monkeypatch.delenv("PJ_API_KEYS_FILE")
    monkeypatch.delenv("PJ_API_KEYS")
    assert len(api_keys(None)) == 0


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("alice", "user_id=key"),
        ("alice=short", "16"),
        ("=pj-key-0123456789abc", "user_id=key"),
        ("bad\x00id=pj-key-0123456789abc", "user id"),
    ],
)
def test_a_malformed_environment_variable_is_a_typed_error(value: str, says: str) -> None:
    with pytest.raises(ApiKeyFileError, match=says):
        KeyRing.from_env({"PJ_API_KEYS": value})


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"format": "other"}',
        '{"format": "persona-judge-api-keys", "keys": 3}',
        '{"format": "persona-judge-api-keys", "keys": [{"id": "k"}]}',
        '{"format": "persona-judge-api-keys", "keys": [{"id": "k", "sha256": "x", '
        '"user_id": "a"}]}',
    ],
)
def test_a_broken_key_file_is_a_typed_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ApiKeyFileError):
        read_key_file(path)
    with pytest.raises(ApiKeyFileError, match="no API key file"):
        KeyRing.from_file(tmp_path / "missing.json")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "keys.json")
    assert main(["keys", "add", "--file", path]) != 0  # neither a user nor --admin
    assert main(["keys", "add", "alice", "--admin", "--file", path]) != 0
    assert main(["keys", "revoke", "key_nope", "--file", path]) != 0
    assert main(["serve", "--api-keys", str(tmp_path / "missing.json")]) != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 4 and all(line.startswith("pj: error: ") for line in lines), lines


def test_an_open_server_listens_on_loopback_only() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        check_host(host, keys=0)
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.com"):
        with pytest.raises(InvalidGenerationConfigError, match="loopback"):
            check_host(host, keys=0)
        check_host(host, keys=1)
