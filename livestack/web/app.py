"""Routes -> one Service call -> JSON (or a refusal as one sentence), served by aiohttp in a thread.

GET  /                      the page (static/index.html); /static/<name> its JS and CSS
GET  /api/status            counts, the latest frame, the last rejection, state (JSON)
GET  /api/frames?since=N    frames.jsonl records from N on, with the log's generation
GET  /api/preview.jpg       the stretched live preview
GET  /api/targets           the targets (fields of the sky) of the output folder, the current one's id, held frames
GET  /api/targets/<id>/preview.jpg   a target's preview: the live one for the current target, else its archived file
GET  /api/stack.fits        the stack (float32, weight map in HDU "WEIGHT")
GET  /api/export?format=png|tiff&mode=stretched|linear   full-resolution 16-bit image
GET  /api/files/<path>      any file inside the session folder (frames.jsonl, archive/…); nothing outside
GET  /api/events            server-sent events: "status" with the status JSON whenever anything changes
HEAD                        any GET above: its status and headers, no body (an export's without its length:
                            it is not made)
POST /api/pause, /api/resume, /api/exclude {"file"}, /api/include {"file"}, /api/stretch {black, midtones,
     white | auto}, /api/palette {palette, weights, hues}, /api/new-session — with a token configured, each
     needs "Authorization: Bearer <token>" or "X-Livestack-Token: <token>"

Every request must name this server in its Host header (DNS rebinding: a foreign name resolving here is
refused, reads included); a POST must not come from another site's page (Origin foreign or "null") and its
body, if any, is JSON (Content-Type: application/json) of at most 64 KiB.

Why aiohttp and not http.server: its parser answers malformed requests (Content-Length: -1, abc …) with 400,
a connection costs no thread (the standard library's server spends one per connection, idle ones included),
and its keep-alive timer closes a connection that sends no complete request in time, trickled bytes or not.
The event loop runs in one thread beside the worker; the Service is only called through its thread-safe
methods and its futures.  It serves from before the Service's start(): while the session loads, the status says
"starting" and what needs the loaded session is refused with 503 by the Service (loaded(), its commands).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from ..session import Refused

log = logging.getLogger("livestack.web")
_STARTED = "livestack.answer_started"     # set on a request once its streamed answer's headers are sent
STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".jpg": "image/jpeg", ".json": "application/json", ".jsonl": "application/x-ndjson",
                 ".fits": "application/fits", ".txt": "text/plain; charset=utf-8"}
MAX_BODY = 64 * 1024          # a POST body (JSON); larger: 413
SSE_KEEPALIVE_S = 15.0
IDLE_S = 30.0                 # no complete request, body or read progress for this long: the connection closes
BACKLOG = 128                 # pending connections the kernel queues before the loop accepts them
MAX_CONNECTIONS = 256         # open connections; beyond: 503 at once (file descriptors are the daemon's too)
BUSY_LINGER = 32              # refused connections held for their 503 at once; beyond, reset (a flood of connects)
LINGER_S = 2.0                # a refused request's unread body is discarded this long, then the socket closes
SHUTDOWN_S = 3.0
CHUNK = 1 << 20               # file and export streaming
IO_THREADS = 2                # file reads (open, read) off the event loop
MAX_FILTERS = 32              # POST /api/palette: weights or hues for at most this many filter names,
MAX_FILTER_NAME = 140         # each at most this long (a FITS FILTER value: 68 characters; "<filter>:<channel>")
EXPORT_SENDS = 2              # exports made or sent at once: each is in memory until its client has read it
BAD_TOKENS = 10               # wrong tokens from one address (loopback aside) within BAD_TOKEN_S: it waits …
BAD_TOKEN_S = 60.0            # … until the oldest of them is this old (a token guessed at 10 a minute, not 1000 a s)
BIG_FILE = 32 << 20           # a file this large (stack.fits, a checkpoint) …
BIG_SENDS = 4                 # … is sent to at most this many clients at once: each holds the version it began
COMMAND_S = 60.0              # the worker's answer to a stretch, a palette awaited this long (it does them between
NEW_SESSION_S = 120.0         # frames, or after a restack), a new session's this long, an export's this long
EXPORT_S = 300.0


class _GoesOn(Exception):
    """The command awaited is not done when the wait ends, and goes on (Api._wait): the worker has begun it
    (`begun`), or another request for it (an export) waits for it still."""

    def __init__(self, begun: bool):
        super().__init__()
        self.begun = begun


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---------------------------------------------------------------------------------------------------- the server

class App:
    """The HTTP server of one Service.  The socket is bound here (OSError when the port is taken);
    serve_forever() in a thread (serve_in_thread); shutdown() then server_close() to stop."""

    def __init__(self, service, web_params):
        self.service, self.web = service, web_params
        self.idle_s = idle_timeout(web_params)
        self.hosts = Hosts.for_server(web_params.host, web_params.allowed_hosts)
        host = web_params.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, web_params.port), family=family, backlog=BACKLOG,
                                           dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested, self._served, self._stopped = threading.Event(), threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def lan_urls(self) -> list[str]:
        """Where a phone on the same network opens the page when the server listens on every address (0.0.0.0,
        ::), whose own URL (``url``) no browser can open: <hostname>.local (mDNS, as Raspberry Pi OS announces
        it) and the address of the interface the default route leaves by; [] for any other bind."""
        host, port = self.socket.getsockname()[:2]
        if host not in ("0.0.0.0", "::"):
            return []
        urls = [f"http://{socket.gethostname().split('.')[0].lower()}.local:{port}/"]
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect(("10.255.255.255", 1))       # no packet is sent: the kernel only picks a route
            ip = probe.getsockname()[0]
            if not ipaddress.ip_address(ip).is_loopback:
                urls.append(f"http://{ip}:{port}/")
        except OSError:             # no route at all (no network yet)
            pass
        finally:
            probe.close()
        return urls

    def serve_forever(self) -> None:
        """Serve until shutdown(); blocks (run it in a thread)."""
        self._served.set()
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        finally:
            try:
                # handlers still sending after the shutdown's grace (a slow download: its writes wait up to the
                # idle timeout) are cancelled and end here, not destroyed pending by close() — 'ERROR Task was
                # destroyed but it is pending!' on every stop with a slow client
                left = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in left:
                    t.cancel()
                if left:
                    loop.run_until_complete(asyncio.wait(left, timeout=1.0))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving (open event streams end, requests in flight get SHUTDOWN_S) and wait for it."""
        self._stop_requested.set()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:      # the loop has already closed
                pass
        if self._served.is_set():
            self._stopped.wait(SHUTDOWN_S + 5)

    def server_close(self) -> None:
        self.socket.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop = loop                       # after _stop: shutdown() reads _loop first
        if self._stop_requested.is_set():
            return
        changes = Changes(self.service, loop)
        io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="livestack-web-io")
        api = Api(self.service, self.web, self.hosts, self.idle_s, changes, io)
        server = _Server(api.handle, self.web.max_per_client, keepalive_timeout=self.idle_s,
                         lingering_time=LINGER_S, auto_decompress=False, logger=_HTTP_LOG, access_log=log,
                         access_log_class=_AccessLog)

        refused: set[_Busy] = set()

        def protocol():
            return _Busy(refused) if len(server.connections) >= MAX_CONNECTIONS else server()

        async def sweep():
            while True:
                await asyncio.sleep(1.0)
                server.drop_stalled(self.idle_s, loop.time())

        changes.start()
        listener = await loop.create_server(protocol, sock=self.socket, backlog=BACKLOG)
        sweeper = loop.create_task(sweep())
        try:
            await self._stop.wait()
        finally:
            sweeper.cancel()
            listener.close()
            changes.close()
            await server.shutdown(SHUTDOWN_S / 2)     # aiohttp waits twice: for the handler, then its cancel
            io.shutdown(wait=False, cancel_futures=True)
            changes.join(2.0)


def make_app(service, web_params) -> App:
    """Bind ``web.host:web.port`` (port 0: any free port; see App.url)."""
    return App(service, web_params)


def serve_in_thread(app: App) -> threading.Thread:
    t = threading.Thread(target=app.serve_forever, name="livestack-web", daemon=True)
    t.start()
    return t


def idle_timeout(web_params) -> float:
    """Seconds a connection may stay idle: LIVESTACK_WEB_IDLE_S (tests, diagnosis), else [web] idle_timeout_s
    when the config has it, else IDLE_S."""
    env = os.environ.get("LIVESTACK_WEB_IDLE_S")
    if env:
        try:
            v = float(env)
            if 0 < v <= 3600:
                return v
        except ValueError:
            pass
        log.warning("livestack: LIVESTACK_WEB_IDLE_S=%r is not a number of seconds in (0, 3600]; using %g s",
                    env, IDLE_S)
        return IDLE_S
    return float(web_params.idle_timeout_s or IDLE_S)


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" % len(body)) + body


def client_key(peername) -> ipaddress.IPv4Address | ipaddress.IPv6Network | None:
    """Whose connection this is, for [web] max_per_client: the IPv4 address, or the IPv6 /64 (one machine may take
    any address of its /64); None for loopback (everyone comes from there behind a reverse proxy) and the unknown."""
    try:
        ip = ipaddress.ip_address(peername[0].split("%", 1)[0])
    except (TypeError, IndexError, ValueError):
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None
    return ip if ip.version == 4 else ipaddress.ip_network((ip, 64), strict=False)


class _Server(web.Server):
    """aiohttp's server, with at most `per_client` ([web] max_per_client; 0: any number) open connections per
    client: an event stream is never idle, so one phone opening 300 of them held every slot of MAX_CONNECTIONS
    for as long as it liked, and the page answered 503 to everyone else.  (A browser opens 6 to a host.)"""

    def __init__(self, handler, per_client: int, **kwargs):
        super().__init__(handler, **kwargs)
        self.per_client = per_client
        self.too_many = _refusal(f"too many open connections from your address (over {per_client}); "
                                 "close some pages")
        self._client_of: dict = {}                           # handler -> client_key, while its connection is open
        self._per_client: collections.Counter = collections.Counter()
        self._stalled: dict = {}      # handler -> (loop time, its write buffer's size) since which nothing moved

    def drop_stalled(self, idle_s: float, now: float) -> None:
        """Abort the connections whose client has read nothing of their answers for `idle_s` (called every
        second).  aiohttp waits for a client to read without a time limit: requests pipelined and never read
        kept a connection, and ~4 MB of kernel buffers, past the idle timeout for as long as the client liked.
        Stalled = writing paused and the write buffer the same size as a second ago: a client that reads, however
        slowly, lets the buffer drain into the kernel (a 384 MB stack.fits takes minutes over weak Wi-Fi)."""
        stalled = {}
        for h in self.connections:
            t = h.transport
            if t is None or not h.writing_paused:
                continue
            size = t.get_write_buffer_size()
            since, before = self._stalled.get(h, (now, -1))
            if size != before:
                since = now
            if now - since >= idle_s:
                t.abort()
            else:
                stalled[h] = (since, size)
        self._stalled = stalled

    def connection_made(self, handler, transport) -> None:
        super().connection_made(handler, transport)
        key = client_key(transport.get_extra_info("peername")) if self.per_client else None
        if key is None:
            return
        if self._per_client[key] >= self.per_client:
            transport.pause_reading()           # its request is not read: the 503 is the only answer
            transport.write(self.too_many)
            # closed once the handler's task has started (closing here, it would start on a lost connection)
            asyncio.get_running_loop().call_soon(transport.close)
            return
        self._client_of[handler] = key
        self._per_client[key] += 1

    def connection_lost(self, handler, exc=None) -> None:
        key = self._client_of.pop(handler, None)
        if key is not None:
            self._per_client[key] -= 1
            if self._per_client[key] <= 0:
                del self._per_client[key]
        super().connection_lost(handler, exc)


class _Busy(asyncio.Protocol):
    """A connection over MAX_CONNECTIONS: 503 at once, then closed (no request is parsed, no thread spent).
    At most BUSY_LINGER of them are held for the client to read its 503; beyond, the socket is reset at once:
    a flood of connects held one descriptor a second each, and took every descriptor of the process (systemd's
    limit is 1024) — the worker stopped on 'Too many open files' and each refused accept logged a traceback."""

    RESPONSE = _refusal(f"too many open connections (over {MAX_CONNECTIONS}); try again")

    def __init__(self, lingering: set):
        self.lingering = lingering
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        if len(self.lingering) >= BUSY_LINGER:
            transport.abort()
            return
        self.lingering.add(self)
        # read what the client sends for a moment: closing with unread data would reset the connection
        # before the client reads the 503
        self._timer = asyncio.get_running_loop().call_later(1.0, transport.close)
        try:
            transport.write(self.RESPONSE)
            if transport.can_write_eof():
                transport.write_eof()
        except OSError:               # the client has gone already (ENOTCONN): nothing to tell it
            transport.abort()

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        self.lingering.discard(self)
        if self._timer is not None:
            self._timer.cancel()


class _AccessLog(AbstractAccessLogger):
    """One debug line per request (journald stays readable; `-v` does not turn it on)."""

    def log(self, request, response, time):
        self.logger.debug("%s %s %s %d %.3fs", request.remote, request.method, request.raw_path[:200],
                          response.status, time)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


class _MalformedOneLine(logging.Filter):
    """aiohttp logs a malformed request (bad Content-Length, header too long …) with a traceback at ERROR: an
    attacker could fill the journal.  Make it one debug line (shown only when debugging)."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        reason = (exc.message or type(exc).__name__).strip().splitlines()[0]
        record.msg, record.args = "%s: %s %s", (record.getMessage(), exc.code, reason)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return log.isEnabledFor(logging.DEBUG)


_HTTP_LOG = logging.getLogger("livestack.web.http")
_HTTP_LOG.addFilter(_MalformedOneLine())


# ---------------------------------------------------------------------------------------------------- who may ask

_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?")


def host_name(authority: str) -> str | None:
    """'Pi.local:8080' -> 'pi.local', '[::1]:8080' -> '::1', 'x.' -> 'x'; None when it is not host[:port]."""
    m = _AUTHORITY.fullmatch(authority.strip())
    return m and m.group(1).strip("[]").rstrip(".").lower() or None


@dataclass(frozen=True, slots=True)
class Hosts:
    """The names this server answers to (the Host header).  A page from a DNS-rebinding name (evil.example
    resolving to this address) is same-origin with it in the browser: only the Host header tells."""

    names: frozenset[str]     # lower case, no port; "*" allows any
    any_ip: bool              # any IP literal (listening on all or a LAN address), else loopback literals only
    configured: frozenset[str] = frozenset()   # the names of [web] allowed_hosts ("*" aside): a page from one of
    # them is this server's page (a reverse proxy's), whatever Host the proxy passes on

    @classmethod
    def for_server(cls, bound: str, allowed=()) -> Hosts:
        """Listening on loopback: localhost, 127.x, ::1.  Otherwise also any IP literal, this machine's
        hostname and <hostname>.local (mDNS), and the listening name.  Plus `allowed` ([web] allowed_hosts)."""
        allowed = (allowed,) if isinstance(allowed, str) else allowed or ()
        configured = frozenset(n for n in (host_name(a) for a in allowed if a != "*") if n)
        names = {"localhost"} | configured | ({"*"} if "*" in allowed else set())
        b = bound.strip("[]").lower()
        try:
            loopback = ipaddress.ip_address(b).is_loopback
        except ValueError:
            loopback = b == "localhost"
            if b and not loopback:
                names.add(b.rstrip("."))
        if not loopback:
            hn = socket.gethostname().lower().rstrip(".")
            short = hn.split(".")[0]
            names |= {hn, short, short + ".local"}
        return cls(frozenset(names), not loopback, configured)

    def allows(self, authority: str) -> bool:
        name = host_name(authority)
        if name is None:
            return False
        if name in self.names or "*" in self.names:
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_ip or ip.is_loopback


# ---------------------------------------------------------------------------------------------------- changes

class Changes:
    """The Service's change counter, brought into the event loop by one thread: an event stream costs no
    thread.  `value` is the latest counter, None once the service or the server is closing."""

    def __init__(self, service, loop: asyncio.AbstractEventLoop):
        self.service, self.loop = service, loop
        self.value: int | None = -1
        self._wake = asyncio.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="livestack-web-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _watch(self) -> None:
        seen = -1
        while not self._done.is_set():
            ch = self.service.wait_change(seen, 1.0)     # 1 s: notice close() even when nothing changes
            if ch is None:
                break
            if ch != seen:
                seen = ch
                self._post(ch)
        self._post(None)

    def _post(self, value: int | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._set, value)
        except RuntimeError:          # the loop has closed: nobody listens any more
            pass

    def _set(self, value: int | None) -> None:
        if self.value is None:
            return
        self.value = value
        self._wake.set()
        self._wake = asyncio.Event()

    def close(self) -> None:
        """In the loop: end every event stream now."""
        self._done.set()
        self._set(None)

    async def wait(self, seen: int, timeout: float) -> int | None:
        """The counter once it differs from `seen`, or `seen` after `timeout` s; None when closing."""
        if self.value != seen:
            return self.value
        wake = self._wake
        try:
            await asyncio.wait_for(wake.wait(), timeout)
        except TimeoutError:
            pass
        return self.value


# ---------------------------------------------------------------------------------------------------- routes

class Api:
    """One request -> checks -> one Service call -> a response.  Runs in the event loop: nothing here blocks
    (files are read in `io`, the worker's futures are awaited)."""

    def __init__(self, service, web_params, hosts: Hosts, idle_s: float, changes: Changes, io: ThreadPoolExecutor):
        self.service, self.web, self.hosts, self.idle_s = service, web_params, hosts, idle_s
        self.changes, self.io = changes, io
        self.exports = 0              # export requests being made or sent (EXPORT_SENDS); only the loop touches it
        self.big_sends = 0            # files of BIG_FILE or more being sent (BIG_SENDS); only the loop touches it
        self.bad_tokens: dict = {}    # client_key -> loop times of its wrong tokens (BAD_TOKENS); the loop's only
        self.waiting: collections.Counter = collections.Counter()   # a worker's future -> requests awaiting it

    async def handle(self, req: web.BaseRequest) -> web.StreamResponse:
        try:
            target = req.raw_path
            if target.startswith("/"):          # origin-form, as browsers send it: the path is taken as is
                path, _, query = target.partition("?")
                authority = None
            else:                               # absolute-form (http://host/path): its host must be ours too
                u = urlsplit(target)
                path, query, authority = u.path or "/", u.query, u.netloc
            self._check_host(req, authority)
            if req.method not in ("GET", "HEAD", "POST"):
                raise HttpError(405, f"{req.method} is not used here: GET reads, POST changes",
                                {"Allow": "GET, HEAD, POST"})
            write = req.method == "POST"
            if write:
                self._check_origin(req)
                self._check_token(req)
                self._check_content_type(req)
            for prefix, serve in (("/api/files/", self._file), ("/static/", self._static),
                                  ("/api/targets/", self._target_preview)):
                if path.startswith(prefix):
                    if write:            # read-only trees: a POST is the wrong method (405), not a missing page
                        raise HttpError(405, f"{path[:200]} needs GET", {"Allow": "GET"})
                    return await serve(req, path[len(prefix):])
            fn = (POST_ROUTES if write else GET_ROUTES).get(path)
            if fn is None:
                if path in (GET_ROUTES if write else POST_ROUTES):
                    raise HttpError(405, f"{path} needs {'GET' if write else 'POST'}",
                                    {"Allow": "GET" if write else "POST"})
                raise HttpError(404, f"no such page {path[:200]}; the API is under /api/ (see the README, HTTP API)")
            q = {k: v[-1] for k, v in parse_qs(query).items()}
            return await fn(self, req, q, await self._body(req) if write else None)
        except HttpError as err:
            return _json({"error": err.message}, err.status, err.headers)
        except Refused as err:
            return _json({"error": str(err)}, err.status, {"Retry-After": "2"} if err.status == 503 else None)
        except ConnectionError:
            raise
        except Exception as err:
            # a bug: the traceback to the log, and the JSON every other error is (aiohttp's own 500 was a
            # plain-text "Server got itself in trouble", which the page and scripts could not read); once an
            # answer has begun (a download, the event stream) there is nothing to say: aiohttp drops the connection
            if req.get(_STARTED):
                raise
            log.exception("internal error answering %s %s", req.method, req.path[:200])
            return _json({"error": f"internal error ({type(err).__name__}: {str(err)[:200]}): a bug — the "
                                   f"daemon's log has the details; please report it"}, 500)

    # ---------------------------------------------------------------- checks
    def _check_host(self, req: web.BaseRequest, target_authority: str | None) -> None:
        """Refuse a request for another name (DNS rebinding reads and changes through the user's browser).
        No Host header at all is not a browser (HTTP/1.0 scripts): allowed."""
        for authority in (req.headers.get("Host"), target_authority):
            if authority is not None and not self.hosts.allows(authority):
                raise HttpError(403, f"Host {authority[:100]!r} is not a name of this server (DNS rebinding?); "
                                     "if it is, add it to [web] allowed_hosts")

    def _check_origin(self, req: web.BaseRequest) -> None:
        """A page from another site must not drive the daemon through the user's browser."""
        origin = req.headers.get("Origin")
        if origin is None:
            return                    # not a browser: curl, scripts
        if origin.strip().lower() == "null":
            raise HttpError(403, "cross-site request refused: Origin null (a sandboxed frame or a local file)")
        try:
            o = urlsplit(origin.strip())
        except ValueError:            # "http://[::1": not a URL a browser sends
            o = None
        if o is not None and o.scheme in ("http", "https"):
            if o.netloc.lower() == req.headers.get("Host", "").lower():
                return
            # behind a reverse proxy the Host is what the proxy sends (nginx: 127.0.0.1:8080 by default, or the
            # name without its port): the page's origin is one of the [web] allowed_hosts names
            if host_name(o.netloc) in self.hosts.configured:
                return
        raise HttpError(403, f"cross-site request from {origin[:100]} refused")

    def _check_token(self, req: web.BaseRequest) -> None:
        token = self.web.token
        if not token:
            return
        auth = req.headers.get("Authorization", "")
        # the scheme is case-insensitive (RFC 9110 11.1): 'bearer …' as well as 'Bearer …'
        got = auth[7:].strip() if auth[:7].lower() == "bearer " else req.headers.get("X-Livestack-Token")
        if not got:
            raise HttpError(401, "this call changes the session and needs the token: send "
                                 "'Authorization: Bearer <token>' or 'X-Livestack-Token: <token>'",
                            {"WWW-Authenticate": 'Bearer realm="livestack"'})
        # Guessing: an address that sent BAD_TOKENS wrong ones within BAD_TOKEN_S waits (429), right token or
        # not — a short token ([web] token = "1234") fell to a script trying thousands a second.  Loopback is
        # not counted: behind a reverse proxy every visitor comes from there, and one guesser would lock all out.
        transport = req.transport
        key = client_key(transport.get_extra_info("peername")) if transport is not None else None
        now = asyncio.get_running_loop().time()
        times = self.bad_tokens.get(key) if key is not None else None
        if times:
            while times and now - times[0] >= BAD_TOKEN_S:
                times.popleft()
            if len(times) >= BAD_TOKENS:
                wait = max(1, math.ceil(BAD_TOKEN_S - (now - times[0])))
                raise HttpError(429, f"{BAD_TOKENS} wrong tokens from your address within {BAD_TOKEN_S:g} s; "
                                     f"try again in {wait} s", {"Retry-After": str(wait)})
        # bytes that are not UTF-8 reach us as lone surrogates: compared as they came, never a 500
        if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"), token.encode()):
            if key is not None:
                if key not in self.bad_tokens and len(self.bad_tokens) >= 1024:    # (many addresses: forget one)
                    self.bad_tokens.pop(next(iter(self.bad_tokens)))
                self.bad_tokens.setdefault(key, collections.deque()).append(now)
            raise HttpError(403, "wrong token")

    def _check_content_type(self, req: web.BaseRequest) -> None:
        """Only JSON: a form or a text/plain body is what another site's page can send without asking."""
        ctype = req.headers.get("Content-Type")
        mime = ctype.split(";", 1)[0].strip().lower() if ctype is not None else None
        if mime == "application/json" or (mime is None and not req.body_exists):
            return
        raise HttpError(415, f"send the body as JSON with 'Content-Type: application/json' "
                             f"(got {(ctype or 'no Content-Type')[:60]})")

    async def _body(self, req: web.BaseRequest) -> dict:
        n = req.content_length
        if n is not None and n > MAX_BODY:
            raise HttpError(413, f"request body of {n} bytes is over the {MAX_BODY} byte limit")
        if not req.body_exists:
            return {}
        raw = bytearray()
        try:
            if req.headers.get("Expect", "").lower() == "100-continue":
                await req.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            async with asyncio.timeout(self.idle_s):
                while chunk := await req.content.read(MAX_BODY + 1 - len(raw)):
                    raw += chunk
                    if len(raw) > MAX_BODY:
                        raise HttpError(413, f"request body is over the {MAX_BODY} byte limit")
        except TimeoutError as err:
            raise HttpError(408, f"request body not received within {self.idle_s:g} s") from err
        except ConnectionError as err:      # the client left before its body was complete: nobody to answer,
            # and not aiohttp's "Error handling request" with a traceback at ERROR for each one
            raise HttpError(400, "the connection closed before the request body was complete") from err
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:        # RecursionError: [[[[… nested beyond Python's stack
            raise HttpError(400, f"request body is not JSON ({type(err).__name__}: {str(err)[:100]})") from err
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        return body

    # ---------------------------------------------------------------- responses
    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        """A client that stops reading is dropped after idle_s, not kept with its buffers forever."""
        try:
            await asyncio.wait_for(resp.write(data), self.idle_s)
        except TimeoutError as err:
            raise ConnectionResetError(f"the client read nothing for {self.idle_s:g} s") from err

    async def _stream(self, req, status: int, ctype: str, size: int, chunks, headers: dict | None = None):
        resp = web.StreamResponse(status=status, headers=_headers(ctype, headers))
        resp.content_length = size
        try:
            await resp.prepare(req)
            req[_STARTED] = True
            async with contextlib.aclosing(chunks):
                if req.method == "HEAD":          # GET's headers, no body (aiohttp would send what is written)
                    return resp
                async for chunk in chunks:
                    await self._write(resp, chunk)
        except ConnectionError:
            resp.force_close()
        return resp

    async def _send_bytes(self, req, data: bytes, ctype: str, headers: dict | None = None):
        async def chunks():
            for i in range(0, len(data), CHUNK):
                yield data[i:i + CHUNK]
        return await self._stream(req, 200, ctype, len(data), chunks(), headers)

    async def _send_file(self, req, p: Path, *, download: str | None = None):
        loop = asyncio.get_running_loop()
        try:
            # an atomic rename replaces the inode: this open sees one complete version
            f = await loop.run_in_executor(self.io, open, p, "rb")
        except FileNotFoundError as err:
            # the session folder itself gone (its USB disk pulled out): not a file still to come
            if not await loop.run_in_executor(self.io, p.parent.is_dir):
                raise HttpError(404, f"{p.name} cannot be read: the folder {p.parent} is gone (its disk "
                                     "unplugged?)") from err
            raise HttpError(404, f"{p.name} does not exist yet") from err
        except OSError as err:
            raise HttpError(404, f"{p.name} cannot be read ({err.strerror})") from err
        size = os.fstat(f.fileno()).st_size
        # A download holds the version of the file it began with: stack.fits is replaced every few frames, and a
        # replaced version's disk space comes back only when its last reader is done — slow readers (a phone on
        # weak Wi-Fi) held one 470 MB version each at 24 MP, as many as asked, on an SD card.
        big = size >= BIG_FILE
        if big and self.big_sends >= BIG_SENDS:
            f.close()
            raise HttpError(503, f"{BIG_SENDS} large files are being downloaded; try again when one is done",
                            {"Retry-After": "10"})
        if big:
            self.big_sends += 1

        async def chunks():
            left = size
            while left > 0 and (chunk := await loop.run_in_executor(self.io, f.read, min(CHUNK, left))):
                left -= len(chunk)
                yield chunk
            if left:                  # truncated meanwhile: the client must not wait for the rest
                raise ConnectionResetError(f"{p.name} shrank while being sent")

        headers = {"Content-Disposition": f'attachment; filename="{download}"'} if download else None
        try:
            return await self._stream(req, 200, CONTENT_TYPES.get(p.suffix.lower(), "application/octet-stream"),
                                      size, chunks(), headers)
        finally:
            f.close()
            if big:
                self.big_sends -= 1

    async def _static(self, req, name: str):
        name = unquote(name)
        if name not in STATIC_FILES:
            raise HttpError(404, f"no static file {name[:200]!r}")
        return await self._send_file(req, STATIC / name)

    async def _file(self, req, rel: str):
        """A file of the session folder.  '..', encoded '%2e%2e', absolute paths and symlinks leading out are
        refused: only paths that resolve inside the folder are served."""
        rel = unquote(rel)
        shown = rel if len(rel) <= 120 else rel[:100] + "…"
        parts = rel.replace("\\", "/").split("/")
        if not rel or rel.startswith("/") or "\0" in rel or ".." in parts or Path(rel).is_absolute():
            raise HttpError(403, f"refused: {shown!r} is not a path inside the session folder")
        try:
            root = self.service.out.resolve()
            p = (root / rel).resolve()
            if not p.is_relative_to(root):
                raise HttpError(403, f"refused: {shown!r} leads outside the session folder")
            is_file = p.is_file()
        except (OSError, RuntimeError) as err:   # name too long, a symlink loop (RuntimeError before 3.13)
            reason = getattr(err, "strerror", None) or "symlink loop"
            raise HttpError(404, f"{shown} is not a file of the session folder ({reason})") from err
        if not is_file:
            raise HttpError(404, f"{shown} is not a file of the session folder")
        return await self._send_file(req, p)

    async def _target_preview(self, req, rest: str):
        """/api/targets/<id>/preview.jpg.  The id is looked up in the published targets list; the file's path is
        built from that list's folder only, never from the request."""
        m = _TARGET_PREVIEW.fullmatch(rest)
        if m is None:
            shown = unquote(rest)[:100]
            raise HttpError(404, f"no such page /api/targets/{shown}; a target's image is "
                                 "/api/targets/<id>/preview.jpg with an id from GET /api/targets")
        tid = int(m.group(1))
        snap = self.service.loaded()          # one snapshot: its targets list and its preview belong together
        t = next((t for t in snap.status.get("targets") or () if t.get("id") == tid), None)
        if t is None:
            raise HttpError(404, f"no target {tid}; the ids are listed by GET /api/targets")
        name = str(t.get("name"))[:100]
        if t.get("current"):
            if snap.preview is None:
                raise HttpError(404, f"target {tid} ({name}) has nothing stacked yet: its preview appears with "
                                     "the first stacked frame")
            return await self._send_bytes(req, snap.preview, "image/jpeg")
        folder = t.get("folder")
        missing = f"target {tid} ({name}) has no preview.jpg in {str(folder)[:120]}"
        try:
            # targets.json is the daemon's own file, but a hand-edited folder must not lead out of OUT either
            root = self.service.out.resolve()
            p = (root / folder / "preview.jpg").resolve() if isinstance(folder, str) and folder else None
            if p is None or not p.is_relative_to(root) or not p.is_file():
                raise HttpError(404, missing)
        except (OSError, RuntimeError) as err:
            raise HttpError(404, missing) from err
        try:
            return await self._send_file(req, p)
        except HttpError as err:          # moved by a switch of targets since the snapshot
            raise HttpError(404, missing) from err

    async def _result(self, fut: Future, timeout: float):
        """The worker's result, awaited without a thread; TimeoutError after `timeout` s.  The future is not
        cancelled here: the worker sets its result whatever happens — unless _wait withdraws it before the worker
        has begun it (Service.withdraw), which exclude/include never are."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def wake(_):
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:      # the loop has closed
                pass

        fut.add_done_callback(wake)
        await asyncio.wait_for(done.wait(), timeout)
        return fut.result()

    async def _wait(self, fut: Future, timeout: float, what: str):
        """The worker's result within `timeout` s.  Past it, a command the worker has not begun is withdrawn
        (Service.withdraw) and the answer is 503: nothing was done, try again — left queued, it was carried out
        after that answer anyway, and the retry it advised made it twice (two new sessions back to back).  One
        the worker has begun goes on: _GoesOn, for the caller to say so."""
        self.waiting[fut] += 1
        try:
            return await self._result(fut, timeout)
        except TimeoutError:
            # the requests for one export share its future (Service.export): withdrawn when the last one gives up
            shared = self.waiting[fut] > 1
            if not shared and self.service.withdraw(fut):
                raise HttpError(503, f"nothing was done: the worker was busy for over {timeout:g} s (a restack of "
                                     f"the night, a long frame) and {what} was withdrawn before it began; try "
                                     "again when it is free (GET /api/status: state)", {"Retry-After": "10"}) from None
            if fut.done():            # done as the wait ended
                return fut.result()
            raise _GoesOn(not shared or fut.running()) from None
        finally:
            self.waiting[fut] -= 1
            if not self.waiting[fut]:
                del self.waiting[fut]

    async def _command(self, fut: Future, timeout: float, what: str, request: str) -> web.Response:
        """A change the worker makes (stretch, palette, new session): the status after it, or 202 when the worker
        has begun it and is not done in `timeout` s — it takes effect when done, and a refusal that comes then is
        the status's `refused` (Service.follow: ``request`` names it).  (Answered 503 "try again", a new session
        still being made was asked for a second time.)"""
        try:
            return _json(await self._wait(fut, timeout, what))
        except _GoesOn:
            self.service.follow(fut, request)
            return _json({"accepted": True, "message": f"{what} is under way (the worker, busy, began it late) and "
                                                       "takes effect when it is done: the status shows it, or its "
                                                       "refusal (refused); asking again would do it a second "
                                                       "time"}, 202)

    # ---------------------------------------------------------------- GET routes
    async def index(self, req, q, _):
        return await self._send_file(req, STATIC / "index.html")

    async def status(self, req, q, _):
        return _json(self.service.status())

    async def frames(self, req, q, _):
        snap = self.service.loaded()
        try:
            since = max(0, int(q.get("since", 0)))
        except ValueError as err:
            raise HttpError(400, f"since={q.get('since')!r}: must be an integer") from err
        return _json({"generation": snap.generation, "total": len(snap.frames), "since": since,
                      "frames": [_clean(d) for d in snap.frames[since:]]})

    async def preview(self, req, q, _):
        jpg = self.service.loaded().preview
        if jpg is None:
            raise HttpError(404, "nothing stacked yet: the preview appears with the first stacked frame")
        return await self._send_bytes(req, jpg, "image/jpeg")

    async def targets(self, req, q, _):
        s = self.service.loaded().status
        # the book's count of the current target is brought up to date when stack.fits is written; the engine's
        # count, in the same snapshot, is the live one
        targets = [{**t, "frames": s["stacked"]} if t.get("current") and isinstance(s.get("stacked"), int) else t
                   for t in s.get("targets") or ()]
        current = (s.get("target") or {}).get("id")
        if current is None:
            current = next((t.get("id") for t in targets if t.get("current")), None)
        return _json({"targets": targets, "current": current, "held": list(s.get("held") or ())})

    async def stack_fits(self, req, q, _):
        return await self._send_file(req, self.service.out / "stack.fits", download="stack.fits")

    async def export(self, req, q, _):
        fmt, mode = q.get("format", "tiff").lower(), q.get("mode", "stretched").lower()
        if fmt not in ("png", "tiff"):
            raise HttpError(400, f"format={fmt!r}: use png or tiff")
        if mode not in ("stretched", "linear"):
            raise HttpError(400, f"mode={mode!r}: use stretched or linear")
        # the worker's time between frames: not for any page a visitor has open (<img src=…/api/export>); the
        # browser says where a request comes from (Sec-Fetch-Site; Origin on a fetch).  Scripts send neither.
        refused = HttpError(403, "refused: another site's page asked for an export (the worker makes it between "
                                 "frames); download it from this server's page")
        if req.headers.get("Sec-Fetch-Site", "").strip().lower() in ("cross-site", "same-site"):
            raise refused
        try:
            self._check_origin(req)
        except HttpError as err:
            raise refused from err
        ext = "png" if fmt == "png" else "tif"
        headers = {"Content-Disposition": f'attachment; filename="stack-{mode}-16bit.{ext}"'}
        ctype = "image/png" if fmt == "png" else "image/tiff"
        if req.method == "HEAD":
            # GET's status and headers without the export (its length is known only once it is made: seconds of
            # the worker's time and ~100 MB at 24 MP, for a link checker or a download manager asking first)
            self.service.check_export()
            resp = web.StreamResponse(headers=_headers(ctype, headers))
            await resp.prepare(req)
            req[_STARTED] = True
            return resp
        # each export sent is a whole image in memory (144 MB at 24 MP) until its client has read it: slow
        # readers (a phone on weak Wi-Fi, or on purpose) held one each, as many as asked
        if self.exports >= EXPORT_SENDS:
            raise HttpError(503, f"{EXPORT_SENDS} exports are being made or downloaded; try again when one is done",
                            {"Retry-After": "10"})
        self.exports += 1
        try:
            try:
                data = await self._wait(self.service.export(fmt, mode), EXPORT_S, "the export")
            except _GoesOn as going:
                # the answer is the image: not 202.  Not made again for a retry: the same request meanwhile shares
                # it (another is refused until it is done); once made, it is not kept (~144 MB at 24 MP)
                now = "is still being made" if going.begun else \
                    "is not begun (the worker is busy: a restack, a long frame) and stays queued for another request"
                raise HttpError(503, f"the export {now} after {EXPORT_S:g} s: asking again ({fmt}, {mode}) "
                                     "while it is made gets this one, no second export is started",
                                {"Retry-After": "10"}) from None
            return await self._send_bytes(req, data, ctype, headers)
        finally:
            self.exports -= 1

    async def events(self, req, q, _):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        resp.force_close()
        try:
            await resp.prepare(req)
            req[_STARTED] = True
            if req.method == "HEAD":
                return resp
            await self._write(resp, b"retry: 2000\n\n")
            seen = -1
            while (ch := await self.changes.wait(seen, SSE_KEEPALIVE_S)) is not None:
                if ch == seen:
                    await self._write(resp, b": keepalive\n\n")
                else:
                    seen = ch
                    data = json.dumps(self.service.status(), allow_nan=False, default=str)
                    await self._write(resp, f"event: status\ndata: {data}\n\n".encode())
        except ConnectionError:
            pass
        return resp

    # ---------------------------------------------------------------- POST routes
    async def pause(self, req, q, body):
        return _json(self.service.pause())

    async def resume(self, req, q, body):
        return _json(self.service.resume())

    async def _exclude(self, body, exclude: bool):
        name = body.get("file")
        if not isinstance(name, str) or not name:
            raise HttpError(400, 'send {"file": "<name as in /api/frames>"}')
        # (in the I/O pool: the service looks at the stack's files, which a dying USB disk may take long to answer)
        fut = await asyncio.get_running_loop().run_in_executor(self.io, self.service.exclude, name, exclude)
        try:
            return _json(await self._result(fut, 2.0))
        except TimeoutError:
            # a refusal now comes after this answer: the status says it (refused), or no one would hear of it
            self.service.follow(fut, f"{'exclude' if exclude else 'include'} {name}")
            return _json({"accepted": True, "message": "restacking; progress in /api/status (restack)"}, 202)

    async def exclude(self, req, q, body):
        return await self._exclude(body, True)

    async def include(self, req, q, body):
        return await self._exclude(body, False)

    async def stretch(self, req, q, body):
        unknown = set(body) - {"black", "midtones", "white", "auto"}
        if unknown:
            raise HttpError(400, f"unknown stretch field(s) {', '.join(sorted(unknown)[:5])[:200]}; "
                                 "use black, midtones, white (0..1) or auto")
        auto = body.get("auto", False)
        if not isinstance(auto, bool):      # "no", "false", 0.5, NaN were all taken as auto
            raise HttpError(400, f"stretch auto = {str(auto)[:40]!r}: must be true or false")
        if auto:
            vals = {"black": None, "midtones": None, "white": None}
        else:
            vals = {}
            for k in ("black", "midtones", "white"):
                v = body.get(k)
                # (the range refuses NaN and ±inf too, and compares an int beyond a float, 10**400, exactly)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                    raise HttpError(400, f"stretch {k} = {v!r}: must be a number in 0..1 or null (auto)")
                vals[k] = None if v is None else float(v)
            if vals["midtones"] is not None and not 0 < vals["midtones"] < 1:
                raise HttpError(400, "stretch midtones must be strictly between 0 and 1")
            if None not in (vals["black"], vals["white"]) and vals["black"] >= vals["white"]:
                raise HttpError(400, f"stretch black {vals['black']} must be below white {vals['white']}")
        return await self._command(self.service.set_stretch(**vals), COMMAND_S, "the stretch", "stretch")

    async def new_session(self, req, q, body):
        return await self._command(self.service.new_session(), NEW_SESSION_S, "the new session", "new session")

    async def palette(self, req, q, body):
        unknown = set(body) - {"palette", "weights", "hues"}
        if unknown:
            raise HttpError(400, f"unknown palette field(s) {', '.join(sorted(unknown)[:5])[:200]}; use palette, "
                                 "weights, hues")
        for k in ("weights", "hues"):
            if k in body and not isinstance(body[k], dict):
                raise HttpError(400, f'{k} must be an object, e.g. {{"Ha": 1.5}}')
            # any name is taken (a filter may come later), but not without end: they are in every status sent
            if k in body and (len(body[k]) > MAX_FILTERS or any(len(n) > MAX_FILTER_NAME for n in body[k])):
                raise HttpError(400, f"{k}: at most {MAX_FILTERS} filters, names of at most {MAX_FILTER_NAME} "
                                     "characters")
        if "palette" in body and not isinstance(body["palette"], str):
            raise HttpError(400, 'palette must be a name, e.g. "SHO" (or "auto")')
        try:
            fut = self.service.set_palette(body.get("palette"), body.get("weights"), body.get("hues"))
        except (ValueError, TypeError) as err:      # (its sentence quotes the value sent: 64 KiB of it at most)
            why = str(err)
            raise HttpError(400, why if len(why) <= 300 else why[:280] + "…") from err
        return await self._command(fut, COMMAND_S, "the palette", "palette")


def _headers(ctype: str, extra: dict | None = None) -> dict:
    return {"Content-Type": ctype, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            **(extra or {})}


def _json(obj, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(obj, allow_nan=False, default=str).encode(),
                        headers=_headers("application/json", headers))


def _clean(d: dict) -> dict:
    """JSON-safe record (frames.jsonl never holds NaN, but be strict on the wire)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


_TARGET_PREVIEW = re.compile(r"([0-9]{1,9})/preview\.jpg")
STATIC_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file()) if STATIC.is_dir() else frozenset()

GET_ROUTES = {"/": Api.index, "/index.html": Api.index, "/api/status": Api.status, "/api/frames": Api.frames,
              "/api/preview.jpg": Api.preview, "/api/stack.fits": Api.stack_fits, "/api/export": Api.export,
              "/api/events": Api.events, "/api/targets": Api.targets}
POST_ROUTES = {"/api/pause": Api.pause, "/api/resume": Api.resume, "/api/exclude": Api.exclude,
               "/api/include": Api.include, "/api/stretch": Api.stretch, "/api/new-session": Api.new_session,
               "/api/palette": Api.palette}
