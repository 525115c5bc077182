"""The systemd notification protocol (``sd_notify(3)``), both ends, without libsystemd.

A service tells its manager how it is doing by sending one datagram of ``KEY=VALUE`` lines
(``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``) to the AF_UNIX socket named in
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract name space). :func:`notify` is the
sending side (a no-op returning False when there is no manager), :func:`watchdog_interval` reads
the watchdog period the manager asked for, and :class:`NotifyListener` is the receiving side a
manager needs: ``mcs supervise`` gives one to its members, so a program written for systemd is
supervised by mcs without a change, and the kernel's credentials say which member spoke.
"""

from __future__ import annotations

import array
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from typing import Mapping

__all__ = ["notify", "watchdog_interval", "Notification", "NotifyListener"]

SEND_TIMEOUT = 1.0  # a manager that does not drain its socket must not hang the service
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_MAX_DATAGRAM = 4096
_MAX_FDS = 16  # descriptors a sender may attach (FDSTORE=1): received only to be closed


def _address(value: str) -> str | None:
    """NOTIFY_SOCKET's value as a socket address: a path, or ``@name`` -> abstract ``\\0name``."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not supported here


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``"READY=1"``, several lines allowed) to ``NOTIFY_SOCKET``.

    Returns whether it was sent: False when the variable is unset or unusable, or the socket is
    missing or full. Never raises for those, so a service calls it unconditionally."""
    address = _address((os.environ if env is None else env).get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog period in seconds the manager expects ``WATCHDOG=1`` within (from
    ``WATCHDOG_USEC``), or None when there is none or it is meant for another process
    (``WATCHDOG_PID`` set to another pid). Ping at half of it, as systemd advises."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = int(env.get("WATCHDOG_PID", os.getpid()))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 1e6


@dataclass(frozen=True)
class Notification:
    """One datagram received: the sender's pid (from the kernel, not from the message) and its
    ``KEY=VALUE`` fields (a key given twice keeps its last value)."""

    pid: int
    fields: dict[str, str]


def parse(data: bytes) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a datagram; lines without ``=`` are ignored."""
    fields = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


class NotifyListener:
    """A NOTIFY_SOCKET of our own: a datagram socket in a private (0700) temporary directory,
    with SO_PASSCRED so that every datagram arrives with its sender's pid.

    Non-blocking: select on :meth:`fileno`, then :meth:`receive` drains what is queued. Receive
    before reaping a sender that may have exited: the kernel reports a reaped sender as pid 0.
    ``close()`` is idempotent and removes the directory; a context manager."""

    def __init__(self, prefix: str = "mcs-notify-") -> None:
        self._dir: str | None = tempfile.mkdtemp(prefix=prefix)  # mode 0700
        self.path = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(self.path)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.setblocking(False)
        except OSError:
            self.close()
            raise

    @property
    def address(self) -> str:
        """What to put in a child's NOTIFY_SOCKET."""
        return self.path

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self) -> list[Notification]:
        """Every datagram queued now, oldest first (an empty list when none)."""
        out = []
        ancillary = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(_MAX_FDS * 4)
        while True:
            try:
                data, cmsgs, _flags, _addr = self._sock.recvmsg(_MAX_DATAGRAM, ancillary)
            except (BlockingIOError, InterruptedError):
                return out
            pid = 0
            for level, kind, payload in cmsgs:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack_from(payload)[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        os.close(fd)  # no descriptor store here: never leak what was passed
            out.append(Notification(pid, parse(data)))

    def close(self) -> None:
        self._sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
