"""`livestack run`: watch a folder, stack live, serve the page.  Foreground; systemd supervises it."""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path

from . import NOTICE
from .config import Config, ConfigError, flag_error, make_section
from .daemon.config import session_section, shell_sections
from .session import FolderError, FolderInUse, SessionError, SessionFolder, held_folder
from .text import one_line

log = logging.getLogger("livestack")

class OneLineFormatter(logging.Formatter):
    """Wraps a handler's formatter: each record's message is one line whatever the file names in it say; a
    traceback, if any, still follows on its own lines."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        record.msg, record.args = one_line(record.getMessage()), None
        try:
            return self.inner.format(record)
        finally:
            record.msg, record.args = msg, args


def register_commands(sub, engine_opts) -> None:
    p = sub.add_parser("run", help="watch a capture folder, stack each new frame, serve the live page")
    p.add_argument("--watch", metavar="DIR", help="capture folder to watch (or [watch] dir)")
    p.add_argument("--out", metavar="DIR", help="session folder: stack.fits, preview.jpg, frames.jsonl, "
                                                 "checkpoint (or [daemon] out)")
    p.add_argument("--port", type=int, help="web page port (default 8080; 0: any free port)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a phone on the LAN)")
    p.add_argument("--token", help="required on state-changing API calls (or [web] token)")
    p.add_argument("--new-session", action="store_true",
                   help="archive the session folder's contents into archive/<time>/ and start a new stack")
    p.add_argument("--recursive", action="store_true", default=None, help="also watch subfolders")
    p.add_argument("--no-web", action="store_true", help="no web page (stack and checkpoint only)")
    engine_opts(p, quiet_help="leave out the INFO lines (one per frame, per write): the session's milestones "
                              "and problems only")
    p.set_defaults(func=cmd_run)


def cmd_run(args, cfg: Config) -> int:
    from .engine.solve import SolveParams      # here, not at the top: astropy.wcs costs every command 0.2 s

    source = Path(args.config).name if getattr(args, "config", None) else "config"
    try:
        wp, dp, web = shell_sections(cfg, source)
        session_section(cfg, source)           # checked here: a bad key is a one-line usage error
        make_section(SolveParams, cfg.extra.get("solve", {}), f"{source}: solve")
        wp = dataclasses.replace(wp, **{k: v for k, v in {"dir": args.watch, "recursive": args.recursive}.items()
                                        if v is not None})
        dp = dataclasses.replace(dp, out=args.out or dp.out)
        for key in ("host", "port", "token"):      # a bad value is said as the flag the user typed
            if (value := getattr(args, key)) is not None:
                try:
                    web = dataclasses.replace(web, **{key: value})
                except ConfigError as err:
                    raise flag_error(err, f"web.{key}", f"--{key}", value) from err
        if args.no_web:
            web = dataclasses.replace(web, enabled=False)
    except (ConfigError, ValueError) as err:
        print(f"livestack run: {err}", file=sys.stderr)
        return 2
    if not wp.dir or not dp.out:
        print("livestack run: give the capture folder and the session folder: --watch DIR --out DIR "
              "(or [watch] dir and [daemon] out in the config)", file=sys.stderr)
        return 2
    watch_dir, out_dir = Path(wp.dir).expanduser().resolve(), Path(dp.out).expanduser().resolve()
    if watch_dir.is_relative_to(out_dir):
        # the session folder is kept out of the watch (its stack.fits is no light): a capture folder that is it, or
        # is inside it, would never have a frame stacked, without a word — and a new stack would move it into
        # archive/ with the session's files
        where = "the session folder" if watch_dir == out_dir else f"inside the session folder {out_dir}"
        print(f"livestack run: the capture folder {watch_dir} is {where}: its frames would never be stacked; "
              "give --out a folder of its own (beside the captures, or inside them)", file=sys.stderr)
        return 2
    log.setLevel(NOTICE if args.quiet else logging.INFO)   # -q: the session's milestones, problems
    for h in logging.getLogger().handlers:          # the journal: one line per record
        if not isinstance(h.formatter, OneLineFormatter):
            h.setFormatter(OneLineFormatter(h.formatter))
    from .masters_cli import load_masters

    try:
        masters = load_masters(dp.masters, cfg)
    except ValueError as err:
        print(f"livestack run: {err}", file=sys.stderr)
        return 2
    if masters is not None:     # which library calibrates the night: the log said nothing of it
        log.log(NOTICE, "livestack: calibration masters from %s: %s (on_mismatch = %s)", masters.root,
                masters.summary(), masters.params.on_mismatch)
    # held before --new-session, which would archive the other daemon's night from under it; exit 1, not 2:
    # under systemd the unit takes the folder over, restarted every 5 s, once a run started by hand is stopped
    try:
        with held_folder(out_dir, make=watch_dir.is_dir()):
            return _serve(args, cfg, wp, dp, web, masters)
    except FolderInUse as err:
        print(f"livestack run: {err}", file=sys.stderr)
        return 1


def _serve(args, cfg: Config, wp, dp, web, masters) -> int:
    """The rest of `livestack run`, while the session folder is held: --new-session, the service, the page."""
    from .daemon.service import Service
    from .web.app import make_app, serve_in_thread

    if args.new_session:
        from .targets import Book

        folder = SessionFolder(dp.out)
        try:
            folder.out.mkdir(parents=True, exist_ok=True)
            book = Book.open(folder.out)
            dest = folder.new_session()
            book.close_current(dest)
            # a fresh start typed at the keyboard stacks: a pause left by the last run ends (the page's New stack,
            # pressed while paused for a slew, keeps it)
            ended = folder.paused() is not None
            if ended:
                folder.set_paused(None)
        except (SessionError, OSError) as err:     # a full or read-only disk: one line, not a traceback
            why = err.strerror if isinstance(err, OSError) and err.strerror else err
            print(f"livestack run: --new-session: {folder.out}: {why}", file=sys.stderr)
            return 1
        if dest is not None:
            log.log(NOTICE, "livestack: previous session archived in %s", dest)
        if ended:
            log.log(NOTICE, "livestack: the last run's pause ended by --new-session")

    svc = Service(cfg, wp.dir, dp.out, wp, dp, masters=masters)
    app = web_thread = None
    if web.enabled:
        if web.host not in ("127.0.0.1", "localhost", "::1") and not web.token:
            log.warning("livestack: the page listens on %s without a token: anyone on the network can change "
                        "the session; set [web] token or --token", web.host)
        try:
            app = make_app(svc, web)
        except OSError as err:
            print(f"livestack run: cannot listen on {web.host}:{web.port} ({err.strerror or err})", file=sys.stderr)
            return 1
        # served before the start: loading the night so far (a 24 MP colour checkpoint is ~0.5 GB: ~10 s read cold
        # from a Pi's SD card) left the page of a restarted daemon hanging; meanwhile the status says "starting"
        # and what needs the session answers 503
        web_thread = serve_in_thread(app)

    stop = threading.Event()

    def on_signal(signum, frame):
        log.log(NOTICE, "livestack: %s received: finishing the current frame", signal.Signals(signum).name)
        stop.set()

    def close() -> None:
        if app is not None:
            app.shutdown()
            app.server_close()
            web_thread.join(timeout=5)
        for s, h in old.items():
            signal.signal(s, h)

    # SIGHUP (the terminal or ssh session closed) stops cleanly like SIGTERM, instead of killing the process
    # mid-frame; there is no reload: a changed config would not match the checkpoint's stack.  Caught from before
    # the start: the page says "idle" as soon as it is done, and a stop asked for meanwhile is a clean one too.
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        svc.start()
    except (SessionError, OSError) as err:
        print(f"livestack run: {err}", file=sys.stderr)
        close()
        # a session folder that cannot be one is a configuration error (2: systemd's RestartPreventExitStatus=
        # keeps it from restarting into it every 5 s); a full or read-only disk is no error at start any more
        return 2 if isinstance(err, FolderError) else 1
    if app is not None:             # said once started: the line has always meant a daemon that stacks
        log.log(NOTICE, "livestack: page at %s", app.url)
        lan = app.lan_urls()
        if lan:             # (http://0.0.0.0:8080/ is no address a phone can open)
            log.log(NOTICE, "livestack: from another machine: %s", " or ".join(lan))
    try:
        while not stop.wait(0.5):
            if not svc.running:
                break
    finally:
        svc.stop()
        close()
    if svc.error is not None:
        print(f"livestack run: stopped by an error: {type(svc.error).__name__}: {svc.error}", file=sys.stderr)
        return 1
    return 0
