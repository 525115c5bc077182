"""``mcs supervise``: run N members of any program and keep them running.

Erlang/OTP's restart budget and systemd's protocols, for one host. Each member (a *slot*,
0..N-1) is restarted after it crashes, with exponential back-off; a slot that crashes more
than ``max_restarts`` times within ``period`` seconds gives up (it is not restarted again) and
the others keep running; when no slot is left to run the supervisor exits, with status 1 if
any gave up. Members say they are ready with ``sd_notify`` (``READY=1``) on the socket the
supervisor gives them; the supervisor says READY=1 to *its* manager (systemd) once every
member is ready, and pings the manager's watchdog.

The supervisor is not a single point of failure for the members' cleanliness: every member is
started with ``PR_SET_PDEATHSIG`` = SIGTERM, so if the supervisor dies (even by SIGKILL) each
member is asked to stop and none is left orphaned. Bringing them back is the job of the
supervisor's own manager (systemd ``Restart=on-failure``): see docs/supervise.md.

Rules, in one place:

* back-off: the k-th consecutive crash of a slot waits ``min * 2**(k-1)`` seconds, at most
  ``max``; a run that lasted at least ``max`` seconds resets k (the next crash waits ``min``);
* intensity: a crash is counted at the moment the member exits; the slot gives up when more
  than ``max_restarts`` of its crashes fall within the last ``period`` seconds;
* a crash is an exit with a non-zero status or by a signal, a member killed for not being
  ready within ``ready_timeout``, and (with :attr:`RestartPolicy.ALWAYS`) any exit;
  a clean exit (status 0) under :attr:`RestartPolicy.ON_FAILURE` ends the slot: not restarted;
* a command that cannot be executed at all (no such file, not executable) gives its slot up at
  once: restarting it could only fail the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

from mcs.errors import SupervisorError
from mcs.sdnotify import NotifyListener, notify, watchdog_interval

__all__ = ["Supervisor", "RestartIntensity", "Backoff", "ReadyMode", "RestartPolicy",
           "SlotState", "SlotStatus", "describe_exit", "parse_count", "parse_seconds"]

# The environment a member gets (beside NOTIFY_SOCKET).
ENV_PID, ENV_SLOT, ENV_RESTARTS = "MCS_SUPERVISOR_PID", "MCS_SUPERVISOR_SLOT", "MCS_RESTARTS"
# The manager's watchdog is the supervisor's, never a member's.
_NOT_INHERITED = ("WATCHDOG_USEC", "WATCHDOG_PID", "NOTIFY_SOCKET")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def parse_seconds(text: str, what: str, *, zero: bool = False) -> float:
    """A finite number of seconds (positive, or also 0 when ``zero``) from ``text``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = "0 or more" if zero else "more than 0"
        raise SupervisorError(f"{what}: {text!r} is not a number of seconds ({bound})")
    return value


def parse_count(text: str, what: str, *, least: int = 1) -> int:
    """A whole number of at least ``least`` from ``text``."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise SupervisorError(f"{what}: {text!r} is not a whole number of at least {least}")
    return value


def _halves(text: str, sep: str, option: str, form: str) -> tuple[str, str]:
    """``text`` split at ``sep``; without one, an error saying the ``form`` expected."""
    first, found, second = text.partition(sep)
    if not found:
        raise SupervisorError(f"{option}: {text!r} is not {form}")
    return first, second


@dataclass(frozen=True)
class RestartIntensity:
    """At most ``max_restarts`` crashes of one slot within ``period`` seconds (OTP's
    intensity/period); one more and the slot gives up."""

    max_restarts: int
    period: float

    @classmethod
    def parse(cls, text: str) -> RestartIntensity:
        """``"MAX/SECONDS"``, e.g. ``"5/10"``."""
        count, period = _halves(text, "/", "--restart-intensity", "MAX/SECONDS (e.g. 5/10)")
        return cls(parse_count(count, "--restart-intensity MAX", least=0),
                   parse_seconds(period, "--restart-intensity SECONDS"))

    def exceeded(self, crashes: deque[float], now: float) -> bool:
        """Forget crashes older than the period; whether those left are too many."""
        while crashes and now - crashes[0] > self.period:
            crashes.popleft()
        return len(crashes) > self.max_restarts


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a slot: ``min`` doubled per consecutive crash, at most ``max``;
    a run of ``max`` seconds or more resets it."""

    min: float
    max: float

    @classmethod
    def parse(cls, text: str) -> Backoff:
        """``"MIN:MAX"`` in seconds, e.g. ``"0.1:10"``."""
        low, high = _halves(text, ":", "--backoff", "MIN:MAX in seconds (e.g. 0.1:10)")
        backoff = cls(parse_seconds(low, "--backoff MIN"), parse_seconds(high, "--backoff MAX"))
        if backoff.min > backoff.max:
            raise SupervisorError(f"--backoff: MIN {low} is more than MAX {high}")
        return backoff

    def delay(self, consecutive: int) -> float:
        """The wait after the ``consecutive``-th crash in a row (1, 2, ...)."""
        return min(self.max, self.min * 2.0 ** min(consecutive - 1, 64))


class ReadyMode(Enum):
    """When a member counts as ready."""

    NOTIFY = "notify"  # when it sends READY=1 on NOTIFY_SOCKET
    STARTED = "started"  # as soon as it is running (programs that do not speak sd_notify)


class RestartPolicy(Enum):
    """Which exits are restarted."""

    ON_FAILURE = "on-failure"  # crashes only: a clean exit (status 0) ends the slot
    ALWAYS = "always"  # every exit, clean or not (each counts against the intensity)


class SlotState(Enum):
    STARTING = "starting"  # running, not ready yet
    READY = "ready"
    BACKING_OFF = "backing-off"  # crashed; restarted when its delay is over
    GAVE_UP = "gave-up"  # crashed too often (or cannot be executed): never restarted
    STOPPED = "stopped"  # exited cleanly, or stopped by the supervisor


_FINISHED = (SlotState.GAVE_UP, SlotState.STOPPED)


def describe_exit(returncode: int) -> str:
    """``status 3`` or ``killed by SIGKILL`` from a :class:`subprocess.Popen` return code."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass(frozen=True)
class SlotStatus:
    """What :meth:`Supervisor.status` reports about one slot (plain data)."""

    slot: int
    state: SlotState
    pid: int | None
    restarts: int
    last_exit: str | None  # e.g. "killed by SIGKILL", None before the first exit
    status_text: str | None  # the member's last STATUS= message

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}


@dataclass(eq=False)
class _Slot:
    index: int
    state: SlotState = SlotState.STARTING
    proc: subprocess.Popen | None = None
    pidfd: int = -1
    started: float = 0.0
    deadline: float = math.inf  # ready timeout while STARTING, restart time while BACKING_OFF
    restarts: int = 0
    consecutive: int = 0
    crashes: deque[float] = field(default_factory=deque)
    last_exit: str | None = None
    status: str | None = None
    timed_out: bool = False


def _stay_with(supervisor: int) -> None:
    """In a new member, between fork and exec: SIGTERM when the supervisor's thread dies.

    SIGTERM/SIGINT go back to their default first: a Python handler inherited from the
    supervisor would swallow a death signal arriving before exec. The signal mask is emptied,
    as systemd gives its services: one inherited from whoever started the supervisor (a mask
    survives exec) would leave SIGTERM pending for good. If the supervisor died before the
    prctl, the member is already orphaned and must not start."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != supervisor:
        os._exit(1)


def _log_stderr(message: str) -> None:
    print(f"mcs supervise: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Runs ``members`` copies of ``command`` (an argv, or a function of the slot returning one)
    and keeps them running by the rules of this module; :meth:`run` returns the exit status.

    ``log`` receives one line per start, readiness, exit, restart and give-up (default: stderr,
    prefixed ``mcs supervise:``); ``on_ready`` is called once, with :meth:`status`, when every
    member is ready for the first time (when READY=1 goes to the supervisor's own manager).
    ``env`` is the members' base environment (default: ours); ``stdout`` their standard output
    (as for :class:`subprocess.Popen`; default: ours)."""

    def __init__(self, command: Sequence[str] | Callable[[int], Sequence[str]],
                 members: int = 1, *, intensity: RestartIntensity = RestartIntensity(5, 10.0),
                 backoff: Backoff = Backoff(0.1, 10.0), ready: ReadyMode = ReadyMode.NOTIFY,
                 ready_timeout: float = 30.0, stop_timeout: float = 10.0,
                 restart: RestartPolicy = RestartPolicy.ON_FAILURE,
                 env: Mapping[str, str] | None = None, stdout: int | IO[Any] | None = None,
                 log: Callable[[str], None] = _log_stderr,
                 on_ready: Callable[[list[SlotStatus]], None] | None = None) -> None:
        if not callable(command) and not command:
            raise SupervisorError("no command to supervise")
        if members < 1:
            raise SupervisorError(f"members: {members} is not a whole number of at least 1")
        self._command = command
        self._slots = [_Slot(i) for i in range(members)]
        self.intensity, self.backoff, self.ready, self.restart = intensity, backoff, ready, restart
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self._env = {k: v for k, v in (os.environ if env is None else env).items()
                     if k not in _NOT_INHERITED}
        self._stdout = stdout
        self._log = log
        self._on_ready = on_ready
        self._pid = os.getpid()
        self._ran = False
        self._announced = False
        self._manager_status = ""
        self._stop_requested = False
        self._stop_deadline: float | None = None  # set once stopping
        self._listener: NotifyListener | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wakeup_read = self._wakeup = -1
        watchdog = watchdog_interval()
        self._ping_every = None if watchdog is None else watchdog / 2
        self._next_ping = 0.0

    # -- public ---------------------------------------------------------------------------

    def status(self) -> list[SlotStatus]:
        """Per slot: state, pid (None when not running), restarts so far, last exit, STATUS."""
        return [SlotStatus(s.index, s.state, s.proc.pid if s.proc else None, s.restarts,
                           s.last_exit, s.status) for s in self._slots]

    def stop(self) -> None:
        """Ask :meth:`run` to stop every member and return 0 (what SIGTERM and SIGINT do)."""
        self._stop_requested = True
        if self._wakeup >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wakeup, b"\0")

    def run(self) -> int:
        """Supervise until stopped (0) or until no slot is left to run (1 if one gave up)."""
        if self._ran:
            raise SupervisorError("a Supervisor runs once")
        if threading.current_thread() is not threading.main_thread():
            # PR_SET_PDEATHSIG fires when the *thread* that forked the member ends.
            raise SupervisorError("a Supervisor must run in the main thread")
        self._ran = True
        with contextlib.ExitStack() as stack:
            self._selector = stack.enter_context(selectors.DefaultSelector())
            self._listener = stack.enter_context(NotifyListener(prefix="mcs-supervise-"))
            self._selector.register(self._listener, selectors.EVENT_READ)
            stack.enter_context(self._signals())
            stack.callback(self._kill_all)  # on an unexpected error: no member left behind
            for slot in self._slots:
                self._spawn(slot)
            self._tell_manager()
            code = None
            while code is None:
                code = self._step()
            return code

    # -- the loop -------------------------------------------------------------------------

    def _step(self) -> int | None:
        now = time.monotonic()
        if self._stop_requested and self._stop_deadline is None:
            self._begin_stop(now)
        code = self._finished()
        if code is not None:
            return code
        self._wait(now)
        self._receive()  # before reaping: a reaped sender's pid reads as 0
        now = time.monotonic()
        for slot in self._slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                self._exited(slot, now)
        self._timers(now)
        self._tell_manager()
        return None

    def _finished(self) -> int | None:
        if any(s.proc is not None or s.state is SlotState.BACKING_OFF for s in self._slots):
            return None
        if self._stop_deadline is not None:
            self._log("stopped")
            return 0
        gave_up = [s.index for s in self._slots if s.state is SlotState.GAVE_UP]
        if len(gave_up) == len(self._slots):
            self._log("every slot gave up; exiting with status 1")
        elif gave_up:
            self._log(f"no member left to run (slot(s) {', '.join(map(str, gave_up))} gave up); "
                      "exiting with status 1")
        else:
            self._log("every member exited cleanly; exiting")
        return 1 if gave_up else 0

    def _wait(self, now: float) -> None:
        assert self._selector is not None
        deadlines = [s.deadline for s in self._slots]
        if self._ping_every is not None:
            deadlines.append(self._next_ping)
        if self._stop_deadline is not None:
            deadlines.append(self._stop_deadline)
        soonest = min(deadlines)
        timeout = None if soonest == math.inf else max(0.0, soonest - now)
        for key, _ in self._selector.select(timeout):
            if key.fileobj == self._wakeup_read:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wakeup_read, 512):
                        pass

    def _timers(self, now: float) -> None:
        if self._ping_every is not None and now >= self._next_ping:
            notify("WATCHDOG=1")
            self._next_ping = now + self._ping_every
        if self._stop_deadline is not None:
            if now >= self._stop_deadline:
                self._stop_deadline = math.inf
                for slot in self._running():
                    self._log(f"slot {slot.index} pid {slot.proc.pid} did not stop within "
                              f"{self.stop_timeout:g} s; killing it")
                    slot.proc.kill()
            return
        for slot in self._slots:
            if now < slot.deadline:
                continue
            if slot.state is SlotState.BACKING_OFF:
                slot.restarts += 1
                self._spawn(slot)
            elif slot.state is SlotState.STARTING and slot.proc is not None:
                self._log(f"slot {slot.index} pid {slot.proc.pid} sent no READY=1 within "
                          f"{self.ready_timeout:g} s; killing it")
                slot.timed_out = True
                slot.deadline = math.inf
                slot.proc.kill()

    # -- members --------------------------------------------------------------------------

    def _argv(self, index: int) -> list[str]:
        command = self._command
        return list(command(index) if callable(command) else command)

    def _spawn(self, slot: _Slot) -> None:
        assert self._listener is not None and self._selector is not None
        argv = self._argv(slot.index)
        env = {**self._env, ENV_PID: str(self._pid), ENV_SLOT: str(slot.index),
               ENV_RESTARTS: str(slot.restarts), "NOTIFY_SOCKET": self._listener.address}
        try:
            proc = subprocess.Popen(argv, env=env, stdout=self._stdout,
                                    preexec_fn=lambda: _stay_with(self._pid))
        except OSError as exc:
            slot.state, slot.deadline, slot.proc = SlotState.GAVE_UP, math.inf, None
            slot.last_exit = f"cannot execute {argv[0]!r}: {exc.strerror}"
            self._log(f"slot {slot.index} gave up: {slot.last_exit}; not restarting it")
            return
        slot.proc, slot.status, slot.timed_out = proc, None, False
        slot.pidfd = os.pidfd_open(proc.pid)
        self._selector.register(slot.pidfd, selectors.EVENT_READ)
        slot.started = time.monotonic()
        again = f" (restart {slot.restarts})" if slot.restarts else ""
        self._log(f"slot {slot.index} pid {proc.pid} started{again}")
        if self.ready is ReadyMode.STARTED:
            self._became_ready(slot)
        else:
            slot.state, slot.deadline = SlotState.STARTING, slot.started + self.ready_timeout

    def _receive(self) -> None:
        assert self._listener is not None
        by_pid = {s.proc.pid: s for s in self._running()}
        for message in self._listener.receive():
            slot = by_pid.get(message.pid)
            if slot is None:
                continue  # only a member itself speaks for its slot (NotifyAccess=main)
            if "STATUS" in message.fields:
                slot.status = message.fields["STATUS"]
            if message.fields.get("READY") == "1" and slot.state is SlotState.STARTING:
                self._became_ready(slot)

    def _became_ready(self, slot: _Slot) -> None:
        assert slot.proc is not None
        slot.state, slot.deadline = SlotState.READY, math.inf
        if self.ready is ReadyMode.NOTIFY:
            said = f": {slot.status}" if slot.status else ""
            self._log(f"slot {slot.index} pid {slot.proc.pid} ready{said}")
        active = [s for s in self._slots if s.state not in _FINISHED]
        if self._announced or not all(s.state is SlotState.READY for s in active):
            return
        self._announced = True
        self._log(f"all {len(active)} member(s) ready")
        notify("READY=1")
        if self._on_ready is not None:
            self._on_ready(self.status())

    def _exited(self, slot: _Slot, now: float) -> None:
        assert slot.proc is not None and self._selector is not None
        pid, code = slot.proc.pid, slot.proc.returncode
        self._selector.unregister(slot.pidfd)
        os.close(slot.pidfd)
        slot.proc, slot.pidfd, slot.deadline = None, -1, math.inf
        how = describe_exit(code)
        if slot.timed_out:
            how += f": no READY=1 within {self.ready_timeout:g} s"
        slot.last_exit = how
        ran = now - slot.started
        if self._stop_deadline is not None:
            slot.state = SlotState.STOPPED
            self._log(f"slot {slot.index} pid {pid} stopped ({how})")
            return
        if code == 0 and not slot.timed_out and self.restart is RestartPolicy.ON_FAILURE:
            slot.state = SlotState.STOPPED
            self._log(f"slot {slot.index} pid {pid} exited ({how}) after {ran:.2f} s; "
                      "done, not restarting it")
            return
        slot.consecutive = 1 if ran >= self.backoff.max else slot.consecutive + 1
        slot.crashes.append(now)
        if self.intensity.exceeded(slot.crashes, now):
            slot.state = SlotState.GAVE_UP
            kind = "exits" if self.restart is RestartPolicy.ALWAYS else "crashes"
            self._log(f"slot {slot.index} gave up: {len(slot.crashes)} {kind} within "
                      f"{self.intensity.period:g} s (last: {how}); not restarting it")
            return
        delay = self.backoff.delay(slot.consecutive)
        slot.state, slot.deadline = SlotState.BACKING_OFF, now + delay
        self._log(f"slot {slot.index} pid {pid} exited ({how}) after {ran:.2f} s; "
                  f"restarting in {delay:.2f} s")

    def _running(self) -> list[_Slot]:
        return [s for s in self._slots if s.proc is not None]

    # -- stopping -------------------------------------------------------------------------

    def _begin_stop(self, now: float) -> None:
        notify("STOPPING=1")
        running = self._running()
        self._log(f"stopping: SIGTERM to {len(running)} member(s)")
        self._stop_deadline = now + self.stop_timeout
        for slot in self._slots:
            slot.deadline = math.inf
            if slot.proc is None and slot.state not in _FINISHED:
                slot.state = SlotState.STOPPED  # a pending restart is cancelled
        for slot in running:
            slot.proc.send_signal(signal.SIGTERM)

    def _kill_all(self) -> None:
        for slot in self._running():
            slot.proc.kill()
            slot.proc.wait()
            os.close(slot.pidfd)
            slot.proc, slot.pidfd = None, -1

    def _tell_manager(self) -> None:
        """STATUS= to our own manager (systemd), when it changes."""
        ready = sum(s.state is SlotState.READY for s in self._slots)
        gave_up = sum(s.state is SlotState.GAVE_UP for s in self._slots)
        line = f"{ready}/{len(self._slots)} members ready" + (
            f", {gave_up} gave up" if gave_up else "")
        if line != self._manager_status:
            self._manager_status = line
            notify(f"STATUS={line}")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT ask for a stop (unblocked, if whoever started us blocked them); a
        self-pipe wakes the loop (restored afterwards)."""
        assert self._selector is not None
        stops = {signal.SIGTERM, signal.SIGINT}
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        self._wakeup_read, self._wakeup = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(self._wakeup, False)
        previous_fd = signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)
        handler = lambda signum, frame: self.stop()  # noqa: E731
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._selector.register(self._wakeup_read, selectors.EVENT_READ)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            signal.set_wakeup_fd(previous_fd)
            self._selector.unregister(self._wakeup_read)
            os.close(self._wakeup_read)
            os.close(self._wakeup)
            self._wakeup = -1
