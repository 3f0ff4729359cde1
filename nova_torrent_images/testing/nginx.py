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

"""A real caching proxy (Debian's ``nginx``) in front of an origin, for tests and benchmarks.

It stands for a zone cache an operator puts between a rack or zone of compute hosts and
the origin's HTTP endpoints (:mod:`nova_torrent_images.origin.stripe_server`). The configuration
is the stock one an operator would write, nothing specific to this project:

* ``proxy_cache`` in a directory of the runner's own, ``proxy_cache_valid 200 206 1h``
  (the origin's own ``Cache-Control: max-age`` takes precedence) and ``proxy_cache_lock``,
  so hosts asking for the same bytes at the same time cause one origin request;
* image data (``.../data``, always asked for with a ``Range``) through the ``slice``
  module (Debian builds it: ``nginx -V`` lists ``--with-http_slice_module``): nginx asks
  the origin for aligned slices, caches each under its own key and cuts any client range
  out of them, so two hosts asking for different piece runs still share the slices;
* everything else (the stripe dispenser's POSTs) passed through, never cached.

Run as root, nginx's workers run as ``nobody``: the work directory is made
world-searchable and nginx creates its cache and temporary directories for that user.
:class:`Nginx` binds 127.0.0.1 on a free port, in its own process group, and removes its
directory on :meth:`stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from nova_torrent_images.testing.processes import ServiceProcess

SLICE = "1m"

CONFIG = """\
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format zone '$remote_addr "$request" $status $upstream_cache_status '
                    '$body_bytes_sent "$http_range"';
    access_log {dir}/access.log zone;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=zone:10m max_size={max_size}
                     inactive=1d use_temp_path=off;
    server {{
        listen {host}:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 60s;
        add_header X-Cache-Status $upstream_cache_status always;

        # Image bytes: aligned slices, each cached once.
        location ~ ^/v1/torrents/[0-9a-f]+/data$ {{
            slice {slice};
            proxy_cache zone;
            proxy_cache_key $scheme$proxy_host$uri$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_pass {upstream};
        }}
        # The .torrent is cached; stripe requests (POST) are never cached.
        location / {{
            proxy_cache zone;
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            proxy_pass {upstream};
        }}
    }}
}}
"""


class NginxError(RuntimeError):
    """nginx is missing, did not start, or did not answer."""


def find_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


def has_slice_module(binary: str) -> bool:
    out = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False)
    return "--with-http_slice_module" in out.stdout + out.stderr


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Nginx(ServiceProcess):
    """A caching reverse proxy on ``host`` in front of ``upstream`` (``http://ip:port``)."""

    name = "nginx"

    def __init__(
        self,
        upstream: str,
        workdir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        binary: str | None = None,
        max_size: str = "4g",
        startup_timeout: float = 10.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.host = host
        self.binary = binary or find_binary()
        self.max_size = max_size
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise NginxError("nginx is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> str:
        return str(self._dir / "nginx.conf")

    @property
    def access_log_path(self) -> str:
        return str(self._dir / "access.log")

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise NginxError("nginx has no work directory before start()")
        return self.workdir

    def start(self) -> Nginx:
        if self.binary is None:
            raise NginxError(
                "nginx is not installed (Debian: apt-get install nginx; "
                "tools/install-system-packages does it)"
            )
        if not has_slice_module(self.binary):
            raise NginxError(f"{self.binary} was built without the slice module")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="nginx-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # workers run as nobody when the master is root
        self.port = _free_port(self.host)
        Path(self.config_path).write_text(
            CONFIG.format(
                dir=self.workdir,
                host=self.host,
                port=self.port,
                upstream=self.upstream,
                slice=SLICE,
                max_size=self.max_size,
            )
        )
        log = open(self._dir / "stderr.log", "ab")  # noqa: SIM115  closed below
        try:
            self._process = subprocess.Popen(
                # -e: the start-up error log too (the default, /var/log/nginx, needs root).
                [
                    self.binary,
                    "-c",
                    self.config_path,
                    "-p",
                    str(self.workdir),
                    "-e",
                    str(self._dir / "error.log"),
                    "-g",
                    "daemon off;",
                ],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise NginxError(f"nginx exited with {self._process.returncode}: {self.log_tail()}")
            try:
                with opener.open(self.url + "/", timeout=2) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer (the origin's 404) means the proxy is up
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise NginxError(f"nginx did not answer on {self.url}: {last}")

    def log_tail(self, size: int = 4000) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            try:
                parts.append((self._dir / name).read_bytes()[-size:].decode("utf-8", "replace"))
            except OSError:
                continue
        return "\n".join(parts) or "(no log)"

    def cache_statuses(self) -> list[tuple[str, str]]:
        """(request line, upstream cache status) of every request the proxy answered."""
        out = []
        try:
            lines = Path(self.access_log_path).read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                _, request, rest = line.split('"', 2)
            except ValueError:
                continue
            fields = rest.split()
            out.append((request, fields[1] if len(fields) > 1 else "-"))
        return out
