"""Scale-out on one machine: the PostgreSQL profile store against SQLite, and ``pj serve`` with
1 and 2 Ray Serve replicas against the plain server.

Part 1, the store (no model): the time of one ``get`` and one ``update`` of a profile, one
thread, then 8 threads updating their own profiles at once, on a SQLite file and on
PostgreSQL (a throw-away server from Debian's package on loopback with fsync on, as SQLite's
``synchronous=FULL``; or ``--postgres URL``).

Part 2, serving (``--tokens`` per answer, streaming clients with prompts from the development
set, each client a user whose profile is in the PostgreSQL store): throughput of 1, 4 and 8
concurrent clients against the same requests one after another, and time to first token, for
- ``pj serve`` (one process, the model's torch threads = the machine's cores),
- ``pj serve --ray --replicas 1 --replica-cpus <cores>``,
- ``pj serve --ray --replicas 2 --replica-cpus <cores / 2>``.
Each server runs alone, started and stopped here.

Usage::

    python benchmarks/scale_out.py                     # SmolLM2, 32 tokens, clients 1 4 8
    python benchmarks/scale_out.py --skip-serving      # the store only (a minute)

Writes ``benchmarks/results/<name>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.prompt_source import load_prompts  # noqa: E402
from benchmarks.serving_load import _free_port, percentile, run_clients  # noqa: E402
from pj_core.personas import PersonaProfile  # noqa: E402
from pj_core.personas.store import AbstractProfileStore, open_store  # noqa: E402
from tests._postgres import PostgresServer, postgres_binaries  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
USERS = {"alice": ["humor", "concise"], "bob": ["expert", "friendly"]}


# --------------------------------------------------------------------------- the store


def _bump(profile: PersonaProfile) -> PersonaProfile:
    count = profile.metadata.get("count", 0)
    return profile.evolve(metadata={"count": (count if isinstance(count, int) else 0) + 1})


def _median_ms(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def store_costs(store: AbstractProfileStore, repeats: int, threads: int) -> dict[str, float]:
    """Median milliseconds of one get and one update (one thread), and updates per second
    with ``threads`` threads each updating its own profile."""
    store.put(PersonaProfile(user_id="solo", preferences=["humor"]))
    for _ in range(20):  # warm: connections, caches
        store.get("solo")
    result = {
        "get_ms": _median_ms(lambda: store.get("solo"), repeats),
        "update_ms": _median_ms(lambda: store.update("solo", _bump), repeats // 2),
    }
    per_thread = repeats // 4

    def writer(index: int) -> None:
        for _ in range(per_thread):
            store.update(f"u{index}", _bump, default=PersonaProfile(user_id=f"u{index}"))

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    result["concurrent_updates_per_s"] = threads * per_thread / (time.perf_counter() - started)
    counts = [store.get(f"u{i}").metadata["count"] for i in range(threads)]
    assert counts == [per_thread] * threads, counts  # no update lost
    return result


# --------------------------------------------------------------------------- serving


@contextmanager
def server(kind: str, model: str, store: str, cores: int) -> Iterator[str]:
    """A server of ``kind`` ("plain", "ray1", "ray2") on a free port; yields its base URL."""
    port = _free_port()
    command = [sys.executable, "-m", "pj_core.cli", "serve", "--model", model, "--store", store,
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    replicas = {"plain": 0, "ray1": 1, "ray2": 2}[kind]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TQDM_DISABLE"] = "1"
    if replicas:
        cpus = max(1, cores // replicas)
        command += ["--ray", "--replicas", str(replicas), "--replica-cpus", str(cpus)]
    handle, name = tempfile.mkstemp(prefix=f"pj-{kind}-", suffix=".log")
    log = Path(name)
    with os.fdopen(handle, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 600
        while len(seen) < max(1, replicas):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{kind} did not start:\n{log.read_text()[-3000:]}")
            try:
                answer = httpx.get(f"{base}/health", timeout=5)
                if answer.status_code == 200:
                    seen.add(answer.headers.get("x-pj-replica", "plain"))
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield base
    finally:
        process.send_signal(2)  # SIGINT: pj serve --ray stops Serve and its local Ray
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serving_rows(
    base: str, prompts: list[str], concurrency: list[int], per_client: int, tokens: int
) -> list[dict[str, Any]]:
    url = f"{base}/v1/chat/completions"
    model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    users = list(USERS)
    for warm in range(4):  # every replica loads its caches
        asyncio.run(run_clients(url, model, prompts, 2, 1, 4, f"warm {warm}", users))
    rows = []
    for clients in concurrency:
        count = clients * per_client
        sequential, seq_wall = asyncio.run(
            run_clients(url, model, prompts, 1, count, tokens, f"{clients} seq", users)
        )
        concurrent, con_wall = asyncio.run(
            run_clients(url, model, prompts, clients, per_client, tokens, f"{clients} con", users)
        )
        row = {
            "clients": clients,
            "sequential_tokens_per_s": sum(t.tokens for t in sequential) / seq_wall,
            "concurrent_tokens_per_s": sum(t.tokens for t in concurrent) / con_wall,
            "ttft_p50": percentile([t.first_token for t in concurrent], 0.5),
            "ttft_p95": percentile([t.first_token for t in concurrent], 0.95),
        }
        rows.append(row)
        print(
            f"  {clients} clients: {row['concurrent_tokens_per_s']:.1f} tok/s (one by one "
            f"{row['sequential_tokens_per_s']:.1f}); TTFT p50 {row['ttft_p50']:.2f} s",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--postgres", default=None, help="a database URL (default: start one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--store-repeats", type=int, default=400)
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--name", default="scale-out")
    args = parser.parse_args()
    started = time.monotonic()
    cores = os.cpu_count() or 1
    database: PostgresServer | None = None
    url = args.postgres
    if url is None:
        binaries = postgres_binaries()
        if binaries is None:
            raise SystemExit("PostgreSQL is not installed: apt-get install -y postgresql")
        database = PostgresServer(binaries, durable=True)  # fsync on, as SQLite's FULL
        database.start()
        url = database.create_database()
    results: dict[str, Any] = {"store": {}, "serving": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="pj-scale-") as folder:
            for label, target in (("sqlite", str(Path(folder) / "p.db")), ("postgresql", url)):
                with open_store(target) as store:
                    results["store"][label] = store_costs(store, args.store_repeats, 8)
                print(f"{label}: {results['store'][label]}", flush=True)
        if not args.skip_serving:
            with open_store(url) as store:
                for user, preferences in USERS.items():
                    store.put(PersonaProfile(user_id=user, preferences=preferences))
            prompts, source = load_prompts(max(args.concurrency) * args.requests_per_client + 8)
            results["prompts"] = source
            for kind in ("plain", "ray1", "ray2"):
                print(f"{kind}:", flush=True)
                with server(kind, args.model, url, cores) as base:
                    results["serving"][kind] = serving_rows(
                        base, prompts, args.concurrency, args.requests_per_client, args.tokens
                    )
    finally:
        if database is not None:
            database.close()
    meta = {
        "command": " ".join(["python benchmarks/scale_out.py", *sys.argv[1:]]),
        "model": args.model,
        "tokens": args.tokens,
        "machine": f"{platform.platform()}, {cores} CPUs",
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    results["meta"] = meta
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (RESULTS / f"{args.name}.md").write_text(_report(results, cores), encoding="utf-8")
    if results["serving"]:
        _plot(results["serving"], RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.{{json,md,png}}")


def _report(results: dict[str, Any], cores: int) -> str:
    meta = results["meta"]
    lines = [
        "# Scale-out: the PostgreSQL store and Ray Serve replicas",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['minutes']} minutes",
        "",
        "## The profile store",
        "",
        "| store | get (median) | update (median) | 8 threads updating, updates/s |",
        "| --- | --- | --- | --- |",
    ]
    for label, row in results["store"].items():
        lines.append(
            f"| {label} | {row['get_ms']:.2f} ms | {row['update_ms']:.2f} ms | "
            f"{row['concurrent_updates_per_s']:.0f} |"
        )
    if results["serving"]:
        names = {
            "plain": "pj serve (one process)",
            "ray1": f"--ray --replicas 1 --replica-cpus {cores}",
            "ray2": f"--ray --replicas 2 --replica-cpus {max(1, cores // 2)}",
        }
        lines += [
            "",
            f"## Serving ({meta['model']}, {meta['tokens']} tokens per answer, profiles in "
            f"PostgreSQL; prompts from `{results.get('prompts')}`)",
            "",
            "| server | clients | tok/s one by one | tok/s concurrent | speed-up | TTFT p50 | "
            "TTFT p95 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for kind, rows in results["serving"].items():
            for row in rows:
                speedup = row["concurrent_tokens_per_s"] / row["sequential_tokens_per_s"]
                lines.append(
                    f"| {names[kind]} | {row['clients']} | {row['sequential_tokens_per_s']:.1f} | "
                    f"{row['concurrent_tokens_per_s']:.1f} | {speedup:.2f}x | "
                    f"{row['ttft_p50']:.2f} s | {row['ttft_p95']:.2f} s |"
                )
    return "\n".join(lines) + "\n"


def _plot(serving: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, rows in serving.items():
        clients = [row["clients"] for row in rows]
        left.plot(clients, [r["concurrent_tokens_per_s"] for r in rows], "o-", label=kind)
        right.plot(clients, [r["ttft_p50"] for r in rows], "o-", label=kind)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("tokens / s")
    left.set_title("throughput")
    left.legend()
    right.set_xlabel("concurrent clients")
    right.set_ylabel("seconds")
    right.set_title("time to first token (p50)")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
