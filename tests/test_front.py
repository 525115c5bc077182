"""``mcs-webcache front``: the configurations it writes (pure functions of a FrontConfig), its
errors (one line, exit status 2), the engines' own verdict on what it writes (``haproxy -c``,
``nginx -t``), the readiness endpoint and identity headers of a host, and nginx really in front
of two hosts on loopback (consistent hashing, a host crash). HAProxy in front of three hosts in
network namespaces is tests/test_hosts.py."""

from __future__ import annotations

import collections
import http.client
import json
import os
from signal import SIGKILL
import subprocess
import sys
from pathlib import Path

import pytest

import hostlab
from conftest import wait_for
from webcache.front import (Address, Backend, FrontConfig, FrontError, engine_argv,
                            engine_binary, parse_address, parse_hosts, render_haproxy,
                            render_nginx)

MCS_WEBCACHE = str(Path(sys.executable).with_name("mcs-webcache"))
FAST = json.dumps({"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.4})
THREE = "h1=10.0.0.2:8080,h2=10.0.0.6:8080,h3=[fd00::2]:8080"


def front(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MCS_WEBCACHE, "front", *args], capture_output=True, text=True,
                          timeout=60)


def engine_or_skip(engine: str) -> str:
    try:
        return engine_binary(engine)
    except FrontError as exc:
        pytest.skip(str(exc))


def server_lines(text: str) -> dict[str, str]:
    return {line.split()[1]: line.strip() for line in text.splitlines()
            if line.strip().startswith("server ")}


def test_haproxy_consistent_hashing_checks_and_retries():
    cfg = FrontConfig(parse_hosts(THREE), listen=Address("127.0.0.1", 9000), fall=3, rise=4,
                      check_interval_ms=500, retries=3, stats_socket="/run/x.sock")
    text = render_haproxy(cfg)
    for line in ("balance uri", "hash-type consistent", "option httpchk GET /_mcs/ready",
                 "http-check expect status 200", "bind 127.0.0.1:9000", "retries 3",
                 "option redispatch 1", "stats socket /run/x.sock mode 600 level admin",
                 "default-server check inter 500ms fall 3 rise 4 weight 100 observe layer7 "
                 "error-limit 10 on-error mark-down"):
        assert f"\n    {line}\n" in text, line
    assert "retry-on conn-failure empty-response" in text
    servers = server_lines(text)
    assert list(servers) == ["h1", "h2", "h3"]
    assert servers["h3"].startswith("server h3 [fd00::2]:8080 id ")
    # A host's place on the ring (its id) comes from its address, not from its position:
    # reordering or removing hosts moves no other host's share.
    again = server_lines(render_haproxy(FrontConfig(parse_hosts(
        "h3=[fd00::2]:8080,h1=10.0.0.2:8080"))))
    assert again == {k: servers[k] for k in ("h3", "h1")}
    ids = [line.split(" id ")[1] for line in servers.values()]
    assert len(set(ids)) == 3


def test_haproxy_round_robin_to_compare():
    text = render_haproxy(FrontConfig(parse_hosts(THREE), balance="roundrobin"))
    assert "\n    balance roundrobin\n" in text
    assert "hash-type" not in text and "balance uri" not in text
    assert "stats socket" not in text


def test_nginx_consistent_hashing_passive_checks_and_next_upstream():
    cfg = FrontConfig(parse_hosts(THREE), listen=Address("0.0.0.0", 80), fall=3, rise=2,
                      check_interval_ms=1500, retries=1)
    text = render_nginx(cfg)
    assert "        hash $uri consistent;\n" in text
    assert "        server 10.0.0.6:8080 max_fails=3 fail_timeout=3s;  # h2\n" in text
    assert "        server [fd00::2]:8080 max_fails=3 fail_timeout=3s;  # h3\n" in text
    assert "listen 0.0.0.0:80;" in text
    assert "proxy_next_upstream error timeout invalid_header http_502 http_503 http_504;" in text
    assert "proxy_next_upstream_tries 2;" in text
    assert "hash " not in render_nginx(FrontConfig(cfg.hosts, balance="roundrobin"))


@pytest.mark.parametrize("text, error", [
    ("", "at least one HOST:PORT"),
    ("10.0.0.1", "is not HOST:PORT"),
    ("10.0.0.1:0", "not within 1..65535"),
    ("10.0.0.1:70000", "not within 1..65535"),
    ("a=10.0.0.1:80,a=10.0.0.2:80", "the name 'a' is given twice"),
    ("10.0.0.1:80,10.0.0.1:80", "10.0.0.1:80 is given twice"),
    ("bad name=10.0.0.1:80", "name 'bad name'"),
    ("-x-:80", "neither an IP address nor a host name"),
    ("[nope]:80", "neither an IP address nor a host name"),
    ("10.0.0.1:80,,10.0.0.2:80", "empty item"),
])
def test_bad_hosts_are_refused(text, error):
    with pytest.raises(FrontError, match=error):
        parse_hosts(text)


def test_addresses_and_default_names():
    hosts = parse_hosts(" cache-a.example.com:8080 , [::1]:81,10.1.2.3:82")
    assert [b.address for b in hosts] == [Address("cache-a.example.com", 8080),
                                          Address("::1", 81), Address("10.1.2.3", 82)]
    assert [b.name for b in hosts] == ["cache-a.example.com_8080", "1__81", "10.1.2.3_82"]
    assert str(parse_address("[::1]:81", "x")) == "[::1]:81"
    assert Backend("a", Address("10.1.2.3", 82)).haproxy_id == hosts[2].haproxy_id


@pytest.mark.parametrize("args, error", [
    (["--hosts", "x"], "--hosts: 'x' is not HOST:PORT"),
    (["--hosts", "a:1", "--listen", "nowhere"], "--listen: 'nowhere' is not HOST:PORT"),
    (["--hosts", "a:1", "--engine", "varnish"], "--engine must be one of haproxy, nginx"),
    (["--hosts", "a:1", "--balance", "random"], "--balance must be one of"),
    (["--hosts", "a:1", "--fall", "0"], "--fall must be within 1..100"),
    (["--hosts", "a:1", "--check-interval", "fast"], "--check-interval: 'fast' is not a whole"),
    (["--hosts", "a:1", "--engine", "nginx", "--stats-socket", "/x"], "--stats-socket is for"),
    (["--hosts", "a:1", "--out", "/nonexistent-dir/x.cfg"], "does not exist"),
])
def test_cli_errors_are_one_line_with_exit_status_2(args, error):
    r = front(*args)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("mcs-webcache front: error: ")
    assert error in r.stderr, r.stderr


def test_a_missing_engine_says_how_to_install_it():
    with pytest.raises(FrontError, match="apt-get install no-such-engine"):
        engine_binary("no-such-engine")


def test_cli_writes_to_stdout_or_to_a_file(tmp_path):
    r = front("--hosts", THREE)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == render_haproxy(FrontConfig(parse_hosts(THREE)))
    out = tmp_path / "nginx.conf"
    r = front("--hosts", THREE, "--engine", "nginx", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text() == render_nginx(FrontConfig(parse_hosts(THREE)))


@pytest.mark.parametrize("engine", ["haproxy", "nginx"])
@pytest.mark.parametrize("balance", ["consistent", "roundrobin"])
def test_the_engine_accepts_what_is_written(engine, balance, tmp_path):
    engine_or_skip(engine)
    r = front("--hosts", THREE, "--engine", engine, "--balance", balance, "--listen",
              "127.0.0.1:1", "--out", str(tmp_path / f"{engine}.conf"), "--check",
              *(["--stats-socket", str(tmp_path / "s.sock")] if engine == "haproxy" else []))
    assert r.returncode == 0, r.stdout + r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.conf").write_text("this is not a configuration\n")
    bad = subprocess.run(engine_argv(engine, engine_binary(engine), broken / "x.conf",
                                     check=True), capture_output=True)
    assert bad.returncode != 0  # the check can fail


def test_serve_refuses_a_bad_host_name(tmp_path):
    r = subprocess.run([MCS_WEBCACHE, "serve", "--root", str(tmp_path), "--port", "0",
                        "--host-name", "bad name"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("mcs-webcache: error: --host-name: 'bad name': use letters, "
                                "digits, '.', '_', '-' (at most 63, starting with a letter or "
                                "digit)")


@pytest.mark.slow
def test_nginx_in_front_of_two_hosts_on_loopback(tmp_path):
    """Two hosts (one node each) on 127.0.0.1 behind nginx: every URI has one host; the
    readiness and identity of a host; one host crashes: every request still 200, only its
    URIs move."""
    engine_or_skip("nginx")
    root = tmp_path / "site"
    root.mkdir()
    files = {f"/p{i:02d}.txt": f"page {i}\n".encode() * (i + 1) for i in range(60)}
    for path, data in files.items():
        (root / path[1:]).write_bytes(data)
    hosts: list[hostlab.Host] = []
    proxy = None
    try:
        for name in ("a", "b"):
            hosts.append(hostlab.Host(None, root, tmp_path, name=name, port=0,
                                      domain=f"front{os.getpid()}-{name}"))
        status, headers, body = hosts[0].get("/_mcs/ready")
        assert (status, body) == (200, b"ready\n")
        assert headers["X-Mcs-Host"] == "a" and headers["X-Mcs-Node"] == str(hosts[0].pids[0])
        assert hosts[0].status()["host"] == "a"
        for path in ("/p01.txt", "/p01.txt", "/nope"):  # a miss, a hit (fast path), a 404
            status, headers, _ = hosts[0].get(path)
            assert (status, headers["X-Mcs-Host"]) == (404 if path == "/nope" else 200, "a")
        assert hosts[0].status()["fast_path"]["served"] >= 1
        proxy = hostlab.Front(hosts, tmp_path, engine="nginx")

        owner = proxy.owners(files)
        assert proxy.owners(files) == owner
        assert set(collections.Counter(owner.values())) == {"a", "b"}
        hosts[1].crash()
        # nginx tries the next host (proxy_next_upstream): no request fails
        assert proxy.owners(files) == {uri: "a" for uri in files}
        assert hosts[1].gc().returncode == 0
    finally:
        codes = [proxy.stop()] if proxy is not None else []
        codes += [h.stop() for h in hosts]
        for h in hosts:
            h.gc()
    assert codes == [0, 0, 0], codes  # nginx exits 0 on SIGTERM
    assert not any(h.shm_left() for h in hosts)


@pytest.mark.slow
def test_a_host_is_ready_only_while_its_domain_is_stable(tmp_path):
    """/_mcs/ready (the front's health check) says 503 while the domain recovers, when
    /_mcs/status still says 200: a node restarted after kill -9 sleeps 2 s in its first
    recovery (a fault point armed through MCS_FAULTS_FILE, which only processes started after
    it was written read), and the survivor waits for it."""
    root = tmp_path / "site"
    root.mkdir()
    faults = tmp_path / "faults"
    faults.write_text("")
    host = hostlab.Host(None, root, tmp_path, name="r", port=0, nodes=2,
                        domain=f"ready{os.getpid()}", extra=("--timing", FAST),
                        env={"MCS_FAULTS_FILE": str(faults)})
    try:
        assert host.get("/_mcs/ready")[::2] == (200, b"ready\n")
        faults.write_text("recovery.contribute=sleep:2")
        victim = host.pids[1]
        os.kill(victim, SIGKILL)

        def rejoining() -> bool:  # the restarted node is a member, in its 2 s recovery
            try:
                doc = host.status()
            except (OSError, http.client.HTTPException):  # asked the node being killed
                return False
            pids = {m["pid"] for m in doc["members"]}
            return doc["recovering"] and len(pids) == 2 and victim not in pids

        assert wait_for(rejoining, 30, 0.01)  # /_mcs/status answers 200 meanwhile
        assert host.get("/_mcs/ready")[::2] == (503, b"not ready: its domain is recovering\n")
        assert wait_for(lambda: host.get("/_mcs/ready")[0] == 200, 30, 0.05)
        assert not host.status()["recovering"]
    finally:
        code = host.stop()
        host.gc()
    assert code == 0 and not host.shm_left()
