"""Bootstrap sections (/mcs.<domain>): creation race, header checks, and `mcs gc`."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import mcs
from mcs import layout
from mcs.bootstrap import Bootstrap

HOLD_LIFE_MUTEX = """
import sys, time
from mcs.bootstrap import Bootstrap
boot = Bootstrap.open(sys.argv[1])
life = boot.life_mutex(int(sys.argv[2]))
print(life.lock().name, flush=True)
time.sleep(600)
"""

TOTAL = layout.ROOT_SIZE + 64


def shm_file(domain: str) -> Path:
    return Path("/dev/shm") / f"mcs.{domain}"


def mcs_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mcs")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def write_object(domain: str, data: bytes, mode: int = 0o600) -> None:
    path = shm_file(domain)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def test_create_then_reopen(domain, spawn):
    with Bootstrap.open(domain) as boot:
        assert boot.created
        st = shm_file(domain).stat()
        assert st.st_mode & 0o777 == 0o600
        assert st.st_uid == os.geteuid()
        header = boot.section._header()
        assert header["magic"] == layout.ROOT_MAGIC
        assert header["version"] == layout.ROOT_VERSION
        assert header["uid"] == os.geteuid()
        assert header["size"] == layout.ROOT_SIZE
        nonce = header["nonce"]
        child = spawn(
            """
            import sys
            from mcs.bootstrap import Bootstrap
            b = Bootstrap.open(sys.argv[1], create=False)
            print(b.created, b.section._header()["nonce"], flush=True)
            """,
            domain,
        )
        assert child.readline() == f"False {nonce}"


def test_missing_domain_without_create(domain):
    with pytest.raises(mcs.BootstrapError, match="does not exist"):
        Bootstrap.open(domain, create=False)


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "x" * 64, "sp ace", "nul\x00",
                                  "é", None, 7])
def test_invalid_domain_names(name):
    with pytest.raises(ValueError, match="invalid domain name"):
        Bootstrap.open(name)


def test_concurrent_creators_agree(domain, spawn):
    code = """
    import sys
    from mcs.bootstrap import Bootstrap
    sys.stdin.readline()
    b = Bootstrap.open(sys.argv[1])
    print(b.created, b.section._header()["nonce"], flush=True)
    """
    children = [spawn(code, domain) for _ in range(6)]
    for child in children:
        child.send("go")
    answers = [child.readline().split() for child in children]
    assert sum(created == "True" for created, _ in answers) == 1
    assert len({nonce for _, nonce in answers}) == 1


def _valid_image(domain: str) -> bytearray:
    with Bootstrap.open(domain) as boot:
        image = bytearray(boot.section.view(0, layout.ROOT_SIZE))
        header = boot.section._header()
    os.unlink(shm_file(domain))
    head = struct.pack("<QQQQQIIQQ", header["magic"], header["nonce"], header["size"], 0,
                       header["created_ns"], header["version"], header["uid"], 0, 0)
    return bytearray(head) + image


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda img: img.__setitem__(slice(0, 8), b"NOTMCS!!"), "bad magic"),
        (lambda img: img.__setitem__(slice(40, 44), struct.pack("<I", 99)), "layout version 99"),
        (lambda img: img.__setitem__(slice(16, 24), struct.pack("<Q", 12)), "header size"),
        (lambda img: img.__setitem__(slice(44, 48), struct.pack("<I", 4242)), "uid 4242"),
        (lambda img: img.__setitem__(slice(0, 8), bytes(8)), "never initialised"),
        (lambda img: img.__delitem__(slice(1000, None)), "truncated"),
        (lambda img: img.extend(bytes(4096)), "wrong size"),
    ],
)
def test_bad_objects_are_refused_clearly(domain, mutate, message):
    image = _valid_image(domain)
    mutate(image)
    write_object(domain, bytes(image))
    with pytest.raises(mcs.BootstrapError, match=message):
        Bootstrap.open(domain, wait=0.05)
    with pytest.raises(mcs.BootstrapError):
        Bootstrap.open(domain, create=True, wait=0.05)  # never clobbered either
    assert shm_file(domain).stat().st_size == len(image)


def test_object_readable_by_others_is_refused(domain):
    write_object(domain, bytes(_valid_image(domain)), mode=0o644)
    with pytest.raises(mcs.BootstrapError, match="mode 0644"):
        Bootstrap.open(domain)


def test_gc_keeps_live_domain_and_removes_dead_one(domain, spawn):
    holder = spawn(HOLD_LIFE_MUTEX, domain, "3")
    holder.expect("OK")
    result = mcs_cli("gc", "--json")
    assert result.returncode == 0, result.stderr
    mine = [r for r in json.loads(result.stdout) if r["domain"] == domain]
    assert mine == [{"domain": domain, "component": None, "full_name": domain, "action": "kept",
                     "reason": "live: 1 member(s)"}]
    assert shm_file(domain).exists()

    holder.signal(signal.SIGSTOP)  # frozen still counts as live
    mine = [r for r in json.loads(mcs_cli("gc", "--json").stdout) if r["domain"] == domain]
    assert mine[0]["action"] == "kept"

    holder.kill()
    dry = mcs_cli("gc", "--dry-run")
    assert f"{domain}" in dry.stdout and "would remove" in dry.stdout
    assert shm_file(domain).exists()
    result = mcs_cli("gc")
    assert result.returncode == 0
    assert any(line.split()[:2] == [domain, "removed"] for line in result.stdout.splitlines())
    assert not shm_file(domain).exists()


def test_gc_keeps_foreign_objects(domain):
    write_object(domain, b"\x01" * TOTAL)
    result = mcs_cli("gc", "--json")
    mine = [r for r in json.loads(result.stdout) if r["domain"] == domain]
    assert mine[0]["action"] == "kept" and "bad magic" in mine[0]["reason"]
    assert shm_file(domain).exists()


def test_gc_removes_long_dead_half_initialised_object(domain):
    write_object(domain, bytes(TOTAL))
    os.utime(shm_file(domain), (0, 0))  # created long ago, never initialised
    mine = [r for r in json.loads(mcs_cli("gc", "--json").stdout) if r["domain"] == domain]
    assert mine[0]["action"] == "removed"
    assert not shm_file(domain).exists()


def test_opener_sees_retired_root(domain):
    with Bootstrap.open(domain) as first:
        with Bootstrap.open(domain) as second:
            mutex = second.root_mutex()
            assert mutex.lock() is mcs.LockStatus.OK
            assert second.live_slots() == []
            second.retire()
            mutex.unlock()
        assert first.removed
        assert not shm_file(domain).exists()


def test_probe_tells_live_dead_and_free(domain, spawn):
    with Bootstrap.open(domain) as boot:
        live = spawn(HOLD_LIFE_MUTEX, domain, "0")
        dead = spawn(HOLD_LIFE_MUTEX, domain, "1")
        live.expect("OK")
        dead.expect("OK")
        dead.kill()
        assert boot.probe_slot(0) == "live"
        assert boot.probe_slot(1) == "dead"
        assert boot.probe_slot(1) == "free"  # the probe repaired it
        assert boot.probe_slot(2) == "free"
        assert boot.live_slots() == [0]


def test_cli_usage_errors():
    result = mcs_cli()
    assert result.returncode == 2
    assert "usage" in result.stderr
    result = mcs_cli("frobnicate")
    assert result.returncode == 2
