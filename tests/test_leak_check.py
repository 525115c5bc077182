"""The suite's leak check counts only what this test's own process tree created: a foreign mcs
program churning segments on the same machine (another checkout's tests, a running cache) is
never taken for a leak, while a segment our own child leaves behind still is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import sysv_ipc

from conftest import created_by_us, new_segments, sysv_segments, wait_for

# Creates unmarked segments (a "leak" if it were ours), prints their ids, keeps churning
# (create + remove) until stdin closes, then removes what it made.
_CHURN = textwrap.dedent("""
    import os, sys, time, sysv_ipc
    if os.fork():
        os._exit(0)  # the grandchild is reparented away from the test's process tree
    os.setsid()
    kept = [sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=4096)
            for _ in range(2)]
    print(" ".join(str(m.id) for m in kept), os.getpid(), flush=True)
    import select
    while not select.select([sys.stdin], [], [], 0.01)[0]:
        m = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=4096)
        m.remove()
    for m in kept:
        m.remove()
""")


def test_foreign_churning_domain_is_not_a_leak() -> None:
    before = sysv_segments()
    proc = subprocess.Popen([sys.executable, "-c", _CHURN], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    proc.wait(10)  # the intermediate parent exits at once; the churner runs on
    ids, churner = [int(x) for x in line[:-1]], int(line[-1])
    try:
        assert len(ids) == 2 and set(ids) <= set(sysv_segments())
        assert not created_by_us(churner), "the churner must be outside our process tree"
        assert not new_segments(before) & set(ids)
        # Our own child's unremoved segment is still seen.
        own = subprocess.run(
            [sys.executable, "-c", "import sysv_ipc; print(sysv_ipc.SharedMemory("
             "None, sysv_ipc.IPC_CREX, mode=0o600, size=4096).id)"],
            capture_output=True, text=True, check=True)
        mine = int(own.stdout)
        try:
            # Its creator is dead: a dead creator counts as ours (the check stays strict).
            assert mine in new_segments(before)
        finally:
            sysv_ipc.remove_shared_memory(mine)
    finally:
        proc.stdin.close()
        proc.stdout.close()
        assert wait_for(lambda: not os.path.exists(f"/proc/{churner}") or
                        set(ids).isdisjoint(sysv_segments()), 10)
        if os.path.exists(f"/proc/{churner}"):
            os.kill(churner, signal.SIGKILL)


def test_segment_of_a_live_child_is_ours(spawn) -> None:
    before = sysv_segments()
    child = spawn("""
        import sysv_ipc, sys
        m = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=4096)
        print(m.id, flush=True)
        sys.stdin.readline()
        m.remove()
    """)
    sid = int(child.readline())
    assert created_by_us(child.pid)
    assert sid in new_segments(before)
    child.send("")
    assert child.wait() == 0
    assert sid not in new_segments(before)
