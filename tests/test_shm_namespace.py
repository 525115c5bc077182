"""The shared /dev/shm name space: names squatted by another (real, unprivileged) user, symlinks,
directories and FIFOs named mcs.*, hard links, a full tmpfs (a real small tmpfs mount), a
bootstrap name unlinked under a running domain (systemd RemoveIPC=yes), and the CLIs' answers to
bad input: one clear line, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import membership
from mcs.bootstrap import Bootstrap
from mcs.component_record import component_domain
from mcs.shmname import owner_name
from mcs.errors import (BootstrapError, DomainNotFoundError, DomainUnlinkedError,
                        ForeignObjectError, ShmFullError)

FAST = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.3}
BIN = Path(sys.executable).parent

MEMBER = """
import sys
import membership
m = membership.join(sys.argv[1], heartbeat=0.02, suspect_after=0.1, evict_after=0.3)
print("joined", m.slot, flush=True)
sys.stdin.readline()
m.leave()
print("left", flush=True)
"""

JOIN_ONCE = """
import sys
import membership
from mcs.errors import BootstrapError
try:
    m = membership.join(sys.argv[1])
except BootstrapError as exc:
    print(type(exc).__name__, exc, flush=True)
    sys.exit(1)
print("joined", flush=True)
m.leave()
"""


def shm_file(domain: str) -> Path:
    return Path("/dev/shm") / f"mcs.{domain}"


def cli(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True,
                          timeout=timeout)


def one_clean_line(result: subprocess.CompletedProcess) -> str:
    """The CLI failed with exactly one line on stderr and no traceback; returns that line."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def gc_entry(domain: str) -> dict:
    """What `mcs gc` reports for ``domain`` (a dry run: other tests' dead domains are theirs)."""
    result = cli("mcs", "gc", "--dry-run", "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    [entry] = [r for r in json.loads(result.stdout) if r["domain"] == domain]
    return entry


# -- another user squats a name ----------------------------------------------------------------


@pytest.fixture
def other_user() -> Iterator[tuple[str, int]]:
    """A real unprivileged user (name, uid), created for this test and deleted after it."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("needs root with useradd and runuser to create an unprivileged user")
    name = f"mcsq{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a user: {made.stderr.strip()}")
    try:
        import pwd
        yield name, pwd.getpwnam(name).pw_uid
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_user(user: str, *argv: str) -> None:
    subprocess.run(["runuser", "-u", user, "--", *argv], check=True, timeout=30)


def test_a_name_squatted_by_another_user_is_refused_naming_the_owner(domain, other_user, tmp_path):
    user, uid = other_user
    squat = shm_file(domain)
    as_user(user, "touch", str(squat))  # what any user can do, before our server starts
    try:
        assert squat.stat().st_uid == uid
        with pytest.raises(ForeignObjectError) as err:
            membership.join(domain, **FAST)
        message = str(err.value)
        assert f"{user} (uid {uid})" in message and str(squat) in message
        assert "remove it" in message and "another domain name" in message

        status = cli("mcs", "status", "--domain", domain)
        assert status.returncode == 1 and f"{user} (uid {uid})" in one_clean_line(status)
        entry = gc_entry(domain)
        assert entry["action"] == "skipped" and f"{user} (uid {uid})" in entry["reason"]
        assert squat.exists() and squat.stat().st_size == 0  # never opened, written or removed
    finally:
        squat.unlink()

    cache_name = shm_file(component_domain(domain, "webcache"))
    as_user(user, "touch", str(cache_name))
    try:
        served = cli("mcs-webcache", "serve", "--root", str(tmp_path), "--port", "0",
                     "--domain", domain)
        assert served.returncode == 2 and f"{user} (uid {uid})" in one_clean_line(served)
    finally:
        cache_name.unlink()


def python_for(user: str) -> tuple[str, dict] | None:
    """An interpreter ``user`` may run that imports the installed mcs (this one, or the system
    Python of the same version pointed at our site-packages), with its environment."""
    import mcs
    site = str(Path(mcs.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=site)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin")):
        if exe and subprocess.run(["runuser", "-u", user, "--", exe, "-P", "-c",
                                   "import membership"], capture_output=True, env=env,
                                  cwd="/").returncode == 0:
            return exe, env
    return None


def test_an_unprivileged_joiner_is_told_who_holds_its_name(domain, other_user):
    user, _ = other_user
    found = python_for(user)
    if found is None:
        pytest.skip(f"no Python that user {user} may run can import the installed mcs")
    exe, env = found
    shm_file(domain).touch(mode=0o644)  # squatted by root this time
    try:
        result = subprocess.run(["runuser", "-u", user, "--", exe, "-P", "-c", JOIN_ONCE,
                                 domain], capture_output=True, text=True, timeout=60, env=env,
                                cwd="/")
        assert result.returncode == 1, result.stderr
        assert result.stdout.startswith("ForeignObjectError")
        assert owner_name(os.geteuid()) in result.stdout
    finally:
        shm_file(domain).unlink()


# -- names that are not regular files ------------------------------------------------------------


def _symlink(path: Path, tmp: Path) -> str:
    target = tmp / "victim"
    target.write_bytes(b"precious")
    path.symlink_to(target)
    return f"symbolic link (-> {target})"


def _directory(path: Path, tmp: Path) -> str:
    path.mkdir()
    return "directory"


def _fifo(path: Path, tmp: Path) -> str:
    os.mkfifo(path)
    return "FIFO"


def _socket(path: Path, tmp: Path) -> str:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return "socket"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()


@pytest.mark.parametrize("make", [_symlink, _directory, _fifo, _socket])
def test_non_regular_names_are_reported_never_followed(domain, make, tmp_path):
    path = shm_file(domain)
    kind = make(path, tmp_path)
    try:
        for create in (True, False):
            with pytest.raises(ForeignObjectError) as err:
                Bootstrap.open(domain, create=create, wait=0.05)
            assert f"{path} is a {kind} owned by {owner_name(os.geteuid())}" in str(err.value)
        with pytest.raises(ForeignObjectError, match=kind.split()[0]):
            membership.join(domain, **FAST)

        status = cli("mcs", "status", "--domain", domain)
        assert status.returncode == 1 and kind in one_clean_line(status)
        entry = gc_entry(domain)
        assert entry["action"] == "skipped" and kind in entry["reason"], entry
        assert path.is_symlink() or path.exists()  # left alone
        if make is _symlink:
            assert (tmp_path / "victim").read_bytes() == b"precious"
    finally:
        _remove(path)


def test_a_hard_link_to_another_domains_root_is_refused(domain):
    other = f"{domain}-linked"
    with Bootstrap.open(domain):
        os.link(shm_file(domain), shm_file(other))
        try:
            with pytest.raises(BootstrapError, match="2 hard links"):
                Bootstrap.open(other)
        finally:
            shm_file(other).unlink()


# -- a full tmpfs ------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, mounted for this test (mcs pointed at it with MCS_SHM_DIR)."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=1777", "tmpfs",
                              str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(directory: Path, leave: int) -> None:
    """Fill the file system of ``directory`` up to ``leave`` free bytes."""
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize
    with open(directory / "filler", "wb") as f:
        f.write(b"\xff" * (free - leave))
    vfs = os.statvfs(directory)
    assert vfs.f_bavail * vfs.f_frsize <= leave + 4096


def test_a_full_tmpfs_is_a_clean_error_and_leaves_nothing(domain, small_tmpfs, monkeypatch,
                                                          spawn):
    fill(small_tmpfs, leave=32 * 1024)  # room to create the name, not to hold the root
    monkeypatch.setenv("MCS_SHM_DIR", str(small_tmpfs))
    with pytest.raises(ShmFullError) as err:
        membership.join(domain, **FAST)
    assert f"{small_tmpfs} is full" in str(err.value) and "65600-byte" in str(err.value)
    assert sorted(os.listdir(small_tmpfs)) == ["filler"]  # nothing half-made left behind

    # a whole process (a restarted node): a clean error, not SIGBUS
    child = spawn(JOIN_ONCE, domain)
    line = child.readline()
    assert child.wait() == 1 and line.startswith("ShmFullError"), line
    assert sorted(os.listdir(small_tmpfs)) == ["filler"]

    (small_tmpfs / "filler").unlink()  # space again: the domain starts normally there
    with membership.join(domain, **FAST):
        assert (small_tmpfs / f"mcs.{domain}").exists()
    assert os.listdir(small_tmpfs) == []


# -- the bootstrap name unlinked while the domain runs ---------------------------------------


def test_a_joiner_refuses_to_start_a_second_domain_when_the_name_was_unlinked(domain, spawn,
                                                                              tmp_path):
    name = component_domain(domain, "webcache")  # the domain a cache started with --domain <domain> runs
    members = [spawn(MEMBER, name) for _ in range(2)]
    for m in members:
        assert m.readline().startswith("joined")
    os.unlink(shm_file(name))  # what systemd RemoveIPC=yes does under a running service

    with pytest.raises(DomainUnlinkedError) as err:
        membership.join(name, **FAST)
    message = str(err.value)
    assert "was unlinked" in message and "RemoveIPC" in message
    assert all(str(m.pid) in message for m in members)
    assert not shm_file(name).exists()  # no second root

    restarted = spawn(JOIN_ONCE, name)  # a node restarted by its supervisor
    line = restarted.readline()
    assert restarted.wait() == 1 and line.startswith("DomainUnlinkedError"), line
    status = cli("mcs", "status", "--domain", name)
    assert status.returncode == 1 and "was unlinked" in one_clean_line(status)
    served = cli("mcs-webcache", "serve", "--root", str(tmp_path), "--port", "0",
                 "--domain", domain)
    assert served.returncode == 2 and "was unlinked" in one_clean_line(served)
    assert not shm_file(name).exists()

    for m in members:  # once the old domain is gone, the name can start a new one
        m.send("leave")
        m.expect("left")
        assert m.wait() == 0
    with membership.join(name, **FAST) as me:
        assert [x.pid for x in me.view.members] == [os.getpid()]


# -- bad input to the CLIs ----------------------------------------------------------------------


def test_fault_poison_and_status_answer_bad_input_in_one_line(domain):
    with Bootstrap.open(f"{domain}.registry"):  # an existing component domain
        cases = [
            (("fault", "poison", "--domain", "bad/x", "--component", "registry", "--master"),
             2, "invalid domain name"),
            (("fault", "poison", "--domain", domain, "--component", "no such", "--master"),
             2, "invalid component name"),
            (("fault", "poison", "--domain", domain, "--component", "registry", "--slot", "999"),
             2, "--slot 999 is out of range: member slots are 0..63"),
            (("fault", "poison", "--domain", domain, "--component", "registry", "--slot", "-1"),
             2, "out of range"),
            (("fault", "poison", "--domain", "x" * 60, "--component", "registry", "--master"),
             2, "at most 54"),
            (("fault", "poison", "--domain", domain, "--component", "nosuch", "--master"),
             1, f"domain {domain!r} has no component 'nosuch' (it has: registry)"),
            (("fault", "poison", "--domain", f"{domain}-x", "--component", "registry",
              "--master"), 1, "does not exist"),
            (("status", "--domain", "bad/x"), 2, "invalid domain name"),
            (("status", "--domain", f"{domain}-x"), 1, "does not exist"),
            (("status", "--domain", domain, "--watch", "--interval", "-1"), 2, "--interval"),
        ]
        for args, code, text in cases:
            result = cli("mcs", *args)
            line = one_clean_line(result)
            assert result.returncode == code and text in line, (args, result.stderr)


def test_webcache_refuses_a_domain_too_long_for_its_cache_up_front(tmp_path):
    for length in (55, 63):
        result = cli("mcs-webcache", "serve", "--root", str(tmp_path), "--port", "0",
                     "--domain", "d" * length, timeout=60)
        line = one_clean_line(result)
        assert result.returncode == 2 and "at most 54" in line, result.stderr
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("mcs." + "d" * 55)]


def test_missing_domain_is_its_own_error(domain):
    with pytest.raises(DomainNotFoundError, match="does not exist"):
        Bootstrap.open(domain, create=False)
