"""A registry member for tests and chaos runs: registers its keys, then checks the invariants
in consistent blocks without pause, and obeys commands on stdin; it talks in JSON lines.

    python registry_worker.py DOMAIN NAME NKEYS TIMING_JSON

An invariant violation is printed as {"violation": ...} and ends the process with status 3.
"""


import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mcs  # noqa: E402
from registry import InvariantViolation, Registry  # noqa: E402


def main(argv: list[str]) -> int:
    domain, name, nkeys = argv[1], argv[2], int(argv[3])
    timing = json.loads(argv[4]) if len(argv) > 4 else {}
    out = threading.Lock()

    def say(**kw: object) -> None:
        with out:
            print(json.dumps(kw), flush=True)

    reg = Registry(domain, **timing).start()
    for i in range(nkeys):
        reg.register(f"{name}-{i}".encode(), f"v{i}@{os.getpid()}".encode())
    say(ready=reg.slot, pid=os.getpid(), epoch=reg.stats.epoch)
    stop = threading.Event()

    def checker() -> None:
        while not stop.is_set():
            try:
                reg.run(reg.check_invariants)
            except InvariantViolation as exc:
                say(violation=str(exc), pid=os.getpid())
                os._exit(3)
            except mcs.ClosedError:
                return

    threading.Thread(target=checker, daemon=True).start()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "get":
            say(get=cmd[1], value=(reg.lookup(cmd[1].encode()) or b"").decode())
        elif cmd[0] == "set":
            reg.register(cmd[1].encode(), cmd[2].encode())
            say(set=cmd[1])
        elif cmd[0] == "count":
            st = reg.stats
            say(count=reg.run(reg.check_invariants), epoch=st.epoch, members=len(reg.view.members),
                recoveries=st.recoveries, last_ms=st.last_duration_ms, reason=st.requests[-3:],
                generation=st.generation)
        elif cmd[0] == "stop":
            stop.set()
            reg.stop()
            say(stopped=True)
            break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
