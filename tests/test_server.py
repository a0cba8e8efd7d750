"""``pj serve`` on a tiny model: OpenAI's chat-completions protocol over real HTTP.

The server runs in uvicorn on a loopback port (tests/_server.py); requests go through httpx
and the ``openai`` client. Every answer is checked against ``PersonaJudge.generate`` with the
same conversation, personas and seed; every bad request against its status and OpenAI's error
shape, with the server still answering afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from pj_core.engine import PersonaJudge
from pj_core.personas import GenerationDefaults, PersonaProfile, resolve_personas
from pj_core.personas.store import ProfileStore
from pj_core.server import ServerConfig, create_app
from tests._server import serving
from tests._tiny import make_tiny_engine

MODEL = "tiny-chat"
PREFERENCES = ["be funny", "be brief"]
HELLO = [{"role": "user", "content": "hello world"}]
CLIENT_HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    return make_tiny_engine(MODEL)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("server") / "profiles.db"
    with ProfileStore(path) as store:
        store.put(
            PersonaProfile(
                user_id="alice",
                preferences=["the cat", "the dog"],
                defaults=GenerationDefaults(max_new_tokens=5),
            )
        )
    return path


@pytest.fixture(scope="module")
def base_url(engine: PersonaJudge, store_path: Path) -> Iterator[str]:
    app = create_app(
        ServerConfig(engine=engine, profile_store=store_path, max_body_bytes=64 * 1024)
    )
    with serving(app) as url:
        yield url


def _post(base_url: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60, **kwargs)


def _body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": HELLO,
        "seed": 0,
        "max_tokens": 6,
        "persona_judge": {"preferences": PREFERENCES},
    }
    body.update(fields)
    return {name: value for name, value in body.items() if value is not None}


def _sse_data(response: httpx.Response) -> list[str]:
    return [
        line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")
    ]


# ----------------------------------------------------------------------------- answers


def test_health_and_models(base_url: str) -> None:
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok", "model": MODEL}
    models = httpx.get(f"{base_url}/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        (MODEL, "model", "persona-judge")
    ]
    assert httpx.get(f"{base_url}/v1/models/{MODEL}").json()["id"] == MODEL
    assert httpx.get(f"{base_url}/v1/models/gpt-4o").status_code == 404


def test_a_completion_is_the_engines_answer(base_url: str, engine: PersonaJudge) -> None:
    response = _post(
        base_url,
        _body(
            temperature=0.8,
            top_p=0.9,
            persona_judge={"preferences": PREFERENCES, "lookahead": 2, "strategy": "lockstep"},
        ),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = engine.generate(
        HELLO,
        resolve_personas(PREFERENCES),
        seed=0,
        max_new_tokens=6,
        temperature=0.8,
        top_p=0.9,
        lookahead=2,
        strategy="lockstep",
    )
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == ("length" if expected.finish_reason == "length" else "stop")
    assert body["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": len(expected.token_ids),
        "total_tokens": expected.prompt_tokens + len(expected.token_ids),
    }
    info = body["persona_judge"]
    assert info["persona_source"] == "preferences"
    assert [p["text"] for p in info["personas"]] == [p.text for p in resolve_personas(PREFERENCES)]
    assert info["stats"]["strategy"] == "lockstep" and info["stats"]["tokens"] == len(
        expected.token_ids
    )


def test_the_user_selects_the_saved_profile(base_url: str, engine: PersonaJudge) -> None:
    body = _body(user="alice")
    del body["persona_judge"], body["max_tokens"]
    response = _post(base_url, body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["persona_judge"]["persona_source"] == "profile:alice"
    expected = engine.generate(
        HELLO, resolve_personas(["the cat", "the dog"]), seed=0, max_new_tokens=5
    )  # alice's saved budget
    assert data["choices"][0]["message"]["content"] == expected.text
    assert data["usage"]["completion_tokens"] == len(expected.token_ids) <= 5


def test_a_stream_gives_the_same_answer_in_chunks(base_url: str) -> None:
    whole = _post(base_url, _body()).json()
    response = _post(base_url, _body(stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = _sse_data(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    *_, last, usage = chunks
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["persona_judge"]["stats"]["tokens"] == whole["usage"]["completion_tokens"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_stop_strings_end_the_answer(base_url: str, engine: PersonaJudge) -> None:
    free = _post(base_url, _body(max_tokens=12)).json()["choices"][0]["message"]["content"]
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]
    body = _post(base_url, _body(max_tokens=12, stop=stop)).json()
    assert body["choices"][0]["message"]["content"] == free[: free.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    both = _post(
        base_url, _body(max_tokens=None, max_completion_tokens=12, stop=[stop, "zzz"])
    ).json()
    assert both["choices"][0]["message"] == body["choices"][0]["message"]


def test_the_openai_client_sync_async_and_streaming(base_url: str) -> None:
    import asyncio

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    extra = {"persona_judge": {"preferences": PREFERENCES}}
    answer = client.chat.completions.create(
        model=MODEL,
        messages=CLIENT_HELLO,
        seed=0,
        max_tokens=6,
        extra_body=extra,
    )
    direct = _post(base_url, _body()).json()
    assert answer.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert answer.usage is not None and answer.usage.total_tokens == direct["usage"]["total_tokens"]
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=CLIENT_HELLO,
        seed=0,
        max_tokens=6,
        stream=True,
        extra_body=extra,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == answer.choices[0].message.content

    async def async_call() -> str | None:
        async_client = openai.AsyncOpenAI(
            base_url=f"{base_url}/v1", api_key="unused", max_retries=0
        )
        done = await async_client.chat.completions.create(
            model=MODEL,
            messages=CLIENT_HELLO,
            seed=0,
            max_tokens=6,
            extra_body=extra,
        )
        return done.choices[0].message.content

    assert asyncio.run(async_call()) == answer.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="profile"):
        client.chat.completions.create(
            model=MODEL,
            messages=CLIENT_HELLO,
            user="nobody",
        )


def test_developer_messages_and_text_parts_are_read(base_url: str, engine: PersonaJudge) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}],
        },
    ]
    body = _post(base_url, _body(messages=messages)).json()
    expected = engine.generate(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello\nworld"}],
        resolve_personas(PREFERENCES),
        seed=0,
        max_new_tokens=6,
    )
    assert body["choices"][0]["message"]["content"] == expected.text


def test_accepted_no_op_fields(base_url: str) -> None:
    plain = _post(base_url, _body()).json()["choices"][0]["message"]
    fields = {
        "n": 1,
        "logprobs": False,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "metadata": {"app": "x"},
        "store": False,
        "logit_bias": {},
    }
    response = _post(base_url, _body(**fields))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"] == plain


# ----------------------------------------------------------------------------- bad input


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return dict(error)


@pytest.mark.parametrize(
    ("fields", "status", "code", "says"),
    [
        ({"n": 2}, 400, "invalid_value", "n=2"),
        ({"logprobs": True}, 400, "invalid_value", "logprobs"),
        ({"frequency_penalty": 0.5}, 400, "invalid_value", "frequency_penalty"),
        ({"functions": [{"name": "f"}]}, 400, "invalid_value", "use tools"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, 400, "invalid_value", "disagree"),
        ({"temperature": -1}, 400, "invalid_value", "temperature"),
        ({"seed": -5}, 400, "invalid_value", "seed"),
        ({"max_tokens": 500}, 400, "context_length_exceeded", "context"),
        ({"user": "nobody", "persona_judge": None}, 404, "profile_not_found", "nobody"),
        ({"model": "gpt-4o"}, 404, "model_not_found", "smollm2|tiny-chat"),
        ({"persona_judge": None}, 400, "invalid_value", "no personas"),
        ({"user": "alice"}, 400, "invalid_value", "preferences"),
        ({"temprature": 0.5}, 422, "invalid_request_body", "temprature"),
        ({"temperature": "hot"}, 422, "invalid_request_body", "temperature"),
        ({"messages": []}, 422, "invalid_request_body", "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "invalid_request_body", "role"),
        ({"persona_judge": {"lookahed": 2}}, 422, "invalid_request_body", "lookahed"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "invalid_value",
            "image_url",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, 400, "invalid_value", "empty"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "invalid_value", "surrogate"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_stays_up(
    base_url: str, fields: dict[str, Any], status: int, code: str, says: str
) -> None:
    content = json.dumps(_body(**fields), ensure_ascii=False).encode("utf-8", "surrogatepass")
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    error = _error(response, status)
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    import re

    assert re.search(says, error["message"], re.IGNORECASE), error["message"]
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_malformed_json_wrong_shapes_and_unknown_routes(base_url: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    error = _error(httpx.post(url, content=b'{"model": "tiny-chat", ', headers=headers), 400)
    assert error["code"] == "invalid_json"
    assert _error(httpx.post(url, content=b"[1, 2]", headers=headers), 422)["code"] == (
        "invalid_request_body"
    )
    assert _error(httpx.post(url, content=b"\xff\xfe", headers=headers), 400)["code"] == (
        "invalid_json"
    )
    assert _error(httpx.get(f"{base_url}/v1/nothing"), 404)["code"] == "http_404"
    assert _error(httpx.get(url), 405)["code"] == "http_405"
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_oversized_bodies_get_a_413(base_url: str) -> None:
    big = _body(messages=[{"role": "user", "content": "hello " * 20_000}])
    error = _error(_post(base_url, big), 413)
    assert error["code"] == "request_too_large" and "65536" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "'
        for _ in range(200):
            yield b"hello " * 100
        yield b'"}]}'

    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert _error(response, 413)["code"] == "request_too_large"
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_a_prompt_over_the_context_window_is_a_400_before_any_chunk(base_url: str) -> None:
    long = " ".join(["hello"] * 70)
    response = _post(base_url, _body(stream=True, messages=[{"role": "user", "content": long}]))
    assert _error(response, 400)["code"] == "context_length_exceeded"


def test_a_server_with_default_preferences_answers_anonymous_requests(
    engine: PersonaJudge, tmp_path: Path
) -> None:
    app = create_app(
        ServerConfig(
            engine=engine,
            profile_store=tmp_path / "p.db",
            preferences=PREFERENCES,
            served_model_name="custom",
        )
    )
    with serving(app) as url:
        body = _body(model="custom")
        del body["persona_judge"]
        response = _post(url, body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "custom"
        assert response.json()["persona_judge"]["persona_source"] == "preferences"
        expected = engine.generate(HELLO, resolve_personas(PREFERENCES), seed=0, max_new_tokens=6)
        assert response.json()["choices"][0]["message"]["content"] == expected.text


def test_pj_serve_refuses_a_public_address_without_keys(capsys: pytest.CaptureFixture[str]) -> None:
    from pj_core.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loopback" in err


def test_a_backend_without_room_is_a_503_to_retry_later() -> None:
    """A llama.cpp context with every sequence or cell taken is the server's state, not the
    request's fault: 503, not 400 or 500."""
    from pj_core.errors import BackendCapacityError
    from pj_core.server.app import status_of

    assert status_of(BackendCapacityError("no room")) == (503, "backend_capacity")
