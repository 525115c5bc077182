"""Membership of a process at its RLIMIT_NOFILE: real member processes, one of which opens
descriptors until EMFILE (and keeps them) while others join and are killed with kill -9.

The domain's ``evict_after`` is 10 s, so only the life mutexes (about 1 ms) can report these
deaths within PROMPT: a member that missed a generation would see it only by heartbeat."""

from __future__ import annotations

import json
import signal

from conftest import wait_for

SLOW = {"heartbeat": 0.05, "suspect_after": 5.0, "evict_after": 10.0}
PROMPT = 3.0  # s: generous on a loaded machine, well under evict_after

MEMBER = """
import dataclasses, errno, json, os, resource, sys, threading
import membership, membership.member
if len(sys.argv) > 4:
    membership.member.RESERVE_FDS = int(sys.argv[4])
m = membership.join(sys.argv[1], node=sys.argv[2], **json.loads(sys.argv[3]))
lock = threading.Lock()
hoard = []

def say(obj):
    with lock:
        print(json.dumps(obj), flush=True)

def at_limit():
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        return exc.errno == errno.EMFILE
    return False

def report(view):
    say({"gen": view.generation, "pids": sorted(x.pid for x in view.members),
         "departed": sorted([x.pid, why] for x, why in view.departed)})

say({"pid": os.getpid()})
m.on_view_change(report)
report(m.view)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "exhaust":  # open descriptors until EMFILE, and keep them
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
        while True:
            try:
                hoard.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE, exc
                break
        say({"hoarded": len(hoard), "at_limit": at_limit()})
    elif cmd[0] == "release":
        for _ in range(int(cmd[1])):
            os.close(hoard.pop())
        say({"released": int(cmd[1])})
    elif cmd[0] == "stats":
        say({**dataclasses.asdict(m.stats), "at_limit": at_limit(),
             "view": sorted(x.pid for x in m.view.members)})
"""


class Member:
    """A member in a child process; ``views`` are the views its callbacks reported, in order."""

    def __init__(self, spawn, domain: str, node: str, *extra: str) -> None:
        self.child = spawn(MEMBER, domain, node, json.dumps(SLOW), *extra)
        self.pid = json.loads(self.child.readline())["pid"]
        self.views: list[dict] = []
        self.seen = 0

    def _read(self, timeout: float) -> dict:
        msg = json.loads(self.child.readline(timeout))
        if "gen" in msg:
            self.views.append(msg)
        return msg

    def reply(self, command: str, key: str) -> dict:
        """Send ``command``, return its answer (the one that has ``key``)."""
        self.child.send(command)
        while True:
            msg = self._read(PROMPT)
            if key in msg:
                return msg

    def wait_members(self, *members: "Member", timeout: float = PROMPT) -> dict:
        """The first view reported since the last match whose members are exactly ``members``;
        fails the test if none comes within ``timeout``."""
        pids = sorted(m.pid for m in members)
        while True:
            for i, view in enumerate(self.views[self.seen:], self.seen):
                if view["pids"] == pids:
                    self.seen = i + 1  # the next wait looks at later views only
                    return view
            self._read(timeout)

    def exhaust(self) -> None:
        reply = self.reply("exhaust", "hoarded")
        assert reply["hoarded"] > 0 and reply["at_limit"], reply

    def stats(self) -> dict:
        return self.reply("stats", "views_deferred")


def everyone_sees(members: list[Member]) -> None:
    for m in members:
        m.wait_members(*members, timeout=10.0)


def test_exhausted_member_reports_every_generation_and_watches_newcomers(domain, spawn):
    e = Member(spawn, domain, "e")
    a, b = Member(spawn, domain, "a"), Member(spawn, domain, "b")
    everyone_sees([e, a, b])
    e.exhaust()

    c = Member(spawn, domain, "c")  # a newcomer: e needs a pidfd for it, at EMFILE
    c.wait_members(e, a, b, c, timeout=10.0)
    e.wait_members(e, a, b, c)
    stats = e.stats()
    assert stats["at_limit"] and stats["reserve_spent"] >= 1, stats

    a.child.kill()
    assert e.wait_members(e, b, c)["departed"] == [[a.pid, "dead"]]
    b.child.kill()
    assert e.wait_members(e, c)["departed"] == [[b.pid, "dead"]]
    c.child.kill()  # e alone can see it: through the watcher it started at EMFILE
    assert e.wait_members(e)["departed"] == [[c.pid, "dead"]]

    assert e.stats()["views_deferred"] == 0
    gens = [v["gen"] for v in e.views]
    assert gens == sorted(set(gens)), f"generations repeated or out of order: {gens}"


def test_view_without_a_descriptor_is_retried_not_published(domain, spawn):
    e = Member(spawn, domain, "e", "1")  # a reserve of one descriptor
    e.exhaust()
    c1 = Member(spawn, domain, "c1")
    e.wait_members(e, c1)  # its pidfd came from the reserve
    c2 = Member(spawn, domain, "c2")
    c2.wait_members(e, c1, c2, timeout=10.0)
    assert wait_for(lambda: e.stats()["views_deferred"] >= 1, 10.0, interval=0.05)
    stats = e.stats()
    assert stats["view"] == sorted([e.pid, c1.pid]), "an unhandled view was made the local view"
    assert all(c2.pid not in v["pids"] for v in e.views), "an unhandled view reached callbacks"

    e.reply("release 1", "released")  # one descriptor free: the next monitor round handles it
    e.wait_members(e, c1, c2)
    c2.child.kill()
    assert e.wait_members(e, c1)["departed"] == [[c2.pid, "dead"]]


def test_node_peer_dying_check_needs_no_new_descriptor(domain, spawn):
    # a and b share a node name: when a dies, the survivor that publishes checks whether b is
    # dying too (to make a node's death one change). e is the only survivor able to (b is
    # stopped), and it is at EMFILE: it reads b's /proc/PID/stat through a descriptor it took
    # when b joined.
    e = Member(spawn, domain, "e")
    a, b = Member(spawn, domain, "pair"), Member(spawn, domain, "pair")
    everyone_sees([e, a, b])
    e.exhaust()
    b.child.signal(signal.SIGSTOP)
    a.child.kill()
    assert e.wait_members(e, b)["departed"] == [[a.pid, "dead"]]
    assert e.stats()["procfs_fallbacks"] == 0  # b's state was read, not guessed from a pidfd
