"""What hostile input costs the aggregator: time to refuse each kind of bad input, memory per
connection, and connections held while a legitimate round completes under a flood.

    .venv/bin/python bench/hostile.py [--sites 5] [--flood 2000] [--conns 200]

The aggregator's transport (`AggregatorServer`, real TLS, the plan's validator) runs in
its own process so its memory and descriptors are measured alone; this process plays
the sites and the attackers. Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM = 262_144  # a 1 MiB float32 model
ROUND_BLOB = 4 * DIM


# ---------------------------------------------------------------- the aggregator's side (subprocess)

def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


async def serve(workdir: Path) -> None:
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.network import protocol as P
    from hemafed.network.envelope import Envelope, Limits
    from hemafed.network.server import AggregatorServer, Message
    from hemafed.network.tls import ServerTLS

    keys = json.loads((workdir / "keys.json").read_text())
    plan = FederationPlan(federation_id="bench", algorithm="fedavg", dp_mode="local", noise_multiplier=0.0,
                          secagg=False, dp=False, threshold=2, min_sites=1, max_sites=len(keys), max_weight=4096)
    server = AggregatorServer(keys, tls=ServerTLS(workdir / "tls" / "server.pem", workdir / "tls" / "server.key"),
                              federation="bench", limits=Limits.for_model(DIM, max_sites=len(keys)),
                              handshake_timeout=30.0, max_unauthenticated=256, max_unauthenticated_per_address=32)
    validator = P.plan_validator(plan, DIM, len(keys))
    validator.round = 1
    server.validator = validator
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        cmd, *args = line.split()
        if cmd == "stats":
            print(json.dumps({"rss_kib": _rss_kib(), "fds": len(os.listdir("/proc/self/fd")),
                              "pending": server.gate.pending, "refused": server.gate.refused,
                              "connected": len(server.connected())}), flush=True)
        elif cmd == "round":
            n = int(args[0])
            await server.wait_for_sites(n, timeout=120)
            started = time.perf_counter()
            sites = await server.broadcast(Envelope(P.ROUND_START, 1, {"participants": {}}, (bytes(ROUND_BLOB),)))
            got: set[str] = set()
            while got < sites:
                event = await server.recv(timeout=120)
                if isinstance(event, Message) and event.envelope.type == P.PLAIN_UPDATE:
                    got.add(event.site)
            print(json.dumps({"round_s": time.perf_counter() - started, "sites": len(got)}), flush=True)
        elif cmd == "drain":
            with contextlib.suppress(TimeoutError):
                while True:
                    await server.recv(timeout=0.2)
            print("{}", flush=True)
    await server.close()


# ---------------------------------------------------------------- this side: sites and attackers

class Aggregator:
    """The subprocess, driven by one-line commands."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    async def __aenter__(self) -> Aggregator:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", str(self.workdir), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=open(self.workdir / "server.log", "wb"))  # noqa: SIM115
        self.port = (await self._reply())["port"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        await self.proc.wait()

    async def _reply(self) -> dict:
        return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 300))

    async def ask(self, line: str) -> dict:
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._reply()


async def authenticated(url: str, identity, ca: Path):
    from websockets.asyncio.client import connect

    from hemafed.network import handshake
    from hemafed.network.envelope import Envelope, Limits
    from hemafed.network.tls import cert_binding, client_context

    ws = await connect(url, ssl=client_context(ca), compression=None, max_size=None)
    hello = Envelope.decode(await ws.recv(), Limits.for_model(DIM))
    binding = cert_binding(ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
    await ws.send(handshake.answer(hello, identity, binding).encode())
    await ws.recv()
    return ws


async def site_loop(ws) -> None:
    """A legitimate site: answers every round_start with a plain update."""
    import numpy as np

    from hemafed.network import protocol as P
    from hemafed.network.envelope import Envelope, Limits

    k2 = 64
    update = (np.zeros(DIM, "<f4").tobytes(), np.zeros(k2, "<i8").tobytes())
    with contextlib.suppress(Exception):
        while True:
            env = Envelope.decode(await ws.recv(), Limits.for_model(DIM))
            if env.type == P.ROUND_START:
                await ws.send(Envelope(P.PLAIN_UPDATE, env.round, {"weight": 10}, update).encode())


def idle_tcp(port: int, n: int, sources: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.{1 + i % sources // 250}.{2 + i % sources % 250}", 0))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def raw_envelope(kind: str, rnd: int, body: str, blobs: tuple[bytes, ...] = ()) -> bytes:
    header = f'{{"v":1,"type":"{kind}","round":{rnd},"body":{body},"blobs":{json.dumps([len(b) for b in blobs])}}}'
    return struct.pack(">I", len(header)) + header.encode() + b"".join(blobs)


def bad_inputs() -> dict[str, bytes]:
    import numpy as np

    huge = "1" + "0" * 5000
    secagg = b'{"type":"secagg.advertise_keys","round":1,"site_id":' + huge.encode() + b"}"
    plain = (np.zeros(DIM, "<f4").tobytes(), np.zeros(64, "<i8").tobytes())
    return {
        "garbage bytes": b"\x00\x00\x00\x05{nope",
        "5,000-digit integer in a body": raw_envelope("plan_accept", 0, '{"digest":' + huge + "}"),
        "plan_reject whose reasons is a number": raw_envelope("plan_reject", 0, '{"reasons":5}'),
        "plain update with weight 10**400": raw_envelope("plain_update", 1, '{"weight":1' + "0" * 400 + "}", plain),
        "plain update with weight -1": raw_envelope("plain_update", 1, '{"weight":-1}', plain),
        "secagg header with a 5,000-digit integer": raw_envelope(
            "secagg", 1, "{}", (b"HFSA" + struct.pack("<BI", 1, len(secagg)) + secagg,)),
        "message for a future round": raw_envelope("decline", 99, '{"reason":"x"}'),
    }


def decoder_times() -> dict[str, float]:
    """Microseconds for the edge (envelope decode + validator) to refuse each input, in-process."""
    from hemafed.core.rounds.plan import FederationPlan
    from hemafed.network import protocol as P
    from hemafed.network.envelope import Envelope, Limits
    from hemafed.network.errors import ProtocolError

    plan = FederationPlan(federation_id="bench", algorithm="fedavg", dp_mode="local", noise_multiplier=0.0,
                          secagg=False, dp=False, threshold=2, min_sites=1, max_weight=4096)
    validator = P.plan_validator(plan, DIM, 8)
    validator.round = 1
    limits = Limits.for_model(DIM, max_sites=8)

    def refuse(data: bytes) -> None:
        try:
            validator("x", Envelope.decode(data, limits))
        except ProtocolError:
            return
        raise AssertionError("accepted")

    out = {}
    for name, data in bad_inputs().items():
        n = 200
        out[name] = timeit.timeit(lambda d=data: refuse(d), number=n) / n * 1e6
    return out


async def tls_refusal_times(url: str, port: int, identity, ca: Path, repeats: int) -> dict[str, float]:
    """Milliseconds from sending the bad input on an authenticated connection to the close (median)."""
    from websockets.exceptions import ConnectionClosed

    from hemafed.core.trust.identity import IdentityKey

    out: dict[str, float] = {}
    for name, data in bad_inputs().items():
        times = []
        for _ in range(repeats):
            ws = await authenticated(url, identity, ca)
            started = time.perf_counter()
            await ws.send(data)
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.recv()
            times.append((time.perf_counter() - started) * 1e3)
        out[name] = statistics.median(times)
    times = []
    for _ in range(repeats):  # an unknown key: TLS + challenge + refusal, from connect to close
        started = time.perf_counter()
        with contextlib.suppress(ConnectionClosed):
            ws = await authenticated(url, IdentityKey.generate(), ca)
            await ws.recv()
        times.append((time.perf_counter() - started) * 1e3)
    out["unknown key (whole TLS + handshake)"] = statistics.median(times)
    return out


async def memory_per_connection(work: Path, url_of, ca: Path, identities: list, n: int) -> dict[str, float]:
    """RSS growth of a fresh aggregator process per connection, for each kind in its own process
    (freed memory is not returned to the OS, so one kind after the other would under-count)."""
    from websockets.asyncio.client import connect

    from hemafed.network.tls import client_context

    out: dict[str, float] = {"n": n}
    for kind in ("unauthenticated", "authenticated"):
        async with Aggregator(work) as agg:
            url = url_of(agg)
            # one connection first, so one-time costs (TLS context, imports) are not counted
            warm = await authenticated(url, identities[-1], ca)
            await agg.ask("drain")
            base = await agg.ask("stats")
            if kind == "unauthenticated":  # TLS up, then silent at the challenge: the most it can cost
                conns = [await connect(url, ssl=client_context(ca), compression=None,
                                       sock=_bound(f"127.0.2.{2 + i // 30}", agg.port)) for i in range(n)]
            else:
                conns = [await authenticated(url, ident, ca) for ident in identities[:n]]
            after = await agg.ask("stats")
            out[f"{kind}_kib"] = (after["rss_kib"] - base["rss_kib"]) / n
            for ws in [*conns, warm]:
                await ws.close()
    return out


def _bound(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


async def round_under_flood(agg: Aggregator, url: str, ca: Path, identities: list, sites: int,
                            flood: int) -> dict[str, dict]:
    out = {}
    for label, n_idle in (("no flood", 0), (f"{flood} idle TCP connections from 64 addresses", flood)):
        # The sites are connected (a federation's connections are long-lived), then the flood starts.
        clients = [await authenticated(url, ident, ca) for ident in identities[:sites]]
        tasks = [asyncio.create_task(site_loop(ws)) for ws in clients]
        socks = idle_tcp(agg.port, n_idle, 64)
        await asyncio.sleep(1.0)
        result = await agg.ask(f"round {sites}")
        stats = await agg.ask("stats")
        out[label] = {**result, **stats}
        for ws in clients:
            await ws.close()
        for t in tasks:
            t.cancel()
        for s in socks:
            s.close()
        await agg.ask("drain")
        await asyncio.sleep(1.0)
    return out


async def bench(args: argparse.Namespace) -> str:
    from hemafed.core.trust.certs import create_federation_certs
    from hemafed.core.trust.identity import IdentityKey

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        certs = create_federation_certs(work / "tls", ["127.0.0.1"])
        n_ids = max(args.sites, args.conns) + 1
        identities = [IdentityKey.generate() for _ in range(n_ids)]
        (work / "keys.json").write_text(json.dumps({f"s{i}": k.public_line() for i, k in enumerate(identities)}))
        async with Aggregator(work) as agg:
            url = f"wss://127.0.0.1:{agg.port}"
            decode_us = decoder_times()
            tls_ms = await tls_refusal_times(url, agg.port, identities[-1], certs.ca_file, args.repeats)
            await agg.ask("drain")
            flood = await round_under_flood(agg, url, certs.ca_file, identities, args.sites, args.flood)
        memory = await memory_per_connection(work, lambda a: f"wss://127.0.0.1:{a.port}", certs.ca_file,
                                             identities, args.conns)

    from _report import machine_line

    rows = "\n".join(f"| {name} | {decode_us[name]:.1f} µs | {tls_ms[name]:.1f} ms |" for name in decode_us)
    rows += f"\n| unknown key (whole TLS + handshake) | – | {tls_ms['unknown key (whole TLS + handshake)']:.1f} ms |"
    flood_rows = "\n".join(
        f"| {label} | {r['round_s']:.3f} s | {r['sites']} | {r['pending']} | {r['refused']} | {r['fds']} |"
        for label, r in flood.items())
    return f"""## Hostile input: cost of refusing it (`bench/hostile.py`)

The aggregator's transport (`AggregatorServer` with the plan's validator, real TLS, a 1 MiB
model) in its own process; sites and attackers in another, over loopback. One run; machine:
{machine_line()}.

Time to refuse each kind of bad input: at the edge alone (envelope decode + schema, in-process,
mean of 200), and over TLS on an authenticated connection (from sending it to the connection
being closed, median of {args.repeats}):

| bad input | edge | over TLS, to close |
|---|---|---|
{rows}

Memory per connection (RSS growth of a fresh aggregator process / {memory['n']} connections, each
kind in its own process): {memory['unauthenticated_kib']:.0f} KiB per unauthenticated connection (TLS
up, silent at the challenge), {memory['authenticated_kib']:.0f} KiB per authenticated idle site (mostly
OpenSSL's and websockets' buffers). What a peer can add on top is bounded: websockets' `max_queue`
(4) frames of at most the message limit (16 KiB before authentication, model-sized after), at most
16 of its messages waiting for the driver, and its send queue (64 messages, references to broadcast
bytes shared by all sites, each sent within `send_timeout_s`).

A legitimate round ({args.sites} connected sites; the aggregator broadcasts 1 MiB and each site
answers with a 1 MiB update) without and with a flood of idle TCP connections that never start TLS,
opened after the sites connected (caps: 256 unauthenticated in all, 32 per address; a refused
connection is closed inside `accept()`, before TLS):

| | round time | sites done | unauthenticated held | refused in accept() so far | aggregator fds |
|---|---|---|---|---|---|
{flood_rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", metavar="DIR")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--conns", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(Path(args.serve)))
        return
    md = asyncio.run(bench(args))
    print(md)
    from _report import write_section

    write_section("hostile", md)


if __name__ == "__main__":
    main()
