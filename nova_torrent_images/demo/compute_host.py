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

"""One simulated compute host of the demo, in its own process.

It runs the real XenAPI image handler against its own fake XAPI (SR in files, no root
needed) and talks to the orchestrator in JSON lines: events on stdout, commands on stdin
(``boot N`` boots instance N, ``stop`` ends the host). It keeps seeding between boots, so
other hosts can fetch from it, until told to stop.

``http N IMAGE URL`` is the demo's plain HTTP column: the same pipeline with ``mode = none``
fetches the image from the Glance at ``URL`` (the demo's Glance behind the origin's uplink
cap) into a file of its own (not the SR: the boots' base copies are left alone), verified,
then removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time

from nova_torrent_images.compute.pipeline import fetch_to_file
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.swarm.engine import SwarmEngine
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, GiB
from nova_torrent_images.testing.swarm import make_conf
from nova_torrent_images.virt.xenapi.handler import TorrentImageHandler

_out_lock = threading.Lock()


def emit(event: str, **fields: object) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


def _vdi_sha512(fake: FakeXenAPI, vdi_uuid: str, size: int) -> str:
    ref = next(r for r in fake.all_refs("VDI") if fake.get_record("VDI", r)["uuid"] == vdi_uuid)
    hasher = hashlib.sha512()
    with open(fake.vdi_path(ref), "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 4 << 20))
            hasher.update(chunk)
            left -= len(chunk)
    return hasher.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--glance", required=True, help="Glance endpoint (noauth)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sr-size", type=int, default=8 * GiB)
    args = parser.parse_args(argv)
    logging.basicConfig(
        filename=f"{args.workdir}/{args.name}.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )

    conf = make_conf(state_dir=f"{args.workdir}/state", progress_interval=5)
    engine = SwarmEngine(conf, listen_interfaces=[f"{args.address}:0"]).start()
    glance = GlanceClient.for_endpoint(args.glance, conf)
    progress_state = {"boot": 0}

    def progress(done: int, total: int, rate: int, peers: int) -> None:
        emit("progress", boot=progress_state["boot"], done=done, total=total, peers=peers)

    with FakeXenAPI.create(
        f"{args.workdir}/xapi", sr_size=args.sr_size, use_loop_devices=False
    ) as fake:
        session = fake.session()
        fake.configure(conf)
        handler = TorrentImageHandler(
            conf,
            glance_factory=lambda context: glance,
            engine=engine,
            progress=progress,
        )
        emit("ready", address=args.address, port=engine.listen_port)
        try:
            for line in sys.stdin:
                command = line.split()
                if not command or command[0] == "stop":
                    break
                if command[0] == "boot":
                    boot_number, image_id = int(command[1]), command[2]
                    progress_state["boot"] = boot_number
                    _boot(handler, session, fake, glance, args.name, boot_number, image_id)
                elif command[0] == "http":
                    _plain_http(args.workdir, int(command[1]), command[2], command[3])
        finally:
            handler.shutdown()
            session.xenapi.session.logout()
            engine.shutdown()
    return 0


def _boot(handler, session, fake, glance, name, number, image_id) -> None:
    started = time.monotonic()
    try:
        root = handler.download_image(None, session, {"name": f"{name}-vm-{number}"}, image_id)[
            "root"
        ]["uuid"]
    except Exception as exc:  # noqa: BLE001  reported to the orchestrator, and logged
        logging.getLogger(__name__).exception("boot %d failed", number)
        emit("boot", boot=number, error=str(exc))
        return
    seconds = time.monotonic() - started
    image = glance.image_info(image_id)
    fetched = handler.pipeline(session).fetches.pop(image_id, None)
    emit(
        "boot",
        boot=number,
        seconds=seconds,
        source=fetched.source if fetched else "clone",
        from_peers=fetched.bytes_from_peers if fetched else 0,
        from_origin=fetched.bytes_from_origin if fetched else 0,
        from_glance=fetched.bytes_from_glance if fetched else 0,
        verified=_vdi_sha512(fake, root, image.size) == image.hash_value,
        root=root,
    )


def _file_sha512(path: str) -> str:
    hasher = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def _plain_http(workdir: str, number: int, image_id: str, glance_url: str) -> None:
    """The plain HTTP baseline: the pipeline with ``mode = none``, into a file."""
    started = time.monotonic()
    dest = os.path.join(workdir, f"http-{number}.raw")
    try:
        conf = make_conf(state_dir=os.path.join(workdir, "http-state"), mode="none")
        glance = GlanceClient.for_endpoint(glance_url, conf)
        image = glance.image_info(image_id)
        fetched = fetch_to_file(image, dest, conf=conf, glance=glance)
        seconds = time.monotonic() - started
        verified = _file_sha512(dest) == image.hash_value
    except Exception as exc:  # noqa: BLE001  reported to the orchestrator, and logged
        logging.getLogger(__name__).exception("plain HTTP fetch %d failed", number)
        emit("http", boot=number, error=str(exc))
        return
    finally:
        if os.path.exists(dest):
            os.unlink(dest)
    emit(
        "http",
        boot=number,
        seconds=seconds,
        source=fetched.source,
        from_glance=fetched.bytes_from_glance,
        verified=verified,
    )


if __name__ == "__main__":
    sys.exit(main())
