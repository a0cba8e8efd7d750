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
POOL_SIZE = 2  # connections per process (replica or CLI), from the --store URL


@dataclass
class RayServer:
    base: str
    model: str
    process: subprocess.Popen[bytes]
    log: Path
    store: str  # the --store URL, with the pool bound
    database: str  # the database's plain URL


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
    store = f"{database}?pool_size={POOL_SIZE}&max_overflow=0"  # each process's bound
    port = _free_port()
    log = folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        sys.executable, "-m", "pj_core.cli", "serve", "--ray", "--replicas", "2",
        "--model", str(model_dir), "--store", store, "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}
        )
    server = RayServer(f"http://127.0.0.1:{port}", str(model_dir), process, log, store, database)
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


def _put_with_retry(server: RayServer, user: str, change: dict[str, int]) -> tuple[str, int]:
    """Read, increment ``metadata.count`` and write back with ``If-Match``; again on a 409.
    Returns the replica that wrote and how many conflicts it met."""
    conflicts = 0
    while True:
        read = httpx.get(f"{server.base}/v1/profiles/{user}", timeout=60)
        assert read.status_code == 200, read.text
        profile = read.json()
        metadata = {"count": profile["metadata"]["count"] + change["count"]}
        written = httpx.put(
            f"{server.base}/v1/profiles/{user}",
            json={"preferences": profile["preferences"], "metadata": metadata},
            headers={"if-match": read.headers["etag"]},
            timeout=60,
        )
        if written.status_code == 409:
            conflicts += 1
            continue
        assert written.status_code == 200, written.text
        return written.headers[HEADER], conflicts


def test_sixteen_writers_across_both_replicas_and_the_cli_lose_no_update(
    ray_server: RayServer,
) -> None:
    """12 HTTP writers (spread over both replicas by Ray's proxy) increment one counter with
    optimistic revisions while 4 CLI processes add profiles: exact final counts, and no
    process opens more connections than its bound."""
    http_writers, increments, cli_writers, cli_profiles = 12, 5, 4, 3
    put = httpx.put(
        f"{ray_server.base}/v1/profiles/counter",
        json={"preferences": ALICE, "metadata": {"count": 0}},
        timeout=30,
    )
    assert put.status_code in (200, 201), put.text
    replicas: set[str] = set()
    conflicts: list[int] = []
    errors: list[BaseException] = []

    def http_writer() -> None:
        try:
            for _ in range(increments):
                replica, clashes = _put_with_retry(ray_server, "counter", {"count": 1})
                replicas.add(replica)
                conflicts.append(clashes)
        except BaseException as exc:  # reported below
            errors.append(exc)

    script = "; ".join(
        f"pj profiles add cli{{k}}-{i} -p concise --store '{ray_server.store}' >/dev/null"
        for i in range(cli_profiles)
    )
    pj = Path(sys.executable).parent / "pj"
    watching = threading.Event()
    peak = [0]

    def watch() -> None:
        import psycopg

        with psycopg.connect(ray_server.database, autocommit=True) as conn:
            while not watching.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'persona-judge' AND datname = current_database()"
                ).fetchone()
                peak[0] = max(peak[0], int(row[0]) if row else 0)
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=http_writer) for _ in range(http_writers)]
    for thread in threads:
        thread.start()
    clis = [
        subprocess.Popen(
            ["bash", "-c", f"PATH={pj.parent}:$PATH; " + script.replace("{k}", str(k))],
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(cli_writers)
    ]
    for cli in clis:
        _, stderr = cli.communicate(timeout=300)
        assert cli.returncode == 0, stderr
    for thread in threads:
        thread.join(timeout=300)
    watching.set()
    watcher.join(timeout=30)
    assert errors == []
    final = httpx.get(f"{ray_server.base}/v1/profiles/counter", timeout=30)
    assert final.json()["metadata"]["count"] == http_writers * increments
    assert final.headers["etag"] == f'"{http_writers * increments + 1}"'
    assert len(replicas) == 2  # both replicas wrote
    listed = httpx.get(f"{ray_server.base}/v1/profiles", timeout=30).json()
    ids = {p["user_id"] for p in listed["data"]}
    assert {f"cli{k}-{i}" for k in range(cli_writers) for i in range(cli_profiles)} <= ids
    assert 0 < peak[0] <= POOL_SIZE * (2 + cli_writers), peak  # 2 replicas + the CLIs
    assert "too many clients" not in ray_server.log.read_text()


def test_a_database_restart_under_load_fails_typed_and_recovers(
    ray_server: RayServer, postgres_server: PostgresServer
) -> None:
    put = httpx.put(f"{ray_server.base}/v1/profiles/erin", json={"preferences": BOB}, timeout=30)
    assert put.status_code in (200, 201), put.text
    outcomes: list[tuple[float, float, int, str | None]] = []
    stop = threading.Event()

    def chat_client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            answer = _chat(ray_server, "erin")
            code = answer.json()["error"]["code"] if answer.status_code != 200 else None
            if answer.status_code == 200:
                assert _personas(answer) == _expected(BOB)
            outcomes.append((started, time.monotonic(), answer.status_code, code))

    def profile_client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            answer = httpx.put(
                f"{ray_server.base}/v1/profiles/erin", json={"preferences": BOB}, timeout=60
            )
            code = answer.json()["error"]["code"] if answer.status_code >= 400 else None
            outcomes.append((started, time.monotonic(), answer.status_code, code))
            time.sleep(0.05)

    clients = [threading.Thread(target=chat_client) for _ in range(4)]
    clients += [threading.Thread(target=profile_client) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(2)
        postgres_server.stop("fast")
        stopped = time.monotonic()
        time.sleep(4)
    finally:
        restarting = time.monotonic()  # a request may end after this with the database back
        postgres_server.start()
    restarted = time.monotonic()
    time.sleep(8)
    stop.set()
    for thread in clients:
        thread.join(timeout=120)
    failures = [o for o in outcomes if o[2] not in (200, 201)]
    assert failures, "no request failed while the database was down"
    for _, _, status, code in failures:  # typed: the store is unavailable, retry later
        assert (status, code) == (503, "profile_store_unavailable"), (status, code)
    down = [o for o in outcomes if o[0] > stopped + 0.5 and o[1] < restarting]
    assert down and all(o[2] == 503 for o in down)
    late = [o for o in outcomes if o[0] > restarted + 3]
    assert late and all(o[2] in (200, 201) for o in late), late  # recovered by itself


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
    assert main(["serve", "--replica-gpus", "1", "--ray-address", "auto"]) == 1
    assert "--ray-address, --replica-gpus need --ray" in capsys.readouterr().err
    assert main(["serve", "--ray", "--replica-cpus", "0"]) == 1
    assert "--replica-cpus must be > 0" in capsys.readouterr().err
