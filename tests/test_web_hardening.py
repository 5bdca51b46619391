"""What an attacker on another web page or on the network can do to the daemon's server: refused, bounded, answered.

Issue 13, points 5 (cross-site requests, DNS rebinding) and 6 (HTTP robustness).  Each daemon listens on
127.0.0.1 with an idle timeout of IDLE_S (LIVESTACK_WEB_IDLE_S), so that idle sockets close within the test.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import Daemon
from test_web import TOKEN

IDLE_S = 2.0
MAX_CONNECTIONS = 256          # livestack.web.app.MAX_CONNECTIONS
MAX_PER_CLIENT = 32            # [web] max_per_client


def feed(d: Daemon, files) -> None:
    """The frames written into the daemon's capture folder, and their lines in frames.jsonl waited for."""
    for f in files:
        (d.watch / f.name).write_bytes(f.read_bytes())
    d.wait_lines(len(files))


def start_daemon(root, *extra: str, idle_s: float = IDLE_S) -> Daemon:
    (root / "watch").mkdir()
    d = Daemon(root, root / "watch", root / "out", *extra)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIVESTACK_WEB_IDLE_S", str(idle_s))
        d.start()
    d.port = urlsplit(d.url).port
    wait_ok(d)
    return d


@pytest.fixture(scope="module")
def open_web(tmp_path_factory):
    """No token: the default on 127.0.0.1, where only the Host/Origin/Content-Type checks stand."""
    d = start_daemon(tmp_path_factory.mktemp("web-open"))
    yield d
    assert d.stop() == 0
    assert "Traceback" not in d.log.read_text(), d.log.read_text()


@pytest.fixture(scope="module")
def token_web(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("web-token"), "--token", TOKEN)
    yield d
    assert d.stop() == 0


def request(d: Daemon, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 10) -> tuple[int, bytes]:
    """One request with exactly these headers (a "Host" given here replaces the real one)."""
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_ok(d: Daemon, timeout: float = 10) -> None:
    """The daemon answers /api/status with 200 within ``timeout`` — a connection reset meanwhile (the last of a
    flood's connections still counted against the cap) is waited out like any other answer."""
    end = time.monotonic() + timeout
    while True:
        try:
            if request(d, "GET", "/api/status")[0] == 200:
                return
        except (ConnectionResetError, ConnectionRefusedError):
            pass
        assert time.monotonic() < end, d.log.read_text()
        time.sleep(0.05)


def paused(d: Daemon) -> bool:
    return json.loads(request(d, "GET", "/api/status")[1])["paused"]


def raw(d: Daemon, data: bytes, timeout: float = 5) -> bytes:
    """Send bytes, read the answer until the server closes or `timeout`."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            pass
        return got


def proc_status(d: Daemon, key: str) -> int:
    """A number from /proc/<daemon>/status (VmRSS, VmHWM in kB; Threads)."""
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------------- point 5

def test_a_sandboxed_frame_cannot_post(open_web):
    """Any page can send Origin: null with a text/plain body (sandboxed iframe): no preflight, so refuse."""
    st, body = request(open_web, "POST", "/api/pause", b'{"x": 1}',
                       {"Origin": "null", "Content-Type": "text/plain;charset=UTF-8"})
    assert st == 403 and "Origin null" in json.loads(body)["error"]
    st, body = request(open_web, "POST", "/api/exclude", b'{"file": "a.dng"}', {"Origin": "null",
                                                                               "Content-Type": "application/json"})
    assert st == 403
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        st, body = request(open_web, "POST", "/api/pause", b'{"file": "a"}', {"Content-Type": ctype})
        assert st == 415 and "application/json" in json.loads(body)["error"], ctype
    st, _ = request(open_web, "POST", "/api/pause", b'{}')          # a body without any Content-Type
    assert st == 415
    assert paused(open_web) is False


@pytest.mark.parametrize("method,path", [("POST", "/api/pause"), ("GET", "/api/status"), ("GET", "/"),
                                         ("GET", "/api/frames"), ("GET", "/api/events"),
                                         ("GET", "/api/files/frames.jsonl")])
def test_dns_rebinding_is_refused(open_web, method, path):
    """evil.example resolving to 127.0.0.1: Host and Origin are both the attacker's name, reads included."""
    evil = f"evil.example:{open_web.port}"
    headers = {"Host": evil, "Origin": f"http://{evil}", "Content-Type": "application/json"}
    st, body = request(open_web, method, path, b"{}" if method == "POST" else None, headers)
    assert st in (403, 421) and "Host" in json.loads(body)["error"]
    assert paused(open_web) is False


def test_this_servers_names_and_own_page_still_work(open_web):
    port = open_web.port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", f"LOCALHOST.:{port}"):
        assert request(open_web, "GET", "/api/status", headers={"Host": host})[0] == 200, host
    for host in (f"192.168.1.20:{port}", f"raspberrypi.local:{port}", f"localhost.evil.example:{port}",
                 f"evil.example@127.0.0.1:{port}", ""):
        assert request(open_web, "GET", "/api/status", headers={"Host": host})[0] in (400, 403, 421), host
    # the page's own fetch: same origin, JSON
    own = {"Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json"}
    st, body = request(open_web, "POST", "/api/pause", b"{}", own)
    assert st == 200 and json.loads(body)["paused"] is True
    st, _ = request(open_web, "POST", "/api/resume", b"{}", {"Origin": f"http://localhost:{port}",
                                                            "Host": f"localhost:{port}",
                                                            "Content-Type": "application/json; charset=utf-8"})
    assert st == 200
    st, _ = request(open_web, "POST", "/api/pause", b"{}", {**own, "Origin": f"http://localhost:{port}"})
    assert st == 403                                   # Origin names another host than Host
    # curl -X POST localhost:PORT/api/pause: no Origin, no body
    assert request(open_web, "POST", "/api/pause", headers={"Host": f"localhost:{port}"})[0] == 200
    assert request(open_web, "POST", "/api/resume")[0] == 200
    assert paused(open_web) is False


def test_with_a_token_a_request_without_it_is_still_401(token_web):
    own = {"Origin": f"http://127.0.0.1:{token_web.port}", "Content-Type": "application/json"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    st, body = request(token_web, "POST", "/api/pause", b"{}", own)
    assert st == 401 and "token" in json.loads(body)["error"]
    assert request(token_web, "POST", "/api/pause")[0] == 401
    # the token (e.g. kept by a script on a shared machine) does not make a cross-site request acceptable
    assert request(token_web, "POST", "/api/pause", b"{}", {**own, **auth, "Origin": "null"})[0] == 403
    assert request(token_web, "POST", "/api/pause", b"{}", {**auth, "Content-Type": "text/plain"})[0] == 415
    st, _ = request(token_web, "POST", "/api/pause", b"{}", {**own, **auth})
    assert st == 200
    st, _ = request(token_web, "POST", "/api/resume", headers={"X-Livestack-Token": TOKEN})
    assert st == 200
    assert request(token_web, "POST", "/api/pause", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
    assert request(token_web, "POST", "/api/resume", headers={"X-Livestack-Token": TOKEN})[0] == 200


def test_a_token_header_that_is_not_utf8_is_403_not_500(token_web):
    for header in (b"Authorization: Bearer \xff\xfe", b"X-Livestack-Token: sekret\xe9"):
        got = raw(token_web, b"POST /api/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header
                  + b"\r\nConnection: close\r\n\r\n")
        assert got.split(b"\r\n", 1)[0].split()[1:2] == [b"403"], got[:300]
    assert "Traceback" not in token_web.log.read_text()


def test_what_json_and_headers_can_hold_is_a_4xx_not_a_500(open_web):
    """A review's finds: each was a 500 and a traceback in the journal, from anyone who reaches the port."""
    js = {"Content-Type": "application/json"}
    big = "1" + "0" * 400                                     # an int no float holds
    for path, body in [("/api/stretch", f'{{"black": {big}}}'), ("/api/stretch", f'{{"midtones": -{big}}}'),
                       ("/api/palette", f'{{"weights": {{"a": {big}}}}}'),
                       ("/api/palette", f'{{"hues": {{"a": [{big}, 0, 0]}}}}'),
                       ("/api/pause", "[" * 30000 + "]" * 30000), ("/api/stretch", '{"a":' * 10000 + "1" + "}" * 10000)]:
        st, answer = request(open_web, "POST", path, body.encode(), js)
        assert st == 400 and json.loads(answer)["error"], (path, body[:40], st, answer[:200])
    st, _ = request(open_web, "POST", "/api/pause", b"{}", {**js, "Origin": "http://[::1"})   # not a URL
    assert st == 403
    for path in ("/api/files/stack.fits", "/static/app.js", "/api/targets/1/preview.jpg"):    # read-only trees
        conn = http.client.HTTPConnection("127.0.0.1", open_web.port, timeout=10)
        try:
            conn.request("POST", path, b"{}", js)
            r = conn.getresponse()
            assert (r.status, r.getheader("Allow")) == (405, "GET"), (path, r.status)
        finally:
            conn.close()
    assert paused(open_web) is False
    assert "Traceback" not in open_web.log.read_text()


def test_which_host_names_are_this_servers():
    """A Pi listening on all addresses is reached by IP, <hostname>, <hostname>.local or a configured name;
    on loopback only by loopback names.  A name resolving here is not enough (DNS rebinding)."""
    from livestack.web.app import Hosts

    hn = socket.gethostname().split(".")[0].lower()
    lan = Hosts.for_server("0.0.0.0", ["astro.example.org"])
    for ok in ("192.168.1.20:8080", "[fe80::1]:8080", f"{hn}:8080", f"{hn}.local:8080", f"{hn.upper()}.LOCAL.",
               "astro.example.org", "localhost:8080", "127.0.0.1"):
        assert lan.allows(ok), ok
    for bad in ("evil.example:8080", f"{hn}.evil.example", "astro.example.org.evil", "", "a b", "x@192.168.1.20"):
        assert not lan.allows(bad), bad
    lo = Hosts.for_server("127.0.0.1")
    assert lo.allows("localhost:8080") and lo.allows("[::1]:8080") and lo.allows("127.0.0.1:8080")
    assert not lo.allows("192.168.1.20:8080") and not lo.allows(f"{hn}.local:8080")
    assert Hosts.for_server("127.0.0.1", ["*"]).allows("anything.example")


# ---------------------------------------------------------------------------------------------------- point 6

@pytest.mark.parametrize("length", ["-1", "abc", "-5", "1e3", ""])
def test_bad_content_length_is_400_at_once(open_web, length):
    t0 = time.monotonic()
    got = raw(open_web, f"POST /api/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {length}\r\n\r\n{{}}".encode())
    assert got.split(b"\r\n", 1)[0].split()[1:2] == [b"400"], got[:200]
    assert time.monotonic() - t0 < 2
    assert paused(open_web) is False


def _stream_at(d: Daemon, head: bytes, total: int, chunk: bytes) -> int:
    """Send `head` then up to `total` bytes of body; the bytes the server took before it closed."""
    sent = 0
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        try:
            s.sendall(head)
            while sent < total:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:               # the server refused and closed: what we wanted
            pass
    return sent


def test_streaming_a_huge_body_does_not_grow_memory(open_web):
    """Content-Length -1 used to read until the client closed; an honest 128 MB length or a chunked stream
    must not be buffered either.  The peak RSS (VmHWM) of the daemon stays put."""
    mb = 128
    chunk = b"x" * (1 << 20)
    hwm0 = proc_status(open_web, "VmHWM")
    post = b"POST /api/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for length in (b"-1", b"%d" % (mb << 20)):
        _stream_at(open_web, post + b"Content-Length: " + length + b"\r\n\r\n", mb << 20, chunk)
    # chunked: 1 MiB chunks, no length announced
    _stream_at(open_web, post + b"Transfer-Encoding: chunked\r\n\r\n", mb << 20, b"100000\r\n" + chunk + b"\r\n")
    grown_mb = (proc_status(open_web, "VmHWM") - hwm0) / 1024
    assert grown_mb < 20, f"peak RSS grew {grown_mb:.0f} MB while {3 * mb} MB were streamed at the server"
    st, body = request(open_web, "POST", "/api/pause", b"x" * 70_000, {"Content-Type": "application/json"})
    assert st == 413 and "limit" in json.loads(body)["error"]
    assert paused(open_web) is False


def test_long_path_and_symlink_loop_get_an_answer(open_web):
    out = open_web.out
    (out / "loop").symlink_to("loop")
    (out / "ping").symlink_to("pong")
    (out / "pong").symlink_to("ping")
    for path in ("/api/files/" + "a" * 300, "/api/files/" + "/".join(["b" * 250] * 20), "/api/files/loop",
                 "/api/files/ping", "/api/files/loop/x", "/" + "c" * 300, "/static/" + "d" * 300):
        st, body = request(open_web, "GET", path)
        assert st in (403, 404) and json.loads(body)["error"], (path[:40], st)
    assert "Traceback" not in open_web.log.read_text()


def test_fifty_concurrent_posts_are_all_answered(open_web):
    n = 50
    go = threading.Barrier(n)
    results: list = [None] * n

    def post(i):
        go.wait()
        try:
            results[i] = request(open_web, "POST", "/api/pause", b"{}", {"Content-Type": "application/json"},
                                 timeout=20)[0]
        except OSError as err:
            results[i] = repr(err)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r for r in results if isinstance(r, int)) == [200] + [409] * (n - 1), results
    assert request(open_web, "POST", "/api/resume")[0] == 200


def test_idle_sockets_cost_no_thread_and_time_out(open_web):
    """200 idle sockets: no thread each, closed after the idle timeout; an event stream is not idle: it
    outlives the timeout and still gets the next change."""
    events = http.client.HTTPConnection("127.0.0.1", open_web.port, timeout=IDLE_S + 10)
    events.request("GET", "/api/events")
    r = events.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"

    def next_status():
        while True:
            line = r.readline().decode()
            if line.startswith("data: "):
                return json.loads(line[6:])

    assert next_status()["paused"] is False
    threads0 = proc_status(open_web, "Threads")
    socks = [socket.create_connection(("127.0.0.1", open_web.port), timeout=IDLE_S + 5) for _ in range(200)]
    try:
        time.sleep(0.3)
        threads = proc_status(open_web, "Threads")
        assert threads <= threads0 + 4, f"{threads0} threads before, {threads} with 200 idle sockets"
        assert request(open_web, "GET", "/api/status")[0] == 200         # still answering meanwhile
        t0 = time.monotonic()
        closed = sum(s.recv(1) == b"" for s in socks)                    # EOF: the server closed it
        assert closed == 200 and time.monotonic() - t0 < IDLE_S + 3
        time.sleep(1)
        assert request(open_web, "POST", "/api/pause")[0] == 200
        # the stream brings the change (the read times out if it does not); an event sent before the pause —
        # any change of status while the sockets were open — may come first
        while next_status()["paused"] is not True:
            pass
    finally:
        for s in socks:
            s.close()
        events.close()
        request(open_web, "POST", "/api/resume")


def test_a_trickling_request_is_closed_too(open_web):
    """Slowloris: a byte now and then must not keep a connection open past the idle timeout."""
    with socket.create_connection(("127.0.0.1", open_web.port), timeout=IDLE_S + 5) as s:
        t0 = time.monotonic()
        got = None
        for c in b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([c]))
            except OSError:
                got = b""
                break
            s.settimeout(0.25)
            try:
                got = s.recv(100)
                break
            except TimeoutError:
                pass
        assert got is not None and b"200 OK" not in got and time.monotonic() - t0 < IDLE_S + 3


def test_connections_over_the_cap_get_503(open_web):
    socks = [socket.create_connection(("127.0.0.1", open_web.port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        st, body = request(open_web, "GET", "/api/status")
        assert st == 503 and "too many" in json.loads(body)["error"]
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert request(open_web, "GET", "/api/status")[0] == 200


# ---------------------------------------------------------------------------------------------------- review-web

def _flood(port: int, seconds: float, hold_s: float = 2.0, most: int = 6000) -> int:
    """Open connections as fast as the loop goes, each kept open `hold_s` without a byte sent (a script on the
    Wi-Fi; no request is needed), at most `most` at once; returns how many were opened."""
    held: list = []
    n = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            while held and (held[0][0] < time.monotonic() - hold_s or len(held) >= most):
                held.pop(0)[1].close()
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                time.sleep(0.001)
                continue
            held.append((time.monotonic(), s))
            n += 1
    finally:
        for _, s in held:
            s.close()
    return n


def test_a_connection_flood_does_not_take_the_daemons_files(tmp_path, night):
    """Each connection over the cap used to be held for a second to deliver its 503: a flood of connects held
    every descriptor of the process (systemd's default limit: 1024).  The daemon stopped on an error
    ('Too many open files: …/frames.jsonl'), the watcher lost its folder and asyncio logged a traceback per
    refused accept (3 MB of journal in 12 s).  Now frames keep being stacked and the log stays quiet."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 8192:
        pytest.skip(f"the flood needs ~8000 descriptors on this side (hard limit {hard})")
    files, _ = night("flood", n_frames=6)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))        # the daemon inherits systemd's default
    (tmp_path / "d").mkdir()
    try:
        d = start_daemon(tmp_path / "d")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 8192), hard))
    try:
        (d.watch / files[0].name).write_bytes(files[0].read_bytes())
        d.wait_lines(1)
        done = []
        t = threading.Thread(target=lambda: done.append(_flood(d.port, 8.0)))
        t.start()
        try:
            time.sleep(2)
            for f in files[1:]:
                (d.watch / f.name).write_bytes(f.read_bytes())
                time.sleep(0.8)
        finally:
            t.join(20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert done, "the flood stopped on an error"
        if done[0] < 4000:                 # ~500 a second: fewer could not take 1024 descriptors, fixed or not
            pytest.skip(f"this machine opened only {done[0]} connections in 8 s")
        recs = d.wait_lines(len(files), timeout=30)
        assert [r["status"] for r in recs].count("stacked") + 1 == len(files), recs
        wait_ok(d)
        log = d.log.read_text()
        assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]
        assert "out of system resource" not in log and len(log) < 20_000, log[-3000:]
    finally:
        assert d.stop() == 0


def test_a_client_gone_in_the_middle_of_its_body_is_no_traceback(open_web):
    """A POST whose body stops half-way, then the connection closes: aiohttp logged 'Error handling request' and a
    traceback at ERROR for each (ConnectionResetError out of the body's read): a script could fill the journal."""
    before = open_web.log.read_text().count("Traceback")
    head = b"POST /api/exclude HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", open_web.port), timeout=5) as s:
            s.sendall(head + b'Content-Length: 100\r\n\r\n{"file": "a')
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", open_web.port), timeout=5) as s:   # 100-continue, no body
            s.sendall(head + b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 100")
        with socket.create_connection(("127.0.0.1", open_web.port), timeout=5) as s:   # chunked, cut
            s.sendall(head + b'Transfer-Encoding: chunked\r\n\r\n40\r\n{"file"')
            time.sleep(0.05)
    time.sleep(0.5)
    wait_ok(open_web)
    log = open_web.log.read_text()
    assert log.count("Traceback") == before and "Error handling request" not in log, log[-2000:]


def _lan_address() -> str | None:
    """This machine's address on its network (not loopback), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))          # no packet is sent: only the route is looked up
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_one_client_cannot_hold_every_connection(tmp_path):
    """A phone on the Wi-Fi opening 300 event streams held every connection slot, for as long as it liked (a
    stream is never idle): the page answered 503 to everyone else.  One address now gets at most
    [web] max_per_client connections; the next visitor's page loads."""
    ip = _lan_address()
    if ip is None:
        pytest.skip("no network address besides loopback")
    (tmp_path / "d").mkdir()
    # on all addresses (for the test's few seconds): the flood comes from `ip`, the next visitor from loopback
    d = start_daemon(tmp_path / "d", "--host", "0.0.0.0")
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection((ip, d.port), timeout=5)
            s.sendall(b"GET /api/events HTTP/1.1\r\nHost: %s\r\n\r\n" % ip.encode())
            socks.append(s)
        time.sleep(0.5)
        heads = []
        for s in socks:
            try:
                heads.append(s.recv(12))
            except OSError:
                heads.append(b"reset")
        assert 1 <= heads.count(b"HTTP/1.1 200") <= MAX_PER_CLIENT, heads.count(b"HTTP/1.1 200")
        # the next visitor (here from loopback: a reverse proxy's address too, which is not capped)
        st, body = request(d, "GET", "/")
        assert st == 200 and b"<html" in body
        assert request(d, "GET", "/api/status")[0] == 200
    finally:
        for s in socks:
            s.close()
        assert d.stop() == 0
    assert "Traceback" not in d.log.read_text()


def test_an_address_guessing_the_token_waits(tmp_path):
    """With `--token 1234` a script on the Wi-Fi could try thousands of tokens a second (403 each, no end).  After
    10 wrong ones within a minute its address gets 429 and Retry-After, even for the right token; loopback (a
    reverse proxy's address, everyone's behind it) is not counted, so a guesser cannot lock the page out."""
    ip = _lan_address()
    if ip is None:
        pytest.skip("no network address besides loopback")
    (tmp_path / "d").mkdir()
    d = start_daemon(tmp_path / "d", "--host", "0.0.0.0", "--token", TOKEN)

    def post(host: str, token: str, path: str = "/api/pause") -> tuple[int, dict]:
        conn = http.client.HTTPConnection(host, d.port, timeout=10)
        try:
            conn.request("POST", path, body=b"{}", headers={
                "Host": f"{host}:{d.port}", "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
            r = conn.getresponse()
            return r.status, {**dict(r.getheaders()), "body": r.read()}
        finally:
            conn.close()

    try:
        assert [post(ip, f"guess{i}")[0] for i in range(10)] == [403] * 10
        st, h = post(ip, TOKEN)
        assert st == 429 and 50 <= int(h["Retry-After"]) <= 60, (st, h)
        assert b"10 wrong tokens" in h["body"]
        assert post("127.0.0.1", TOKEN)[0] == 200            # the proxy's address, and anyone else's
        assert [post("127.0.0.1", "nope")[0] for _ in range(12)] == [403] * 12      # loopback: not counted
        assert post("127.0.0.1", TOKEN, "/api/resume")[0] == 200
    finally:
        assert d.stop() == 0


def test_max_per_client_is_checked():
    from livestack.config import ConfigError
    from livestack.daemon.config import WebParams

    assert WebParams(max_per_client=0).max_per_client == 0          # a proxy on another machine: no cap
    for bad in (-1, True, 10**6):
        with pytest.raises(ConfigError, match="max_per_client"):
            WebParams(max_per_client=bad)


def slow_readers(d, target: str, n: int, socks: list) -> list[bytes]:
    """``n`` GETs of ``target`` whose clients read the status line and then nothing more (a 4 KB receive
    buffer): the first 12 bytes of each answer; the sockets go into ``socks`` (the caller closes them)."""
    heads = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", d.port))
        socks.append(s)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        heads.append(s.recv(12))
    return heads


def test_slow_export_downloads_do_not_pile_up_in_memory(tmp_path, night):
    """Each export answered is a new image in memory (a 24 MP 16-bit TIFF: 144 MB) until its client has read it;
    a client reading slowly kept it (all but the few MB the kernel's socket buffer takes).  12 slow downloads of
    an 18 MB export held 12 images; a Pi holds 20 of 144 MB.  Now at most 2 are sent at once, the others get
    503 and Retry-After, and memory stays put."""
    files, _ = night("exports", n_frames=2, width=2000, height=1500)
    (tmp_path / "d").mkdir()
    d = start_daemon(tmp_path / "d")
    socks = []
    try:
        feed(d, files)
        while not json.loads(request(d, "GET", "/api/status")[1])["has_stack"]:
            time.sleep(0.05)
        assert request(d, "GET", "/api/export?format=tiff&mode=linear")[0] == 200     # warm: its buffers
        rss0 = proc_status(d, "VmRSS")
        heads = slow_readers(d, "/api/export?format=tiff&mode=linear", 12, socks)
        time.sleep(0.5)
        grown_mb = (proc_status(d, "VmRSS") - rss0) / 1024
        assert 1 <= heads.count(b"HTTP/1.1 200") <= 2, heads
        assert heads.count(b"HTTP/1.1 503") == len(heads) - heads.count(b"HTTP/1.1 200"), heads
        # two exports in flight and their making (float32 planes the allocator keeps): ~70 MB; 12 were 258 MB
        assert grown_mb < 130, f"{grown_mb:.0f} MB more with 12 slow downloads of an 18 MB export"
        for s in socks:
            s.close()
        socks = []
        # the slots are free once the daemon has seen its two readers go (503 until then)
        deadline = time.monotonic() + 10
        while (st := request(d, "GET", "/api/export?format=png&mode=linear")[0]) != 200 \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert st == 200
    finally:
        for s in socks:
            s.close()
        assert d.stop() == 0


def test_slow_downloads_of_a_large_file_are_few(tmp_path, night):
    """Each download holds the version of stack.fits it began with, and a replaced version's disk space comes back
    only when its reader is done: slow readers held one each (8 seen; at 24 MP each is 470 MB of an SD card).  A
    file of 32 MB or more is sent to at most 4 clients at once; the others get 503 and Retry-After."""
    files, _ = night("big", n_frames=2, width=2000, height=1500)       # stack.fits: 48 MB
    (tmp_path / "d").mkdir()
    d = start_daemon(tmp_path / "d")
    socks = []
    try:
        feed(d, files)
        while not (d.out / "stack.fits").exists():
            time.sleep(0.05)
        heads = slow_readers(d, "/api/stack.fits", 8, socks)
        assert heads.count(b"HTTP/1.1 200") == 4 and heads.count(b"HTTP/1.1 503") == 4, heads
        assert request(d, "GET", "/api/status")[0] == 200          # small answers are not held back
        for s in socks:
            s.close()
        socks = []
        deadline = time.monotonic() + 10
        while (st := request(d, "GET", "/api/stack.fits")[0]) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert st == 200
    finally:
        for s in socks:
            s.close()
        assert d.stop() == 0


def test_a_stop_with_slow_downloads_open_is_clean(tmp_path, night):
    """SIGTERM while a client reads stack.fits slowly and another holds an export: aiohttp waited 2 x 3 s for
    their handlers, then the loop closed with them still pending — 'ERROR Task was destroyed but it is
    pending!' in the journal, on every stop with a slow client.  Now they are cancelled and end."""
    files, _ = night("stop", n_frames=2, width=1200, height=900)
    (tmp_path / "d").mkdir()
    d = start_daemon(tmp_path / "d", idle_s=30)          # the default: a slow reader is not dropped before the stop
    socks = []
    try:
        feed(d, files)
        while not (d.out / "stack.fits").exists():
            time.sleep(0.05)
        for path in ("/api/stack.fits", "/api/export?format=tiff&mode=linear", "/api/events"):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            s.connect(("127.0.0.1", d.port))
            s.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
            assert s.recv(12) == b"HTTP/1.1 200", path
            socks.append(s)
        time.sleep(0.5)
        t0 = time.monotonic()
        assert d.stop() == 0
        took = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    log = d.log.read_text()
    assert "Task was destroyed" not in log and "ERROR" not in log, log[-2000:]
    assert took < 8, f"the stop took {took:.1f} s"


def test_the_page_behind_a_reverse_proxy_can_post(tmp_path):
    """[web] allowed_hosts names a reverse proxy's public name, so that its page works.  Reads did, but the page's
    POSTs were refused as cross-site whenever the proxy does not pass the browser's Host as it came: nginx's
    default (Host: 127.0.0.1:8080) or its $host on another port than 443 (the port is dropped).  An Origin
    naming an allowed_hosts name is this server's page; other Origins are still refused."""
    root = tmp_path / "d"
    (root / "watch").mkdir(parents=True)
    d = Daemon(root, root / "watch", root / "out")
    d.config.write_text(d.config.read_text() + '[web]\nallowed_hosts = ["astro.example.org"]\n')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIVESTACK_WEB_IDLE_S", str(IDLE_S))
        d.start()
    d.port = urlsplit(d.url).port
    try:
        wait_ok(d)
        js = {"Content-Type": "application/json"}
        for host, origin in ((f"127.0.0.1:{d.port}", "https://astro.example.org"),       # nginx's default
                             ("astro.example.org", "https://astro.example.org:8443"),   # $host, another port
                             ("astro.example.org", "https://Astro.Example.Org")):
            st, body = request(d, "POST", "/api/pause", b"{}", {**js, "Host": host, "Origin": origin})
            assert st == 200, (host, origin, st, body)
            assert request(d, "POST", "/api/resume", b"{}", {**js, "Origin": origin})[0] == 200
        for origin in ("https://evil.example", "https://astro.example.org.evil.example", "http://localhost:3000",
                       "https://127.0.0.1:9999", "null", "https://astro.example.org@evil.example"):
            st, _ = request(d, "POST", "/api/pause", b"{}", {**js, "Origin": origin})
            assert st == 403, origin
        assert paused(d) is False
    finally:
        assert d.stop() == 0


def test_stretch_auto_must_be_true_or_false(open_web):
    """{"auto": "no"}, {"auto": "false"}, {"auto": 0.5} and {"auto": NaN} were all taken as auto (any truthy
    value), and the other fields of an auto request were not looked at ({"auto": true, "blakc": 0.1})."""
    js = {"Content-Type": "application/json"}
    for body in ('{"auto": "no"}', '{"auto": "false"}', '{"auto": 0.5}', '{"auto": NaN}', '{"auto": null}',
                 '{"auto": true, "blakc": 0.1}', '{"auto": [1]}'):
        st, answer = request(open_web, "POST", "/api/stretch", body.encode(), js)
        assert st == 400 and json.loads(answer)["error"], (body, st, answer[:200])
    st, answer = request(open_web, "POST", "/api/stretch", b'{"auto": true}', js)
    assert st == 200 and json.loads(answer)["stretch"]["auto"] is True, answer[:300]
    st, answer = request(open_web, "POST", "/api/stretch", b'{"auto": false, "black": 0.01}', js)
    assert st == 200, answer[:300]
    assert request(open_web, "POST", "/api/stretch", b'{"auto": true}', js)[0] == 200


def _sockets(d: Daemon) -> int:
    """Open sockets of the daemon (the listening one included)."""
    fds = Path(f"/proc/{d.proc.pid}/fd")
    n = 0
    for fd in fds.iterdir():
        try:
            n += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return n


def test_a_client_that_never_reads_its_answers_is_closed(open_web):
    """Slow read: requests pipelined on one connection whose answers are never read.  aiohttp waited for the
    client to read, without a time limit: the connection stayed open past the idle timeout for as long as the
    client liked (63 s seen with a 5 s timeout), holding ~4 MB of kernel buffers; 256 of them, a Pi's memory."""
    # (the connections of the tests before may still be closing: count once the number holds still)
    base, end = _sockets(open_web), time.monotonic() + 10
    while time.monotonic() < end:
        time.sleep(0.5)
        if (now := _sockets(open_web)) == base:
            break
        base = now
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", open_web.port))
        s.setblocking(False)
        req = b"GET /api/frames HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 100
        end = time.monotonic() + IDLE_S / 2
        while time.monotonic() < end:
            try:
                s.send(req)
            except BlockingIOError:
                time.sleep(0.02)
            except OSError:
                break
        assert _sockets(open_web) == base + 1
        end = time.monotonic() + IDLE_S + 4
        while _sockets(open_web) > base and time.monotonic() < end:
            time.sleep(0.2)
        assert _sockets(open_web) == base, f"still open {IDLE_S + 4:g} s after the client stopped reading"
    wait_ok(open_web)


def test_head_is_answered_like_get_without_a_body(open_web):
    """HEAD was 405 everywhere (curl -I, link checkers, `wget --spider`, a download manager asking the size);
    every general-purpose server must answer it (RFC 9110 9.1): GET's status and headers, no body."""
    for path, status in (("/", 200), ("/api/status", 200), ("/static/app.js", 200), ("/api/files/frames.jsonl", 404),
                         ("/api/files/../x", 403), ("/api/events", 200), ("/nope", 404)):
        got = raw(open_web, f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(),
                  timeout=3)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.split(b"\r\n", 1)[0].split()[1:2] == [str(status).encode()], (path, got[:200])
        assert body == b"", (path, body[:100])
    got = raw(open_web, b"HEAD /static/app.js HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    size = (Path(__file__).parents[1] / "livestack/web/static/app.js").stat().st_size
    assert b"Content-Length: %d\r\n" % size in got, got[:300]
    # keep-alive: the connection goes on with the next request
    got = raw(open_web, b"HEAD /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                        b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert got.count(b"HTTP/1.1 200") == 2 and got.endswith(b"}"), got[-200:]
    assert "Traceback" not in open_web.log.read_text()


def test_a_slow_but_steady_download_is_not_cut(open_web):
    """A phone on weak Wi-Fi reads a big file for longer than the idle timeout, a little at a time: it is reading,
    so it is not idle.  (A 24 MP stack.fits is 384 MB: minutes over Wi-Fi.)"""
    size = 12 << 20                  # beyond the kernel's socket buffers (4 MB here): the server waits on the client
    (open_web.out / "big.bin").write_bytes(bytes(range(256)) * (size // 256))
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.settimeout(IDLE_S + 5)
            s.connect(("127.0.0.1", open_web.port))
            s.sendall(b"GET /api/files/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            got, t0 = b"", time.monotonic()
            while chunk := s.recv(32768):          # ~2 MB/s: 6 s, three times the idle timeout
                got += chunk
                time.sleep(0.015)
            took = time.monotonic() - t0
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == size, (head[:100], len(body), took)
        assert took > IDLE_S * 1.5, took
    finally:
        (open_web.out / "big.bin").unlink()


def test_palette_weights_and_hues_are_few_and_short(open_web):
    """Any name was taken as a filter: 3000 made-up weights (a 40 KB body) were kept, and every status — each
    event to each open page — grew from ~2 KB to 43 KB for the rest of the night."""
    js = {"Content-Type": "application/json"}
    size0 = len(request(open_web, "GET", "/api/status")[1])
    for body in ({"weights": {f"f{i}": 1.0 for i in range(3000)}},
                 {"hues": {f"f{i}": [1, 0, 0] for i in range(1000)}},
                 {"weights": {"H" * 5000: 1.0}}):
        st, answer = request(open_web, "POST", "/api/palette", json.dumps(body).encode(), js)
        assert st == 400 and json.loads(answer)["error"], (st, answer[:200])
    assert len(request(open_web, "GET", "/api/status")[1]) < size0 + 100
    st, _ = request(open_web, "POST", "/api/palette", b'{"weights": {"Ha": 1.5, "OIII": 0.8}}', js)
    assert st == 200
    assert request(open_web, "POST", "/api/palette", b'{"weights": {}}', js)[0] == 200


def test_a_refusal_quotes_a_long_value_shortly(open_web):
    """A 60 KB file name, palette name or list of unknown fields came back whole in the error (60 KB of "one
    sentence" for the page to show at the foot of the screen); now the sentence quotes the start of it."""
    js = {"Content-Type": "application/json"}
    for path, body, status in (("/api/exclude", {"file": "x" * 60000}, 404),
                               ("/api/palette", {"palette": "A" * 60000}, 400),
                               ("/api/palette", {f"k{i}": 1 for i in range(5000)}, 400)):
        st, answer = request(open_web, "POST", path, json.dumps(body).encode(), js)
        assert st == status and len(answer) < 400, (path, st, len(answer), answer[:100])
        assert "\n" not in json.loads(answer)["error"]


def test_a_download_from_a_session_folder_gone_says_so(tmp_path, night):
    """The session folder's USB disk pulled out: GET /api/stack.fits said "stack.fits does not exist yet", as
    before the first frame — the download is there once the disk is back, and the page's status says why."""
    files, _ = night("gone", n_frames=2)
    (tmp_path / "d").mkdir()
    d = start_daemon(tmp_path / "d")
    try:
        feed(d, files)
        deadline = time.monotonic() + 20
        while request(d, "GET", "/api/stack.fits")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.rename(d.out, tmp_path / "unplugged")
        st, answer = request(d, "GET", "/api/stack.fits")
        assert st == 404 and json.loads(answer)["error"] == (f"stack.fits cannot be read: the folder {d.out} is gone "
                                                             "(its disk unplugged?)")
        os.rename(tmp_path / "unplugged", d.out)
        assert request(d, "GET", "/api/stack.fits")[0] == 200
    finally:
        assert d.stop() == 0


def test_another_sites_page_cannot_make_exports(tmp_path, night):
    """An export is the worker's time between frames (seconds and ~100 MB at 24 MP).  Any page a visitor opened
    while on the observatory's Wi-Fi could have it made again and again: <img src="http://raspberrypi.local:
    8080/api/export?format=tiff">, a GET the Host check lets through.  The browser says where a request comes
    from (Sec-Fetch-Site; Origin on a fetch): another site's is refused, the page's own download link, an
    address typed or a script (no such header) are not."""
    files, _ = night("cross", n_frames=2)
    (tmp_path / "d").mkdir()
    d = start_daemon(tmp_path / "d")
    try:
        feed(d, files)
        while not json.loads(request(d, "GET", "/api/status")[1])["has_stack"]:
            time.sleep(0.05)
        path = "/api/export?format=png&mode=linear"
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                        {"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site", "Origin": f"http://127.0.0.1:{d.port}"}):
            st, body = request(d, "GET", path, headers=headers)
            assert st == 403 and "another site" in json.loads(body)["error"], (headers, st, body[:200])
        for headers in ({}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                        {"Origin": f"http://127.0.0.1:{d.port}", "Sec-Fetch-Site": "same-origin"}):
            st, body = request(d, "GET", path, headers=headers)
            assert st == 200 and body[:8] == b"\x89PNG\r\n\x1a\n", (headers, st, body[:200])
        # reading stays open to everyone (an <img> of the preview on an astronomy club's page)
        assert request(d, "GET", "/api/preview.jpg", headers={"Sec-Fetch-Site": "cross-site"})[0] == 200
    finally:
        assert d.stop() == 0


def test_a_server_on_every_address_says_where_a_phone_opens_the_page():
    """`--host 0.0.0.0` logged "page at http://0.0.0.0:8080/", which no browser opens (a review): the page's
    <hostname>.local and the default route's address are said too; a bind to one address says nothing more."""
    import socket

    from livestack.web.app import App

    class Bound:          # what lan_urls reads of an App: its listening socket
        def __init__(self, sock):
            self.socket = sock

    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            urls = App.lan_urls(Bound(s))
            port = s.getsockname()[1]
        if host == "127.0.0.1":
            assert urls == []
            continue
        assert urls[0] == f"http://{socket.gethostname().split('.')[0].lower()}.local:{port}/"
        assert all(u.endswith(f":{port}/") and "0.0.0.0" not in u and "127." not in u for u in urls)


def test_an_internal_error_is_answered_as_json_and_logged(caplog):
    """A bug in a handler was answered by aiohttp's own plain-text "500 Internal Server Error — Server got itself
    in trouble", not the `{"error": …}` every other answer is (README, HTTP API): the page and scripts could not
    read it.  Now a JSON 500 naming the exception, and its traceback in the log; the server goes on answering."""
    import logging

    from livestack.daemon.config import WebParams
    from livestack.web.app import App, serve_in_thread

    class Broken:                 # a service whose status() has a bug; nothing ever changes
        calls = 0

        def status(self):
            Broken.calls += 1
            if Broken.calls == 1:
                raise RuntimeError("a bug in status")
            return {"state": "idle"}

        def wait_change(self, seen, timeout):
            return None

    app = App(Broken(), WebParams(port=0))
    thread = serve_in_thread(app)
    try:
        port = app.socket.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="livestack.web"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/api/status")
            r = conn.getresponse()
            body = r.read()
            assert (r.status, r.getheader("Content-Type").split(";")[0]) == (500, "application/json"), body
            assert json.loads(body)["error"].startswith("internal error (RuntimeError: a bug in status)")
            conn.request("GET", "/api/status")          # the same connection, the next answer
            r = conn.getresponse()
            assert (r.status, json.loads(r.read())) == (200, {"state": "idle"})
            conn.close()
        assert any(rec.exc_info and "GET /api/status" in rec.getMessage() for rec in caplog.records), caplog.text
    finally:
        app.shutdown()
        thread.join(10)
        app.server_close()
