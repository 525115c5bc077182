"""``mcs supervise`` (issue 12): real supervisors running real child processes, killed for real.

Each member is a small Python script written to tmp_path; it reports what it saw (its
environment, when it started, a SIGTERM) in files. The supervisor runs in a session of its own
and each test kills that whole process group at the end, so no member outlives its test. The
supervisor's log (stderr) is read line by line as it comes."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from mcs import procfs
from mcs.sdnotify import NotifyListener, notify, watchdog_interval

from conftest import gone, wait_for

MCS = str(Path(sys.executable).with_name("mcs"))
PID = r"pid (\d+)"

# A member that reports one JSON line to $REPORT when it starts, then acts as its slot's entry
# in $PLAN says: "crash" (READY=1, then SIGKILL itself), "exit0", "silent" (never READY=1), or
# "serve" (the default: READY=1 after $READY_DELAY * slot seconds, then wait for SIGTERM, which
# it notes in $REPORT). Only the "serve" path imports mcs: the others start fast.
MEMBER = textwrap.dedent("""
    import json, os, signal, sys, time
    slot = int(os.environ["MCS_SUPERVISOR_SLOT"])
    action = json.loads(os.environ.get("PLAN", "{}")).get(str(slot), "serve")
    def report(**what):
        with open(os.environ["REPORT"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "slot": slot, "t": time.monotonic(),
                                **what}) + "\\n")
    report(event="start", env={k: v for k, v in os.environ.items()
                               if k.startswith(("MCS_", "NOTIFY_", "WATCHDOG_"))},
           blocked=sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, ())))
    if action == "exit0":
        sys.exit(0)
    if action == "silent":
        time.sleep(600)
    signal.signal(signal.SIGTERM, lambda *a: (report(event="sigterm"), sys.exit(0)))
    from mcs.sdnotify import notify
    if action == "crash":
        notify("READY=1")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("READY_DELAY", "0")) * slot)
    report(event="ready")
    notify("READY=1\\nSTATUS=serving slot %d" % slot)
    while True:
        time.sleep(1)
""")


class Supervise:
    """A running ``mcs supervise`` with its stderr read line by line in the background."""

    def __init__(self, tmp_path: Path, args: list[str], plan: dict[int, str] | None = None,
                 env: dict[str, str] | None = None, blocked: tuple[int, ...] = ()) -> None:
        script = tmp_path / "member.py"
        script.write_text(MEMBER)
        self.report = tmp_path / "report.jsonl"
        full_env = {k: v for k, v in os.environ.items()  # no manager unless a test is one
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        full_env.update(REPORT=str(self.report), **(env or {}),
                        PLAN=json.dumps({str(k): v for k, v in (plan or {}).items()}))
        self.started = time.monotonic()
        self.proc = subprocess.Popen([MCS, "supervise", *args, "--", sys.executable,
                                      str(script)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=full_env,
                                     start_new_session=True, preexec_fn=lambda: (
                                         signal.pthread_sigmask(signal.SIG_BLOCK, blocked)))
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match:
        """The next log line matching ``pattern`` (earlier ones are kept in ``lines``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line like {pattern!r} in {timeout}s; log: {self.lines}")
            if line is None:
                pytest.fail(f"supervisor exited ({self.proc.wait()}) before a line like "
                            f"{pattern!r}; log: {self.lines}")
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the supervisor's exit; its status (every log line is then in ``lines``)."""
        code = self.proc.wait(timeout)
        self._reader.join(10)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        return code

    def events(self, event: str) -> list[dict]:
        if not self.report.exists():
            return []
        rows = [json.loads(line) for line in self.report.read_text().splitlines()]
        return [r for r in rows if r["event"] == event]

    def close(self) -> None:
        """Kill the supervisor's whole process group (its members stay in it) and reap."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._reader.join(10)
        self.proc.stderr.close()


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator:
    started: list[Supervise] = []

    def start(*args: str, plan: dict[int, str] | None = None,
              env: dict[str, str] | None = None, blocked: tuple[int, ...] = ()) -> Supervise:
        sup = Supervise(tmp_path, list(args), plan, env, blocked)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.close()


# -- restarts, back-off, giving up ------------------------------------------------------------


def test_a_crashing_member_is_restarted_with_growing_delays_then_given_up(supervise):
    sup = supervise("-n", "1", "--backoff", "0.1:0.4", "--restart-intensity", "4/30",
                    plan={0: "crash"})
    sup.expect(r"slot 0 gave up: 5 crashes within 30 s \(last: killed by SIGKILL\); "
               r"not restarting it$")
    assert sup.finish() == 1
    assert sup.lines[-1] == "mcs supervise: every slot gave up; exiting with status 1"
    starts = sup.events("start")
    assert [s["env"]["MCS_RESTARTS"] for s in starts] == ["0", "1", "2", "3", "4"]
    assert {s["env"]["MCS_SUPERVISOR_SLOT"] for s in starts} == {"0"}
    assert {s["env"]["MCS_SUPERVISOR_PID"] for s in starts} == {str(sup.proc.pid)}
    # Each restart waited its back-off: 0.1 s doubled per crash in a row, at most 0.4 s (the
    # gap between two starts is the member's short life plus the delay).
    delays = [float(d) for d in re.findall(r"restarting in ([\d.]+) s", "\n".join(sup.lines))]
    assert delays == [0.1, 0.2, 0.4, 0.4], sup.lines
    gaps = [b["t"] - a["t"] for a, b in zip(starts, starts[1:])]
    assert all(gap >= delay for gap, delay in zip(gaps, delays)), (gaps, delays)
    assert sum("started" in line for line in sup.lines) == 5


def test_one_slot_gives_up_the_other_keeps_running_until_sigterm(supervise):
    sup = supervise("-n", "2", "--backoff", "0.05:0.1", "--restart-intensity", "2/30",
                    plan={0: "crash", 1: "serve"})
    sup.expect(r"slot 0 gave up: 3 crashes within 30 s")
    [survivor] = [s["pid"] for s in sup.events("start") if s["slot"] == 1]
    assert wait_for(lambda: sup.events("ready"), 20, 0.02)
    time.sleep(0.3)
    assert sup.proc.poll() is None and not gone(survivor)  # still supervising slot 1
    sup.proc.send_signal(signal.SIGTERM)
    sup.expect(r"stopping: SIGTERM to 1 member\(s\)")
    assert sup.finish() == 0
    assert sup.lines[-1] == "mcs supervise: stopped"
    assert [e["pid"] for e in sup.events("sigterm")] == [survivor]  # it stopped cleanly
    assert gone(survivor)


def test_clean_exit_ends_a_slot_unless_restart_always(supervise):
    sup = supervise("-n", "2", "--ready", "started", plan={0: "exit0", 1: "exit0"})
    assert sup.finish() == 0
    assert sum("done, not restarting it" in line for line in sup.lines) == 2
    assert sup.lines[-1] == "mcs supervise: every member exited cleanly; exiting"
    sup.report.unlink()

    again = supervise("--ready", "started", "--restart", "always", "--backoff", "0.05:0.1",
                      "--restart-intensity", "2/30", plan={0: "exit0"})
    again.expect(r"slot 0 gave up: 3 exits within 30 s \(last: status 0\)")
    assert again.finish() == 1
    assert len(again.events("start")) == 3


def test_started_with_stop_signals_blocked_it_still_stops_and_members_start_unblocked(
        supervise):
    # A parent that blocks SIGTERM/SIGINT (a shell's background job, a runner) passes the mask
    # on through exec: the supervisor unblocks them for itself and gives members an empty mask,
    # as systemd does, so neither a stop nor the supervisor's death is lost.
    sup = supervise("-n", "2", blocked=(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1))
    sup.expect(r"all 2 member\(s\) ready")
    pids = [s["pid"] for s in sup.events("start")]
    assert [s["blocked"] for s in sup.events("start")] == [[], []]
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.finish() == 0
    assert sorted(e["pid"] for e in sup.events("sigterm")) == sorted(pids)
    assert all(gone(p) for p in pids)


# -- the supervisor's death --------------------------------------------------------------------


def test_killing_the_supervisor_stops_every_member_cleanly(supervise):
    sup = supervise("-n", "3", "--stop-timeout", "30")
    sup.expect(r"all 3 member\(s\) ready")
    pids = [s["pid"] for s in sup.events("start")]
    assert len(pids) == 3 and not any(gone(p) for p in pids)
    os.kill(sup.proc.pid, signal.SIGKILL)
    assert wait_for(lambda: all(gone(p) for p in pids), 2.0, 0.01), \
        [(p, procfs.read_stat(p).state) for p in pids if not gone(p)]
    # Not killed: each got SIGTERM (PR_SET_PDEATHSIG) and ran its handler.
    assert sorted(e["pid"] for e in sup.events("sigterm")) == sorted(pids)


# -- readiness and systemd ---------------------------------------------------------------------


def test_systemd_protocol_ready_after_every_member_watchdog_and_stopping(supervise, tmp_path):
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(address)
        manager.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        manager.settimeout(10)
        sup = supervise("-n", "3", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000",
                                        "READY_DELAY": "0.3"})
        received: list[tuple[float, int, str]] = []  # (when, sender pid, datagram)

        def until(text: str) -> float:
            while True:
                data, cmsgs, _, _ = manager.recvmsg(4096, socket.CMSG_SPACE(12))
                pid = struct.unpack("iII", cmsgs[0][2])[0]
                received.append((time.monotonic(), pid, data.decode()))
                if text in data.decode().splitlines():
                    return received[-1][0]

        ready_at = until("READY=1")
        member_ready = [e["t"] for e in sup.events("ready")]
        assert len(member_ready) == 3 and ready_at >= max(member_ready)
        assert not any("READY=1" in d for _, _, d in received[:-1])
        pings = [until("WATCHDOG=1") for _ in range(10)]
        gaps = sorted(b - a for a, b in zip(pings, pings[1:]))
        assert 0.07 <= gaps[len(gaps) // 2] <= 0.2, gaps  # half of WATCHDOG_USEC
        sup.proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert sup.finish() == 0
    assert {pid for _, pid, _ in received} == {sup.proc.pid}  # NotifyAccess=main holds
    assert any(d.startswith("STATUS=3/3 members ready") for _, _, d in received)
    for start in sup.events("start"):  # the members speak to the supervisor, not to systemd
        env = start["env"]
        assert env["NOTIFY_SOCKET"] != address and "WATCHDOG_USEC" not in env
    assert len(sup.events("sigterm")) == 3


def test_ready_started_needs_no_notify(supervise):
    sup = supervise("-n", "2", "--ready", "started", "--ready-timeout", "0.5",
                    plan={0: "silent", 1: "silent"})
    sup.expect(r"all 2 member\(s\) ready", timeout=5)
    time.sleep(1.0)  # past --ready-timeout: it does not apply
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.finish() == 0
    assert not any("killing" in line or "exited" in line for line in sup.lines), sup.lines


def test_a_member_never_ready_is_killed_after_ready_timeout_and_counted(supervise):
    sup = supervise("-n", "1", "--ready-timeout", "0.5", "--restart-intensity", "1/30",
                    "--backoff", "0.05:0.1", plan={0: "silent"})
    sup.expect(r"slot 0 pid \d+ sent no READY=1 within 0.5 s; killing it")
    sup.expect(r"slot 0 gave up: 2 crashes within 30 s "
               r"\(last: killed by SIGKILL: no READY=1 within 0.5 s\)")
    assert sup.finish() == 1
    starts = sup.events("start")
    assert len(starts) == 2 and starts[1]["t"] - starts[0]["t"] >= 0.5
    assert not any("all 1 member(s) ready" in line for line in sup.lines)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args,says", [
    (["-n", "0", "--", "true"], "-n: '0' is not a whole number of at least 1"),
    (["-n", "two", "--", "true"], "-n: 'two'"),
    (["--restart-intensity", "5", "--", "true"], "--restart-intensity: '5' is not MAX/SECONDS"),
    (["--restart-intensity", "5/0", "--", "true"], "--restart-intensity SECONDS: '0'"),
    (["--restart-intensity=-1/10", "--", "true"], "--restart-intensity MAX: '-1'"),
    (["--backoff", "1", "--", "true"], "--backoff: '1' is not MIN:MAX"),
    (["--backoff", "2:1", "--", "true"], "--backoff: MIN 2 is more than MAX 1"),
    (["--backoff", "nan:1", "--", "true"], "--backoff MIN: 'nan'"),
    (["--ready-timeout", "0", "--", "true"], "--ready-timeout: '0'"),
    (["-n", "2"], "give the command to supervise after --"),
    (["-n", "2", "--"], "give the command to supervise after --"),
])
def test_usage_errors_are_one_line_and_status_2(args, says):
    done = subprocess.run([MCS, "supervise", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("mcs supervise: error: ") and says in line, line


def test_a_command_that_cannot_run_gives_up_at_once(tmp_path):
    missing = str(tmp_path / "no-such-program")
    started = time.monotonic()
    done = subprocess.run([MCS, "supervise", "-n", "1", "--", missing, "--flag"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"mcs supervise: slot 0 gave up: cannot execute {missing!r}: No such file or "
        "directory; not restarting it",
        "mcs supervise: every slot gave up; exiting with status 1"]
    assert time.monotonic() - started < 10  # no restart loop, no back-off


# -- the protocol module -------------------------------------------------------------------------


def test_sdnotify_without_a_manager_is_a_quiet_no_op(tmp_path):
    assert notify("READY=1", env={}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "missing")}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1"}) is False
    assert watchdog_interval({"WATCHDOG_USEC": "200000"}) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None and watchdog_interval({}) is None


def test_listener_names_the_sender_by_its_credentials(spawn):
    with NotifyListener() as listener:
        assert oct(os.stat(os.path.dirname(listener.address)).st_mode & 0o777) == "0o700"
        assert notify("READY=1\nSTATUS=a=b\nnonsense", env={"NOTIFY_SOCKET": listener.address})
        child = spawn("""
            import sys
            from mcs.sdnotify import notify
            print(notify("WATCHDOG=1", env={"NOTIFY_SOCKET": sys.argv[1]}), flush=True)
            sys.stdin.readline()
        """, listener.address)
        child.expect("True")
        mine, theirs = listener.receive()
        assert mine.pid == os.getpid() and mine.fields == {"READY": "1", "STATUS": "a=b"}
        assert theirs.pid == child.pid and theirs.fields == {"WATCHDOG": "1"}
        assert listener.receive() == []
        directory = os.path.dirname(listener.address)
    assert not os.path.exists(directory)
