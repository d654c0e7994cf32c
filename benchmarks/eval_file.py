"""Out-of-core evaluation: `xent_fast.evaluate_file` over a large .npy against the
file's own read speed, with the peak resident memory.  A benchmark, not a test.

Run:  python benchmarks/eval_file.py [--gb 8.4] [--classes 32000] [--dir /tmp]
                                    [--repeat 2] [--mode cold|warm|both]
                                    [--out benchmarks/results/eval-file.md]

It writes a float32 logits file of about ``--gb`` GB (rows x classes) and its targets
under ``--dir``, then alternates, in fresh processes:

- read: the file read sequentially with ``readinto`` into one 64 MB buffer (the plain
  read speed of this file on this machine);
- eval: ``xent_fast.evaluate_file`` on it (kernels compiled or loaded from the cache
  beforehand, outside the timing), with the peak RSS of the process (``ru_maxrss``).

``cold``: before each run the file is dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (after an ``fsync``), so both read from the disk.
``warm``: the file is read once first so that both are served from the page cache
(needs RAM for the file).  The files are deleted at the end.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DROP = """
import os


def peak_rss_mb():
    # VmHWM: the peak resident set of this process's own address space.  (ru_maxrss
    # would do in a process started from a small parent, but Linux carries it over
    # execve, so a child reports at least its parent's peak.)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def drop(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
"""

READ = DROP + """
import json, resource, sys, time
path, cold, ahead = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
if cold:
    drop(path)
size = 64 << 20
buf = bytearray(size)
mv = memoryview(buf)
n = 0
t0 = time.perf_counter()
with open(path, "rb", buffering=0) as fh:
    fd = fh.fileno()
    while True:
        if ahead:  # ask the kernel for the next block while this one is copied
            os.posix_fadvise(fd, n + size, size, os.POSIX_FADV_WILLNEED)
        k = fh.readinto(mv)
        if not k:
            break
        n += k
dt = time.perf_counter() - t0
print(json.dumps({"bytes": n, "seconds": dt, "maxrss_mb": peak_rss_mb()}))
"""

MAP = DROP + """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from xent_fast._stream import DEFAULT_CHUNK_BYTES, NpySource
path, cold = sys.argv[1], sys.argv[2] == "1"
if cold:
    drop(path)
src = NpySource(path)
rows = src.shape[0]
step = max(1, DEFAULT_CHUNK_BYTES // (src.shape[1] * src.dtype.itemsize))
slabs = [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]
ahead = ThreadPoolExecutor(1)
t0 = time.perf_counter()
fut = ahead.submit(src.will_need, 0, *slabs[0])
for i, (lo, hi) in enumerate(slabs):
    fut.result()
    if i + 1 < len(slabs):
        fut = ahead.submit(src.will_need, 0, *slabs[i + 1])
    src.done(0, lo, hi)
dt = time.perf_counter() - t0
print(json.dumps({"bytes": os.path.getsize(path), "seconds": dt, "maxrss_mb": peak_rss_mb()}))
"""

EVAL = DROP + """
import json, resource, sys, time
import numpy as np
import xent_fast as xf
path, tpath, cold = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
c = int(sys.argv[4])
xf.evaluate_file(np.zeros((8, c), np.float32), np.zeros(8, np.int64))  # kernels ready
base = peak_rss_mb()
if cold:
    drop(path)
t0 = time.perf_counter()
res = xf.evaluate_file(path, tpath)
dt = time.perf_counter() - t0
import numba
print(json.dumps({"bytes": os.path.getsize(path), "seconds": dt, "base_rss_mb": base,
                  "maxrss_mb": peak_rss_mb(), "ru_maxrss_mb":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": numba.get_num_threads(), "result": res.as_dict()}))
"""


def _child(code, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_files(d, gb, classes):
    rows = int(gb * 1e9 / (4 * classes))
    rows -= rows % 1024
    path = os.path.join(d, "xent_eval_bench_logits.npy")
    tpath = os.path.join(d, "xent_eval_bench_targets.npy")
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(path, "w+", np.float32, (rows, classes))
    blocks = [(rng.standard_normal((1024, classes), np.float32) * 3) for _ in range(4)]
    t0 = time.perf_counter()
    for i, lo in enumerate(range(0, rows, 1024)):
        x[lo:lo + 1024] = blocks[i % 4]
        if i % 8 == 7:
            x.flush()
    x.flush()
    del x, blocks
    np.save(tpath, rng.integers(0, classes, rows))
    return path, tpath, rows, time.perf_counter() - t0


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM"


def versions():
    import numba

    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return (f"python {platform.python_version()}, numpy {np.__version__}, numba "
            f"{numba.__version__}, xent_fast at {commit or '?'}")


def disk_of(d):
    try:
        out = subprocess.run(["df", "-h", d], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1].split()[0]
    except (OSError, IndexError):
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.4)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--mode", choices=["cold", "warm", "both"], default="both")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    modes = ["cold", "warm"] if args.mode == "both" else [args.mode]
    path, tpath, rows, wt = make_files(args.dir, args.gb, args.classes)
    size = os.path.getsize(path)
    print(f"wrote {path}: {rows} x {args.classes} float32, {size / 1e9:.2f} GB in {wt:.1f} s",
          flush=True)
    results = {}
    try:
        for mode in modes:
            cold = mode == "cold"
            if not cold:
                _child(READ, path, 0, 0)  # fill the page cache
            reads, evals = [], []
            for _ in range(args.repeat):
                plain = _child(READ, path, int(cold), 0)
                e = _child(EVAL, path, tpath, int(cold), args.classes)
                fast = _child(READ, path, int(cold), 1)
                mapped = _child(MAP, path, int(cold))
                # warm, "map" only maps pages already in memory (nothing is read), so
                # the read speed is that of read() there; cold, all three read the disk
                pool = [plain, fast, mapped] if cold else [plain, fast]
                r = dict(max(pool, key=lambda v: v["bytes"] / v["seconds"]))
                r["plain"] = plain["bytes"] / plain["seconds"] / 1e9
                r["ahead"] = fast["bytes"] / fast["seconds"] / 1e9
                r["map"] = mapped["bytes"] / mapped["seconds"] / 1e9
                reads.append(r)
                evals.append(e)
                print(f"{mode}: read {r['plain']:.2f} / {r['ahead']:.2f} / {r['map']:.2f} "
                      f"GB/s, eval "
                      f"{e['bytes'] / e['seconds'] / 1e9:.2f} GB/s, peak RSS "
                      f"{e['maxrss_mb']:.0f} MB", flush=True)
            results[mode] = (reads, evals)
    finally:
        for p in (path, tpath):
            try:
                os.remove(p)
            except OSError:
                pass
    report = render(args, size, rows, results)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)


def render(args, size, rows, results):
    lines = [
        "# Out-of-core evaluation: `evaluate_file` on a large .npy against its read speed",
        "",
        f"Machine: {machine()}; file on {disk_of(args.dir)} ({args.dir}).  ",
        f"Versions: {versions()}.  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.  ",
        f"File: {rows} x {args.classes} float32 logits, {size / 1e9:.2f} GB "
        f"({size / 2 ** 30:.2f} GiB); int64 targets.  ",
        f"Command: `python benchmarks/eval_file.py --gb {args.gb} --classes {args.classes} "
        f"--dir {args.dir} --repeat {args.repeat} --mode {args.mode}`",
        "",
        "read = the file read sequentially with `readinto` into a 64 MB buffer, plain and "
        "with `posix_fadvise(WILLNEED)` on the next 64 MB before each read, and map = the "
        "I/O part of the eval alone (the file memory-mapped and brought in by the same "
        "32 MB `MADV_POPULATE_READ` slabs one ahead on a thread, no compute); the ratio "
        "is taken against the fastest of the three, measured around the eval (warm, "
        "against the faster read() only: map then reads nothing, it only maps pages "
        "already in memory); eval = "
        "`xent_fast.evaluate_file(logits, targets)` with defaults (backend 'auto', about "
        "32 MB chunks), kernels compiled/loaded before the timing; each in a fresh process, "
        "alternating.  cold = the file dropped from the page cache "
        "(`posix_fadvise(POSIX_FADV_DONTNEED)`) before each run; warm = served from the "
        "page cache.  Peak RSS = the eval process's peak resident set (`VmHWM`: Python, "
        "NumPy and Numba included; 'before' is after imports and the kernels' warm-up; "
        "not `ru_maxrss`, which Linux carries over `execve` from the parent that wrote "
        "the file, so a child would report at least the parent's peak).",
        "",
        "| mode | run | read GB/s plain / ahead / map | eval GB/s | eval / read | eval rows/s | "
        "peak RSS MB (before) | threads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for mode, (reads, evals) in results.items():
        for i, (r, e) in enumerate(zip(reads, evals)):
            rs = r["bytes"] / r["seconds"] / 1e9
            es = e["bytes"] / e["seconds"] / 1e9
            lines.append(f"| {mode} | {i + 1} | {r['plain']:.2f} / {r['ahead']:.2f} / "
                         f"{r['map']:.2f} | "
                         f"{es:.2f} | {es / rs:.0%} | "
                         f"{rows / e['seconds']:,.0f} | {e['maxrss_mb']:.0f} "
                         f"({e['base_rss_mb']:.0f}) | {e['threads']} |")
        rs = max(r["bytes"] / r["seconds"] for r in reads) / 1e9
        es = max(e["bytes"] / e["seconds"] for e in evals) / 1e9
        peak = max(e["maxrss_mb"] for e in evals)
        summary.append(f"- {mode}: best read {rs:.2f} GB/s, best eval {es:.2f} GB/s "
                       f"(**{es / rs:.0%}** of the read speed), peak RSS **{peak:.0f} MB**")
    res = next(iter(results.values()))[1][-1]["result"]
    lines += ["", "Summary (best of the runs of each):", ""] + summary + [
        "", "Result of the last eval (random logits, so the metrics are those of chance):",
        "", "```", json.dumps(res, indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
