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
"""Fault injection: kill -9 at XAPI calls, Glance faults, hostile torrents, lying peers.

Every case checks the promises of DESIGN section 1a under its fault:

* no corrupt byte delivered: every disk or file handed on, and every base copy left in
  the store, hashes to Glance's ``os_hash_value``;
* nothing leaked: in the fake XAPI no VBD on the compute VM (but a live process's seed),
  no VDI but base copies (tagged snapshots) and instance disks someone has (a VBD, or a
  live owner); in a store directory only ``<id>.base``, ``<id>.json`` and ``instances/``;
  no scratch directory under ``<state_dir>/scratch``; no device link in the fake's
  device directory;
* recovery: a new process (here: a new pipeline in this process) on the same SR or
  directory runs ``start()``, which removes what the crash left, and a boot succeeds and
  is verified.

The kill -9 cases run the boot in a child process (``fault_child.py``) against the fake
XAPI over XML-RPC. The fake counts the calls of one undisturbed run, then for each chosen
``n`` a fresh host is killed right after its ``n``-th call was carried out, before the
answer reached it (``FakeXenAPI.kill_after``). Between two state-changing calls XAPI's
state is the same, so every call from the first ``VDI.create`` on is a kill point (the
slot, the commit and the clone), and a sample of the read-only calls before it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import libtorrent as lt
import pytest

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.compute.pipeline import ImagePipeline, fetch_to_file
from nova_torrent_images.compute.seeding.resume import ResumeFiles
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.compute.stores.xenapi import TAG
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.magnet import build_magnet
from nova_torrent_images.swarm.torrent import make_torrent
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, GiB
from nova_torrent_images.testing.swarm import (
    SimulatedHost,
    make_conf,
    next_loopback_address,
    write_corrupt_copy,
)
from nova_torrent_images.virt.xenapi.handler import GlanceImageHandler, TorrentImageHandler

from .fault_glance import FaultyGlance

MiB = 1024 * 1024
CHILD = Path(__file__).with_name("fault_child.py")
CHILD_TIMEOUT = 90


# -- images ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Image:
    id: str
    size: int
    hash: str  # sha512, Glance's os_hash_value
    path: str


def sha512_prefix(path: str | os.PathLike, size: int) -> str:
    """sha512 of the first ``size`` bytes (a VDI is rounded up to its SR's granularity)."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 4 * MiB))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def create_glance_image(glance_server, path: Path, size: int, name: str) -> Image:
    path.write_bytes(os.urandom(size))
    record = glance_server.create_image(str(path), name=name)
    assert record["os_hash_value"] == sha512_prefix(path, size)
    return Image(record["id"], size, record["os_hash_value"], str(path))


@pytest.fixture(scope="module")
def plain_image(glance_server, tmp_path_factory):
    """A 4 MiB raw image in the real glance-api, not torrentable."""
    image = create_glance_image(
        glance_server, tmp_path_factory.mktemp("images") / "plain.raw", 4 * MiB, "fault-plain"
    )
    yield image
    glance_server.client().images.delete(image.id)


@pytest.fixture(scope="module")
def swarm_image(glance_server, tmp_path_factory):
    """A 4 MiB torrentable image seeded by one host limited to 8 MiB/s (a boot's swarm
    download takes about half a second: long enough to kill it in the middle)."""
    image = create_glance_image(
        glance_server, tmp_path_factory.mktemp("images") / "swarm.raw", 4 * MiB, "fault-swarm"
    )
    torrent = make_torrent(image.path, name=image.id)
    seeder = SimulatedHost("fault-seeder", upload_rate_limit=8 * 1024)
    try:
        seeder.seed(torrent.data, image.path)
        glance_server.client().images.update(
            image.id,
            is_torrentable="true",
            torrent_magnet=torrent.magnet(peers=[seeder.endpoint]),
        )
        yield image
    finally:
        seeder.stop()
        glance_server.client().images.delete(image.id)


# -- one fake XenServer host and its nova-compute state ---------------------------------
@dataclasses.dataclass
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    trigger: object = None

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def report(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])

    def describe(self) -> str:
        return f"exit status {self.returncode}; stderr: {self.stderr[-2000:]}"


class XapiHost:
    """A fake XenServer host (SR, compute VM) over XML-RPC, and a nova-compute state dir."""

    def __init__(self, root: Path, glance_url: str) -> None:
        self.root = root
        self.glance_url = glance_url
        self.fake = FakeXenAPI.create(root / "xapi", sr_size=GiB, use_loop_devices=False)
        self.url = self.fake.start_server()
        self.state_dir = root / "state"

    def close(self) -> None:
        self.fake.close()

    def __enter__(self) -> XapiHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- configuration -------------------------------------------------------------------
    def conf_overrides(self, **extra: object) -> dict:
        return {
            "state_dir": str(self.state_dir),
            "glance_endpoint": self.glance_url,
            "glance_noauth": True,
            "glance_retry_delay": 0.05,
            "xenapi_compute_vm_uuid": self.fake.compute_vm_uuid,
            "xenapi_device_dir": str(self.fake.dev_dir()),
            "prune_interval": 0,  # no maintenance thread: the calls are the boot's alone
            **extra,
        }

    def spec(self, action: str, image: Image, handler: str = "glance", **conf: object) -> dict:
        if handler == "torrent":
            conf.setdefault("listen_interfaces", [f"{next_loopback_address()}:0"])
        return {
            "action": action,
            "handler": handler,
            "xapi_url": self.url,
            "image_id": image.id,
            "vm_name": "vm-of-child",
            "conf": self.conf_overrides(**conf),
        }

    # -- the child -----------------------------------------------------------------------
    def start_child(self, spec: dict) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def run_child(self, spec: dict, kill_after: int | None = None) -> ChildRun:
        """Run the child to its end, or with ``kill_after`` until its n-th XAPI call."""
        child = self.start_child(spec)
        trigger = None
        if kill_after is not None:
            trigger = self.fake.kill_after(child.pid, kill_after)
        try:
            out, err = child.communicate(b"go\n", timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
        finally:
            self.fake.cancel_kill()
        return ChildRun(child.returncode, out.decode(), err.decode(), trigger)

    # -- what "Nova" does with a root disk ------------------------------------------------
    def attach_to_instance(self, vdi_uuid: str) -> None:
        """Nova's next step after download_image: a VBD of a new (halted) instance VM."""
        vm = self.fake.add_vm(f"instance of {vdi_uuid}", power_state="Halted")
        session = self.fake.session()
        try:
            x = session.xenapi
            x.VBD.create(
                {
                    "VM": vm,
                    "VDI": x.VDI.get_by_uuid(vdi_uuid),
                    "userdevice": "0",
                    "bootable": True,
                    "mode": "RW",
                    "type": "Disk",
                    "empty": False,
                    "other_config": {},
                    "qos_algorithm_type": "",
                    "qos_algorithm_params": {},
                }
            )
        finally:
            session.xenapi.session.logout()

    def vdi_sha512(self, vdi_uuid: str, size: int) -> str:
        ref = next(
            r
            for r in self.fake.all_refs("VDI")
            if self.fake.get_record("VDI", r)["uuid"] == vdi_uuid
        )
        return sha512_prefix(self.fake.vdi_path(ref), size)

    # -- the checks ----------------------------------------------------------------------
    def problems(self, image: Image) -> list[str]:
        """Leaks, half-done objects and corrupt base copies; empty when all is well."""
        fake = self.fake
        found = []
        attached_devices = set()
        for ref in fake.all_refs("VBD"):
            vbd = fake.get_record("VBD", ref)
            if vbd["VM"] != fake.compute_vm_ref:
                continue  # an instance's disk
            if vbd["currently_attached"]:
                attached_devices.add(vbd["device"])
            owner = vbd["other_config"].get(TAG + "owner")
            if owner and not utils.owner_is_gone(owner):
                continue  # in use by a live process (the recovered pipeline's seed)
            found.append(
                f"VBD {vbd['uuid']} on the compute VM ({vbd['mode']}, "
                f"role={vbd['other_config'].get(TAG + 'role')}, owner={owner}, "
                f"attached={vbd['currently_attached']})"
            )
        bases: collections.Counter = collections.Counter()
        for ref in fake.all_refs("VDI"):
            vdi = fake.get_record("VDI", ref)
            tags = vdi["other_config"]
            role, owner = tags.get(TAG + "role"), tags.get(TAG + "owner")
            what = (
                f"VDI {vdi['uuid']} ({vdi['name_label']!r}, role={role}, owner={owner}, "
                f"is_a_snapshot={vdi['is_a_snapshot']})"
            )
            if role == "base" and vdi["is_a_snapshot"]:
                bases[tags.get(TAG + "image_id")] += 1
                if tags.get(TAG + "image_id") == image.id and (
                    sha512_prefix(fake.vdi_path(ref), image.size) != image.hash
                ):
                    found.append(f"{what}: a base copy whose bytes are not the image's")
                continue
            if role == "instance" and (
                vdi["VBDs"] or (owner is not None and not utils.owner_is_gone(owner))
            ):
                continue  # taken by an instance, or its live maker is handing it on
            why = {
                "slot": "a download slot",
                "base": "a clone still carrying base tags",
                "instance": "an instance disk nobody took",
            }.get(role, "a VDI this library does not account for")
            found.append(f"{what}: {why}")
        found += [f"{n} base copies of image {i}" for i, n in bases.items() if n > 1]
        resumes = ResumeFiles.in_state_dir(str(self.state_dir))
        found += [
            f"resume data of image {i} without a base copy"
            for i in resumes.image_ids()
            if i not in bases
        ]
        scratch = self.state_dir / "scratch"
        if scratch.is_dir() and os.listdir(scratch):
            found.append(f"scratch directories left: {sorted(os.listdir(scratch))}")
        dev_dir = fake.dev_dir()
        links = set(os.listdir(dev_dir)) if dev_dir.is_dir() else set()
        if links - attached_devices:
            found.append(f"device links left in {dev_dir}: {sorted(links - attached_devices)}")
        return found

    def recover_and_boot(
        self, image: Image, engine: object = None, *, seeds_again: bool = False
    ) -> list[str]:
        """A restarted nova-compute: first use runs start(), then one boot, verified.

        With ``engine`` the torrent handler, else the plain one; ``seeds_again``: the
        restarted process must seed the image again (its resume data was saved).
        """
        conf = make_conf(**self.conf_overrides())
        cls = TorrentImageHandler if engine is not None else GlanceImageHandler
        handler = cls(conf, engine=engine)
        session = self.fake.session()
        found = []
        try:
            pipeline = handler.pipeline(session)  # a new process's first use: start()
            found += [f"after the restart: {p}" for p in self.problems(image)]
            seeding = pipeline.seeds.seeding() if pipeline.seeds is not None else []
            if seeds_again and seeding != [image.id]:
                found.append(f"the restarted process does not seed the image: {seeding}")
            root = handler.download_image(None, session, {"name": "vm-after-restart"}, image.id)
            uuid = root["root"]["uuid"]
            if self.vdi_sha512(uuid, image.size) != image.hash:
                found.append(f"the boot after the restart delivered VDI {uuid}: wrong bytes")
            self.attach_to_instance(uuid)
        except Exception as exc:  # noqa: BLE001  reported with the others
            found.append(f"the boot after the restart failed: {exc!r}")
        finally:
            handler.shutdown()
            session.xenapi.session.logout()
        found += [f"after the boot: {p}" for p in self.problems(image)]
        vbds = [
            r
            for r in self.fake.all_refs("VBD")
            if self.fake.get_record("VBD", r)["VM"] == self.fake.compute_vm_ref
        ]
        if vbds:
            found.append(f"{len(vbds)} VBDs on the compute VM after the handler's shutdown")
        return found


def kill_and_recover(
    root: Path,
    glance_url: str,
    image: Image,
    calls: tuple[str, ...],
    n: int,
    *,
    handler: str = "glance",
    setup=None,
    action: str = "boot",
    engine: object = None,
    seeds_again: bool = False,
) -> list[str]:
    """Kill a child right after its n-th XAPI call on a fresh host; restart; boot again."""
    where = f"kill -9 after call {n} ({calls[n - 1]})"
    with XapiHost(root, glance_url) as host:
        if setup is not None:
            setup(host)
        run = host.run_child(host.spec(action, image, handler), kill_after=n)
        if not run.killed:
            return [f"{where}: the child was not killed: {run.describe()}"]
        _, method = run.trigger.call
        if method != calls[n - 1]:
            return [f"{where}: it died after {method} instead: the calls are not repeatable"]
        found = host.recover_and_boot(image, engine=engine, seeds_again=seeds_again)
        return [f"{where}: {p}" for p in found]


def count_calls(
    root: Path, glance_url: str, image: Image, *, handler="glance", setup=None, action="boot"
) -> tuple[str, ...]:
    """The XAPI calls of one undisturbed child run (a fresh host, after ``setup``)."""
    with XapiHost(root, glance_url) as host:
        if setup is not None:
            setup(host)
        host.fake.clear_calls()
        run = host.run_child(host.spec(action, image, handler))
        assert run.returncode == 0, run.describe()
        calls = host.fake.calls
        if action == "boot":
            report = run.report()
            assert host.vdi_sha512(report["root"], image.size) == image.hash
    assert calls[-1] == "session.logout", calls
    return calls[:-1]  # after the logout the work is done: no kill point


# == 1. kill -9 after XenAPI calls ======================================================
@pytest.fixture(scope="module")
def plain_boot_calls(plain_image, glance_server, tmp_path_factory):
    return count_calls(tmp_path_factory.mktemp("count-plain"), glance_server.url, plain_image)


def plain_kill_points(calls: tuple[str, ...], phase: str) -> list[int]:
    first_slot = calls.index("VDI.create")
    if phase == "before-the-slot":
        # Read-only calls (login, the store, the stale scan, the lookup): a sample.
        return sorted({*range(1, first_slot + 1, 3), first_slot})
    # The slot, the Glance download into it, the commit, the clone: every call.
    return list(range(first_slot + 1, len(calls) + 1))


@pytest.mark.parametrize("phase", ["before-the-slot", "slot-commit-clone"])
def test_kill_9_during_a_plain_boot(phase, plain_boot_calls, plain_image, glance_server, tmp_path):
    calls = plain_boot_calls
    assert {"VDI.create", "VDI.snapshot", "VDI.clone"} <= set(calls), calls
    problems = []
    for n in plain_kill_points(calls, phase):
        problems += kill_and_recover(tmp_path / f"n{n}", glance_server.url, plain_image, calls, n)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("first", ["VBD.plug", "VDI.clone"])
def test_kill_9_again_during_the_cleanup(
    first, plain_boot_calls, plain_image, glance_server, tmp_path
):
    """A crash, then a second crash of the restarted process while it removes the first's
    leftovers (a plugged download slot; a clone still carrying base tags)."""
    first_n = plain_boot_calls.index(first) + 1

    def crash_once(host: XapiHost) -> None:
        run = host.run_child(host.spec("boot", plain_image), kill_after=first_n)
        assert run.killed, run.describe()

    calls = count_calls(tmp_path / "count", glance_server.url, plain_image, setup=crash_once)
    # The restarted boot's own calls, from its store to its first new work (the clean-up
    # of the first crash and the lookup): every one is a kill point.
    begin = calls.index("VM.get_by_uuid") + 1
    end = next(i for i, c in enumerate(calls) if c in ("VDI.create", "VDI.clone"))
    assert "VDI.destroy" in calls[begin:end], calls  # something was cleaned up
    problems = []
    for n in range(begin + 1, end + 1):
        problems += kill_and_recover(
            tmp_path / f"n{n}", glance_server.url, plain_image, calls, n, setup=crash_once
        )
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def torrent_boot_calls(swarm_image, glance_server, tmp_path_factory):
    return count_calls(
        tmp_path_factory.mktemp("count-torrent"), glance_server.url, swarm_image, handler="torrent"
    )


def test_kill_9_while_starting_to_seed(
    torrent_boot_calls, swarm_image, glance_server, hosts, tmp_path
):
    """Kill points of the seed's read-only view (made before the clone) and the clone."""
    calls = torrent_boot_calls
    snapshot = calls.index("VDI.snapshot")
    seed_vbd = calls.index("VBD.create", snapshot)
    assert calls[seed_vbd : seed_vbd + 3] == ("VBD.create", "VBD.plug", "VBD.get_device"), calls
    points = [seed_vbd + 1, seed_vbd + 2, seed_vbd + 3, calls.index("VDI.clone") + 1]
    compute = hosts("compute-restarted")
    problems = []
    for n in points:
        problems += kill_and_recover(
            tmp_path / f"n{n}",
            glance_server.url,
            swarm_image,
            calls,
            n,
            handler="torrent",
            engine=compute.engine,
            seeds_again=True,  # its resume data was saved before the seed started
        )
    assert not problems, "\n".join(problems)


def wait_for_line(child: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"the child said nothing within {timeout}s")
    return child.stdout.readline().decode()


def test_kill_9_while_seeding_after_the_boot(swarm_image, glance_server, hosts, tmp_path):
    """The boot is done and its disk handed on; nova-compute dies while seeding."""
    with XapiHost(tmp_path, glance_server.url) as host:
        spec = host.spec("boot", swarm_image, "torrent")
        spec["linger"] = True
        child = host.start_child(spec)
        try:
            child.stdin.write(b"go\n")
            child.stdin.flush()
            root = json.loads(wait_for_line(child, CHILD_TIMEOUT))["root"]
            assert host.vdi_sha512(root, swarm_image.size) == swarm_image.hash
            host.attach_to_instance(root)
            seeds = [
                host.fake.get_record("VBD", r)
                for r in host.fake.all_refs("VBD")
                if host.fake.get_record("VBD", r)["other_config"].get(TAG + "role") == "seed"
            ]
            assert [(s["mode"], s["currently_attached"]) for s in seeds] == [("RO", True)]
        finally:
            child.kill()
            child.communicate()
        assert child.returncode == -signal.SIGKILL
        problems = host.recover_and_boot(
            swarm_image, engine=hosts("compute-restarted").engine, seeds_again=True
        )
        assert not problems, "\n".join(problems)
        # The instance disk the dead process handed on is still there, whole.
        assert host.vdi_sha512(root, swarm_image.size) == swarm_image.hash


def test_kill_9_in_the_middle_of_a_swarm_download(swarm_image, glance_server, hosts, tmp_path):
    with XapiHost(tmp_path, glance_server.url) as host:
        # The seeder's limiter lets a first burst through: the child's own downlink cap
        # keeps the download going for seconds, so the kill lands inside it.
        spec = host.spec("boot", swarm_image, "torrent", download_rate_limit=512)
        child = host.start_child(spec)
        scratch = host.state_dir / "scratch"
        try:
            child.stdin.write(b"go\n")
            child.stdin.flush()
            deadline = time.monotonic() + CHILD_TIMEOUT
            while not (scratch.is_dir() and os.listdir(scratch)):
                assert child.poll() is None, "the child ended before its swarm download"
                assert time.monotonic() < deadline, "no swarm download started"
                time.sleep(0.002)
            time.sleep(0.1)  # into the download
            slots = [
                r
                for r in host.fake.all_refs("VDI")
                if host.fake.get_record("VDI", r)["other_config"].get(TAG + "role") == "slot"
            ]
        finally:
            child.kill()
            child.communicate()
        assert child.returncode == -signal.SIGKILL and len(slots) == 1
        assert os.listdir(scratch), "the kill came after the download"
        problems = host.recover_and_boot(swarm_image, engine=hosts("compute-restarted").engine)
        assert not problems, "\n".join(problems)


def boot_then_delete_instance(image: Image):
    """Setup of an eviction: a base copy with no instance left (Nova deleted the VM)."""

    def setup(host: XapiHost) -> None:
        conf = make_conf(**host.conf_overrides())
        handler = GlanceImageHandler(conf)
        session = host.fake.session()
        try:
            root = handler.download_image(None, session, {"name": "gone"}, image.id)
            x = session.xenapi
            x.VDI.destroy(x.VDI.get_by_uuid(root["root"]["uuid"]))
            # As a swarm download leaves it: the eviction must not leave it behind.
            ResumeFiles.in_state_dir(str(host.state_dir)).save(image.id, b"resume data")
        finally:
            handler.shutdown()
            session.xenapi.session.logout()

    return setup


def test_kill_9_during_an_eviction(plain_image, glance_server, tmp_path):
    setup = boot_then_delete_instance(plain_image)
    calls = count_calls(
        tmp_path / "count", glance_server.url, plain_image, setup=setup, action="evict"
    )
    assert "VDI.destroy" in calls, calls
    problems = []
    for n in range(1, len(calls) + 1):
        problems += kill_and_recover(
            tmp_path / f"n{n}",
            glance_server.url,
            plain_image,
            calls,
            n,
            setup=setup,
            action="evict",
        )
    assert not problems, "\n".join(problems)


def store_dir_problems(directory: Path, image: Image, *, booted: bool = False) -> list[str]:
    """What a filesystem store directory holds beyond base copies, sidecars, instances/.

    Right after a restart a data file may still wait for its sidecar (a commit cut in
    half, removed once ``UNFINISHED_COMMIT_GRACE`` passed); after a boot it may not.
    """
    names = set(os.listdir(directory))
    extra = names - {f"{image.id}.base", f"{image.id}.json", "instances"}
    found = [f"{directory} holds {sorted(extra)}"] if extra else []
    base = directory / f"{image.id}.base"
    if base.exists() and sha512_prefix(base, image.size) != image.hash:
        found.append(f"{base} does not hash to the image")
    if booted and not {f"{image.id}.base", f"{image.id}.json"} <= names:
        found.append(f"{directory} has no complete base copy after the boot: {sorted(names)}")
    return found


def fs_conf(root: Path, glance_url: str, **extra: object) -> dict:
    return {
        "state_dir": str(root / "state"),
        "image_cache_dir": str(root / "cache"),
        "glance_endpoint": glance_url,
        "glance_noauth": True,
        "glance_retry_delay": 0.05,
        **extra,
    }


def fs_fetch(root: Path, image: Image, glance_url: str) -> list[str]:
    """A restarted process on the store directory: start(), then the image, verified."""
    conf = make_conf(**fs_conf(root, glance_url))
    cache = root / "cache"
    pipeline = ImagePipeline(conf, FilesystemStore(str(cache)), seeding=False)
    pipeline.start()
    found = [f"after the restart: {p}" for p in store_dir_problems(cache, image)]
    glance = GlanceClient.from_conf(conf)
    try:
        delivery = pipeline.ensure_base(glance.image_info(image.id), glance)
        if sha512_prefix(delivery.base.ref, image.size) != image.hash:
            found.append(f"the fetch after the restart delivered {delivery.base.ref}: wrong bytes")
    except Exception as exc:  # noqa: BLE001  reported with the others
        found.append(f"the fetch after the restart failed: {exc!r}")
    found += [f"after the fetch: {p}" for p in store_dir_problems(cache, image, booted=True)]
    scratch = root / "state" / "scratch"
    if scratch.is_dir() and os.listdir(scratch):
        found.append(f"scratch directories left: {sorted(os.listdir(scratch))}")
    return found


def run_plain_child(spec: dict) -> ChildRun:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = child.communicate(b"go\n", timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
    return ChildRun(child.returncode, out.decode(), err.decode())


@pytest.mark.parametrize("phase", ["download", "cache-hit"])
def test_kill_9_after_each_file_operation(phase, plain_image, glance_server, tmp_path):
    """The filesystem store: kill -9 right after every file operation in its directory."""

    def prepare(root: Path) -> dict:
        (root / "cache").mkdir(parents=True)
        if phase == "cache-hit":  # a base copy is there: the boot touches its sidecar
            assert fs_fetch(root, plain_image, glance_server.url) == []
        spec = {"action": "fetch", "image_id": plain_image.id}
        spec["conf"] = fs_conf(root, glance_server.url)
        return spec

    spec = prepare(tmp_path / "count")
    spec["file_ops"] = {"under": str(tmp_path / "count" / "cache")}
    run = run_plain_child(spec)
    assert run.returncode == 0, run.describe()
    events = run.report()["file_ops"]
    assert events, "no file operation in the store directory"
    problems = []
    for n, event in enumerate(events, start=1):
        root = tmp_path / f"n{n}"
        spec = prepare(root)
        spec["file_ops"] = {"under": str(root / "cache"), "die_after": n}
        run = run_plain_child(spec)
        where = f"kill -9 after file operation {n} ({event})"
        if not run.killed:
            problems.append(f"{where}: the child was not killed: {run.describe()}")
            continue
        problems += [f"{where}: {p}" for p in fs_fetch(root, plain_image, glance_server.url)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("store", ["filesystem", "output-file"])
def test_kill_9_during_a_glance_download_into_a_file(store, tmp_path):
    data = os.urandom(4 * MiB)
    cache = tmp_path / "cache"
    cache.mkdir()
    with FaultyGlance(hang_seconds=CHILD_TIMEOUT) as glance:
        image_rec = glance.add_image(data)
        image = Image(image_rec["id"], len(data), image_rec["os_hash_value"], "")
        glance.script["file"].append("stall")  # half the image, then nothing
        conf = {
            "state_dir": str(tmp_path / "state"),
            "glance_endpoint": glance.url,
            "glance_noauth": True,
            "glance_timeout": CHILD_TIMEOUT,
            "image_cache_dir": str(cache),
        }
        output = cache / "image.raw"
        spec = {"action": "fetch", "image_id": image.id, "conf": conf}
        if store == "output-file":
            spec["output"] = str(output)
        child = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            child.stdin.write(b"go\n")
            child.stdin.flush()
            deadline = time.monotonic() + CHILD_TIMEOUT

            def partial():
                return [
                    e
                    for e in os.listdir(cache)
                    if f".part-{child.pid}-" in e and os.path.getsize(cache / e) >= len(data) // 2
                ]

            while not partial():
                assert child.poll() is None, child.communicate()
                assert time.monotonic() < deadline, "the download never got half way"
                time.sleep(0.005)
        finally:
            child.kill()
            child.communicate()
        assert child.returncode == -signal.SIGKILL

        # The restart: a new pipeline on the same directory, then the image again.
        conf = make_conf(**conf)
        glance_client = GlanceClient.from_conf(conf)
        info = glance_client.image_info(image.id)
        if store == "filesystem":
            pipeline = ImagePipeline(conf, FilesystemStore(str(cache)), seeding=False)
            pipeline.start()
            assert store_dir_problems(cache, image) == []
            delivery = pipeline.ensure_base(info, glance_client)
            assert sha512_prefix(delivery.base.ref, image.size) == image.hash
            assert store_dir_problems(cache, image) == []
            assert set(os.listdir(cache)) == {f"{image.id}.base", f"{image.id}.json"}
        else:
            result = fetch_to_file(info, str(output), conf=conf, glance=glance_client)
            assert result.source == "glance"
            assert sha512_prefix(output, image.size) == image.hash
            assert os.listdir(cache) == ["image.raw"]


# == 2. Glance faults ===================================================================
@pytest.fixture
def faulty_glance():
    with FaultyGlance(hang_seconds=5.0) as glance:
        yield glance


def fault_conf(tmp_path: Path, glance: FaultyGlance, **extra):
    overrides = {
        "state_dir": str(tmp_path / "state"),
        "glance_endpoint": glance.url,
        "glance_noauth": True,
        "glance_retries": 2,
        "glance_retry_delay": 0.01,
        "glance_timeout": 1,
    }
    return make_conf(**{**overrides, **extra})


def image_of(record: dict) -> Image:
    return Image(record["id"], record["size"], record["os_hash_value"], "")


@pytest.mark.parametrize("fault", [500, 503, "truncate", "reset", "hang", "stall"])
def test_glance_fault_then_success(fault, faulty_glance, tmp_path):
    image = image_of(faulty_glance.add_image(os.urandom(3 * MiB + 4321)))
    faulty_glance.script["file"].append(fault)
    conf = fault_conf(tmp_path, faulty_glance)
    glance = GlanceClient.from_conf(conf)
    out = tmp_path / "out"
    out.mkdir()

    result = fetch_to_file(
        glance.image_info(image.id), str(out / "image"), conf=conf, glance=glance
    )

    assert result.source == "glance" and result.bytes_from_glance == image.size
    assert sha512_prefix(out / "image", image.size) == image.hash
    assert os.listdir(out) == ["image"]
    assert faulty_glance.count("file") == 2


@pytest.mark.parametrize(
    ("fault", "error", "words"),
    [
        (503, exception.GlanceUnavailable, ["HTTP 503", "after 3 attempt(s)"]),
        ("truncate", exception.GlanceUnavailable, ["after 3 attempt(s)"]),
        ("reset", exception.GlanceUnavailable, ["after 3 attempt(s)"]),
        ("hang", exception.GlanceUnavailable, ["timed out", "glance_timeout"]),
        ("wrong", exception.IntegrityError, ["sha512", "discarded"]),
    ],
)
def test_glance_fault_that_stays_is_typed_and_leaves_nothing(
    fault, error, words, faulty_glance, tmp_path
):
    image = image_of(faulty_glance.add_image(os.urandom(2 * MiB)))
    faulty_glance.script["file"].extend([fault] * 3)
    conf = fault_conf(tmp_path, faulty_glance, glance_retries=1 if fault == "hang" else 2)
    glance = GlanceClient.from_conf(conf)
    out = tmp_path / "out"
    out.mkdir()

    started = time.monotonic()
    with pytest.raises(error) as err:
        fetch_to_file(glance.image_info(image.id), str(out / "image"), conf=conf, glance=glance)
    took = time.monotonic() - started

    message = str(err.value)
    assert type(err.value) is error and image.id in message
    assert all(w in message for w in words), message
    assert os.listdir(out) == [], "a partial or unverified file was left"
    # Typed and bounded: retried as configured, a wrong body never.
    expected = {"wrong": 1, "hang": 2}.get(fault, 3)
    assert faulty_glance.count("file") == expected
    if fault == "hang":
        assert 2.0 <= took < 6.0, took


@pytest.mark.parametrize(
    ("fault", "error"),
    [("reset", exception.GlanceUnavailable), ("wrong", exception.IntegrityError)],
)
def test_glance_fault_through_the_xenapi_handler(fault, error, faulty_glance, tmp_path):
    image = image_of(faulty_glance.add_image(os.urandom(4 * MiB)))
    with XapiHost(tmp_path, faulty_glance.url) as host:
        conf = make_conf(**host.conf_overrides(glance_retry_delay=0.01, glance_timeout=2))
        handler = GlanceImageHandler(conf)
        session = host.fake.session()
        try:
            faulty_glance.script["file"].extend([fault] * 4)
            with pytest.raises(error) as err:
                handler.download_image(None, session, {"name": "vm"}, image.id)
            assert image.id in str(err.value)
            assert host.problems(image) == []
            assert host.fake.leaks().vdis == (), "the download slot was not destroyed"

            # Glance recovers after one more hiccup: the boot succeeds, verified.
            faulty_glance.script["file"].clear()
            faulty_glance.script["file"].extend([503, "truncate"])
            root = handler.download_image(None, session, {"name": "vm"}, image.id)
            assert host.vdi_sha512(root["root"]["uuid"], image.size) == image.hash
        finally:
            handler.shutdown()
            session.xenapi.session.logout()
        assert host.problems(image) == []


# == 3. Hostile torrent metadata ========================================================
def seed_multifile_torrent(
    host: SimulatedHost, root: Path, image_size: int, empty_name: str
) -> bytes:
    """A torrent with an image-sized file, a zero-length one and a subdirectory, seeded.

    libtorrent sorts a hybrid torrent's files by path: with ``empty_name`` "0-empty" the
    zero-length file is file 0 (renamed onto the destination), with "z-empty" it is one
    libtorrent creates beside it, in the save path, as soon as the metadata arrives.
    """
    top = root / "hostile"
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / empty_name).write_bytes(b"")
    (top / "m-image.raw").write_bytes(os.urandom(image_size))
    (top / "sub" / "deeper" / "notes.txt").write_bytes(b"not an image\n" * 100)
    entries = [
        lt.create_file_entry(path.relative_to(root).as_posix(), path.stat().st_size)
        for path in sorted(top.rglob("*"))
        if path.is_file()
    ]
    creator = lt.create_torrent(entries, 256 * 1024)
    lt.set_piece_hashes(creator, str(root))
    data = lt.bencode(creator.generate())
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(data)
    params.save_path = str(root)
    flags = lt.torrent_flags.default_flags | lt.torrent_flags.seed_mode
    params.flags = flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
    host.engine.add_torrent(params, label="hostile multi-file torrent")
    info = lt.torrent_info(data)
    assert info.num_files() >= 3
    assert (info.layout().file_path(0) == f"hostile/{empty_name}") == (empty_name == "0-empty")
    return data


def magnet_of(torrent_data: bytes, peer) -> str:
    hashes = lt.torrent_info(torrent_data).info_hashes()
    return build_magnet(
        info_hash_v1=str(hashes.v1) if hashes.has_v1() else None,
        info_hash_v2=str(hashes.v2) if hashes.has_v2() else None,
        peers=[peer],
    )


@pytest.mark.parametrize("empty_name", ["0-empty", "z-empty"])
def test_multi_file_torrent_falls_back_and_writes_nothing_beside(
    empty_name, make_image, hosts, glance, tmp_path
):
    image = make_image(4 * MiB)
    seeder = hosts("hostile-seeder")
    data = seed_multifile_torrent(seeder, tmp_path / "hostile", image.record["size"], empty_name)
    glance.set_properties(
        image.id, is_torrentable="true", torrent_magnet=magnet_of(data, seeder.endpoint)
    )
    compute = hosts("compute-1", metadata_timeout=10)
    cache = tmp_path / "cache"
    conf = compute.conf
    conf.set_override("image_cache_dir", str(cache), group="torrent_images")
    pipeline = ImagePipeline(
        conf, FilesystemStore(str(cache)), engine=compute.engine, seeding=False
    )
    pipeline.start()

    delivery = pipeline.ensure_base(glance.image_info(image.id), glance)

    img = Image(image.id, image.record["size"], image.record["os_hash_value"], image.path)
    assert delivery.fetch.source == "glance"
    assert re.search(r"it has \d+ files", delivery.fetch.fallback_reason), delivery.fetch
    assert sha512_prefix(delivery.base.ref, img.size) == img.hash
    assert set(os.listdir(cache)) == {f"{image.id}.base", f"{image.id}.json"}
    scratch = Path(conf.torrent_images.state_dir) / "scratch"
    assert not scratch.exists() or os.listdir(scratch) == []


@pytest.mark.parametrize("empty_name", ["0-empty", "z-empty"])
def test_multi_file_torrent_through_the_xenapi_handler(
    empty_name, make_image, hosts, glance, glance_server, tmp_path
):
    image = make_image(4 * MiB)
    seeder = hosts("hostile-seeder")
    data = seed_multifile_torrent(seeder, tmp_path / "hostile", image.record["size"], empty_name)
    glance.set_properties(
        image.id, is_torrentable="true", torrent_magnet=magnet_of(data, seeder.endpoint)
    )
    compute = hosts("compute-1", metadata_timeout=10)
    img = Image(image.id, image.record["size"], image.record["os_hash_value"], image.path)
    with XapiHost(tmp_path / "host", glance_server.url) as host:
        conf = make_conf(**host.conf_overrides())
        handler = TorrentImageHandler(conf, engine=compute.engine)
        session = host.fake.session()
        try:
            root = handler.download_image(None, session, {"name": "vm"}, image.id)
            fetched = handler.pipeline(session).fetches[image.id]
            assert fetched.source == "glance"
            assert re.search(r"it has \d+ files", fetched.fallback_reason), fetched
            assert host.vdi_sha512(root["root"]["uuid"], img.size) == img.hash
            assert host.problems(img) == []
            # Nothing was written into the device directory but while a VBD was plugged.
            assert os.listdir(host.fake.dev_dir()) == []
        finally:
            handler.shutdown()
            session.xenapi.session.logout()
        assert host.problems(img) == []


def test_torrent_of_the_right_size_but_wrong_bytes_falls_back(make_image, hosts, glance, tmp_path):
    image = make_image(4 * MiB)
    impostor = tmp_path / "impostor.raw"
    impostor.write_bytes(os.urandom(image.record["size"]))
    torrent = make_torrent(str(impostor), name=image.id)  # the right name and size
    seeder = hosts("impostor-seeder")
    seeder.seed(torrent.data, str(impostor))
    glance.set_properties(
        image.id, is_torrentable="true", torrent_magnet=torrent.magnet(peers=[seeder.endpoint])
    )
    compute = hosts("compute-1")
    out = tmp_path / "out"
    out.mkdir()

    result = fetch_to_file(
        glance.image_info(image.id),
        str(out / "image"),
        conf=compute.conf,
        glance=glance,
        engine=compute.engine,
    )

    assert result.source == "glance"
    assert "sha512" in result.fallback_reason and image.id in result.fallback_reason
    assert seeder.uploaded_bytes() >= image.record["size"]  # the swarm really delivered it
    assert sha512_prefix(out / "image", image.record["size"]) == image.record["os_hash_value"]
    assert os.listdir(out) == ["image"]


def seventeen_hints() -> str:
    hints = "".join(f"&x.pe=127.0.0.1:{6881 + i}" for i in range(17))
    return "magnet:?xt=urn:btih:" + "ab" * 20 + hints


def too_long() -> str:
    return "magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=" + "a" * 4100


@pytest.mark.parametrize(
    ("magnet", "words"),
    [(seventeen_hints(), "17 x.pe peers"), (too_long(), "more than 4096")],
    ids=["17-peer-hints", "over-4096-characters"],
)
def test_hostile_magnet_is_typed_and_glance_delivers(
    magnet, words, faulty_glance, tmp_path, caplog
):
    record = faulty_glance.add_image(
        os.urandom(2 * MiB), is_torrentable="true", torrent_magnet=magnet
    )
    image = image_of(record)
    conf = fault_conf(tmp_path, faulty_glance)
    glance = GlanceClient.from_conf(conf)
    info = glance.image_info(image.id)
    assert isinstance(info.torrent_error, exception.InvalidMagnet)
    assert image.id in str(info.torrent_error) and "torrent_magnet" in str(info.torrent_error)
    assert words in str(info.torrent_error)
    out = tmp_path / "out"
    out.mkdir()
    caplog.set_level(logging.WARNING)

    result = fetch_to_file(info, str(out / "image"), conf=conf, glance=glance)

    assert result.source == "glance"
    assert sha512_prefix(out / "image", image.size) == image.hash
    assert os.listdir(out) == ["image"]
    assert any(
        image.id in r.getMessage() and "fetched from Glance" in r.getMessage()
        for r in caplog.records
    )


# == 4. Lying peers =====================================================================
def test_lying_peer_beside_an_honest_one_through_the_xenapi_handler(
    make_image, hosts, glance, glance_server, tmp_path
):
    image = make_image(16 * MiB)
    bad_path = tmp_path / "corrupt.raw"
    write_corrupt_copy(image.path, str(bad_path))
    good, bad = hosts("honest-seeder"), hosts("lying-seeder")
    good.seed(image.torrent.data, image.path)
    bad.seed(image.torrent.data, str(bad_path), lying=True)
    image.set_magnet(peers=[bad.endpoint, good.endpoint])  # the liar is asked first
    compute = hosts("compute-1", stall_timeout=10)
    img = Image(image.id, image.record["size"], image.record["os_hash_value"], image.path)
    with XapiHost(tmp_path / "host", glance_server.url) as host:
        conf = make_conf(**host.conf_overrides(stall_timeout=10))
        handler = TorrentImageHandler(conf, engine=compute.engine)
        session = host.fake.session()
        try:
            root = handler.download_image(None, session, {"name": "vm"}, image.id)
            fetched = handler.pipeline(session).fetches[image.id]
            assert host.vdi_sha512(root["root"]["uuid"], img.size) == img.hash
            assert bad.uploaded_bytes() > 0  # the liar really served pieces
            if fetched.source == "torrent":
                # Every block of the liar's copy is corrupt: any it delivered failed a
                # piece (blocks that lost the end-game race are never counted).
                if fetched.swarm.per_peer.get(bad.peer_key, 0):
                    assert fetched.swarm.hash_failures > 0
            else:  # libtorrent may ban the honest seeder too (see test_fetch)
                assert fetched.fallback_reason
            assert host.problems(img) == []
        finally:
            handler.shutdown()
            session.xenapi.session.logout()
        assert host.problems(img) == []


def test_only_lying_peers_fall_back_to_glance(make_image, hosts, glance, tmp_path):
    image = make_image(8 * MiB)
    liars = []
    for i in range(2):
        bad_path = tmp_path / f"corrupt-{i}.raw"
        write_corrupt_copy(image.path, str(bad_path))
        liar = hosts(f"lying-seeder-{i}")
        liar.seed(image.torrent.data, str(bad_path), lying=True)
        liars.append(liar)
    image.set_magnet(peers=[liar.endpoint for liar in liars])
    compute = hosts("compute-1", stall_timeout=4)
    cache = tmp_path / "cache"
    pipeline = ImagePipeline(
        compute.conf, FilesystemStore(str(cache)), engine=compute.engine, seeding=False
    )
    pipeline.start()

    delivery = pipeline.ensure_base(glance.image_info(image.id), glance)

    img = Image(image.id, image.record["size"], image.record["os_hash_value"], image.path)
    assert delivery.fetch.source == "glance" and delivery.fetch.fallback_reason
    assert sum(liar.uploaded_bytes() for liar in liars) > 0
    assert sha512_prefix(delivery.base.ref, img.size) == img.hash
    assert store_dir_problems(cache, img) == []
    scratch = Path(compute.conf.torrent_images.state_dir) / "scratch"
    assert not scratch.exists() or os.listdir(scratch) == []
