"""Routes -> one Service call -> JSON (or a refusal as one sentence).  Standard library only.

GET  /                      the page (static/index.html); /static/<name> its JS and CSS
GET  /api/status            counts, the latest frame, the last rejection, state (JSON)
GET  /api/frames?since=N    frames.jsonl records from N on, with the log's generation
GET  /api/preview.jpg       the stretched live preview
GET  /api/stack.fits        the stack (float32, weight map in HDU "WEIGHT")
GET  /api/export?format=png|tiff&mode=stretched|linear   full-resolution 16-bit image
GET  /api/files/<path>      any file inside the session folder (frames.jsonl, archive/…); nothing outside
GET  /api/events            server-sent events: "status" with the status JSON whenever anything changes
POST /api/pause, /api/resume, /api/exclude {"file"}, /api/include {"file"}, /api/stretch {black, midtones,
     white | auto}, /api/palette {palette, weights, hues}, /api/new-session — with a token configured, each
     needs "Authorization: Bearer <token>" or "X-Livestack-Token: <token>"
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import os
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..session import Refused

log = logging.getLogger("livestack.web")
STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".jpg": "image/jpeg", ".json": "application/json", ".jsonl": "application/x-ndjson",
                 ".fits": "application/fits", ".txt": "text/plain; charset=utf-8"}
MAX_BODY = 64 * 1024
SSE_KEEPALIVE_S = 15.0


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class App(ThreadingHTTPServer):
    """The HTTP server of one Service.  serve_forever() in a thread; shutdown() + server_close() to stop."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, service, web):
        self.service, self.web = service, web
        super().__init__((web.host, web.port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def make_app(service, web) -> App:
    """Bind ``web.host:web.port`` (port 0: any free port; see App.url)."""
    return App(service, web)


def serve_in_thread(app: App) -> threading.Thread:
    t = threading.Thread(target=app.serve_forever, kwargs={"poll_interval": 0.2}, name="livestack-web",
                         daemon=True)
    t.start()
    return t


class Handler(BaseHTTPRequestHandler):
    server: App
    server_version = "livestack"
    sys_version = ""

    def log_message(self, fmt, *args):  # access log only when debugging: journald stays readable
        log.debug("%s %s", self.address_string(), fmt % args)

    # ---------------------------------------------------------------- dispatch
    def do_GET(self):
        self._dispatch(GET_ROUTES, write=False)

    def do_POST(self):
        self._dispatch(POST_ROUTES, write=True)

    def _dispatch(self, routes: dict, *, write: bool) -> None:
        try:
            url = urlsplit(self.path)
            path = url.path
            if write:
                self._check_origin()
                self._check_token()
            if path.startswith("/api/files/") and not write:
                return self._file(path[len("/api/files/"):])
            if path.startswith("/static/") and not write:
                return self._static(path[len("/static/"):])
            fn = routes.get(path)
            if fn is None:
                other = POST_ROUTES if not write else GET_ROUTES
                if path in other:
                    raise HttpError(405, f"{path} needs {'POST' if not write else 'GET'}")
                raise HttpError(404, f"no such page {path}; the API is under /api/ (see the README, HTTP API)")
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            fn(self, q, self._body() if write else None)
        except HttpError as err:
            self._json({"error": err.message}, err.status, err.headers)
        except Refused as err:
            self._json({"error": str(err)}, err.status)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ---------------------------------------------------------------- checks
    def _check_token(self) -> None:
        token = self.server.web.token
        if not token:
            return
        auth = self.headers.get("Authorization", "")
        got = auth[7:].strip() if auth.startswith("Bearer ") else self.headers.get("X-Livestack-Token")
        if not got:
            raise HttpError(401, "this call changes the session and needs the token: send "
                                 "'Authorization: Bearer <token>' or 'X-Livestack-Token: <token>'",
                            {"WWW-Authenticate": 'Bearer realm="livestack"'})
        if not hmac.compare_digest(got.encode(), token.encode()):
            raise HttpError(403, "wrong token")

    def _check_origin(self) -> None:
        """A page from another site must not drive the daemon through the user's browser."""
        origin = self.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != self.headers.get("Host", ""):
            raise HttpError(403, f"cross-site request from {origin} refused")

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise HttpError(413, f"request body of {n} bytes is over the {MAX_BODY} byte limit")
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise HttpError(400, f"request body is not JSON ({err})") from err
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        return body

    # ---------------------------------------------------------------- responses
    def _send(self, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj, allow_nan=False, default=str).encode(), "application/json", headers)

    def _send_file(self, p: Path, *, download: str | None = None) -> None:
        try:
            f = open(p, "rb")   # an atomic rename replaces the inode: this open sees one complete version
        except FileNotFoundError as err:
            raise HttpError(404, f"{p.name} does not exist yet") from err
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES.get(p.suffix.lower(), "application/octet-stream"))
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            if download:
                self.send_header("Content-Disposition", f'attachment; filename="{download}"')
            self.end_headers()
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)

    def _static(self, name: str) -> None:
        name = unquote(name)
        if name not in STATIC_FILES:
            raise HttpError(404, f"no static file {name!r}")
        self._send_file(STATIC / name)

    def _file(self, rel: str) -> None:
        """A file of the session folder.  '..', encoded '%2e%2e', absolute paths and symlinks leading out are
        refused: only paths that resolve inside the folder are served."""
        rel = unquote(rel)
        root = self.server.service.out.resolve()
        parts = rel.replace("\\", "/").split("/")
        if not rel or rel.startswith("/") or "\0" in rel or ".." in parts or Path(rel).is_absolute():
            raise HttpError(403, f"refused: {rel!r} is not a path inside the session folder")
        p = (root / rel).resolve()
        if not p.is_relative_to(root):
            raise HttpError(403, f"refused: {rel!r} leads outside the session folder")
        if not p.is_file():
            raise HttpError(404, f"{rel} is not a file of the session folder")
        self._send_file(p)

    # ---------------------------------------------------------------- GET routes
    def index(self, q, _):
        self._send_file(STATIC / "index.html")

    def status(self, q, _):
        self._json(self.server.service.status())

    def frames(self, q, _):
        snap = self.server.service.snapshot
        try:
            since = max(0, int(q.get("since", 0)))
        except ValueError as err:
            raise HttpError(400, f"since={q.get('since')!r}: must be an integer") from err
        self._json({"generation": snap.generation, "total": len(snap.frames), "since": since,
                    "frames": [_clean(d) for d in snap.frames[since:]]})

    def preview(self, q, _):
        jpg = self.server.service.snapshot.preview
        if jpg is None:
            raise HttpError(404, "nothing stacked yet: the preview appears with the first stacked frame")
        self._send(200, jpg, "image/jpeg")

    def stack_fits(self, q, _):
        self._send_file(self.server.service.out / "stack.fits", download="stack.fits")

    def export(self, q, _):
        fmt, mode = q.get("format", "tiff").lower(), q.get("mode", "stretched").lower()
        if fmt not in ("png", "tiff"):
            raise HttpError(400, f"format={fmt!r}: use png or tiff")
        if mode not in ("stretched", "linear"):
            raise HttpError(400, f"mode={mode!r}: use stretched or linear")
        data = _wait(self.server.service.export(fmt, mode), 300, "the export")
        ext = "png" if fmt == "png" else "tif"
        self._send(200, data, "image/png" if fmt == "png" else "image/tiff",
                   {"Content-Disposition": f'attachment; filename="stack-{mode}-16bit.{ext}"'})

    def events(self, q, _):
        svc = self.server.service
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.wfile.write(b"retry: 2000\n\n")
        seen = -1
        while True:
            ch = svc.wait_change(seen, SSE_KEEPALIVE_S)
            if ch is None:
                break
            if ch == seen:
                self.wfile.write(b": keepalive\n\n")
            else:
                seen = ch
                data = json.dumps(svc.status(), allow_nan=False, default=str)
                self.wfile.write(f"event: status\ndata: {data}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True

    # ---------------------------------------------------------------- POST routes
    def pause(self, q, body):
        self._json(self.server.service.pause())

    def resume(self, q, body):
        self._json(self.server.service.resume())

    def _exclude(self, body, exclude: bool):
        name = body.get("file")
        if not isinstance(name, str) or not name:
            raise HttpError(400, 'send {"file": "<name as in /api/frames>"}')
        fut = self.server.service.exclude(name, exclude)
        try:
            self._json(fut.result(timeout=2.0))
        except FutureTimeout:
            self._json({"accepted": True, "message": "restacking; progress in /api/status (restack)"}, 202)

    def exclude(self, q, body):
        self._exclude(body, True)

    def include(self, q, body):
        self._exclude(body, False)

    def stretch(self, q, body):
        if body.get("auto"):
            vals = {"black": None, "midtones": None, "white": None}
        else:
            unknown = set(body) - {"black", "midtones", "white", "auto"}
            if unknown:
                raise HttpError(400, f"unknown stretch field(s) {', '.join(sorted(unknown))}; "
                                     "use black, midtones, white (0..1) or auto")
            vals = {}
            for k in ("black", "midtones", "white"):
                v = body.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not math.isfinite(v) or not 0 <= v <= 1):
                    raise HttpError(400, f"stretch {k} = {v!r}: must be a number in 0..1 or null (auto)")
                vals[k] = None if v is None else float(v)
            if vals["midtones"] is not None and not 0 < vals["midtones"] < 1:
                raise HttpError(400, "stretch midtones must be strictly between 0 and 1")
            if None not in (vals["black"], vals["white"]) and vals["black"] >= vals["white"]:
                raise HttpError(400, f"stretch black {vals['black']} must be below white {vals['white']}")
        self._json(_wait(self.server.service.set_stretch(**vals), 60, "the stretch"))

    def new_session(self, q, body):
        self._json(_wait(self.server.service.new_session(), 120, "the new session"))

    def palette(self, q, body):
        unknown = set(body) - {"palette", "weights", "hues"}
        if unknown:
            raise HttpError(400, f"unknown palette field(s) {', '.join(sorted(unknown))}; use palette, weights, hues")
        for k in ("weights", "hues"):
            if k in body and not isinstance(body[k], dict):
                raise HttpError(400, f'{k} must be an object, e.g. {{"Ha": 1.5}}')
        if "palette" in body and not isinstance(body["palette"], str):
            raise HttpError(400, 'palette must be a name, e.g. "SHO" (or "auto")')
        try:
            fut = self.server.service.set_palette(body.get("palette"), body.get("weights"), body.get("hues"))
        except (ValueError, TypeError) as err:
            raise HttpError(400, str(err)) from err
        self._json(_wait(fut, 60, "the palette"))


def _wait(fut, timeout: float, what: str):
    try:
        return fut.result(timeout=timeout)
    except FutureTimeout as err:
        raise HttpError(503, f"{what} is still running after {timeout:g} s; the worker is busy, try again") from err


def _clean(d: dict) -> dict:
    """JSON-safe record (frames.jsonl never holds NaN, but be strict on the wire)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


STATIC_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file()) if STATIC.is_dir() else frozenset()

GET_ROUTES = {"/": Handler.index, "/index.html": Handler.index, "/api/status": Handler.status,
              "/api/frames": Handler.frames, "/api/preview.jpg": Handler.preview,
              "/api/stack.fits": Handler.stack_fits, "/api/export": Handler.export, "/api/events": Handler.events}
POST_ROUTES = {"/api/pause": Handler.pause, "/api/resume": Handler.resume, "/api/exclude": Handler.exclude,
               "/api/include": Handler.include, "/api/stretch": Handler.stretch,
               "/api/new-session": Handler.new_session, "/api/palette": Handler.palette}
