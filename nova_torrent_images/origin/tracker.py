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

"""The tracker side of publishing: opentracker's whitelist and its reload.

Debian's ``opentracker`` package is built in whitelist mode (``WANT_ACCESSLIST_WHITE``; its
usage line shows ``-w whitelistfile``): it answers announces only for the info-hashes in
its whitelist file and refuses any other with "Requested download is not authorized for
use with this tracker". The file is what publish writes here:

* one info-hash per line, 40 hex digits; opentracker skips any line that does not start
  with 40 hex digits followed by a non-hex character, so a comment header is safe;
* every line ends with a newline (opentracker 2021 reads one byte past the end of its
  mapping when the last hash has none);
* for each image **both** the v1 info-hash and the first 20 bytes of the v2 info-hash:
  libtorrent 2.x announces a hybrid torrent once per protocol, with the v1 hash and with the
  truncated v2 hash, and a host that joined from a v2-only magnet announces only the
  truncated v2 hash until it has the metadata;
* replaced atomically (write, fsync, rename), world-readable: opentracker maps the file,
  and when started as root it chroots into its directory and reads it as ``nobody``
  (Debian's unit runs it as ``_opentracker``).

opentracker rereads the file on SIGHUP (in a thread of its own, so the new list applies a
moment after the signal). It writes no pid file, so the operator's service manager must
(``tracker_pidfile``); before signalling, the pid is checked to belong to an opentracker
process, because SIGHUP terminates most other programs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common.utils import atomic_write

LOG = logging.getLogger(__name__)

HEADER = (
    "# opentracker whitelist written by 'nova-torrent-images publish': the v1 info-hash and\n"
    "# the truncated v2 info-hash of every published image. Edits are overwritten.\n"
)
TRACKER_PROCESS_NAME = "opentracker"


def tracker_hashes(info_hash_v1: str | None, info_hash_v2: str | None) -> list[str]:
    """The 40-hex hashes a tracker sees for one torrent (v1, and v2 cut to 20 bytes)."""
    hashes = []
    if info_hash_v1:
        hashes.append(info_hash_v1.lower())
    if info_hash_v2:
        hashes.append(info_hash_v2.lower()[:40])
    return hashes


def render_whitelist(hashes: Iterable[str]) -> str:
    """The whitelist text for ``hashes``: header, sorted unique hashes, newline-terminated."""
    unique = sorted({h.lower() for h in hashes})
    for h in unique:
        if len(h) != 40 or any(c not in "0123456789abcdef" for c in h):
            raise ValueError(f"{h!r} is not a 40-hex info-hash")
    return HEADER + "".join(f"{h}\n" for h in unique)


def write_whitelist(path: str, hashes: Iterable[str]) -> bool:
    """Replace the whitelist at ``path`` with ``hashes``; return whether it changed.

    An unchanged file is not touched at all (no rename, same mtime), so publishing an
    unchanged image changes nothing on disk. Raises :class:`TrackerError`.
    """
    text = render_whitelist(hashes)
    try:
        with open(path, encoding="ascii") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        LOG.warning("Whitelist %s is unreadable (%s); rewriting it", path, exc)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        # A missing directory is a mistyped setting, not something to create: the tracker
        # would never read a file there.
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"the directory {directory} does not exist")
        # World-readable: opentracker reads the file as an unprivileged user.
        atomic_write(path, text.encode("ascii"), mode=0o644)
    except OSError as exc:
        raise exception.TrackerError(
            path=path, option="tracker_whitelist_path", reason=str(exc)
        ) from exc
    LOG.info("Tracker whitelist %s now lists %d info-hashes", path, text.count("\n") - 2)
    return True


def read_whitelist(path: str) -> set[str]:
    """The info-hashes in a whitelist file, parsed the way opentracker does."""
    hashes = set()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                head = line[:41].lower()
                if len(head) >= 40 and all(c in "0123456789abcdef" for c in head[:40]):
                    if len(head) == 40 or head[40] not in "0123456789abcdef":
                        hashes.add(head[:40])
    except FileNotFoundError:
        pass
    return hashes


def _process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def reload_tracker(pidfile: str, *, process_name: str = TRACKER_PROCESS_NAME) -> bool:
    """Send SIGHUP to the tracker named by ``pidfile``; return whether it was signalled.

    Failures are logged, not raised: a tracker that missed a reload still serves the hashes
    it had, and hosts still find the origin through the magnet's peer hints.
    """
    try:
        with open(pidfile, encoding="ascii") as f:
            text = f.read().strip()
        pid = int(text.split()[0])
    except (OSError, ValueError, IndexError) as exc:
        LOG.warning(
            "Cannot read the tracker pid from %s ([torrent_images] tracker_pidfile): %s; "
            "the tracker keeps its old whitelist until it is reloaded",
            pidfile,
            exc,
        )
        return False
    name = _process_name(pid)
    if name != process_name:
        LOG.warning(
            "Pid %d from %s ([torrent_images] tracker_pidfile) is %s, not %s; not sending "
            "SIGHUP (a stale pid file?)",
            pid,
            pidfile,
            f"a {name!r} process" if name else "not running",
            process_name,
        )
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        LOG.warning("Cannot send SIGHUP to tracker pid %d (%s): %s", pid, pidfile, exc)
        return False
    LOG.info("Sent SIGHUP to %s (pid %d) to reload its whitelist", process_name, pid)
    return True


class TrackerWhitelist:
    """The configured whitelist file and the tracker that reads it."""

    def __init__(self, path: str, pidfile: str | None = None) -> None:
        self.path = path
        self.pidfile = pidfile

    def sync(self, hashes: Iterable[str]) -> bool:
        """Make the whitelist list exactly ``hashes``; reload the tracker if it changed."""
        changed = write_whitelist(self.path, hashes)
        if changed and self.pidfile:
            reload_tracker(self.pidfile)
        return changed

    def hashes(self) -> set[str]:
        return read_whitelist(self.path)
