"""A stub OpenAI-compatible streaming server with a known TTFT and token rate, for the bench's tests.

Run as `python tests/bench_stub.py --ttft 0.1 --interval 0.005 ...`; it binds 127.0.0.1 on a free
port and prints `PORT <n>`. Raw asyncio HTTP/1.1 (chunked SSE) so that it can also fail on cue:
`--fail-every K` answers every K-th generation request with HTTP 500, `--drop-every K` cuts every
K-th stream half-way without the closing chunk. Token i (0-based) is sent at TTFT + i * interval
after the request arrived; every 8th token is "." so the first sentence ends with token 7.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class StubConfig:
    ttft: float
    interval: float
    eos_after: int  # tokens produced when the request does not ask for ignore_eos (0: never stops early)
    fail_every: int
    drop_every: int
    tokens_per_chunk: int
    usage: bool


def token_text(index: int) -> str:
    return "." if index % 8 == 7 else f" w{index}"


class Stub:
    def __init__(self, config: StubConfig) -> None:
        self.config = config
        self.generation_requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self.respond(method, path, body, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def send_json(self, writer: asyncio.StreamWriter, status: str, payload: object) -> None:
        data = json.dumps(payload).encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def respond(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close."""
        if method == "GET" and path == "/health":
            await self.send_json(writer, "200 OK", {"status": "ok"})
            return True
        if method == "GET" and path == "/v1/models":
            await self.send_json(writer, "200 OK", {"object": "list", "data": [{"id": "stub-model"}]})
            return True
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            await self.send_json(writer, "404 Not Found", {"error": {"message": f"no route {method} {path}"}})
            return True
        arrived = asyncio.get_running_loop().time()
        self.generation_requests += 1
        number = self.generation_requests
        request = json.loads(body)
        if self.config.fail_every and number % self.config.fail_every == 0:
            await self.send_json(writer, "500 Internal Server Error", {"error": {"message": "stub failure"}})
            return True
        await self.stream(request, path.endswith("chat/completions"), number, arrived, writer)
        return not (self.config.drop_every and number % self.config.drop_every == 0)

    async def stream(
        self, request: dict, chat: bool, number: int, arrived: float, writer: asyncio.StreamWriter
    ) -> None:
        config, loop = self.config, asyncio.get_running_loop()
        wanted = int(request.get("max_tokens", 16))
        count = wanted if request.get("ignore_eos") or not config.eos_after else min(wanted, config.eos_after)
        drop_at = count // 2 if config.drop_every and number % config.drop_every == 0 else None
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

        async def event(data: str) -> None:
            payload = f"data: {data}\n\n".encode()
            writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            await writer.drain()

        sent = 0
        while sent < count:
            if drop_at is not None and sent >= drop_at:
                writer.transport.abort()
                return
            batch = min(config.tokens_per_chunk, count - sent)
            last = sent + batch - 1
            await asyncio.sleep(max(0.0, arrived + config.ttft + last * config.interval - loop.time()))
            text = "".join(token_text(i) for i in range(sent, sent + batch))
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            await event(json.dumps({"choices": [choice]}))
            sent += batch
        if config.usage and (request.get("stream_options") or {}).get("include_usage"):
            await event(json.dumps({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": count}}))
        await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def serve(config: StubConfig) -> None:
    stub = Stub(config)
    server = await asyncio.start_server(stub.handle, "127.0.0.1", 0)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ttft", type=float, default=0.1)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--eos-after", type=int, default=0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--drop-every", type=int, default=0)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument("--no-usage", action="store_true")
    args = parser.parse_args(argv)
    config = StubConfig(
        ttft=args.ttft,
        interval=args.interval,
        eos_after=args.eos_after,
        fail_every=args.fail_every,
        drop_every=args.drop_every,
        tokens_per_chunk=args.tokens_per_chunk,
        usage=not args.no_usage,
    )
    asyncio.run(serve(config))


if __name__ == "__main__":
    main(sys.argv[1:])
