"""A trivial HTTP sink: `python -m benchmarks.sink PORT` reads every POST body and discards it.

The upload scenario's baseline: the same client, the same loopback, the same
aiohttp server stack and read size as the daemon, but nothing done with the
bytes. Answers 202 with the byte count once the body is read.
"""

from __future__ import annotations

import sys

from aiohttp import web

READ_CHUNK = 256 * 1024  # the daemon's read size for raw uploads


async def sink(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
    return web.json_response({"bytes": size}, status=202)


def main() -> None:
    app = web.Application()
    app.router.add_post("/{tail:.*}", sink)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
