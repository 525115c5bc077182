"""The operator tools take the names users see: the domain an application was started with
(`mcs-webcache --domain D` runs its cache in `D.webcache`), the full name, `--component`; an
unknown name is answered with the domains that exist. Real processes, the real `mcs` CLI."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mcs.bootstrap import Bootstrap
from mcs.component_record import ComponentRecord

from conftest import wait_for

EXAMPLES = str(Path(__file__).resolve().parent.parent / "examples")
FAST = {"heartbeat": 0.02, "suspect_after": 0.2, "evict_after": 0.6}

# Two components of one application domain in one process: the example registry and a counter.
APP = f"""
import json, os, sys
sys.path.insert(0, {EXAMPLES!r})
import mcs
from registry import Registry

class Counter(mcs.McsComponent):
    master_area_size = 64
    contribution_size = 64

timing = json.loads(sys.argv[2])
components = [Registry(sys.argv[1], **timing).start(), Counter(sys.argv[1], **timing).start()]
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
for c in components:
    c.stop()
print("stopped", flush=True)
"""


def mcs(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mcs")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def ok_json(*args: str):
    result = mcs(*args, "--json")
    assert result.returncode == 0, (args, result.stderr)
    return json.loads(result.stdout)


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one clean line a failing command prints (never a traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def app(domain, spawn):
    """Two processes running the registry and the counter of application domain ``domain``."""
    children = [spawn(APP, domain, json.dumps(FAST)) for _ in range(2)]
    pids = set()
    for child in children:
        word, pid = child.readline(30).split()
        assert word == "ready"
        pids.add(int(pid))
    yield pids, children
    for child in children:
        if child.proc.poll() is None:
            child.send("stop")
            child.expect("stopped", 30)
            assert child.wait() == 0


def members(status: dict) -> set[int]:
    return {m["pid"] for m in status["members"] if m["state"] == "member"}


def test_status_takes_the_started_name_the_full_name_and_a_component(domain, app):
    pids, _ = app
    both = ok_json("status", "--domain", domain)  # the application's name: each component
    assert sorted((s["domain"], s["component"], s["full_name"]) for s in both) == [
        (domain, "counter", f"{domain}.counter"), (domain, "registry", f"{domain}.registry")]
    assert all(members(s) == pids for s in both)

    text = mcs("status", "--domain", domain)
    assert text.returncode == 0, text.stderr
    for component in ("counter", "registry"):
        assert f"domain {domain}  component {component} ({domain}.{component})" in text.stdout
    assert all(str(pid) in text.stdout for pid in pids)

    for args in (("--domain", f"{domain}.registry"),  # the full name
                 ("--domain", domain, "--component", "registry"),
                 ("--domain", f"{domain}.registry", "--component", "registry")):
        one = ok_json("status", *args)  # one domain: one object, as before
        assert (one["domain"], one["component"], one["full_name"]) == (
            domain, "registry", f"{domain}.registry"), args
        assert members(one) == pids


def test_an_unknown_name_gets_the_list_of_existing_domains(domain, app):
    line = error_line(mcs("status", "--domain", f"{domain}-nope"), 1)
    assert f"domain '{domain}-nope' does not exist" in line
    assert f"{domain} (components: counter, registry)" in line  # what there is instead

    line = error_line(mcs("status", "--domain", domain, "--component", "nope"), 1)
    assert f"domain '{domain}' has no component 'nope' (it has: counter, registry)" in line
    line = error_line(mcs("gc", "--domain", f"{domain}-nope", "--dry-run"), 1)
    assert "does not exist" in line and f"{domain} (components: counter, registry)" in line
    line = error_line(mcs("fault", "poison", "--domain", f"{domain}-nope", "--component",
                          "registry", "--master"), 1)
    assert "does not exist" in line and f"{domain} (components: counter, registry)" in line
    line = error_line(mcs("status", "--domain", "bad/name"), 2)
    assert "invalid domain name" in line


def test_fault_poison_takes_the_same_names(domain, app):
    def failures() -> int:
        return ok_json("status", "--domain", domain, "--component", "registry")[
            "memory_failures"]

    def recovered() -> bool:  # poisoning triggers a recovery; the next poison waits for it
        with Bootstrap.open(f"{domain}.registry", create=False) as boot:
            record = ComponentRecord.read(boot.section)
            return record.stable == record.requested

    for n, name in enumerate((domain, f"{domain}.registry"), start=1):
        assert wait_for(recovered, 30)
        result = mcs("fault", "poison", "--domain", name, "--component", "registry", "--master")
        assert result.returncode == 0, (name, result.stderr)
        assert re.fullmatch(r"poisoned sysv:\d+:[0-9a-f]{16}\n", result.stdout)
        assert failures() == n  # the registry's domain, whichever name was given


def test_gc_takes_the_same_names(domain, app):
    pids, children = app
    kept = ok_json("gc", "--domain", domain)  # live: kept, each component named
    assert sorted((r["component"], r["action"]) for r in kept) == [
        ("counter", "kept"), ("registry", "kept")]
    assert all(r["domain"] == domain and r["full_name"] == f"{domain}.{r['component']}"
               for r in kept)
    for child in children:
        child.kill()  # kill -9: the domains' roots stay behind, with no live member
    [removed] = ok_json("gc", "--domain", f"{domain}.registry")  # the full name: that one only
    assert (removed["component"], removed["action"]) == ("registry", "removed")
    [removed] = ok_json("gc", "--domain", domain)  # what is left of the application
    assert (removed["component"], removed["action"]) == ("counter", "removed")
    line = error_line(mcs("gc", "--domain", domain), 1)
    assert f"domain '{domain}' does not exist" in line
    line = error_line(mcs("gc", "--component", "registry"), 2)
    assert "--component needs --domain" in line


@pytest.mark.slow
def test_status_works_with_the_name_the_launcher_printed(domain, tmp_path):
    (tmp_path / "index.html").write_text("hello\n")
    exe = str(Path(sys.executable).with_name("mcs-webcache"))
    launcher = subprocess.Popen(
        [exe, "serve", "--root", str(tmp_path), "--nodes", "2", "--port", "0", "--domain",
         domain, "--cache-size", "4M", "--timing", json.dumps(FAST)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        said = []
        while not said or not said[-1].startswith("{"):
            line = launcher.stdout.readline()
            assert line, f"launcher exited ({launcher.wait()}): {said}"
            said.append(line)
        info = json.loads(said[-1])
        printed = re.search(r"\(domain (\S+), cache domain (\S+):", "".join(said[:-1]))
        assert printed, said
        assert printed.groups() == (domain, f"{domain}.webcache")  # the real name, shown
        assert info["cache_domain"] == f"{domain}.webcache"
        for name in printed.groups():
            assert wait_for(lambda: members(ok_json("status", "--domain", name)) == set(
                info["pids"]), 30, interval=0.2), name
            status = ok_json("status", "--domain", name)
            assert (status["domain"], status["component"]) == (domain, "webcache")
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            assert launcher.wait(30) == 0
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
            launcher.stdout.close()


def test_the_closest_domains_are_named_first_among_many():
    """With more domains than the message lists, the one a typo was aiming at is still named."""
    from mcs.names import LISTED_MAX, describe_domains
    others = [f"aaa-other-{i:02d}.worker" for i in range(LISTED_MAX + 10)]
    line = describe_domains(others + ["shop.registry", "shop.counter"], "shopp")
    assert line.startswith("domains on this host: shop (components: registry, counter)")
    assert line.endswith(f"and {len(others) + 1 - LISTED_MAX} more")
    assert describe_domains(others, "").startswith("domains on this host: aaa-other-00 ")
