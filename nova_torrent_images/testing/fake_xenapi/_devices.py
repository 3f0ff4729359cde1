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

"""Local stand-ins for storage: VDI contents in sparse files, VBDs on loop devices."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ._schema import MiB

LOG = logging.getLogger(__name__)


def device_name(userdevice: int) -> str:
    """userdevice 0 -> xvda, 1 -> xvdb, ..., 26 -> xvdaa (Linux naming)."""
    letters, n = "", userdevice + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "xvd" + letters


def _run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    return result.stdout.strip()


def losetup_attach(path: Path, read_only: bool) -> str:
    ro = ["--read-only"] if read_only else []
    return _run(["losetup", "--find", "--show", *ro, str(path)])


def losetup_detach(device: str) -> None:
    try:
        _run(["losetup", "--detach", device])
    except subprocess.CalledProcessError as exc:
        LOG.warning("losetup --detach %s failed: %s", device, exc.stderr.strip())


def loop_devices_available(directory: str | os.PathLike[str] | None = None) -> bool:
    """True when we are root and a file in ``directory`` can be attached to a loop device."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        return False
    with tempfile.TemporaryDirectory(prefix="loop-probe-", dir=directory) as tmp:
        probe = Path(tmp) / "probe.img"
        with open(probe, "wb") as f:
            f.truncate(MiB)
        try:
            device = losetup_attach(probe, read_only=True)
        except (OSError, subprocess.SubprocessError) as exc:
            LOG.info("loop devices unavailable: %s", exc)
            return False
        losetup_detach(device)
        return True


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy VDI contents: a reflink where the filesystem can, else a copy keeping holes."""
    _run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)])
    dst.chmod(0o644)


@dataclasses.dataclass
class _Attachment:
    file: Path  # the VDI's contents
    link: Path  # <dev_dir>/<device>, a symlink to the loop device or the file
    loop: str | None  # /dev/loopN in loop mode
    read_only: bool

    @property
    def path(self) -> str:
        return self.loop or str(self.link)


class LocalDevices:
    """Plugged VBDs as local paths: loop devices, or symlinks to the files (see package doc).

    Not thread safe: the fake calls it under its own lock.
    """

    def __init__(self, use_loop_devices: bool) -> None:
        self.use_loop_devices = use_loop_devices
        self._attached: dict[str, _Attachment] = {}

    def attach(self, key: str, file: Path, link: Path, read_only: bool) -> str:
        """Expose ``file`` at ``link`` (and a loop device); return the local device path."""
        loop = losetup_attach(file, read_only) if self.use_loop_devices else None
        if loop is None and read_only:
            file.chmod(0o444)  # stops non-root writers only
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(loop or file)
        self._attached[key] = attachment = _Attachment(file, link, loop, read_only)
        return attachment.path

    def detach(self, key: str) -> None:
        attachment = self._attached.pop(key, None)
        if attachment is None:
            return
        attachment.link.unlink(missing_ok=True)
        if attachment.loop is not None:
            losetup_detach(attachment.loop)
        elif attachment.read_only and not any(
            a.file == attachment.file and a.read_only for a in self._attached.values()
        ):
            attachment.file.chmod(0o644)

    def path(self, key: str) -> str | None:
        attachment = self._attached.get(key)
        return attachment.path if attachment else None

    def keys(self) -> list[str]:
        return list(self._attached)

    def flush(self, file: Path) -> None:
        """Push writes cached by loop devices on ``file`` into it (before copying it)."""
        for attachment in self._attached.values():
            if attachment.file == file and attachment.loop is not None:
                fd = os.open(attachment.loop, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
