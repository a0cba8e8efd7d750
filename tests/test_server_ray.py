"""``pj serve --ray``: two Ray Serve replicas on a local Ray cluster, sharing a PostgreSQL
profile store (both real; tests/_postgres.py starts the database). The server runs as the
command a user types, in a process of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pj_core.personas import compose
from tests._postgres import PostgresServer
from tests._tiny import make_tiny_model, make_tiny_tokenizer

if os.environ.get("PJ_REQUIRE_RAY") != "1":
    pytest.importorskip("ray.serve", reason="pip install 'persona-judge[ray]'")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HEADER = "x-pj-replica"
ALICE = ["humor", "concise"]
BOB = ["expert", "friendly"]


@dataclass
class RayServer:
    base: str
    model: str
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _replicas_seen(server: RayServer, wanted: int, deadline: float) -> set[str]:
    """Replica names answering ``/health``, polled until ``wanted`` distinct ones answered."""
    seen: set[str] = set()
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"pj serve --ray exited:\n{server.log.read_text()[-3000:]}")
        try:
            answer = httpx.get(f"{server.base}/health", timeout=5)
            if answer.status_code == 200:
                seen.add(answer.headers[HEADER])
                if len(seen) >= wanted:
                    return seen
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"saw replicas {seen}, wanted {wanted}:\n{server.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_server(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayServer]:
    folder = tmp_path_factory.mktemp("ray")
    tokenizer = make_tiny_tokenizer()
    model_dir = folder / "tiny-model"
    make_tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    database = postgres_server.create_database()
    port = _free_port()
    log = folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable, "-m", "pj_core.cli", "serve", "--ray", "--replicas", "2",
        "--model", str(model_dir), "--store", database, "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}
        )
    server = RayServer(f"http://127.0.0.1:{port}", str(model_dir), process, log)
    try:
        _replicas_seen(server, 2, time.monotonic() + 240)
        yield server
    finally:
        process.send_signal(signal.SIGINT)  # pj serve --ray shuts Serve and its Ray down
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"])
        postgres_server.drop_database(database)


def _chat(server: RayServer, user: str, **extra: object) -> httpx.Response:
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "hello world"}],
        "user": user,
        "max_tokens": 8,
        **extra,
    }
    return httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)


def _personas(answer: httpx.Response) -> list[str]:
    return [p["text"] for p in answer.json()["persona_judge"]["personas"]]


def _expected(preferences: list[str]) -> list[str]:
    return [p.text for p in compose(preferences)]


def test_a_profile_written_through_one_replica_is_used_by_the_other(ray_server: RayServer) -> None:
    for preferences in (ALICE, BOB):  # a first write, then a change
        put = httpx.put(
            f"{ray_server.base}/v1/profiles/alice", json={"preferences": preferences}, timeout=30
        )
        assert put.status_code in (200, 201), put.text
        writer = put.headers[HEADER]
        for _ in range(60):  # every answer after the write uses it; go on until the other
            answer = _chat(ray_server, "alice")  # replica has answered one
            assert answer.status_code == 200, answer.text
            assert answer.json()["persona_judge"]["persona_source"] == "profile:alice"
            assert _personas(answer) == _expected(preferences)
            if answer.headers[HEADER] != writer:
                break
        else:
            raise AssertionError(f"no request reached the replica that did not write ({writer})")


def test_a_killed_replica_is_replaced_and_no_client_gets_another_users_answer(
    ray_server: RayServer,
) -> None:
    profiles = {"carol": ALICE, "dave": BOB}
    for user, preferences in profiles.items():
        put = httpx.put(
            f"{ray_server.base}/v1/profiles/{user}", json={"preferences": preferences}, timeout=30
        )
        assert put.status_code in (200, 201), put.text
    before = _replicas_seen(ray_server, 2, time.monotonic() + 60)
    victim = sorted(before)[0]
    outcomes: list[tuple[str, float, float, int | str, str | None]] = []
    stop = threading.Event()

    def client(index: int) -> None:
        users = list(profiles)
        n = index
        while not stop.is_set():
            user = users[n % 2]
            n += 1
            started = time.monotonic()
            try:
                answer = _chat(ray_server, user, max_tokens=24)
            except httpx.TransportError as exc:
                outcomes.append((user, started, time.monotonic(), type(exc).__name__, None))
                continue
            status = answer.status_code
            if status == 200:
                source = answer.json()["persona_judge"]["persona_source"]
                assert source == f"profile:{user}", (user, source)  # never another user's
                assert _personas(answer) == _expected(profiles[user])
                outcomes.append((user, started, time.monotonic(), 200, answer.headers[HEADER]))
            else:
                outcomes.append((user, started, time.monotonic(), status, None))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(3)  # load on both replicas
        killed_at = time.monotonic()
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
        time.sleep(3)
        after = _replicas_seen(ray_server, 2, time.monotonic() + 180)  # replaced
        time.sleep(2)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in clients)
    assert victim not in after and len(after) == 2
    in_flight = [o for o in outcomes if o[1] < killed_at < o[2]]
    assert in_flight, "no request was running when the replica was killed"
    served = [o for o in outcomes if o[3] == 200]
    assert any(o[1] > killed_at and o[4] in after - before for o in served)  # the new replica
    assert len(served) > len(outcomes) / 2, outcomes  # errors are the exception
    assert all(o[3] == 200 or not isinstance(o[3], int) or o[3] >= 500 for o in outcomes)


def test_settings_that_cannot_travel_to_replicas_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pj_core.cli import main
    from pj_core.errors import InvalidGenerationConfigError
    from pj_core.personas.store import open_store
    from pj_core.server import ServerConfig
    from pj_core.server.ray_serve import check_config

    with pytest.raises(InvalidGenerationConfigError, match="not a store object"):
        check_config(ServerConfig(profile_store=open_store(":memory:")), 2)
    with pytest.raises(InvalidGenerationConfigError, match=">= 1"):
        check_config(ServerConfig(), 0)
    assert main(["serve", "--replicas", "2"]) == 1
    assert "--replicas need --ray" in capsys.readouterr().err
