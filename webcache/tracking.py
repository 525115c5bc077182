"""The aiohttp side of the connection deadlines: a wrapper of the node's aiohttp request handler.

After the hand-over the front (webcache/fastpath.py ``Connection``) still owns the transport
but no longer parses the requests; this wrapper tells it when aiohttp has a complete head
(``request_started``: the header deadline ends, the body deadline begins if a body is still
coming) and when the answer is written (``request_finished``: the keep-alive deadline begins).
It finishes the response itself (``prepare`` + ``write_eof``; aiohttp's own calls then do
nothing) so that "finished" means the bytes are in the transport.

It also refuses, with 505, a request of another HTTP major version that aiohttp's parser
accepted (0.9, 2.0) in a position the front could not see (pipelined behind another request),
and adds the connection counters to ``/_mcs/status`` and ``/metrics``.

It wraps ``web.Server.request_handler`` (the application's ``_handle``) rather than being an
application middleware: any middleware makes aiohttp add one of its own and build the chain per
request, two more coroutine layers on every request of the aiohttp path.
"""

from __future__ import annotations

import json
from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11

from webcache.app import CACHE, _escape
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
        conn.request_started(request.content)
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                await _finish(request, exc)
                raise
            if request.path == "/_mcs/status" and isinstance(response, web.Response):
                doc = json.loads(response.text or "{}")
                doc["connections"] = conn.front.connection_status()
                response.text = json.dumps(doc)
            elif request.path == "/metrics" and isinstance(response, web.Response):
                response.body = bytes(response.body) + _metrics(request, conn)
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


_COUNTERS = [
    ("accepted", "Connections taken into service"),
    ("refused_at_cap", "Connections closed at once: max_connections were open"),
    ("accept_errors", "accept() failures (EMFILE, ENFILE, ENOBUFS, ...)"),
    ("shed", "Connections closed unserved with the reserve descriptor at EMFILE/ENFILE"),
    ("version_refused", "Requests answered 505 (an HTTP version other than 1.x)"),
]


def _metrics(request: web.Request, conn: Connection) -> bytes:
    """Prometheus lines for the connection counters of this node."""
    cache = request.app[CACHE]
    label = f'node="{_escape(cache.member.info.node)}",slot="{cache.member.slot}"'
    doc = conn.front.connection_status()
    lines = []
    for name, help_, kind, value in [
            ("mcs_webcache_connections_open", "Connections open now", "gauge", doc["open"]),
            ("mcs_webcache_connections_max", "The connection cap (max_connections)", "gauge",
             doc["limits"]["max_connections"])]:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"]
    for key, help_ in _COUNTERS:
        name = f"mcs_webcache_connections_{key}_total"
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter",
                  f"{name}{{{label}}} {doc[key]}"]
    name = "mcs_webcache_connections_timed_out_total"
    lines += [f"# HELP {name} Connections closed by a deadline, by kind", f"# TYPE {name} counter"]
    lines += [f'{name}{{{label},kind="{kind}"}} {n}' for kind, n in doc["timed_out"].items()]
    return ("\n".join(lines) + "\n").encode()
