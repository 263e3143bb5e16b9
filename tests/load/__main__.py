"""Load test over loopback: `python -m tests.load [--duration 15] [--url URL --key KEY --model MODEL]`.

Without `--url` it starts the service itself (`python -m app`: embedded SQLite and broker, a tiny random Llama in a
temporary data dir, no worker, no request rate limits: it measures capacity; its torch threads sized as `unsloth serve`
sizes the API's, `--torch-threads`) and stops it at the end. Phases, each
`--duration` seconds:
1. job polling, `GET /v1/fine_tuning/jobs/{id}` from 1, 8 and 32 clients (and wrk -t2 -c32 when installed);
2. streaming completions (`ignore_eos`, `max_tokens` each) from 1, 8 and 32 clients: aggregate completion tokens/s
   (continuous batching: PERFORMANCE.md wants 32 streams >= 4x the tokens/s of 1 on CPU);
3. overload: more streaming clients than `max_concurrent_generations`: the excess gets 429 with Retry-After;
4. mixed fine-tunes: N clients (`--fine-tunes`, 8 by default), each streaming from its own fine-tune of the model,
   against N clients on the base model: one engine batches them all (adapters pooled), so the aggregate tokens/s
   should stay near the base's. The fine-tunes are made as a worker leaves them (a job created over the API, then
   claimed and completed on the server's database with a random rank-16 adapter), so this phase needs the server's
   data dir: it runs when this tool starts the server, or with `--url` plus `--data-dir` (and `--database-url`).
5. flood (with `--flood`; `--only-flood` skips 1-4): a victim key polls its job (every 20 ms) and streams
   completions (1 client), first alone, then while a flooding key misbehaves from 8 connections in a process of its
   own (16 MiB bodies without a key, uploads, job creates, completions; `--flood-kinds` picks some; it never waits
   out a 429): the victim's p99 flooded against quiet (issue 15 wants within 2x), and no 5xx anywhere. Both keys
   are new (so the phases before have not spent their rate limits) and made in the server's database, so this
   phase too needs the data dir.
Prints a Markdown table and writes every number (with the load average and the command) as JSON to `--out`.
Exit status 1 if any phase saw a 5xx, a transport error, a broken stream or a 429 without Retry-After."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.core.config import Settings
from app.core.rate_limit import FAMILIES
from app.core.threads import cpu_count, embedded_split
from tests.load.loadgen import FLOOD_KINDS, PhaseResult, flood_in_process, poll_job, ready, stream_completions

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-chat"
FLOOD_CLIENTS = 8
VICTIM_POLL_INTERVAL_S = 0.02  # a client polling its job, as often as one ever should: well within the limits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, key: str, max_generations: int, max_batch_size: int,
                 torch_threads: int) -> tuple[subprocess.Popen[bytes], str]:
    from tests.fuzz.conftest import write_tiny_model

    write_tiny_model(data_dir / "models" / MODEL)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH_")}
    env.update(UNSLOTH_DATA_DIR=str(data_dir), UNSLOTH_API_KEY=key, UNSLOTH_PORT=str(port),
               UNSLOTH_HOST="127.0.0.1", UNSLOTH_LOG_LEVEL="warning",
               UNSLOTH_MAX_CONCURRENT_GENERATIONS=str(max_generations), UNSLOTH_MAX_BATCH_SIZE=str(max_batch_size),
               UNSLOTH_TORCH_THREADS=str(torch_threads))
    # It measures capacity: one key polls and streams as fast as the machine answers, past any per-minute limit
    # on a fast machine, so the server it starts counts no request rates (a server given with --url keeps its own).
    env.update({f"UNSLOTH_RPM_{family.upper()}": "0" for family in FAMILIES})
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {(data_dir / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def make_job(url: str, key: str, model: str) -> str:
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        file_id = http.post("/v1/files", files={"file": ("t.jsonl", (json.dumps(row) + "\n").encode() * 10)},
                            data={"purpose": "fine-tune"}).raise_for_status().json()["id"]
        return str(http.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id})
                   .raise_for_status().json()["id"])


def make_fine_tunes(settings: Settings, url: str, key: str, model: str, n: int) -> list[str]:
    """`n` fine-tunes of `model`, each with its own random rank-16 adapter on all seven projections, as a worker
    would leave them: a job created over the API, claimed and completed on the server's database."""
    from app.db.session import make_engine, make_session_factory
    from app.services import lifecycle
    from bench.serving import random_adapter
    from unsloth_core.checkpoint import load_model

    base = load_model(settings.models_dir / model)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    models = []
    try:
        for i in range(n):
            job_id = make_job(url, key, model)
            with sessions() as session:
                owner = "load-worker"
                assert lifecycle.claim_job(session=session, job_id=job_id, attempt=0, owner=owner) is not None
                adapter = random_adapter(base, lifecycle.attempt_dir(settings, job_id, 0) / "adapter", seed=i)
                ft = lifecycle.complete_job(session=session, settings=settings, job_id=job_id, attempt=0,
                                            owner=owner, adapter_dir=adapter, trained_tokens=0)
                assert ft is not None
                models.append(ft)
    finally:
        engine.dispose()
    return models


def new_key(settings: Settings, name: str) -> str:
    """An API key made in the server's database (no API makes keys: `unsloth keys create` does this)."""
    from app.db.session import make_engine, make_session_factory
    from app.services import keys

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return keys.create_key(session=session, name=name)[1]
    finally:
        engine.dispose()


@dataclass
class Flood:
    flooder: str  # the key that floods
    victim: str  # the key whose latency is measured
    victim_job: str  # the job it polls
    kinds: tuple[str, ...] = FLOOD_KINDS  # what the flooder sends


def prepare_flood(settings: Settings, url: str, model: str, kinds: tuple[str, ...]) -> Flood:
    victim = new_key(settings, "victim")
    return Flood(new_key(settings, "flooder"), victim, make_job(url, victim, model), kinds)


async def flood_phases(url: str, model: str, duration: float, max_tokens: int, flood: Flood) -> list[PhaseResult]:
    """The victim key alone, then while the flooding key floods from a process of its own."""
    def victim(state: str) -> list[Any]:
        return [poll_job(url, flood.victim, flood.victim_job, clients=1, duration=duration,
                         interval_s=VICTIM_POLL_INTERVAL_S, name=f"victim poll x1 ({state})"),
                stream_completions(url, flood.victim, model, clients=1, duration=duration, max_tokens=max_tokens,
                                   name=f"victim stream x1 ({state})")]

    quiet = await asyncio.gather(*victim("quiet"))
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        await loop.run_in_executor(pool, ready)  # its start-up is over before the clock starts
        flooding = loop.run_in_executor(pool, flood_in_process, url, flood.flooder, model, FLOOD_CLIENTS, duration,
                                        flood.kinds)
        flooded = await asyncio.gather(flooding, *victim("flooded"))
    return [*quiet, *flooded]


def run_wrk(url: str, key: str, job_id: str, duration: int, connections: int = 32) -> dict[str, Any] | None:
    """wrk's own numbers for the polling phase, or None when wrk is not installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    command = [wrk, "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-H", f"Authorization: Bearer {key}",
               f"{url}/v1/fine_tuning/jobs/{job_id}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60).stdout

    def ms(label: str) -> float | None:
        m = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return None
        return round(float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)], 2)

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"command": " ".join(c if "Bearer" not in c else "Authorization: Bearer $KEY" for c in command),
            "connections": connections, "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "requests_per_s": float(rps.group(1)) if rps else None,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0, "load_average": [round(x, 2) for x in os.getloadavg()],
            "raw": out}


def table(results: list[PhaseResult]) -> str:
    rows = ["| phase | clients | requests | statuses | ok/s | p50 ms | p99 ms | TTFT p50 ms | tokens/s | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary()
        rows.append(f"| {s['phase']} | {s['clients']} | {s['requests']} | {s['statuses']} | {s['ok_per_s']} | "
                    f"{s['p50_ms']} | {s['p99_ms']} | {s['ttft_p50_ms'] or ''} | {s['tokens_per_s'] or ''} | "
                    f"{s['load_average'][0]} |")
    return "\n".join(rows)


async def phases(url: str, key: str, model: str, job_id: str, duration: float, max_tokens: int,
                 max_generations: int, clients: list[int], fine_tunes: list[str],
                 flood: Flood | None = None, only_flood: bool = False) -> list[PhaseResult]:
    results: list[PhaseResult] = []
    await stream_completions(url, key, model, clients=1, duration=1, max_tokens=4)  # load the model first
    if not only_flood:
        results += await capacity_phases(url, key, model, job_id, duration, max_tokens, max_generations, clients,
                                         fine_tunes)
    if flood is not None:
        for r in await flood_phases(url, model, duration, max_tokens, flood):
            results.append(r)
            print(table([r]).splitlines()[-1], flush=True)
    return results


async def capacity_phases(url: str, key: str, model: str, job_id: str, duration: float, max_tokens: int,
                          max_generations: int, clients: list[int], fine_tunes: list[str]) -> list[PhaseResult]:
    """Phases 1-4: polling, streaming, overload, mixed fine-tunes."""
    results: list[PhaseResult] = []
    for n in clients:
        results.append(await poll_job(url, key, job_id, clients=n, duration=duration))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    for n in clients:
        results.append(await stream_completions(url, key, model, clients=n, duration=duration, max_tokens=max_tokens))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    results.append(await stream_completions(url, key, model, clients=max_generations + 16, duration=duration,
                                            max_tokens=max_tokens, name=f"overload x{max_generations + 16}"))
    print(table(results[-1:]).splitlines()[-1], flush=True)
    if fine_tunes:
        n = len(fine_tunes)
        await stream_completions(url, key, fine_tunes, clients=n, duration=1, max_tokens=4)  # load the adapters
        if n not in clients:  # the base at the same concurrency, to compare with
            results.append(await stream_completions(url, key, model, clients=n, duration=duration,
                                                    max_tokens=max_tokens))
            print(table(results[-1:]).splitlines()[-1], flush=True)
        results.append(await stream_completions(url, key, fine_tunes, clients=n, duration=duration,
                                                max_tokens=max_tokens, name=f"mixed fine-tunes x{n}"))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--key", help="its API key (with --url)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (ignore_eos)")
    parser.add_argument("--clients", default="1,8,32", help="client counts for the polling and streaming phases")
    defaults = Settings.model_fields
    parser.add_argument("--max-generations", type=int, default=defaults["max_concurrent_generations"].default,
                        help="the server's concurrency limit (UNSLOTH_MAX_CONCURRENT_GENERATIONS; default: the "
                             "service's)")
    parser.add_argument("--torch-threads", type=int, default=embedded_split(cpu_count())[0],
                        help="the started server's torch threads (default: the API's share under `unsloth serve`; "
                             "every core, as `python -m app` alone takes, oversubscribed them under a flood)")
    parser.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"].default,
                        help="the started server's decode batch (UNSLOTH_MAX_BATCH_SIZE; default: the service's)")
    parser.add_argument("--fine-tunes", type=int, default=8,
                        help="fine-tunes for the mixed phase, each with its own client (0: no such phase)")
    parser.add_argument("--flood", action="store_true", help="the flood phase (needs the server's data dir)")
    parser.add_argument("--only-flood", action="store_true", help="with --flood: no other phase")
    parser.add_argument("--flood-kinds", default=",".join(FLOOD_KINDS),
                        help=f"what the flooder sends, its clients taking these in turn (of {', '.join(FLOOD_KINDS)})")
    parser.add_argument("--data-dir", type=Path, help="with --url: the server's data dir (for --fine-tunes, --flood)")
    parser.add_argument("--database-url", help="with --data-dir: the server's database (default: its SQLite file)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    proc = None
    tmp = None
    url, key = args.url, args.key
    if url is None:
        tmp = Path(tempfile.mkdtemp(prefix="unsloth-load-"))
        key = "sk-load-" + secrets.token_hex(12)
        proc, url = start_server(tmp / "data", key, args.max_generations, args.max_batch_size,
                                 args.torch_threads)
    assert key is not None, "--key is needed with --url"
    data_dir = tmp / "data" if tmp is not None else args.data_dir
    try:
        fine_tunes: list[str] = []
        flood = None
        if data_dir is not None:
            settings = Settings(data_dir=data_dir, database_url=args.database_url or "")  # "": its SQLite file
            if args.fine_tunes and not args.only_flood:
                fine_tunes = make_fine_tunes(settings, url, key, args.model, args.fine_tunes)
            if args.flood:
                flood = prepare_flood(settings, url, args.model, tuple(args.flood_kinds.split(",")))
        job_id = make_job(url, key, args.model)
        started = {"load_average": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%FT%T%z")}
        clients = [int(c) for c in args.clients.split(",")]
        results = asyncio.run(phases(url, key, args.model, job_id, args.duration, args.max_tokens,
                                     args.max_generations, clients, fine_tunes, flood, args.only_flood))
        wrk = None if args.only_flood else run_wrk(url, key, job_id, int(args.duration))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    streams = {r.clients: r.summary()["tokens_per_s"] for r in results if r.name.startswith("stream")}
    mixed = {r.clients: r.summary()["tokens_per_s"] for r in results if r.name.startswith("mixed")}
    p99 = {r.name: r.summary()["p99_ms"] for r in results}
    report = {
        "command": "python -m tests.load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started": started, "phases": [r.summary() for r in results], "wrk": wrk,
        "speedup_tokens_per_s": {f"{n}_vs_1": round(streams[n] / streams[1], 2) for n in streams
                                 if n != 1 and streams.get(1) and streams[n]},
        "mixed_vs_base_tokens_per_s": {f"x{n}": round(mixed[n] / streams[n], 2) for n in mixed
                                       if streams.get(n) and mixed[n]},
        "flooded_vs_quiet_p99": {name: round(p99[f"{name} (flooded)"] / p99[f"{name} (quiet)"], 2)
                                 for name in ("victim poll x1", "victim stream x1")
                                 if p99.get(f"{name} (quiet)") and p99.get(f"{name} (flooded)")},
    }
    print()
    print(table(results))
    if wrk:
        print(f"\nwrk -c{wrk['connections']}: {wrk['requests_per_s']} req/s, p50 {wrk['p50_ms']} ms, "
              f"p99 {wrk['p99_ms']} ms, non-2xx {wrk['non_2xx']}, load avg {wrk['load_average'][0]}")
    print(f"\nstreaming speedup (aggregate tokens/s vs 1 client): {report['speedup_tokens_per_s']}")
    if report["flooded_vs_quiet_p99"]:
        print(f"p99 while another key floods, against quiet (issue 15: <= 2x): {report['flooded_vs_quiet_p99']}")
    if mixed:
        print(f"each client on its own fine-tune (aggregate tokens/s vs the base, same clients): "
              f"{report['mixed_vs_base_tokens_per_s']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    bad = [r.name for r in results if r.server_errors or r.errors or r.missing_retry_after]
    if bad or (wrk and wrk["non_2xx"]):
        print(f"\nFAILED: {bad or 'wrk saw non-2xx answers'}", file=sys.stderr)
        for r in results:
            for e in r.errors[:3]:
                print(f"  {r.name}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
