"""The round trip of the stack itself: how long a small message takes there and back.

Two processes on 127.0.0.1, one message at a time, nothing else running:

- ``websocket``: a Starlette websocket route served by Hypercorn's trio worker
  (as the server serves ``/subscribe``) echoes each text message back to a
  trio-websocket client (as a worker connects);
- ``tcp``: a plain trio TCP echo server and client, for the floor under both
  libraries (the kernel, two wake-ups and trio's scheduling).

A run's way from the server's claim to its ``started_at`` crosses the
websocket twice (the delivery out, the reports back), so twice a one-way trip
is the least the stack adds to submit->start. Prints percentiles in ms::

    python benchmarks/ws_floor.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import percentiles, stop

MESSAGE = '[{"type":"deliver","runs":[{"id":"0193b5a0-0000-7000-8000-000000000000"}]}]'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_websocket(port: int) -> None:
    import hypercorn.config
    import hypercorn.trio
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    app = Starlette(routes=[WebSocketRoute("/echo", echo)])
    trio.run(hypercorn.trio.serve, app, config)  # type: ignore[arg-type]


def serve_tcp(port: int) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    trio.run(trio.serve_tcp, echo, port)


async def time_websocket(port: int, n: int) -> list[float]:
    from trio_websocket import open_websocket_url

    async with open_websocket_url(f"ws://127.0.0.1:{port}/echo") as ws:
        spent = []
        for _ in range(n):
            began = time.perf_counter()
            await ws.send_message(MESSAGE)
            await ws.get_message()
            spent.append(time.perf_counter() - began)
        return spent


async def time_tcp(port: int, n: int) -> list[float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = MESSAGE.encode()
    spent = []
    async with stream:
        for _ in range(n):
            began = time.perf_counter()
            await stream.send_all(data)
            got = b""
            while len(got) < len(data):
                got += await stream.receive_some(65536)
            spent.append(time.perf_counter() - began)
    return spent


async def wait_for(port: int) -> None:
    for _ in range(200):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
        else:
            await stream.aclose()
            return
    raise TimeoutError(f"nothing listens on {port}")


def measure(kind: str, n: int) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)])
    try:
        trio.run(wait_for, port)
        timer = time_websocket if kind == "websocket" else time_tcp
        spent = trio.run(timer, port, n)[n // 10 :]  # the first tenth warms up
    finally:
        stop(server)
    return percentiles(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, port = args.serve
        (serve_websocket if kind == "websocket" else serve_tcp)(int(port))
        return
    for kind in ("tcp", "websocket"):
        print(f"{kind}: round trip {measure(kind, args.messages)}")


if __name__ == "__main__":
    main()
