"""Shared pieces of the benchmarks: machine description, images, throttled HTTP clients.

Every benchmark measures torrent delivery and plain HTTP delivery in the same run on the
same machine and reports ratios, because absolute numbers on a small, noisy 2-core machine
mean little.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import libtorrent as lt

from nova_torrent_images.common.utils import RateLimiter

MiB = 1024 * 1024


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB memory, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, libtorrent "
        f"{lt.__version__}; measured {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )


def write_image(path: str, size: int) -> str:
    """Random bytes (nothing compresses on the way); returns the sha512."""
    hasher = hashlib.sha512()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MiB))
            f.write(chunk)
            hasher.update(chunk)
            left -= len(chunk)
    return hasher.hexdigest()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    """min, median and max of repeated measurements (noise shown, not hidden)."""
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def http_download(glance, image, dest: str, cap: int = 0) -> float:
    """Plain verified HTTP download with an optional client-side cap; returns seconds."""
    bucket = RateLimiter(cap)  # the host's downlink, like the origin's uplink
    hasher = image.new_hasher()
    started = time.monotonic()
    with open(dest, "wb") as out:
        for chunk in glance.iter_data(image.id):
            bucket.take(len(chunk))
            out.write(chunk)
            hasher.update(chunk)
    if hasher.hexdigest() != image.hash_value:
        raise RuntimeError(f"HTTP download of {image.id} is corrupt")
    return time.monotonic() - started


def opentracker_available() -> bool:
    return (
        subprocess.run(
            ["sh", "-c", "command -v opentracker"], capture_output=True, check=False
        ).returncode
        == 0
    )


def run_python(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], **kwargs)


_TICK = os.sysconf("SC_CLK_TCK")


def read_io(pid: int | str = "self") -> dict[str, int]:
    """A process's I/O counters (/proc/<pid>/io): rchar/wchar count read()/pread() and
    write()/pwrite() bytes, page-cache hits included (socket recvmsg/sendmsg are not in
    them), syscr/syscw the calls."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key.strip()] = int(value)
    return out


def context_switches(pid: int | str = "self") -> int:
    """Voluntary and involuntary context switches of every live thread of a process
    (/proc/<pid>/task/*/status): how often its threads slept and woke, or were preempted."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt")):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            continue  # ended meanwhile
    return total


class ProcessThreads:
    """CPU seconds (user + system) by thread of other processes, from /proc/<pid>/task.

    A sampler thread reads every thread's times every :data:`SAMPLE` seconds and keeps
    the last figure of threads that ended since. A process's main thread is ``main``, the
    others go by their kernel name (``comm``), digits dropped.
    """

    SAMPLE = 0.5

    def __init__(self) -> None:
        self._pids: list[int] = []
        self._last: dict[tuple[int, int], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-threads", daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        with self._lock:
            self._pids.append(pid)
        self.sample()

    def sample(self) -> None:
        with self._lock:
            pids = list(self._pids)
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue  # ended: its last figures stay
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        head, _, rest = f.read().rpartition(")")
                except OSError:
                    continue
                fields = rest.split()
                name = "main" if int(tid) == pid else head.partition("(")[2]
                name = name.rstrip("0123456789-_ ") or name
                seconds = (int(fields[11]) + int(fields[12])) / _TICK
                with self._lock:
                    self._last[(pid, int(tid))] = (name, seconds)

    def _run(self) -> None:
        while not self._stop.wait(self.SAMPLE):
            self.sample()

    def stop(self) -> dict[str, float]:
        """The totals by thread name, over every process, after a last sample."""
        self.sample()
        self._stop.set()
        out: dict[str, float] = {}
        with self._lock:
            for name, seconds in self._last.values():
                out[name] = out.get(name, 0.0) + seconds
        return out
