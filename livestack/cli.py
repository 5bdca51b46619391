"""Command line: argparse -> one engine/daemon function.  Exit codes: 0 ok, 1 failed, 2 usage, 130 Ctrl-C."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, flag_error, load_config, with_overrides
from .engine.frame import FrameRecord
from .engine.read import FITS_SUFFIXES, capture_order, is_supported, suffix_of
from .engine.settings import INTERPOLATION_NAMES
from .text import one_line

log = logging.getLogger("livestack")


def collect_inputs(items: list[str]) -> list[Path]:
    """Files from a mix of folders (their supported files, not recursive) and file names, in capture order."""
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            files += [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and is_supported(f)]
        else:
            files.append(p)  # a missing or odd file is reported as failed, not silently dropped
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return capture_order(unique)


def _subfolders_hint(items: list[str], show: int = 3) -> str:
    """'' or, when the folders given hold none but some of their subfolders do (a night's folder per night,
    a filter's per filter: `stack` does not look inside), which ones — the user meant those."""
    subs: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            try:
                subs += sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")
                               and any(f.is_file() and is_supported(f) for f in d.iterdir()))
            except OSError:
                continue
    if not subs:
        return ""
    names = ", ".join(d.name for d in subs[:show]) + (f" and {len(subs) - show} more" if len(subs) > show else "")
    return f" (subfolders are not searched; {names} hold some: give them as inputs)"


class Progress:
    """A one-line progress bar on a terminal, one line per frame otherwise (logs, CI)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.done = total, stream, 0
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, rec: FrameRecord) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "█" * filled + "·" * (width - filled)
        detail = rec.status if rec.reason is None else f"{rec.status}: {rec.reason}"
        q = f" fwhm {rec.fwhm:.2f}px stars {rec.stars}" if rec.fwhm is not None else ""
        line = one_line(f"[{bar}] {self.done}/{self.total} {rec.file} {detail}{q} ({rec.seconds:.2f}s)")
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own above the bar."""
        self.stream.write(("\r\033[K" if self.tty else "") + one_line(text) + "\n")
        self.stream.flush()


class _CtrlC:
    """Ctrl-C (SIGINT) during `livestack stack`: the frame in hand is finished, a plate solve still running is
    given up, and what is stacked is written — a frame stopped halfway would leave some rows of the stack with it
    and others without.  A second Ctrl-C stops at once (an output being written is left as it was: atomic).
    Only in the main thread (where Python delivers signals); elsewhere Ctrl-C is Python's own."""

    def __init__(self):
        self.event = threading.Event()
        self._old = None

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._on)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _on(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        print("livestack stack: stopping after this frame and writing what is stacked (Ctrl-C again: stop now)",
              file=sys.stderr, flush=True)


def stack_files(files: list[Path], out: Path, cfg: Config, *, masters=None, quiet: bool = False,
                solve: bool = True) -> dict:
    """Stack ``files`` into ``out`` (stack.fits, preview.jpg, frames.jsonl), with a WCS when the reference
    plate-solves (``solve``).  Returns a summary dict ("interrupted": a Ctrl-C stopped it after "processed"
    files: see _CtrlC)."""
    from .engine.pipeline import Engine
    from .session import FRAMES_LOG, FramesLog, apply_amended, rewrite_frames_log

    out.mkdir(parents=True, exist_ok=True)
    flog_path = out / FRAMES_LOG
    if flog_path.exists():
        flog_path.unlink()  # a batch run starts a fresh log; the daemon resumes instead
    flog = FramesLog(flog_path)
    engine = Engine(cfg, masters=masters, spill_dir=out)   # stacks beyond [stack] memory_mb: mapped files
    progress = None if quiet else Progress(len(files))
    t0 = time.perf_counter()
    sky = sky_status = None
    processed = 0
    records: list[dict] = []
    # said under -q too: -q leaves out the progress bar, not the one line saying what the stack still waits for
    # (a blind solve that fails takes up to [solve] timeout_s: ~46 s of silence looked like a hang)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with _CtrlC() as ctrl_c:
        for i, f in enumerate(files):
            if ctrl_c.event.is_set():
                break
            last = i + 1 == len(files)
            if last and sky is not None and sky.why is None and not sky.solver.running and sky.own is None:
                # the solve has ended: its WCS goes on the grid now, so that stack.fits' header is final before
                # the last frame (a reference without a WCS of its own: no frame's placing is predicted from one)
                sky_status, sky = sky.finish(engine, stop=ctrl_c.event, say=say), None
            # the last file writes stack.fits as it is stacked — unless a plate solve still to come changes its header
            streamed = last and (sky is None or sky.why is not None)
            rec = engine.process(f, next_path=None if last else files[i + 1], final_into=out if streamed else None,
                                 next_last=i + 2 == len(files))
            processed += 1
            records.append(rec.to_dict())
            # Each line is written at once (a killed process leaves it to the kernel) and made durable with the
            # snapshot (below), in one fsync: a batch keeps nothing of a run cut short by a power loss but its
            # log, which the next run of the folder starts afresh — a line's fsync bought nothing, and each one
            # waited on the main thread for the disk's journal (~1 ms, but 0.07 and 0.23 s in two of five timed
            # runs here, the latter right after an earlier output's deletion; the last frame's, 0.29-0.46 s for the
            # stack.fits it streamed: ext4 commits that file's data with it, and the snapshot's preview waited)
            flog.append(records[-1], sync=False)
            if progress:
                progress.update(rec)
            # -v ("log each frame's details"): a line per frame, as the daemon's, also under -q (no progress bar);
            # failed and rejected frames the engine has logged, with the reason
            if rec.status not in ("failed", "rejected"):
                log.info("%s %s%s", rec.status, rec.file, f": {rec.reason}" if rec.reason else
                         f" fwhm {rec.fwhm} px, {rec.stars} stars ({rec.seconds} s)")
            if engine.amended:      # a first frame judged by the frames after it
                if apply_amended(records, engine.amended):
                    rewrite_frames_log(flog_path, records)
                if progress:
                    for a in engine.amended:
                        progress.note(f"{a['file']} {a['status']}: {a['reason']}")
                engine.amended.clear()
            # --no-solve runs no solver, as [solve] enabled = false: the reference's own WCS still counts — a FITS
            # header's (a RAW file has none: nothing to import the solver's modules for, ~20 MB and 0.2 s)
            if rec.status == "reference" and (solve or suffix_of(Path(f)) in FITS_SUFFIXES):
                import dataclasses

                from .config import make_section
                from .engine.solve import SolveParams
                from .sky import BatchSolve

                params = make_section(SolveParams, cfg.extra.get("solve", {}), "config: solve")
                sky = BatchSolve(engine, f, params if solve else dataclasses.replace(params, enabled=False),
                                 off=None if solve else "plate solving is off (--no-solve)")
        if sky is not None:
            sky_status = sky.finish(engine, stop=ctrl_c.event, say=say)
        try:
            wrote = engine.snapshot(out)
        except BaseException:
            if records:         # frames.jsonl's lines, none fsynced yet (above)
                with contextlib.suppress(OSError):      # (the snapshot's error is the one to tell)
                    flog.sync()
            raise
        if records:
            flog.sync()
    from .engine.outputs import filter_file, stale_stacks

    files_out = [f for fs in engine.stacks if (f := filter_file(engine, fs)) != "stack.fits"]
    # a run into a folder of an earlier one: its stacks of filters this one has not are not left beside this
    # run's frames.jsonl as if they were this run's (nothing is removed when nothing was stacked)
    for p in stale_stacks(out, engine) if wrote else []:
        try:
            p.unlink()
        except OSError as err:
            print(f"livestack stack: could not remove {p}: {err.strerror or err}", file=sys.stderr)
    elsewhere = _pointing_elsewhere(files[:processed], records, engine, cfg)
    return {"frames": len(files), "processed": processed, "interrupted": ctrl_c.event.is_set(),
            "stacked": engine.n_stacked, "rejected": engine.n_rejected,
            "failed": engine.n_failed, "exptime": engine.exptime_total, "seconds": time.perf_counter() - t0,
            "wrote": wrote, "filter_files": files_out, "sky": sky_status, "elsewhere": elsewhere,
            # the masters that calibrated the stacked frames (the stacks' CALIBRAT), said in the summary
            "masters_used": sorted({m for fs in engine.stacks for m in fs.counts.masters}) if masters else None}


def _pointing_elsewhere(files: list[Path], records: list[dict], engine, cfg: Config) -> list[float]:
    """How far (degrees) from the reference frame's pointing the frames that did not register point, for those
    whose header says more than [session] slew_deg: frames of another target, which `stack` cannot put on this
    target's grid (the daemon makes a stack of their own)."""
    ref = engine.ref
    failed = [f for f, d in zip(files, records)
              if d["status"] == "rejected" and str(d.get("reason") or "").startswith("registration failed")]
    if ref is None or ref.pointing is None or not failed:
        return []
    from .daemon.config import session_section
    from .engine.read import read_pointing
    from .targets import separation

    slew = session_section(cfg).slew_deg
    far = [separation(p, ref.pointing) for f in failed if (p := read_pointing(f)) is not None]
    return [d for d in far if d > slew]


def _seconds(t: float) -> str:
    """An integration as a summary says it: "480 s", "1.5 s", "0.0016 s" (a 1/640 s frame is no "0 s")."""
    return f"{t:.0f} s" if t >= 10 or t == 0 else f"{t:.2g} s"


def _print_summary(s: dict, out: Path) -> None:
    read = s.get("processed", s["frames"])
    left = s["frames"] - read
    print(f"{s['stacked']} stacked, {s['rejected']} rejected, {s['failed']} failed of {read} frames; "
          f"{_seconds(s['exptime'])} integration, {s['seconds']:.1f} s"
          + ((f" (stopped by Ctrl-C: {left} not read)" if left else " (Ctrl-C)") if s.get("interrupted") else ""))
    far = s.get("elsewhere") or []
    if far:       # an outreach night's folder: the frames of its other targets are "registration failed"
        span = f"{min(far):.1f}°" + (f"–{max(far):.1f}°" if round(max(far), 1) > round(min(far), 1) else "")
        print(f"{len(far)} frame{'s' * (len(far) != 1)} did not register and point{'s' * (len(far) == 1)} {span} "
              f"from the reference frame: another target — stack each target's files apart (`livestack run` makes "
              f"one stack per target)")
    if s.get("masters_used") is not None and s["stacked"]:     # --masters: which of them the stack has
        print("calibrated with " + (", ".join(s["masters_used"]) or "no master (see frames.jsonl)"))
    sky = s.get("sky")
    if sky:
        how = f"plate solved in {sky['seconds']:.1f} s" if sky["source"] == "solve" else "WCS from the reference frame"
        print(f"{how}: {sky['object'] or 'centre'} at RA {sky['ra_hms']} Dec {sky['dec_dms']}, "
              f"{sky['width_deg']:.2f}°×{sky['height_deg']:.2f}°, {sky['scale_arcsec']:.2f}″/px, "
              f"rotation {sky['rotation_deg']:.1f}° E of N")
    if s["wrote"]:
        for name in ["stack.fits"] + s.get("filter_files", []) + ["preview.jpg", "frames.jsonl"]:
            print(f"  {out / name}")
    else:
        print(f"  nothing stacked; see {out / 'frames.jsonl'}")


def cmd_stack(args, cfg: Config) -> int:
    from .engine.outputs import is_stack_file
    from .engine.write import output_dir_problem

    out = Path(args.out).expanduser()
    # a restack into the same folder: its own stack.fits / stack_<F>.fits are not lights (they were stacked in)
    files = [f for f in collect_inputs(args.inputs) if not (is_stack_file(f) and f.parent.resolve() == out.resolve())]
    if not files:
        print(f"livestack stack: no RAW or FITS files in {' '.join(args.inputs)}{_subfolders_hint(args.inputs)}",
              file=sys.stderr)
        return 1
    problem = output_dir_problem(out)
    if problem:
        print(f"livestack stack: {problem}", file=sys.stderr)
        return 2
    from .session import FolderInUse, held_folder

    try:        # held while it stacks: a `livestack run` started meanwhile is refused
        with held_folder(out, make=False):
            return _stack_into(args, cfg, files, out)
    except FolderInUse:
        # it wrote stack.fits and frames.jsonl over the running night's, which the daemon then wrote over again
        print(f"livestack stack: {out} is the session folder of a running `livestack run`: its stack.fits and "
              "frames.jsonl would be written over — give -o another folder", file=sys.stderr)
        return 2


def _stack_into(args, cfg: Config, files: list[Path], out: Path) -> int:
    masters = None
    if args.masters:            # (the masters' modules only for a stack that has some)
        from .masters_cli import load_masters

        try:
            masters = load_masters(args.masters, cfg)
        except ValueError as err:
            print(f"livestack stack: {err}", file=sys.stderr)
            return 2
    s = stack_files(files, out, cfg, masters=masters, quiet=args.quiet, solve=not args.no_solve)
    _print_summary(s, out)
    if s.get("interrupted"):
        return 130          # as a Ctrl-C ends a command, with what was stacked written
    return 0 if s["wrote"] else 1


def cmd_demo(args, cfg: Config) -> int:
    """The whole live loop on one machine: the simulator capture driver writes a frame every few seconds into a
    watch folder, the daemon stacks each one, and the page shows the stack growing.  Without --out it works in a
    temporary folder: at the end its simulated frames and the checkpoint (tens of MB a run, left in /tmp at every
    run before) are removed, and the outputs the summary lists stay."""
    import shutil

    temp = not args.out
    base = Path(args.out).expanduser() if args.out else Path(tempfile.mkdtemp(prefix="livestack-demo-"))
    code = None
    try:
        code = _demo(args, cfg, base)
        return code
    finally:
        if temp:
            shutil.rmtree(base / "lights", ignore_errors=True)
            shutil.rmtree(base / "out" / "session", ignore_errors=True)
            if code is not None:
                print(f"(the simulated frames and the checkpoint are removed; the outputs stay in {base / 'out'}: "
                      "--out DIR keeps everything)", flush=True)


def _demo(args, cfg: Config, base: Path) -> int:
    from drivers.capture import sim as sim_capture
    from drivers.capture.common import CapturePlan, Stop
    from drivers.simulator import SimConfig

    from .daemon.config import DaemonParams, WatchParams, WebParams
    from .daemon.service import Service
    from .web.app import make_app, serve_in_thread

    lights, out = base / "lights", base / "out"
    lights.mkdir(parents=True, exist_ok=True)
    n = 6 if args.fast else args.frames
    size = (480, 360) if args.fast else (1600, 1200)
    interval = 0.0 if args.fast else args.interval
    # A night with a little of everything: drift, slow field rotation, a satellite and a cloud.
    sim = SimConfig(width=size[0], height=size[1], rotation_deg=0.05, fmt="dng", seed=args.seed,
                    defects={2: "satellite", 4: "cloudy"} if n > 4 else {})
    plan = CapturePlan(exposure=60.0, count=n, interval=interval, out=lights)
    wp = WatchParams(dir=str(lights), settle_s=0.2, timeout_s=30.0, rescan_s=1.0)
    dp = DaemonParams(out=str(out), checkpoint_every=5)
    # the simulator's stars are not the real sky: a blind plate solve would spend ~20 s of a core to fail
    cfg.extra.setdefault("solve", {"enabled": False})
    svc = Service(cfg, lights, out, wp, dp)
    app = None
    if not args.no_web:
        for port in (args.port, 0):   # the chosen port, else any free one
            try:
                app = make_app(svc, WebParams(host="127.0.0.1", port=port))
                break
            except OSError:
                continue
    # SIGTERM (a process manager, `timeout`) and SIGHUP (the terminal closed) end the demo as Ctrl-C does — the
    # daemon stopped, the summary printed —, as they end `livestack run`; they used to kill it on the spot
    stopping: list[int] = []

    def on_signal(signum, frame):
        stopping.append(signum)

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    t0 = time.perf_counter()
    stop = Stop()
    capture = threading.Thread(target=sim_capture.capture, args=(plan, sim, stop), daemon=True, name="capture")
    web_thread = None
    try:
        svc.start()
        web_thread = serve_in_thread(app) if app is not None else None
        print(f"simulated night: {n} frames of {size[0]}×{size[1]} (Bayer RGGB, DNG), one every "
              f"{interval:g} s, into {lights}")
        if app is not None:
            # an invitation only to a page that stays: --fast stacks its frames in a second and exits
            if args.fast:
                print(f"web page: {app.url}   (--fast closes it as soon as the {n} frames are stacked; leave out "
                      "--fast to watch the stack grow)", flush=True)
            else:
                print(f"live page: {app.url}   (open it in a browser and watch the stack grow"
                      + ("; --exit closes it after the last frame)" if args.exit else ")"), flush=True)
        capture.start()
        progress = None if args.quiet else Progress(n)
        shown = 0
        while True:
            recs = svc.snapshot.frames
            for d in recs[shown:]:
                if progress:
                    progress.update(FrameRecord.from_dict(d))
            shown = max(shown, len(recs))
            if shown >= n or not svc.running or stopping:
                break
            time.sleep(0.2)
        if app is not None and not args.fast and not args.exit and not stopping:
            print(f"done; the page stays at {app.url} — press Ctrl-C to stop", flush=True)
            while svc.running and not stopping:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if stopping:
            print(f"livestack demo: {signal.Signals(stopping[0]).name} received: stopping", file=sys.stderr,
                  flush=True)
        stop.stop()
        if capture.is_alive():
            capture.join(timeout=10)
        svc.stop()
        if web_thread is not None:
            app.shutdown()
            web_thread.join(timeout=5)
        if app is not None:
            app.server_close()
        for s, h in old.items():
            signal.signal(s, h)
    st = svc.status()
    s = {"frames": st["frames"], "stacked": st["stacked"], "rejected": st["rejected"], "failed": st["failed"],
         "exptime": st["integration_s"], "seconds": time.perf_counter() - t0,
         "wrote": (out / "stack.fits").exists()}
    _print_summary(s, out)
    return 0 if s["wrote"] and svc.error is None else 1


def check_shell_sections(cfg: Config, source: str) -> None:
    """Every section of livestack.toml that the shells own ([solve], [session], [calibration], [watch], [daemon],
    [web]) checked when the file is read, whatever the command: an unknown key or a bad value is the one-line
    usage error (exit 2) that the engine's sections give — not a traceback once the reference frame is stacked
    (`stack`, `demo`), nor a key silently ignored.  Only the sections present are imported (astropy.wcs for
    [solve])."""
    from .config import make_section

    def solve():
        from .engine.solve import SolveParams
        return SolveParams

    def calibration():
        from .masters import CalibrationParams
        return CalibrationParams

    def daemon(name):
        def cls():
            from .daemon import config as dc
            return getattr(dc, name)
        return cls

    classes = {"solve": solve, "calibration": calibration, "session": daemon("SessionParams"),
               "watch": daemon("WatchParams"), "daemon": daemon("DaemonParams"), "web": daemon("WebParams")}
    for name, values in cfg.extra.items():
        if name in classes:
            make_section(classes[name](), values, f"{source}: {name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``command``: the sub-command about to run, when known — only its own module's
    commands are then added when it is this module's (`stack`, `demo`), and the capture drivers' arguments
    (and their modules) for `capture` only."""
    ap = argparse.ArgumentParser(prog="livestack", description="Live stacking for astrophotography.")
    ap.add_argument("--version", action="version", version=f"livestack {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each frame's details")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def engine_opts(p, quiet_help: str = "no progress bar"):
        p.add_argument("--config", help="livestack.toml")
        p.add_argument("--debayer", choices=("mhc", "bilinear", "superpixel"),
                       help="mhc (default): sharp; bilinear: smoother; superpixel: half resolution, fast")
        p.add_argument("--interpolation", choices=INTERPOLATION_NAMES,
                       help="warp interpolation (compensated: bilinear made as sharp as bicubic, README warp step)")
        p.add_argument("--kappa", type=float, help="outlier pixel rejection threshold (σ)")
        p.add_argument("--drizzle", type=float, metavar="SCALE",
                       help="drizzle onto a grid SCALE× finer (2: undersampled stars; 1: colour without demosaic)")
        p.add_argument("--pixfrac", type=float, help="drizzle drop size in sensor pixels (default 1.0)")
        p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)

    p = sub.add_parser("stack", help="stack a folder or a list of RAW/FITS files")
    p.add_argument("inputs", nargs="+", metavar="DIR|FILES")
    p.add_argument("-o", "--out", required=True, help="output folder (stack.fits, preview.jpg, frames.jsonl)")
    p.add_argument("--masters", help="master library folder (from `livestack masters`)")
    p.add_argument("--no-solve", action="store_true",
                   help="no plate solve (by default the reference is solved with astrometry.net, when installed, "
                        "and the stack files get its WCS); a reference whose FITS header has a WCS still gives it")
    engine_opts(p)
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("demo", help="a live simulated night: capture, stack and the web page on this machine")
    p.add_argument("--out", help="folder for the simulated frames and outputs (default: a temp folder)")
    p.add_argument("--frames", type=int, default=20, help="number of simulated frames (default 20)")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between simulated frames (default 3)")
    p.add_argument("--seed", type=int, default=7, help="simulator seed: the same seed, the same night (default 7)")
    p.add_argument("--port", type=int, default=8080, help="web page port (default 8080; any free port if taken)")
    p.add_argument("--no-web", action="store_true", help="no web page")
    p.add_argument("--exit", action="store_true", help="exit when the last frame is stacked")
    p.add_argument("--fast", action="store_true", help="6 tiny frames at once, exit when done (tests)")
    engine_opts(p)
    p.set_defaults(func=cmd_demo)

    if command in sub.choices:
        # a command of this module's (`stack`, `demo`): the other modules' commands are not added, and their
        # modules not imported (the daemon's and the masters' command lines: 20-35 ms of every `livestack stack`)
        return ap
    for mod in ("livestack.masters_cli", "livestack.run_cli", "drivers.cli"):
        try:
            m = __import__(mod, fromlist=["register_commands"])
        except ModuleNotFoundError as err:
            if err.name is None or not mod.startswith(err.name):
                raise
            continue
        if mod == "drivers.cli":
            m.register_commands(sub, engine_opts, arguments=command in (None, "capture"))
        else:
            m.register_commands(sub, engine_opts)
    return ap


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in ``argv``: its first word that is not an option (the top level's options take
    no value), or None (none: `--help`, `--version`)."""
    return next((a for a in argv if not a.startswith("-")), None)


# the engine flags and the config keys they set
ENGINE_FLAGS = (("debayer", "engine", "debayer"), ("interpolation", "engine", "interpolation"),
                ("kappa", "stack", "kappa"), ("drizzle", "drizzle", "scale"), ("pixfrac", "drizzle", "pixfrac"))


def _with_flags(cfg: Config, args) -> Config:
    """``cfg`` with the engine flags given over it.  A bad value is said as it was given (`--kappa 0: must be in
    [1.5, 20]`): the user typed a flag, not the config key it sets (`stack.kappa = 0.0`)."""
    for flag, section, key in ENGINE_FLAGS:
        value = getattr(args, flag, None)
        if value is None:
            continue
        try:
            cfg = with_overrides(cfg, **{section: {key: value}})
        except (ConfigError, ValueError) as err:
            raise flag_error(err, f"{section}.{key}", f"--{flag}", value) from err
    return cfg


def main(argv: list[str] | None = None, *, exit_fast: bool = False) -> int:
    """Run one command; returns its exit code.  ``exit_fast`` (the `livestack` command itself, not a caller in
    Python): after `stack`, leave the process at once (_exit_now)."""
    from .engine.memory import keep_freed_memory

    keep_freed_memory()          # before any worker thread: frame temporaries reused, one arena (memory.py)
    ap = build_parser(_command_of(sys.argv[1:] if argv is None else argv))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(getattr(args, "config", None))
        check_shell_sections(cfg, Path(args.config).name if getattr(args, "config", None) else "config")
        cfg = _with_flags(cfg, args)
    except (ConfigError, ValueError) as err:
        print(f"livestack: {err}", file=sys.stderr)
        return 2
    try:
        code = int(args.func(args, cfg) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed by its reader (`livestack stack … | head -1`): what was written stays written (a stack's
        # summary comes after its outputs); no traceback, and the status a shell gives a command SIGPIPE ended
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # (the exit's flush must not fail)
        except OSError:
            pass
        return 128 + 13
    if exit_fast and args.func is cmd_stack:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Leave the process without Python's teardown: a batch `stack` has written, fsynced and closed every output
    (atomic writes; frames.jsonl line by line) and joined its threads when it returns, and the teardown that
    follows — freeing ~1 GB of a 24 MP stack's objects, unloading OpenCV, numpy and LibRaw — took 50–70 ms of a
    3.6 s `livestack stack` of 8 frames (exit 0.07–0.10 s after the last line, 0.015 s with this)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def console() -> None:
    """The `livestack` command (and `python -m livestack.cli`)."""
    sys.exit(main(exit_fast=True))


if __name__ == "__main__":
    console()
