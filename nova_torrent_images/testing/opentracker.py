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

"""A real opentracker (Debian package ``opentracker``) for integration tests and the demo.

What the Debian build does, found by running it (0.0~git20210823.110868e-3):

* it is built in whitelist mode: ``opentracker -h`` lists ``-w whitelistfile``, an
  announce for a hash that is not listed gets ``d14:failure reason63:Requested download
  is not authorized for use with this tracker.e``;
* started as root it chroots into ``-d`` (default: the current directory) and drops to
  ``nobody`` *before* it reads the whitelist, so the file must be inside that directory,
  named relative to it, world-readable, and the directory world-searchable; as another
  user it only changes into the directory;
* the whitelist is checked on every announce except ``event=stopped``;
* it reloads the whitelist on SIGHUP, in a thread of its own (the new list applies a
  moment after the signal), writes no pid file, and ends on SIGTERM/SIGINT after a short
  delay;
* its announce interval is about 30 minutes: a swarm's members are learned from the
  first announce of each newcomer, and from peer exchange.

:class:`Opentracker` runs it on 127.0.0.1 with a free TCP/UDP port, a whitelist file and a
pid file (written here, as a service manager would), in its own process group.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import libtorrent as lt

from nova_torrent_images.origin.tracker import read_whitelist, write_whitelist
from nova_torrent_images.testing.processes import ServiceProcess

WHITELIST = "whitelist.txt"
REFUSED = b"not authorized"


class OpentrackerError(RuntimeError):
    """opentracker is missing, did not start, or did not answer."""


def find_binary() -> str | None:
    return shutil.which("opentracker") or (
        "/usr/bin/opentracker" if os.access("/usr/bin/opentracker", os.X_OK) else None
    )


def _free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (opentracker binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port
    raise OpentrackerError(f"no free TCP+UDP port on {host}")


class Opentracker(ServiceProcess):
    """opentracker in whitelist mode on ``host``; its whitelist starts empty.

    :param workdir: directory for the whitelist, pid file and log (its chroot when run as
        root); a temporary directory, removed by :meth:`stop`, if ``None``.
    """

    name = "opentracker"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.host = host
        self.binary = binary or find_binary()
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    # -- paths and URLs ----------------------------------------------------------------
    @property
    def whitelist_path(self) -> str:
        return str(self._dir / WHITELIST)

    @property
    def pidfile_path(self) -> str:
        return str(self._dir / "opentracker.pid")

    @property
    def log_path(self) -> str:
        return str(self._dir / "opentracker.log")

    @property
    def announce_url(self) -> str:
        return f"http://{self.host}:{self._port}/announce"

    @property
    def udp_announce_url(self) -> str:
        return f"udp://{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise OpentrackerError("opentracker has no work directory before start()")
        return self.workdir

    @property
    def _port(self) -> int:
        if self.port is None:
            raise OpentrackerError("opentracker is not started")
        return self.port

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Opentracker:
        if self.binary is None:
            raise OpentrackerError(
                "opentracker is not installed (Debian: apt-get install opentracker; "
                "tools/install-system-packages does it)"
            )
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="opentracker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Run as root, opentracker chroots here and reads the whitelist as nobody.
        os.chmod(self.workdir, 0o755)
        if not os.path.exists(self.whitelist_path):
            write_whitelist(self.whitelist_path, [])
        self.port = _free_port(self.host)
        cmd = [
            self.binary,
            "-i",
            self.host,
            "-p",
            str(self.port),
            "-P",
            str(self.port),
            "-d",
            str(self.workdir),
            "-w",
            WHITELIST,  # relative: resolved inside the chroot / working directory
        ]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        Path(self.pidfile_path).write_text(f"{self._process.pid}\n")
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise OpentrackerError(
                    f"opentracker exited with {self._process.returncode}: {self.log_tail()}"
                )
            try:
                self.announce("00" * 20, event="stopped")
                return
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise OpentrackerError(f"opentracker did not answer on {self.announce_url}: {last}")

    def log_tail(self, size: int = 4000) -> str:
        try:
            return Path(self.log_path).read_bytes()[-size:].decode("utf-8", "replace")
        except OSError as exc:
            return f"(no log: {exc})"

    # -- tracker protocol --------------------------------------------------------------
    def announce(
        self,
        info_hash: str,
        *,
        event: str | None = None,
        port: int = 6881,
        left: int = 1,
        numwant: int = 0,
        peer_id: bytes = b"-NT0000-probe0000000",
    ) -> dict:
        """One HTTP announce (a 40-hex hash); returns the decoded answer (str keys)."""
        query = {
            "info_hash": bytes.fromhex(info_hash),
            "peer_id": peer_id,
            "port": str(port),
            "uploaded": "0",
            "downloaded": "0",
            "left": str(left),
            "compact": "1",
            "numwant": str(numwant),
        }
        if event:
            query["event"] = event
        # quote, not urlencode's default quote_plus: opentracker does not read '+' as a
        # space, so a hash with a 0x20 byte would turn into another hash.
        url = self.announce_url + "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=5) as resp:
            body = resp.read()
        decoded = lt.bdecode(body)
        if not isinstance(decoded, dict):
            raise OpentrackerError(f"unexpected tracker answer {body[:200]!r}")
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in decoded.items()}

    def is_allowed(self, info_hash: str) -> bool:
        """Whether the tracker accepts announces for ``info_hash``.

        Probes with a real announce: opentracker does not check its whitelist for
        ``event=stopped``. An accepted probe is withdrawn at once (``stopped``) so no host
        is sent to the probe's made-up address.
        """
        answer = self.announce(info_hash, port=1, peer_id=b"-NT0000-whitelistprb")
        if "failure reason" in answer:
            return False
        self.announce(info_hash, event="stopped", port=1, peer_id=b"-NT0000-whitelistprb")
        return True

    def wait_allowed(self, info_hash: str, allowed: bool = True, timeout: float = 5.0) -> bool:
        """Wait until the whitelist reload (asynchronous after SIGHUP) shows ``allowed``."""
        deadline = time.monotonic() + timeout
        while True:
            if self.is_allowed(info_hash) == allowed:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def scrape(self, info_hash: str) -> dict:
        """complete / incomplete / downloaded counts of one swarm (zeros if unknown)."""
        url = f"http://{self.host}:{self._port}/scrape?info_hash=" + urllib.parse.quote_from_bytes(
            bytes.fromhex(info_hash)
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=5) as resp:
            decoded = lt.bdecode(resp.read())
        files = decoded.get(b"files", {}) if isinstance(decoded, dict) else {}
        entry = files.get(bytes.fromhex(info_hash), {})
        return {k.decode(): v for k, v in entry.items()} if entry else {}

    def whitelisted(self) -> set[str]:
        return read_whitelist(self.whitelist_path)
