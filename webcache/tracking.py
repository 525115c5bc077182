"""The aiohttp side of the connection deadlines: a wrapper of the node's aiohttp request handler.

After the hand-over the front (webcache/fastpath.py ``Connection``) still owns the transport
but no longer parses the requests; this wrapper tells it when aiohttp has a complete head
(``request_started``: the header deadline ends, the body deadline begins if a body is still
coming) and when the answer is written (``request_finished``: the keep-alive deadline begins).
It finishes the response itself (``prepare`` + ``write_eof``; aiohttp's own calls then do
nothing) so that "finished" means the bytes are in the transport.

It also refuses, with 505, a request of another HTTP major version that aiohttp's parser
accepted (0.9, 2.0) in a position the front could not see (pipelined behind another request).
(The connection counters reach ``/_mcs/status`` and ``/metrics`` through the fast path's stats:
webcache/app.py ``node_status``.)

It wraps ``web.Server.request_handler`` (the application's ``_handle``) rather than being an
application middleware: any middleware makes aiohttp add one of its own and build the chain per
request, two more coroutine layers on every request of the aiohttp path.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11

from webcache.fastpath import Connection

__all__ = ["track_requests"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def track_requests(handler: _Handler) -> _Handler:
    """``runner.server.request_handler = track_requests(runner.server.request_handler)``."""

    async def tracked(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        conn = transport.get_protocol() if transport is not None else None
        if not isinstance(conn, Connection):  # a server without the node's front
            return await handler(request)
        if request.version != HttpVersion11 and request.version != HttpVersion10:
            conn.refuse_version()  # written and closing: aiohttp's answer is never sent
            raise web.HTTPVersionNotSupported()
        conn.front.stats.requests += 1
        conn.request_started(request.content)
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                await _finish(request, exc)
                raise
            await _finish(request, response)
            return response
        finally:
            conn.request_finished()

    return tracked


async def _finish(request: web.Request, response: web.StreamResponse) -> None:
    try:
        if not response.prepared:  # a hit already wrote its whole answer
            await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client is gone; aiohttp sees it too and closes quietly

