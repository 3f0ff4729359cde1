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
"""Child process of test_faults: one boot, eviction or fetch, for the parent to kill -9.

Run as ``python fault_child.py SPEC`` where SPEC is a JSON object:

* ``action``: ``boot`` (an image handler's ``download_image`` on a XAPI session),
  ``evict`` (``nova-torrent-images evict``: the eviction policy of a non-seeding pipeline)
  or ``fetch`` (a filesystem-store pipeline's ``ensure_base``, or with ``output``
  ``fetch_to_file`` into that file; no XAPI);
* ``handler``: ``glance`` or ``torrent`` (for ``boot``);
* ``xapi_url``, ``image_id``, ``vm_name``;
* ``conf``: ``[torrent_images]`` overrides (``state_dir``, ``glance_endpoint``, the fake's
  ``xenapi_compute_vm_uuid`` and ``xenapi_device_dir``, ...);
* ``linger``: after the work, stay (seeding) until killed;
* ``file_ops``: ``{"under": DIR, "die_after": N}``: record every file operation under
  ``DIR`` (a file opened for writing, ``fsync``, ``chmod``, ``replace``, ``link``,
  ``unlink``, ...) and report them; with ``die_after``, SIGKILL this process right after
  the N-th one returned. The filesystem analogue of ``FakeXenAPI.kill_after``: a kill -9
  between any two steps of the store's writes.

Everything is imported first; then the child reads one line from stdin before its first
XAPI call, so that the parent can arm ``FakeXenAPI.kill_after`` with its pid. It prints one
JSON line saying what it did (``{"root": <vdi uuid>}`` for a boot), then exits, or with
``linger`` prints it and sleeps.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
import time

import XenAPI

from nova_torrent_images.compute.pipeline import ImagePipeline, fetch_to_file
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.compute.stores.xenapi import XenAPIStore
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.swarm import transfer  # noqa: F401  imported before "go"
from nova_torrent_images.swarm.engine import shutdown_engine
from nova_torrent_images.testing.swarm import make_conf
from nova_torrent_images.virt.xenapi.handler import GlanceImageHandler, TorrentImageHandler


class FileOps:
    """Records file operations under one directory; SIGKILLs the process after the n-th."""

    PATH_FUNCS = ("replace", "rename", "link", "unlink", "chmod", "mkdir", "rmdir", "truncate")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC

    def __init__(self, under: str, die_after: int | None) -> None:
        self.under = os.path.realpath(under) + os.sep
        self.die_after = die_after
        self.events: list[str] = []

    def _ours(self, path: object) -> str | None:
        if not isinstance(path, str | os.PathLike):
            return None
        real = os.path.realpath(os.fspath(path))
        return real[len(self.under) :] if real.startswith(self.under) else None

    def _record(self, name: str, *paths: object) -> None:
        names = [p for p in map(self._ours, paths) if p is not None]
        if not names:
            return
        self.events.append(f"{name} {' -> '.join(names)}")
        if len(self.events) == self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)

    def install(self) -> None:
        for name in self.PATH_FUNCS:
            real = getattr(os, name)

            def wrapped(*args, _real=real, _name=name, **kwargs):
                result = _real(*args, **kwargs)
                self._record(_name, *args[:2])
                return result

            setattr(os, name, wrapped)
        real_fsync, real_os_open, real_open = os.fsync, os.open, builtins.open

        def fsync(fd):
            real_fsync(fd)
            self._record("fsync", os.readlink(f"/proc/self/fd/{fd}"))

        def os_open(path, flags, *args, **kwargs):
            fd = real_os_open(path, flags, *args, **kwargs)
            if flags & self.WRITE_FLAGS:
                self._record("open-for-writing", path)
            return fd

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+"):
                self._record("open-for-writing", file)
            return f

        os.fsync, os.open, builtins.open = fsync, os_open, open_


def boot(spec: dict, conf) -> dict:
    session = XenAPI.Session(spec["xapi_url"])
    session.login_with_password("root", "", "1.0", "fault-child")
    cls = TorrentImageHandler if spec.get("handler") == "torrent" else GlanceImageHandler
    handler = cls(conf)
    try:
        result = handler.download_image(None, session, {"name": spec["vm_name"]}, spec["image_id"])
        report = {"root": result["root"]["uuid"]}
        if spec.get("linger"):
            print(json.dumps(report), flush=True)
            while True:  # seeding, until the parent kills us
                time.sleep(60)
    finally:
        handler.shutdown()
        session.xenapi.session.logout()
    return report


def evict(spec: dict, conf) -> dict:
    session = XenAPI.Session(spec["xapi_url"])
    session.login_with_password("root", "", "1.0", "fault-child")
    try:
        store = XenAPIStore.from_conf(conf, session=session)
        ImagePipeline(conf, store, seeding=False).eviction.evict(spec["image_id"])
    finally:
        session.xenapi.session.logout()
    return {"evicted": spec["image_id"]}


def fetch(spec: dict, conf) -> dict:
    glance = GlanceClient.from_conf(conf)
    image = glance.image_info(spec["image_id"])
    if spec.get("output"):  # nova-torrent-images fetch --output
        return {
            "output": fetch_to_file(image, spec["output"], conf=conf, glance=glance).destination
        }
    pipeline = ImagePipeline(conf, FilesystemStore.from_conf(conf), seeding=False)
    pipeline.start()
    return {"base": pipeline.ensure_base(image, glance).base.ref}


def main() -> int:
    spec = json.loads(sys.argv[1])
    conf = make_conf(**spec.get("conf", {}))
    action = {"boot": boot, "evict": evict, "fetch": fetch}[spec["action"]]
    sys.stdin.readline()  # "go": the parent has armed its kill
    file_ops = None
    if spec.get("file_ops"):
        file_ops = FileOps(spec["file_ops"]["under"], spec["file_ops"].get("die_after"))
        file_ops.install()
    try:
        report = action(spec, conf)
    finally:
        shutdown_engine()
    if file_ops is not None:
        report["file_ops"] = file_ops.events
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
