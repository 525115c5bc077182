"""Several gunicorn workers (aiohttp's worker class) sharing one mcs.SharedDict: each worker opens
its own handle after the fork (gunicorn's post_fork hook); a handle used across a fork fails with
a clear error, never touching shared memory (GET /fork-misuse shows it). Needs gunicorn.

    python examples/workers_app.py [PORT] [WORKERS]     then: curl http://127.0.0.1:8000/hit
"""
import os, sys
from aiohttp import web
from gunicorn.app.base import BaseApplication

import mcs

DOMAIN = os.environ.get("MCS_DOMAIN") or f"workers{os.getpid()}"  # chosen in the master
shared: mcs.SharedDict | None = None  # this worker's handle, opened after the fork


def post_fork(server, worker) -> None:
    global shared
    shared = mcs.SharedDict(DOMAIN, name="app", capacity=1024, max_key=32, max_value=64).start()


def worker_exit(server, worker) -> None:
    if shared is not None:
        shared.stop()


async def hit(request: web.Request) -> web.Response:  # this worker, all workers' hits, workers now
    hits, workers = shared.incr("hits"), len(shared.view.members)
    return web.json_response({"pid": os.getpid(), "hits": hits, "workers": workers})


async def fork_misuse(request: web.Request) -> web.Response:
    r, w = os.pipe()
    if (child := os.fork()) == 0:  # the child inherited this worker's handle: it must refuse
        try:
            msg = f"no error: {shared.incr('hits')}"
        except mcs.McsError as exc:
            msg = f"{type(exc).__name__}: {exc}"
        os.write(w, msg.encode()[:4000]), os._exit(0)
    os.close(w), os.waitpid(child, 0)
    with open(r) as pipe:
        return web.json_response({"pid": os.getpid(), "error": pipe.read()})


class Server(BaseApplication):
    def load_config(self) -> None:
        port, workers = sys.argv[1:3] + ["8000", "3"][len(sys.argv[1:3]):]
        for key, value in {"bind": f"127.0.0.1:{port}", "workers": int(workers), "post_fork":
                           post_fork, "worker_class": "aiohttp.GunicornWebWorker",
                           "worker_exit": worker_exit, "graceful_timeout": 5}.items():
            self.cfg.set(key, value)

    def load(self) -> web.Application:  # no handle in it: each worker opens its own
        app = web.Application()
        app.add_routes([web.get("/hit", hit), web.get("/fork-misuse", fork_misuse)])
        return app


if __name__ == "__main__":
    Server().run()
