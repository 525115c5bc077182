"""The aiohttp application of one cache node: static files through the shared cache, plus the
operator's endpoints: ``/_mcs/status`` (JSON), ``/metrics`` (Prometheus text format) and
``/_mcs/`` (a live status page), and ``/_mcs/ready`` (200 only while this node's domain is stable:
the health check of a front tier, docs/hosts.md). The nodes share one port, so each endpoint but
the last describes the whole domain, whichever node answers: every member's counters are read
from the board in shared memory (webcache/board.py), where each node publishes its own. Every
response says which node and which host answered (``X-Mcs-Node``, ``X-Mcs-Host``)."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from typing import Any

from aiohttp import web

from mcs.status import member_rows

from webcache import board as B
from webcache.cache import UNAVAILABLE, McsWebCache
from webcache.fastpath import NODE_PID, FastPathStats, identity_fields
from webcache.status_page import PAGE
from webcache.paths import DocumentRoot, FileChanged, Forbidden, NotFound, OpenFile, ResolvedFile
from webcache.semantics import (
    RangeNotSatisfiable,
    file_headers,
    if_range_ok,
    is_not_modified,
    parse_range,
    precondition_failed,
)

__all__ = ["make_app", "node_status", "readiness", "CACHE", "ROOT", "FAST", "BOARD", "HOST_NAME"]

CACHE = web.AppKey("cache", McsWebCache)
ROOT = web.AppKey("root", DocumentRoot)
FAST = web.AppKey("fast_path", FastPathStats)  # set by the node when its fast path is in front
BOARD = web.AppKey("board", B.BoardWriter)  # this node's publisher of its counters
HOST_NAME = web.AppKey("host_name", str)  # serve --host-name ("": none given)
_IDENTITY = web.AppKey("identity", dict)  # the header fields of every response
_PUBLISHER = web.AppKey("board_task", asyncio.Task)
# A file above max_entry is sent in chunks of this size: large enough that the per-chunk cost
# (a worker-thread hop, an open and an fstat) stays small next to the copy, small enough that a
# slow client holds at most this much per response in memory.
STREAM_CHUNK = 256 * 1024


def make_app(cache: McsWebCache, root: DocumentRoot,
             host_name: str | None = None) -> web.Application:
    """App factory: one node's routes over an already started cache. ``host_name`` (the
    host's name in a front tier) goes into every response (``X-Mcs-Host``) and the status."""
    app = web.Application(client_max_size=0)
    app[CACHE] = cache
    app[ROOT] = root
    app[BOARD] = B.BoardWriter(cache)
    app[HOST_NAME] = host_name or ""
    app[_IDENTITY] = identity_fields(host_name)
    app.router.add_get("/_mcs/status", status)
    app.router.add_get("/_mcs/ready", ready)
    app.router.add_get("/_mcs/", status_page)
    app.router.add_get("/_mcs", status_page_redirect)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_start_publishing)
    app.on_cleanup.append(_stop_publishing)
    app.router.add_route("*", "/{tail:.*}", serve_file)
    app.on_response_prepare.append(_server_header)
    return app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(request.app[_IDENTITY])  # the same on both paths


Planned = tuple[OpenFile, int, dict[str, str], "tuple[int, int] | None"]
READ_ATTEMPTS = 8  # a file that changed between its check and its read is looked up again


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


# -- the operator's endpoints ------------------------------------------------------------------


async def _start_publishing(app: web.Application) -> None:
    writer = app[BOARD]
    writer.fast = app.get(FAST)
    writer.publish()
    app[_PUBLISHER] = asyncio.get_running_loop().create_task(
        _publish_forever(writer, app[CACHE]))


async def _publish_forever(writer: B.BoardWriter, cache: McsWebCache) -> None:
    """The node's ticker: publishes its counters and gives the event loop's progress signal
    (a loop blocked for ``progress_timeout`` gets this node evicted as hung)."""
    member = cache.member
    every = min(B.PUBLISH_INTERVAL, member.timing.progress_every)
    next_publish = 0.0
    while True:
        member.progress()
        now = asyncio.get_running_loop().time()
        if now >= next_publish:
            writer.publish()
            next_publish = now + B.PUBLISH_INTERVAL
        await asyncio.sleep(every)


async def _stop_publishing(app: web.Application) -> None:
    task = app.get(_PUBLISHER)
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    app[BOARD].publish()  # a clean stop keeps its last counts


def _zeros(names: tuple[str, ...]) -> dict[str, int]:
    return dict.fromkeys(names, 0)


def _member_doc(row: dict[str, Any], snap: B.NodeSnapshot | None, master_slot: int | None,
                now_ns: int) -> dict[str, Any]:
    """One member of the domain: its membership row and its board snapshot."""
    counters = snap.counters if snap is not None else _zeros(B.COUNTERS)
    looked_up = counters["hits"] + counters["misses"]
    return {
        **row,
        "master": row["slot"] == master_slot,
        "published": snap is not None,  # False: joined, has not published yet (zeros)
        "torn": snap is not None and snap.torn,
        "started": None if snap is None else snap.started_ns / 1e9,
        "published_age_ms": None if snap is None else round((now_ns - snap.published_ns) / 1e6, 1),
        "recovering": snap is not None and snap.recovering,
        "epoch": 0 if snap is None else snap.epoch,
        "generation_seen": 0 if snap is None else snap.generation,
        "counters": counters,
        "gauges": snap.gauges if snap is not None else _zeros(B.GAUGES),
        "hit_ratio": None if not looked_up else round(counters["hits"] / looked_up, 4),
        "last_recovery_ms": 0.0 if snap is None else snap.last_recovery_ms,
        "last_recovery_phases_ms": {} if snap is None else snap.phases_ms,
    }


def domain_view(cache: McsWebCache) -> dict[str, Any]:
    """The whole domain as the board and the membership table show it: every member (with its
    counters), the domain totals, the last recoveries."""
    view = cache.view
    area = cache.master_area
    try:
        snaps = B.read_board(area) if area is not None and B.board_ok(area) else []
        created = B.board_created_ns(area) / 1e9 if snaps else None
    except UNAVAILABLE:  # replaced by a recovery while we read: the members without counters
        snaps, created = [], None
    by_slot = {s.slot: s for s in snaps}
    master_slot = None if view is None or view.master is None else view.master.slot
    rows = member_rows(cache.member.table, view) if view is not None else []
    now_ns = time.time_ns()
    members = []
    for row in rows:
        snap = by_slot.get(row["slot"])
        if snap is not None and (snap.incarnation, snap.pid) != (row["incarnation"], row["pid"]):
            snap = None  # the slot's board still holds its previous occupant
        members.append(_member_doc(row, snap, master_slot, now_ns))
    live = [m for m in members if m["published"]]
    last_epoch = max((m["epoch"] for m in live), default=0)
    last = [m for m in live if m["epoch"] == last_epoch and last_epoch]
    return {
        "members": members,
        "totals": B.domain_totals(snaps),
        "board_created": created,
        "capacity_bytes": sum(m["gauges"]["arena_bytes"] for m in members),
        "recoveries": B.recent_recoveries(snaps),
        "last_recovery": None if not last else {
            "epoch": last_epoch,
            "duration_ms": max(m["last_recovery_ms"] for m in last),
            "phases_ms": {p: max(m["last_recovery_phases_ms"].get(p, 0.0) for m in last)
                          for p in B.PHASES},
        },
    }


def node_status(cache: McsWebCache, fast: FastPathStats | None = None,
                host_name: str = "") -> dict[str, Any]:
    """The status document: the whole domain (``members``, ``domain``), and at the top level
    the node that answered (also the source of /metrics) and its host (``host``: serve
    --host-name, null when none was given)."""
    if fast is not None and fast.sync is not None:
        fast.sync()  # the native hit loop's counts, folded in
    view = cache.view
    st = cache.stats
    cs = cache.cache_stats
    entries, used = cache.domain_usage()
    extra = {} if fast is None or fast.connection_status is None else \
        {"connections": fast.connection_status()}
    domain = domain_view(cache)
    members = domain.pop("members")
    return {
        "node": cache.member.info.node,
        "host": host_name or None,
        "pid": os.getpid(),
        "slot": cache.member.slot,
        "incarnation": cache.member.incarnation,
        "generation": view.generation if view else None,
        "epoch": st.epoch,
        "recovering": cache.recovering,
        "master": None if view is None or view.master is None else
        {"slot": view.master.slot, "pid": view.master.pid, "node": view.master.node},
        "members": members,
        "domain": {"name": cache.domain, "generation": view.generation if view else None,
                   "member_evictions": cache.member.table.evictions(),
                   "cache": {"entries": entries, "bytes": used,
                             "capacity_bytes": domain.pop("capacity_bytes")}, **domain},
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
        "takeover": {"arenas_adopted": cs.arenas_adopted, "entries_adopted": cs.entries_adopted,
                     "entries_dropped": cs.entries_dropped, "entries_reread": cs.reread,
                     "scanning": cache._adopted is not None},
        "recoveries": st.recoveries,
        "last_recovery_ms": round(st.last_duration_ms, 3),
        "last_recovery_phases_ms": {k: round(v, 3) for k, v in st.last_phases_ms.items()},
        "fast_path": None if fast is None else
        {"served": fast.served, "handed_over": fast.handed_over, "connections": fast.connections,
         "aiohttp_requests": fast.requests,
         "native": None if fast.native is None else fast.native()},
        "now": time.time(),
        **extra,
    }


def _fresh_status(request: web.Request) -> dict[str, Any]:
    request.app[BOARD].publish()  # our own counters as of now; the others' lag by at most
    return node_status(request.app[CACHE], request.app.get(FAST),  # PUBLISH_INTERVAL
                       request.app[HOST_NAME])


async def status(request: web.Request) -> web.Response:
    return web.json_response(_fresh_status(request),
                             headers={"Cache-Control": "no-store"})


def readiness(cache: McsWebCache) -> str | None:
    """Why this node should get no traffic from a front tier now, or None when it is ready:
    its domain is stable (no recovery running, the first one included) and it is a member."""
    if cache.member.fenced:
        return "fenced (evicted from its domain)"
    if cache.view is None:
        return "not a member of a view yet"
    if cache.recovering:
        return "its domain is recovering"
    return None


async def ready(request: web.Request) -> web.Response:
    """``GET /_mcs/ready``: 200 ``ready`` while this node serves a stable domain, else 503 with
    the reason: the health check of HAProxy or nginx in front of several hosts (docs/hosts.md).
    ``/_mcs/status`` answers 200 whenever the node answers at all, recovering or not."""
    reason = readiness(request.app[CACHE])
    headers = {"Cache-Control": "no-store"}
    if reason is None:
        return web.Response(text="ready\n", headers=headers)
    return web.Response(status=503, text=f"not ready: {reason}\n", headers=headers)


async def status_page(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store",
                                 "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy":
                                     "default-src 'none'; script-src 'unsafe-inline'; "
                                     "style-src 'unsafe-inline'; connect-src 'self'"})


async def status_page_redirect(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("/_mcs/")


# Per member (labels node, slot, incarnation): counter name -> help. The connection deadlines
# are one family with a ``kind`` label.
_MEMBER_COUNTERS = [
    ("requests", "Requests answered (fast path and aiohttp)"),
    ("hits", "Cache hits served from shared memory"),
    ("misses", "Requests not found in the cache"),
    ("evictions", "Entries evicted from this node's arena"),
    ("coalesced_misses", "Misses that waited for another node's fill"),
    ("checksum_failures", "Cached entries dropped for a checksum mismatch"),
    ("stale_revalidations", "Cached entries dropped because the file changed"),
    ("disk_reads", "Files read from disk"),
    ("served_during_recovery", "Requests served from disk while a recovery ran"),
    ("recoveries", "Global recoveries this node took part in"),
    ("fast_path_served", "Responses written by the fast path (no aiohttp request)"),
    ("fast_path_handed_over", "Connections handed over to aiohttp"),
    ("connections_accepted", "Connections taken into service"),
    ("connections_refused_at_cap", "Connections closed at once: max_connections were open"),
    ("connections_accept_errors", "accept() failures (EMFILE, ENFILE, ENOBUFS, ...)"),
    ("connections_shed", "Connections closed unserved with the reserve descriptor at EMFILE/ENFILE"),
    ("connections_version_refused", "Requests answered 505 (an HTTP version other than 1.x)"),
    ("arenas_adopted", "Arenas taken over from a departed node (warm takeover)"),
    ("entries_adopted", "Entries of taken-over arenas found linked and kept"),
    ("entries_dropped", "Entries of taken-over arenas refused (torn or overlapping)"),
    ("entries_reread", "Cached entries dropped at a hit (corrupt or stale) and read again"),
    ("chains_cut", "Bucket chains found corrupt (garbage in shared memory) and cut"),
    ("native_served", "Responses written by the native hit loop (no Python)"),
    ("native_handed_off", "Connections the native hit loop handed to the asyncio side"),
    ("native_sealed_hits", "Responses the native hit loop sent from a sealed copy (sendfile, "
     "no copy)"),
]
_TIMED_OUT = "connections_timed_out_"
_DOMAIN_COUNTERS = [(k, h) for k, h in _MEMBER_COUNTERS if k != "recoveries"]
_MEMBER_GAUGES = [
    ("node_entries", "entries", "Entries cached in this node's arena"),
    ("node_bytes", "bytes", "Bytes cached in this node's arena"),
    ("arena_bytes", "arena_bytes", "Size of this node's arena"),
    ("connections_open", "connections_open", "Connections open now"),
    ("connections_max", "max_connections", "The connection cap (max_connections)"),
    ("sealed_copy_bytes", "sealed_bytes", "Bytes of sealed copies the native hit loop holds"),
]


class _Exposition:
    """Prometheus text format 0.0.4: each family once, its HELP and TYPE, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: list[tuple[dict[str, Any], float | int]]) -> None:
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def metrics_text(doc: dict[str, Any]) -> bytes:
    """/metrics of a status document: every member's series (labels ``node``, ``slot``,
    ``incarnation``: a restarted node is a new series), the domain's totals and gauges."""
    out = _Exposition()
    members = doc["members"]
    labels = [({"node": m["node"], "slot": m["slot"], "incarnation": m["incarnation"]}, m)
              for m in members]
    out.family("mcs_webcache_member_info", "gauge",
               "One per member: its pid and membership state",
               [({**lab, "pid": m["pid"], "state": m["state"]}, 1) for lab, m in labels])
    for key, help_ in _MEMBER_COUNTERS:
        out.family(f"mcs_webcache_{key}_total", "counter", help_,
                   [(lab, m["counters"][key]) for lab, m in labels])
    out.family("mcs_webcache_connections_timed_out_total", "counter",
               "Connections closed by a deadline, by kind",
               [({**lab, "kind": c[len(_TIMED_OUT):]}, v) for lab, m in labels
                for c, v in m["counters"].items() if c.startswith(_TIMED_OUT)])
    for name, key, help_ in _MEMBER_GAUGES:
        out.family(f"mcs_webcache_{name}", "gauge", help_,
                   [(lab, m["gauges"][key]) for lab, m in labels])
    out.family("mcs_webcache_heartbeat_age_seconds", "gauge",
               "Age of the member's last heartbeat",
               [(lab, m["heartbeat_age_ms"] / 1000) for lab, m in labels])
    out.family("mcs_webcache_locks_held", "gauge",
               "Global mutexes the member's process holds now (copied every heartbeat)",
               [(lab, m["locks_held"]) for lab, m in labels])
    out.family("mcs_webcache_progress_age_seconds", "gauge",
               "Age of the member's last progress signal (a stuck event loop or interpreter "
               "grows it; evicted past progress_timeout)",
               [(lab, m["progress_age_ms"] / 1000) for lab, m in labels
                if m["progress_age_ms"] is not None])
    out.family("mcs_webcache_member_restarts", "gauge",
               "Times the supervisor restarted the member's slot before this incarnation",
               [(lab, m["restarts"]) for lab, m in labels])
    out.family("mcs_webcache_member_start_time_seconds", "gauge",
               "When the member's incarnation started publishing (Unix time)",
               [(lab, m["started"]) for lab, m in labels if m["started"] is not None])
    out.family("mcs_webcache_member_last_recovery_seconds", "gauge",
               "Duration of the member's last recovery",
               [(lab, round(m["last_recovery_ms"] / 1000, 6)) for lab, m in labels])
    dom = doc["domain"]
    for key, help_ in _DOMAIN_COUNTERS:
        out.family(f"mcs_webcache_domain_{key}_total", "counter",
                   help_ + ", the whole domain (departed members included)",
                   [({}, dom["totals"][key])])
    out.family("mcs_webcache_domain_member_evictions_total", "counter",
               "Members evicted and fenced, by cause (frozen, stopped, hung, stalled)",
               [({"cause": c}, n) for c, n in dom["member_evictions"].items()])
    last = dom["last_recovery"]
    gauges = [
        ("entries", "Entries cached in the whole domain", dom["cache"]["entries"]),
        ("bytes", "Bytes cached in the whole domain", dom["cache"]["bytes"]),
        ("capacity_bytes", "Arena bytes of every member together", dom["cache"]["capacity_bytes"]),
        ("generation", "Membership generation of the cache", dom["generation"] or 0),
        ("members", "Members of the domain", len(members)),
        ("recovery_epoch", "Epoch of the last recovery the members finished",
         0 if last is None else last["epoch"]),
        ("last_recovery_seconds", "Duration of the last recovery (its slowest member)",
         0 if last is None else round(last["duration_ms"] / 1000, 6)),
        ("board_created_seconds", "When the board of counters was created: the domain totals "
         "count from there (Unix time)", dom["board_created"] or 0),
    ]
    for name, help_, value in gauges:
        out.family(f"mcs_webcache_{name}", "gauge", help_, [({}, value)])
    master = doc["master"]
    out.family("mcs_webcache_master", "gauge", "The master member",
               [(lab, 1) for lab, m in labels if master is not None and m["slot"] == master["slot"]])
    out.family("mcs_webcache_last_recovery_phase_seconds", "gauge",
               "Phases of the last recovery (the slowest member's time in each)",
               [] if last is None else [({"phase": p}, round(v / 1000, 6))
                                        for p, v in last["phases_ms"].items()])
    return out.text()


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=metrics_text(_fresh_status(request)),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
