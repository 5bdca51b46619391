"""Per-stage and total seconds per frame, and peak memory, for large colour frames.

    python benchmarks/bench_frame.py [--width 6000 --height 4000 --frames 6 --format dng]
                                     [--debayer mhc|bilinear|superpixel]
                                     [--interpolation compensated|bilinear|bicubic|lanczos]
                                     [--no-smooth-background] [--no-read-ahead] [--cpus 0]
    python benchmarks/bench_frame.py --commands [--siril] [--repeat 3] [--cpus 0] [--keep DIR] …
    python benchmarks/bench_frame.py --keep DIR --night 1000
    python benchmarks/bench_frame.py --keep DIR --paired 24 [--cpus 0] [--no-read-ahead]

Frames are rendered by the simulator in a separate process first, so the peak RSS printed is the stacking
process's own.  The engine runs in this process with the allocator settings `livestack` uses (memory.py).

--commands: whole commands instead, as a user runs them — `livestack stack --no-solve` on the frames (its
bytecode compiled first, as `pip install` does) and, with --siril, Siril 1.0's standard colour workflow on the
same files (siril-cli: convert -debayer, register, stack rej s 3 3 -norm=addscale -weighted; HOME in a temp
folder) — alternating, --repeat times.  For each run: wall
seconds, user + system CPU seconds (the command and its children, from wait4), the peak RSS of the whole
process tree (sampled every 50 ms from /proc) and the steal: CPU seconds the hypervisor took from the machine
during the run (/proc/stat; 0 on real hardware) — on this VM it comes in bursts of 0.3–0.4 s that take 0.4–1.2 of
the 2 CPUs, mostly while new memory is touched, and a run that meets one is that much slower.  --cpus pins to
those CPUs (e.g. 0: one core, as `taskset -c 0`).
--warm-mb N: before each command (ours and Siril's), a child process writes N MB of memory and exits.  A
virtual machine that hands its guest's free memory back to the host (virtio-balloon free page reporting, DAMON
pageout: this workplace's Firecracker VMs) makes the first touch of such memory slow — the same 1 GB written in
2.79, 0.23 and 0.09 s in three new processes a minute apart, all of it system time — so a command's system time
varied 1.0–3.2 s from run to run with the same work.  A Raspberry Pi has no host: warming takes that
environment's cost out of both commands alike.
Each command writes into a new folder, as Siril's runs always did (ours re-used one folder until the
twenty-second session, so that our second and later runs replaced the last run's stack.fits and Siril's never
replaced anything: on a disk mounted with `discard`, as this workplace's VMs are, the kernel frees a 384 MB
file's blocks in 0.29–0.38 s against 0.03–0.04 s without — measured with the same root disk remounted either
way), and the folders of the commands before it are removed and the disk synced (os.sync, which waits for their
writeback and the freed blocks' discards) before it starts: no command waits for another's disk.
--reuse-out: ours into the same folder every time (a user restacking a night into its folder; not Siril's case).
Before each command it prints how much of the input files the page cache holds.  This workplace's VMs run DAMON
with a `pageout` scheme that drops pages nobody touched for ~60 s (age ≥ 12 × 5 s): Siril's run (~65 s) outlasts
it and ours (~7 s) does not, so our runs after Siril's found 92–97 % of the inputs cached where Siril's found
97–100 % (one run of ours read frame 0 in 0.54 s against 0.14 s).  --cache-inputs: read the input files just
before each command, ours and Siril's alike — both start with them in the page cache, as frames a camera has
just written are.
--night N: a long night — N frames through one engine, cycling through the rendered files (each pass stacks
them again: the stack's memory is what is measured), the process's resident memory printed every N/10 frames
and its peak at the end, and the steady state: seconds a frame over the second half of the night.
--paired N: what the default mode costs over the old one (`--interpolation bilinear --no-smooth-background`,
the default until the fifth session), measured so that the VM's drift cancels: two engines in one process, each
file through both in turn (which goes first alternates), N files after their bootstraps, cycling; prints each
engine's median seconds a frame and the median and quartiles of the per-frame differences (wall and CPU
seconds; CPU of the whole process, so the read-ahead thread's work counts where it is done).
--commands also prints how long the output folder's disk takes to write and fsync 384 MB (a 24 MP stack.fits).
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--format", choices=("dng", "fits"), default="dng")
    ap.add_argument("--debayer", default="mhc", help="mhc (the default) | bilinear | superpixel")
    ap.add_argument("--interpolation", default="compensated", help="compensated (the default) | bilinear | …")
    ap.add_argument("--no-smooth-background", action="store_true", help="[engine] smooth_background = false")
    ap.add_argument("--no-read-ahead", action="store_true", help="[engine] read_ahead = false")
    ap.add_argument("--keep", help="render into this folder and keep it (re-used when it has the frames)")
    ap.add_argument("--cpus", help="run on these CPUs only, e.g. 0 or 0,1 (as taskset -c)")
    ap.add_argument("--commands", action="store_true", help="time whole `livestack stack` runs (see above)")
    ap.add_argument("--siril", action="store_true", help="with --commands: also Siril on the same frames")
    ap.add_argument("--repeat", type=int, default=3, help="with --commands: runs of each, alternating")
    ap.add_argument("--warm-mb", type=int, default=0,
                    help="with --commands: touch this much memory in a child process just before each run, "
                         "ours and Siril's alike (see above)")
    ap.add_argument("--cache-inputs", action="store_true",
                    help="with --commands: read the input files just before each run, ours and Siril's alike")
    ap.add_argument("--reuse-out", action="store_true",
                    help="with --commands: our runs into one output folder, each replacing the last's stack.fits")
    ap.add_argument("--night", type=int, default=0, help="N frames through one engine, cycling (see above)")
    ap.add_argument("--paired", type=int, default=0, help="N frames: the configuration against the old default "
                                                          "(see above)")
    args = ap.parse_args()
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="livestack-bench-"))
    if not sorted(folder.glob(f"light_*.{args.format}")):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "drivers.simulator", str(folder), "--frames", str(args.frames),
                        "--width", str(args.width), "--height", str(args.height), "--format", args.format,
                        "--rotation-deg", "0.02", "--n-stars", "2000"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"rendered {args.frames} frames in {time.perf_counter() - t:.1f} s (not counted)")
    files = sorted(folder.glob(f"light_*.{args.format}"))[: args.frames]
    if args.commands:
        return compare_commands(args, files)
    if cpus:
        os.sched_setaffinity(0, cpus)

    from livestack.config import Config
    from livestack.engine.pipeline import Engine
    from livestack.engine.memory import keep_freed_memory

    keep_freed_memory()      # as `livestack` does, before the engine's threads

    cfg = Config()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, debayer=args.debayer,
                                                              interpolation=args.interpolation,
                                                              smooth_background=not args.no_smooth_background,
                                                              read_ahead=not args.no_read_ahead))
    if args.paired:
        old = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, interpolation="bilinear",
                                                                  smooth_background=False))
        return paired(Engine(cfg), Engine(old), files, args.paired, args)
    eng = Engine(cfg)
    if args.night:
        return long_night(eng, files, args.night)
    rows = []
    for i, f in enumerate(files):
        rec = eng.process(f, next_path=files[i + 1] if i + 1 < len(files) else None)   # as `livestack stack`
        rows.append((rec, dict(eng.timings)))
        print(f"{rec.file}: {rec.status:9s} {rec.seconds:6.3f} s  " +
              " ".join(f"{k} {v:.3f}" for k, v in eng.timings.items()))
    t = time.perf_counter()
    eng.snapshot(folder / "out")
    snap = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # Steady state: after the reference and the bootstrap frames (the frame that ends the bootstrap also
    # combines the buffered frames into the accumulators: printed above, not in the median).
    boot = max(1, cfg.stack.bootstrap)
    stacked = [(r, tm) for r, tm in rows[boot:] if r.status == "stacked"]
    once = max((tm.get("bootstrap", 0.0) for _, tm in rows), default=0.0)
    stages = [k for k in dict.fromkeys(k for _, tm in stacked for k in tm) if k != "bootstrap"]
    print()
    print(f"frame {args.width}×{args.height} ({args.width * args.height / 1e6:.0f} MP) {args.format}, "
          f"debayer {args.debayer}, warp {args.interpolation}, smooth background {not args.no_smooth_background}, "
          f"read-ahead {not args.no_read_ahead}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    if stacked:
        def median(xs):
            xs = sorted(xs)
            return xs[len(xs) // 2]
        print(f"median s/frame per stage ({len(stacked)} frames after the reference and the bootstrap):")
        for k in stages:
            print(f"  {k:10s} {median([tm.get(k, 0.0) for _, tm in stacked]):.3f}")
        print(f"  {'total':10s} {median([r.seconds for r, _ in stacked]):.3f}")
    print(f"bootstrap combine (once, before frame {boot + 1}): {once:.2f} s")
    print(f"snapshot (stack.fits + preview.jpg): {snap:.2f} s")
    print(f"peak RSS: {peak_mb:.0f} MB")
    return 0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def long_night(eng, files, n: int) -> int:
    """n frames through ``eng``, cycling through ``files``; resident memory every n/10 frames, then the peak."""
    t0 = time.perf_counter()
    every = max(1, n // 10)
    stacked = 0
    half = None         # when the second half began: its rate is the steady state's (no reference, no bootstrap)
    for i in range(n):
        if i == n // 2:
            half = time.perf_counter()
        rec = eng.process(files[i % len(files)], next_path=files[(i + 1) % len(files)] if i + 1 < n else None)
        stacked += rec.status in ("reference", "stacked")
        if (i + 1) % every == 0 or i + 1 == n:
            print(f"frame {i + 1:5d}: RSS {rss_mb():6.0f} MB, peak so far "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:6.0f} MB, "
                  f"{(time.perf_counter() - t0) / (i + 1):.3f} s/frame", flush=True)
    if half is not None and n >= 8:
        print(f"steady state: {(time.perf_counter() - half) / (n - n // 2):.3f} s/frame over frames "
              f"{n // 2 + 1}–{n}")
    print(f"{stacked} of {n} frames stacked; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
          f" MB; {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    return 0


def paired(new, old, files, n: int, args) -> int:
    """Each file through ``new`` and ``old`` in turn (alternating which goes first): per-frame wall and CPU
    seconds of each, after both have their reference and bootstrap frames; medians and the differences'."""
    def one(eng, i, nxt):
        c, t = time.process_time(), time.perf_counter()
        rec = eng.process(files[i % len(files)], next_path=files[nxt % len(files)] if nxt is not None else None)
        if rec.status not in ("reference", "stacked"):
            raise RuntimeError(f"{rec.file}: {rec.status} {rec.error}")
        return time.perf_counter() - t, time.process_time() - c
    boot = 1 + max(1, new.cfg.stack.bootstrap)
    for i in range(boot):                       # reference + bootstrap (+ the combine): not counted
        one(new, i, i + 1)
        one(old, i, i + 1)
    d_wall, d_cpu, nw, ow = [], [], [], []
    for j in range(n):
        i = boot + j
        nxt = i + 1 if j + 1 < n else None
        if j % 2:
            a = one(new, i, nxt)
            b = one(old, i, nxt)
        else:
            b = one(old, i, nxt)
            a = one(new, i, nxt)
        nw.append(a)
        ow.append(b)
        d_wall.append(a[0] - b[0])
        d_cpu.append(a[1] - b[1])
        print(f"{files[i % len(files)].name}: new {a[0]:.3f} s ({a[1]:.2f} CPU)  old {b[0]:.3f} s ({b[1]:.2f} CPU)"
              f"  difference {a[0] - b[0]:+.3f} s", flush=True)

    def q(xs, f):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(f * len(xs)))]
    print()
    print(f"{n} frames {files[0].name}…, {args.width}×{args.height} expected, debayer {args.debayer}: "
          f"new = warp {args.interpolation}, smooth background {not args.no_smooth_background}; old = bilinear, "
          f"no smooth background; read-ahead {not args.no_read_ahead}; {platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} CPUs usable, Python {platform.python_version()}")
    print(f"  new: median {q([x for x, _ in nw], .5):.3f} s a frame, {q([c for _, c in nw], .5):.2f} CPU s")
    print(f"  old: median {q([x for x, _ in ow], .5):.3f} s a frame, {q([c for _, c in ow], .5):.2f} CPU s")
    print(f"  new − old, wall: median {q(d_wall, .5):+.3f} s (quartiles {q(d_wall, .25):+.3f} … "
          f"{q(d_wall, .75):+.3f}); CPU: median {q(d_cpu, .5):+.3f} s (quartiles {q(d_cpu, .25):+.3f} … "
          f"{q(d_cpu, .75):+.3f})")
    return 0


# ---------------------------------------------------------------------------------------------- whole commands

SIRIL_SCRIPT = """requires 1.0.0
convert light -debayer
register light
stack r_light rej s 3 3 -norm=addscale -weighted -out=siril_stack
"""


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    pages: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/statm") as f:
                pages[int(d)] = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += pages.get(p, 0)
        todo += children.get(p, [])
    return total * os.sysconf("SC_PAGE_SIZE")


def steal_seconds() -> float:
    """CPU seconds the hypervisor has taken from this machine's CPUs so far (all of them: /proc/stat's steal),
    0 where there is no such count."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_measured(cmd: list[str], *, cwd: Path, env: dict | None = None, cpus: str | None = None) -> dict:
    """Run ``cmd`` (on ``cpus``, taskset's list, when given): wall seconds, user and system CPU seconds of it
    and its children (wait4), peak RSS of its process tree in bytes (sampled every 50 ms), and the CPU seconds
    the hypervisor took from the machine meanwhile (steal: a virtual machine's host running other guests)."""
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    with tempfile.TemporaryFile() as err:
        steal0 = steal_seconds()
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak = 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - t
        steal = steal_seconds() - steal0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])} … failed ({proc.returncode}): {err.read()[-600:]!r}")
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "rss": max(peak, ru.ru_maxrss * 1024),
            "steal": steal}


def _span(runs: list[dict], key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
    vs = sorted(r[key] * scale for r in runs)
    return f"{vs[0]:{fmt}}–{vs[-1]:{fmt}}"


def cached_fraction(files: list[Path]) -> float:
    """How much of ``files`` the page cache holds (mincore of a read-only mapping of each), 0…1; NaN where that
    cannot be asked (not Linux)."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return float("nan")
    page, held, total = mmap.PAGESIZE, 0, 0
    for f in files:
        size = f.stat().st_size
        if not size:
            continue
        n = -(-size // page)
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return float("nan")
            try:
                vec = ctypes.create_string_buffer(n)
                if libc.mincore(addr, size, vec) != 0:
                    return float("nan")
                held += sum(b & 1 for b in vec.raw)
                total += n
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return held / total if total else float("nan")


def read_through(files: list[Path]) -> None:
    """Read every byte of ``files`` (into the page cache)."""
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def disk_seconds(folder: Path, mb: int = 384) -> float:
    """Seconds to write ``mb`` MB into a new file of ``folder`` and fsync it, in 4 MB writes: what the final
    stack.fits waits for, which on a slow disk is a good part of a run (and of Siril's, which writes ~5 GB)."""
    block = b"\1" * (4 << 20)
    path = folder / "disk-probe.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mb // 4):
            f.write(block)
        os.fsync(f.fileno())
    took = time.perf_counter() - t0
    path.unlink()
    return took


def compare_commands(args, files: list[Path]) -> int:
    work = Path(tempfile.mkdtemp(prefix="livestack-bench-cmd-"))
    toml = work / "bench.toml"
    toml.write_text("[engine]\n" + ("read_ahead = false\n" if args.no_read_ahead else "")
                    + ("smooth_background = false\n" if args.no_smooth_background else ""))
    def ours(i: int) -> list[str]:
        out = work / ("out" if args.reuse_out else f"out{i}")
        return [sys.executable, "-m", "livestack.cli", "stack", *map(str, files), "-o", str(out), "-q",
                "--no-solve", "--debayer", args.debayer, "--interpolation", args.interpolation, "--config",
                str(toml)]
    runs: dict[str, list[dict]] = {"livestack": [], "siril": []}
    # As installed: pip compiles the package's bytecode when it installs it, while a source tree run with
    # PYTHONDONTWRITEBYTECODE set (as on this workplace) compiled ~45 modules at every start (0.15–0.25 s).
    subprocess.run([sys.executable, "-m", "compileall", "-q", "livestack"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)

    def warm() -> None:
        if args.warm_mb > 0:
            subprocess.run([sys.executable, "-c", "import numpy as np; np.ones(%d << 20, np.uint8)" % args.warm_mb],
                           check=True)
        os.sync()       # the last command's files on the disk (and its removed ones' blocks freed) before the next
        if args.cache_inputs:
            read_through(files)
        print(f"  (inputs in the page cache: {100 * cached_fraction(files):.0f} %)", flush=True)

    def clear(i: int) -> None:
        """The folders of run i (ours unless --reuse-out, Siril's) removed: every command starts without them."""
        if not args.reuse_out:
            shutil.rmtree(work / f"out{i}", ignore_errors=True)
        shutil.rmtree(work / f"siril{i}", ignore_errors=True)

    for i in range(args.repeat):
        warm()
        r = run_measured(ours(i), cwd=ROOT, cpus=args.cpus)
        runs["livestack"].append(r)
        print(f"livestack stack  wall {r['wall']:6.2f} s  user {r['user']:6.2f}  sys {r['sys']:5.2f}  "
              f"peak RSS {r['rss'] / 2 ** 20:5.0f} MB  steal {r['steal']:5.2f}", flush=True)
        if args.siril:
            sw = work / f"siril{i}"
            sw.mkdir()
            for f in files:
                (sw / f.name).symlink_to(f.resolve())
            (sw / "bench.ssf").write_text(SIRIL_SCRIPT)
            home = sw / "home"
            home.mkdir()
            warm()
            r = run_measured(["siril-cli", "-d", str(sw), "-s", str(sw / "bench.ssf")], cwd=sw,
                             env={**os.environ, "HOME": str(home)}, cpus=args.cpus)
            runs["siril"].append(r)
            print(f"siril-cli        wall {r['wall']:6.2f} s  user {r['user']:6.2f}  sys {r['sys']:5.2f}  "
                  f"peak RSS {r['rss'] / 2 ** 20:5.0f} MB  steal {r['steal']:5.2f}", flush=True)
        clear(i)
    print()
    print(f"{len(files)} frames from {files[0].parent}, debayer {args.debayer}, warp {args.interpolation}, "
          f"read-ahead {not args.no_read_ahead}, CPUs {args.cpus or 'all'} of {os.cpu_count()}, "
          f"warmed {args.warm_mb} MB, {'one output folder' if args.reuse_out else 'a new output folder a run'}, "
          f"inputs {'read just before each command' if args.cache_inputs else 'as the page cache had them'}; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"  the output folder's disk: {disk_seconds(work):.2f} s for 384 MB written and fsynced (a 24 MP "
          "stack.fits; 1.4 s on 2026-11-30's VM — runs of machines whose disks differ are not comparable)")
    for name, rs in runs.items():
        if rs:
            print(f"  {name:10s} wall {_span(rs, 'wall')} s  user {_span(rs, 'user')} s  sys {_span(rs, 'sys')} s  "
                  f"peak RSS {_span(rs, 'rss', 2 ** -20, '.0f')} MB  steal {_span(rs, 'steal')} s")
    if runs["siril"]:
        ratios = sorted(a["wall"] / b["wall"] for a, b in zip(runs["livestack"], runs["siril"]))
        cpu = sorted((a["user"] + a["sys"]) / (b["user"] + b["sys"]) for a, b in zip(runs["livestack"],
                                                                                   runs["siril"]))
        print(f"  livestack / Siril: wall {ratios[0]:.3f}–{ratios[-1]:.3f}×, CPU {cpu[0]:.3f}–{cpu[-1]:.3f}× "
              "(run by run)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
