"""An aiohttp session store in a mcs.SharedDict (the MCS paper's section 7.3): every worker
process serves every session, and a session outlives the worker that wrote it (kill -9 included).

    python examples/session_store.py [PORT] [WORKERS]   WORKERS processes on one port (SO_REUSEPORT)
    python examples/session_store.py serve DOMAIN PORT  one worker (what the test runs)

    curl -c jar 'http://127.0.0.1:8080/login?user=ada'; curl -b jar http://127.0.0.1:8080/me
"""
import json, os, secrets, subprocess, sys

from aiohttp import web

import mcs


def make_app(d: mcs.SharedDict) -> web.Application:
    async def login(request: web.Request) -> web.Response:
        sid = secrets.token_hex(8)
        d[f"s:{sid}"] = json.dumps({"user": request.query["user"], "visits": 0}).encode()
        response = web.json_response({"sid": sid, "pid": os.getpid()})
        response.set_cookie("sid", sid, httponly=True)
        return response

    def visit(tx, key: str) -> dict:  # read-modify-write of one session: one transaction
        raw = tx.get(key)
        if raw is None:
            raise web.HTTPUnauthorized(text="no session\n")
        session = json.loads(raw)
        session["visits"] += 1
        tx[key] = json.dumps(session).encode()
        return session

    async def me(request: web.Request) -> web.Response:
        session = d.transact(visit, f"s:{request.cookies.get('sid', '')[:16]}")
        return web.json_response({**session, "pid": os.getpid()})

    app = web.Application()
    app.add_routes([web.get("/login", login), web.get("/me", me)])
    return app


def serve(domain: str, port: int) -> None:
    # Opened in the worker process itself: a handle never crosses a fork.
    with mcs.SharedDict(domain, name="sessions", capacity=100_000, max_key=32,
                        max_value=512) as d:
        web.run_app(make_app(d), host="127.0.0.1", port=port, reuse_port=True,
                    print=lambda _: print("ready", os.getpid(), flush=True))


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        port, workers = (sys.argv[1:3] + ["8080", "4"][len(sys.argv[1:3]):])  # Ctrl-C stops all
        cmd = [sys.executable, __file__, "serve", f"sessions{os.getpid()}", port]
        [p.wait() for p in [subprocess.Popen(cmd) for _ in range(int(workers))]]
