"""The aiohttp application of one cache node: static files through the shared cache, plus
``/_mcs/status`` (JSON) and ``/metrics`` (Prometheus text format)."""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

from aiohttp import web

from webcache.cache import McsWebCache
from webcache.fastpath import NODE_PID, SERVER, FastPathStats
from webcache.paths import DocumentRoot, FileChanged, Forbidden, NotFound, OpenFile, ResolvedFile
from webcache.semantics import (
    RangeNotSatisfiable,
    file_headers,
    if_range_ok,
    is_not_modified,
    parse_range,
    precondition_failed,
)

__all__ = ["make_app", "CACHE", "ROOT", "FAST"]

CACHE = web.AppKey("cache", McsWebCache)
ROOT = web.AppKey("root", DocumentRoot)
FAST = web.AppKey("fast_path", FastPathStats)  # set by the node when its fast path is in front
# A file above max_entry is sent in chunks of this size: large enough that the per-chunk cost
# (a worker-thread hop, an open and an fstat) stays small next to the copy, small enough that a
# slow client holds at most this much per response in memory.
STREAM_CHUNK = 256 * 1024


def make_app(cache: McsWebCache, root: DocumentRoot) -> web.Application:
    """App factory: one node's routes over an already started cache."""
    app = web.Application(client_max_size=0)
    app[CACHE] = cache
    app[ROOT] = root
    app.router.add_get("/_mcs/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", serve_file)
    app.on_response_prepare.append(_server_header)
    return app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER  # the same on both paths


Planned = tuple[OpenFile, int, dict[str, str], "tuple[int, int] | None"]
READ_ATTEMPTS = 4  # a file that changed between its check and its read is looked up again


def plan_file_response(request: web.Request, root: DocumentRoot,
                       node_pid: str) -> web.Response | Planned:
    """What a file response is, before its bytes: the method (405), the path (403/404), the
    validators (412/304), the range (206/416) and HEAD. Returns the finished response, or
    ``(opened, status, headers, span)`` for a GET that needs the body: ``opened`` is the file
    held open (webcache.paths.OpenFile), the caller closes it. Shared by the node and the
    benchmark's shared-nothing baseline, so both answer with the same HTTP semantics."""
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
    try:
        opened = root.open(request.path, request.raw_path)
    except Forbidden as exc:
        raise web.HTTPForbidden(text=f"403 forbidden: {exc}\n") from None
    except NotFound:
        raise web.HTTPNotFound(text="404 not found\n") from None
    except FileChanged:
        raise _changed() from None
    try:
        planned = _plan(request, opened.file, node_pid)
    except BaseException:
        opened.close()
        raise
    if isinstance(planned, web.Response):
        opened.close()
        return planned
    return (opened, *planned)


def _changed() -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(text="file changed while being read; retry\n",
                                      headers={"Retry-After": "0"})


def _plan(request: web.Request, f: ResolvedFile,
          node_pid: str) -> web.Response | tuple[int, dict[str, str], tuple[int, int] | None]:
    """plan_file_response once the file is found: its headers, conditionals, range, HEAD."""
    headers = file_headers(f.path, f.size, f.mtime_ns, f.inode, f.ctime_ns)
    headers["X-Mcs-Node"] = node_pid
    tag = headers["ETag"]
    if precondition_failed(request.headers, tag, f.mtime_ns):
        raise web.HTTPPreconditionFailed(headers={"ETag": tag})
    if is_not_modified(request.headers, tag, f.mtime_ns):
        return web.Response(status=304, headers={k: headers[k] for k in ("ETag", "Last-Modified")})
    span = None
    if "Range" in request.headers and if_range_ok(request.headers, tag, f.mtime_ns):
        try:
            span = parse_range(request.headers.get("Range"), f.size)
        except RangeNotSatisfiable:
            raise web.HTTPRequestRangeNotSatisfiable(
                headers={"Content-Range": f"bytes */{f.size}"}) from None
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{f.size}"
    if request.method == "HEAD":
        headers["Content-Length"] = str(f.size if span is None else span[1] - span[0])
        return web.Response(status=status, headers=headers)
    return status, headers, span


async def serve_file(request: web.Request) -> web.StreamResponse:
    """A file: planned (found, validated, conditionals), then its body from the cache or from
    the descriptor found. A file that changed between its check and its read is looked up
    again (a replace in progress ends as the old or the new version, never a mix, never a
    403/404), at most READ_ATTEMPTS times, then 503."""
    root, cache = request.app[ROOT], request.app[CACHE]
    for _ in range(READ_ATTEMPTS):
        planned = plan_file_response(request, root, NODE_PID)
        if isinstance(planned, web.Response):
            return planned
        opened, status, headers, span = planned
        with opened:
            try:
                return await _send_file(request, cache, opened, status, headers, span)
            except FileChanged:
                continue
            except Forbidden as exc:  # became unreadable between the check and the read
                raise web.HTTPForbidden(text=f"403 forbidden: {exc}\n") from None
    raise _changed()


async def _send_file(request: web.Request, cache: McsWebCache, opened: OpenFile, status: int,
                     headers: dict[str, str], span: tuple[int, int] | None) -> web.StreamResponse:
    f = opened.file
    if f.size > cache.max_entry:
        return await _stream_from_disk(request, opened, span, status, headers)
    hit = cache.lookup(f)
    if hit is not None:
        try:
            body = hit.data if span is None else hit.data[span[0]:span[1]]
            resp = web.Response(body=body, status=status, headers=headers)
            await resp.prepare(request)
            await resp.write_eof()
        finally:
            hit.release()
        return resp
    # The read runs in a worker thread with a descriptor of its own (a dup): if this request
    # is cancelled meanwhile, the read still owns what it reads from.
    data = await cache.fill(f, functools.partial(_read_job, opened.dup(), 0, f.size))
    body = data if span is None else memoryview(data)[span[0]:span[1]]
    return web.Response(body=body, status=status, headers=headers)


def _read_job(job: OpenFile, start: int, stop: int) -> bytes:
    """In a worker thread: bytes [start, stop) of ``job`` (a descriptor the job owns)."""
    with job:
        return job.read_span(start, stop)


async def _stream_from_disk(request: web.Request, opened: OpenFile, span: tuple[int, int] | None,
                            status: int, headers: dict[str, str]) -> web.StreamResponse:
    """A file above max_entry, chunk by chunk from its descriptor (each chunk read in a worker
    thread and checked against the stat the headers were built from). A change before the
    first byte is sent raises FileChanged (the caller looks again); a change later cuts the
    connection, so the client sees a short body rather than a mix of two versions."""
    start, stop = (0, opened.file.size) if span is None else span
    loop = asyncio.get_running_loop()

    def read(pos: int) -> asyncio.Future[bytes]:
        end = min(stop, pos + STREAM_CHUNK)
        return loop.run_in_executor(None, _read_job, opened.dup(), pos, end)

    chunk = await read(start)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = stop - start
    await resp.prepare(request)
    pos = start
    while True:
        await resp.write(chunk)
        pos += len(chunk)
        if pos >= stop:
            break
        try:
            chunk = await read(pos)
        except FileChanged:
            if request.transport is not None:
                request.transport.abort()
            return resp
    await resp.write_eof()
    request.app[CACHE].cache_stats.disk_reads += 1
    return resp


def node_status(cache: McsWebCache, fast: FastPathStats | None = None) -> dict[str, Any]:
    """The status document of this node (also the source of /metrics)."""
    view = cache.view
    st = cache.stats
    cs = cache.cache_stats
    entries, used = cache.domain_usage()
    extra = {} if fast is None or fast.connection_status is None else \
        {"connections": fast.connection_status()}
    return {
        "node": cache.member.info.node,
        "pid": os.getpid(),
        "slot": cache.member.slot,
        "incarnation": cache.member.incarnation,
        "generation": view.generation if view else None,
        "epoch": st.epoch,
        "recovering": cache.recovering,
        "master": None if view is None or view.master is None else
        {"slot": view.master.slot, "pid": view.master.pid, "node": view.master.node},
        "members": [] if view is None else
        [{"slot": m.slot, "pid": m.pid, "node": m.node} for m in view.members],
        "cache": {"entries": entries, "bytes": used,
                  "node_entries": len(cache._entries), "node_bytes": cache._alloc.used,
                  "arena_bytes": cache.contribution_size, "max_entry": cache.max_entry},
        "hits": cs.hits,
        "misses": cs.misses,
        "evictions": cs.evictions,
        "coalesced_misses": cs.coalesced,
        "checksum_failures": cs.checksum_failures,
        "stale_revalidations": cs.stale,
        "disk_reads": cs.disk_reads,
        "served_during_recovery": cs.served_during_recovery,
        "recoveries": st.recoveries,
        "last_recovery_ms": round(st.last_duration_ms, 3),
        "last_recovery_phases_ms": {k: round(v, 3) for k, v in st.last_phases_ms.items()},
        "fast_path": None if fast is None else
        {"served": fast.served, "handed_over": fast.handed_over, "connections": fast.connections},
        **extra,
    }


async def status(request: web.Request) -> web.Response:
    return web.json_response(node_status(request.app[CACHE], request.app.get(FAST)))


_METRICS = [
    ("hits", "counter", "Cache hits served from shared memory"),
    ("misses", "counter", "Requests not found in the cache"),
    ("evictions", "counter", "Entries evicted from this node's arena"),
    ("coalesced_misses", "counter", "Misses that waited for another node's fill"),
    ("checksum_failures", "counter", "Cached entries dropped for a checksum mismatch"),
    ("stale_revalidations", "counter", "Cached entries dropped because the file changed"),
    ("disk_reads", "counter", "Files read from disk"),
    ("recoveries", "counter", "Global recoveries this node took part in"),
]


async def metrics(request: web.Request) -> web.Response:
    doc = node_status(request.app[CACHE], request.app.get(FAST))
    label = f'node="{_escape(doc["node"])}",slot="{doc["slot"]}"'
    lines = []
    for key, kind, help_ in _METRICS:
        name = f"mcs_webcache_{key}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {doc[key]}"]
    gauges = [("mcs_webcache_entries", "Entries cached in the whole domain", doc["cache"]["entries"]),
              ("mcs_webcache_bytes", "Bytes cached in the whole domain", doc["cache"]["bytes"]),
              ("mcs_webcache_generation", "Membership generation of the cache", doc["generation"] or 0),
              ("mcs_webcache_members", "Nodes in the current view", len(doc["members"])),
              ("mcs_webcache_last_recovery_seconds", "Duration of the last recovery",
               doc["last_recovery_ms"] / 1000)]
    for name, help_, value in gauges:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name}{{{label}}} {value}"]
    if doc["fast_path"] is not None:
        name = "mcs_webcache_fast_path_served_total"
        lines += [f"# HELP {name} Responses written by the fast path (no aiohttp request)",
                  f"# TYPE {name} counter", f"{name}{{{label}}} {doc['fast_path']['served']}"]
    if "connections" in doc:
        lines += _connection_metrics(doc["connections"], label)
    return web.Response(body=("\n".join(lines) + "\n").encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


_CONNECTION_COUNTERS = [
    ("accepted", "Connections taken into service"),
    ("refused_at_cap", "Connections closed at once: max_connections were open"),
    ("accept_errors", "accept() failures (EMFILE, ENFILE, ENOBUFS, ...)"),
    ("shed", "Connections closed unserved with the reserve descriptor at EMFILE/ENFILE"),
    ("version_refused", "Requests answered 505 (an HTTP version other than 1.x)"),
]


def _connection_metrics(doc: dict[str, Any], label: str) -> list[str]:
    """Prometheus lines of the front's connection report (FastPath.connection_status)."""
    lines = []
    for name, help_, kind, value in [
            ("mcs_webcache_connections_open", "Connections open now", "gauge", doc["open"]),
            ("mcs_webcache_connections_max", "The connection cap (max_connections)", "gauge",
             doc["limits"]["max_connections"])]:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"]
    for key, help_ in _CONNECTION_COUNTERS:
        name = f"mcs_webcache_connections_{key}_total"
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter",
                  f"{name}{{{label}}} {doc[key]}"]
    name = "mcs_webcache_connections_timed_out_total"
    lines += [f"# HELP {name} Connections closed by a deadline, by kind", f"# TYPE {name} counter"]
    lines += [f'{name}{{{label},kind="{kind}"}} {n}' for kind, n in doc["timed_out"].items()]
    return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
