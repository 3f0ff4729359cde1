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

"""Nova 21.2.4 (Ussuri, the last release with the XenAPI driver), unpacked for child processes.

Nova 21 does not install on this Python (its requirements pin libraries of 2020), and the
project's own venv carries a current Nova. So the set-up downloads that release's sdist
with pip, unpacks it, and installs beside it, with ``pip install --target``, the few
libraries its XenAPI modules import that the venv lacks or has in an incompatible
version. A child process runs with ``PYTHONPATH`` = that source, that overlay, this
repository: Nova's own loader and call sites, nothing of Nova copied here.

Cached under ``$NTI_CACHE_DIR`` (default ``~/.cache/nova-torrent-images``), by version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

NOVA_VERSION = "21.2.4"
# What nova.virt.xenapi of 21.2.4 imports and the venv lacks or has too new: os-xenapi (the
# XenAPI session and dom0 helpers), six and netifaces (gone from current OpenStack), and
# oslo.db 8.1 (nova.db of Ussuri uses oslo_db.concurrency, removed since).
OVERLAY = ("os-xenapi==0.3.4", "six==1.17.0", "netifaces==0.11.0", "oslo.db==8.1.0")


class Unavailable(Exception):
    """The release or its overlay could not be had (no package index reachable)."""


def cache_dir() -> str:
    base = os.environ.get("NTI_CACHE_DIR") or os.path.expanduser("~/.cache/nova-torrent-images")
    return os.path.join(base, f"nova-{NOVA_VERSION}")


def _pip(*args: str, cwd: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if run.returncode != 0:
        raise Unavailable(f"pip {' '.join(args)} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")


def pythonpath(repo_root: str) -> str:
    """``PYTHONPATH`` of a child that imports Nova 21.2.4, set up on first use."""
    root = cache_dir()
    source = os.path.join(root, f"nova-{NOVA_VERSION}")
    overlay = os.path.join(root, "overlay")
    if not (os.path.isdir(source) and os.path.isdir(overlay)):
        os.makedirs(os.path.dirname(root), exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".nova-{NOVA_VERSION}-", dir=os.path.dirname(root))
        try:
            _pip(
                "download", "--no-deps", "--no-binary", ":all:", f"nova=={NOVA_VERSION}",
                "-d", work, cwd=work,
            )  # fmt: skip
            with tarfile.open(os.path.join(work, f"nova-{NOVA_VERSION}.tar.gz")) as tar:
                tar.extractall(work, filter="data")
            _pip(
                "install",
                "--no-deps",
                "--target",
                os.path.join(work, "overlay"),
                *OVERLAY,
                cwd=work,
            )
            shutil.rmtree(root, ignore_errors=True)
            os.rename(work, root)  # whole or not at all
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return os.pathsep.join([source, overlay, repo_root])
