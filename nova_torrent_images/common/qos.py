# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""Fair share for guests: image work runs at a lower CPU and I/O priority than guests.

Three layers, each a no-op (logged at DEBUG, or WARNING for an operator's setting) where
Linux or the deployment does not allow it:

* **Threads.** :func:`lower_thread_priority` gives the calling native thread the nice
  value ``qos_nice`` (10) and the I/O priority ``qos_io_class`` (best-effort level 7, or
  idle) with ``setpriority(2)`` on the thread id and ``ioprio_set(2)``; Linux keeps both
  per thread, and threads inherit them from the thread that creates them. The swarm
  engine creates its libtorrent session on such a thread (:func:`call_in_background`),
  so libtorrent's network, disk and hashing threads, which do the downloading, piece
  hashing and seeding, all run lowered. The stripe worker and the alert pump lower
  themselves, and the pipeline runs a download (the whole-image hash, the Glance path)
  inside :func:`background`, which restores the caller's priority afterwards.
* **cgroup v2.** When nova-compute runs in a cgroup the operator names (``qos_cgroup``),
  :func:`apply_cgroup` writes ``cpu.weight`` (``qos_cpu_weight``) and an ``io.max``
  write ceiling (``qos_disk_write_limit``) for the block device of the store.
* **libtorrent** has no disk write rate limit of its own: its writes are bounded by
  ``download_rate_limit`` (network) and by the ``io.max`` ceiling above.

Under eventlet (Nova's default) every green thread shares one native thread: lowering it
would lower all of nova-compute, so the calling-thread helpers do nothing there; the
libtorrent threads are native and still lowered.

Raising a nice value back needs ``CAP_SYS_NICE`` (or ``RLIMIT_NICE``): :func:`background`
only changes the nice value when it can restore it, and the I/O priority (always
restorable below the realtime class) in any case.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import resource
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from oslo_log import log as logging

from nova_torrent_images.common import utils

LOG = logging.getLogger(__name__)

T = TypeVar("T")

IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_NONE = 0
IOPRIO_CLASS_RT = 1
IOPRIO_CLASS_BE = 2
IOPRIO_CLASS_IDLE = 3
IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread
CAP_SYS_NICE = 23

# (ioprio_set, ioprio_get) syscall numbers by machine.
_SYSCALLS = {
    "x86_64": (251, 252),
    "aarch64": (30, 31),
    "i386": (289, 290),
    "i686": (289, 290),
    "ppc64le": (273, 274),
    "s390x": (282, 283),
    "riscv64": (30, 31),
}

IO_CLASSES = ("best-effort", "idle", "none")


def ioprio_value(io_class: int, level: int = 0) -> int:
    return (io_class << IOPRIO_CLASS_SHIFT) | level


@dataclass(frozen=True)
class Settings:
    """How far down bulk image work goes (``[torrent_images] qos_*``)."""

    nice: int = 10  # 0: leave the nice value alone
    io_class: str = "best-effort"

    @classmethod
    def from_conf(cls, conf: Any) -> Settings:
        opts = conf.torrent_images
        return cls(nice=opts.qos_nice, io_class=opts.qos_io_class)

    @property
    def ioprio(self) -> int | None:
        if self.io_class == "best-effort":
            return ioprio_value(IOPRIO_CLASS_BE, 7)
        if self.io_class == "idle":
            return ioprio_value(IOPRIO_CLASS_IDLE)
        return None


_settings = Settings()


def configure(conf: Any) -> Settings:
    """Take the process's settings from ``conf`` (the engine and the pipeline call it)."""
    global _settings
    _settings = Settings.from_conf(conf)
    return _settings


# -- the calling thread ------------------------------------------------------------------
_green = utils._green  # one test for green threads, in common.utils


_libc: Any = None


def _syscall() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.syscall


def ioprio_get(tid: int | None = None) -> int | None:
    """The I/O priority of thread ``tid`` (default: the calling thread), or None."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or not sys.platform.startswith("linux"):
        return None
    value = _syscall()(numbers[1], IOPRIO_WHO_PROCESS, tid or threading.get_native_id())
    if value < 0:
        LOG.debug("ioprio_get: %s", os.strerror(ctypes.get_errno()))
        return None
    return int(value)


def ioprio_set(value: int, tid: int | None = None) -> bool:
    """Set the I/O priority of thread ``tid`` (default: the calling thread)."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or not sys.platform.startswith("linux"):
        LOG.debug("ioprio_set: not available on %s/%s", sys.platform, platform.machine())
        return False
    if _syscall()(numbers[0], IOPRIO_WHO_PROCESS, tid or threading.get_native_id(), value) < 0:
        LOG.debug("ioprio_set(%#x): %s", value, os.strerror(ctypes.get_errno()))
        return False
    return True


def get_nice(tid: int | None = None) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid or threading.get_native_id())


def _set_nice(value: int, tid: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, value)
    except OSError as exc:
        LOG.debug("setpriority(thread %d, %d): %s", tid, value, exc)
        return False
    return True


def may_raise_priority(to_nice: int) -> bool:
    """Whether this process may set a thread's nice value back down to ``to_nice``."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:") and int(line.split()[1], 16) >> CAP_SYS_NICE & 1:
                    return True
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or 20 - soft <= to_nice


@dataclass(frozen=True)
class Saved:
    """A thread's priorities before :func:`lower_thread_priority`."""

    tid: int
    nice: int | None  # None: not changed
    ioprio: int | None  # None: not changed


def lower_thread_priority(settings: Settings | None = None, *, nice: bool = True) -> Saved | None:
    """Lower the calling native thread's CPU and I/O priority; never raises it.

    Returns what to :func:`restore`, or None where nothing was changed (eventlet).
    """
    if _green():
        LOG.debug("Green threads share the native thread: its priority is left alone")
        return None
    return _lower_native(settings or _settings, nice)


def _lower_native(s: Settings, nice: bool = True) -> Saved:
    """:func:`lower_thread_priority` for a thread known to be a native one of its own."""
    tid = threading.get_native_id()
    old_nice = None
    if nice and s.nice > 0:
        current = get_nice(tid)
        if current < s.nice and _set_nice(s.nice, tid):
            old_nice = current
    old_io = None
    wanted = s.ioprio
    if wanted is not None:
        current_io = ioprio_get(tid)
        if current_io is not None and _lower_io(current_io, wanted) and ioprio_set(wanted, tid):
            old_io = current_io
    return Saved(tid, old_nice, old_io)


def _lower_io(current: int, wanted: int) -> bool:
    """Whether ``wanted`` is below ``current`` (classes: RT > BE/NONE > IDLE)."""
    cur_class, want_class = current >> IOPRIO_CLASS_SHIFT, wanted >> IOPRIO_CLASS_SHIFT
    if cur_class == IOPRIO_CLASS_IDLE:
        return False
    if want_class == IOPRIO_CLASS_IDLE:
        return True
    if cur_class == IOPRIO_CLASS_BE:
        return (wanted & 0x7) > (current & 0x7)
    return True


def restore(saved: Saved | None) -> None:
    """Give the thread back the priorities :func:`lower_thread_priority` replaced."""
    if saved is None:
        return
    if saved.nice is not None:
        _set_nice(saved.nice, saved.tid)
    if saved.ioprio is not None:
        ioprio_set(saved.ioprio, saved.tid)


@contextlib.contextmanager
def background(settings: Settings | None = None) -> Iterator[Saved | None]:
    """Run the block at the lowered priority; the thread gets its own back afterwards.

    The nice value is only lowered where it can be raised again (root, ``CAP_SYS_NICE``,
    ``RLIMIT_NICE``): otherwise the caller's thread, Nova's, would stay lowered.
    """
    if _green():
        yield None
        return
    s = settings or _settings
    restorable = may_raise_priority(get_nice())
    if not restorable:
        LOG.debug("Cannot raise the nice value again; only the I/O priority is lowered")
    saved = lower_thread_priority(s, nice=restorable)
    try:
        yield saved
    finally:
        restore(saved)


def call_in_background(func: Callable[[], T], settings: Settings | None = None) -> T:
    """``func()`` on a new native thread at the lowered priority; its result or error.

    Threads ``func`` creates (libtorrent's, for a session) inherit the priority.
    """
    if _green():
        from eventlet import patcher  # only when eventlet is there and patched

        thread_mod = patcher.original("threading")
    else:
        thread_mod = threading
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        _lower_native(settings or _settings)  # a real thread even under eventlet
        try:
            result.append(func())
        except BaseException as exc:  # noqa: BLE001  re-raised in the caller
            error.append(exc)

    thread = thread_mod.Thread(target=run, name="qos-background", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


# -- cgroup v2 ----------------------------------------------------------------------------
CGROUP_ROOT = "/sys/fs/cgroup"


def block_device_of(path: str) -> str | None:
    """``major:minor`` of the whole disk holding ``path`` (io.max refuses partitions)."""
    try:
        dev = os.stat(path).st_dev
    except OSError as exc:
        LOG.debug("stat %s: %s", path, exc)
        return None
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None  # tmpfs, overlay, NFS...: no block device to throttle
    sys_dir = f"/sys/dev/block/{major}:{minor}"
    if os.path.exists(os.path.join(sys_dir, "partition")):
        try:
            with open(os.path.join(os.path.realpath(sys_dir), "..", "dev")) as f:
                return f.read().strip()
        except OSError:
            return None
    return f"{major}:{minor}"


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        reason = "not writable" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        LOG.warning(
            "[torrent_images] qos_cgroup: cannot write %r to %s (%s%s); skipped",
            text.strip(),
            path,
            reason + ": " if reason else "",
            exc.strerror or exc,
        )
        return False
    return True


def apply_cgroup(conf: Any, store_path: str | None) -> dict[str, str]:
    """Write ``cpu.weight`` and ``io.max`` into ``qos_cgroup``; what was written, by file."""
    opts = conf.torrent_images
    if not opts.qos_cgroup:
        return {}
    directory = opts.qos_cgroup
    if not os.path.isabs(directory):
        directory = os.path.join(CGROUP_ROOT, directory)
    if not os.path.isdir(directory):
        LOG.warning("[torrent_images] qos_cgroup %s is not a directory; skipped", directory)
        return {}
    written: dict[str, str] = {}
    if opts.qos_cpu_weight:
        text = f"{opts.qos_cpu_weight}\n"
        if _write(os.path.join(directory, "cpu.weight"), text):
            written["cpu.weight"] = text.strip()
    if opts.qos_disk_write_limit and store_path:
        device = block_device_of(store_path)
        if device is None:
            LOG.warning(
                "[torrent_images] qos_disk_write_limit: %s is on no block device; no io.max",
                store_path,
            )
        else:
            text = f"{device} wbps={opts.qos_disk_write_limit * 1024}\n"
            if _write(os.path.join(directory, "io.max"), text):
                written["io.max"] = text.strip()
    if written:
        LOG.info("Fair share for guests: %s in cgroup %s", written, directory)
    return written
