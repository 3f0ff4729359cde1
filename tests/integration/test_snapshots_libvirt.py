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

"""libvirt snapshots against Nova's own code: its disks, its extract, its Glance service.

Without a Glance client of this library's own, Nova uploads and the saving host keeps the
file; with one (``[torrent_images] glance_endpoint``) the upload goes through this library:
differential against the parent's base copy, queued while Glance is down (across a
restart of the host process), and a differential image is rebuilt over its parent on
another host and handed to Nova whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
import uuid

import pytest

pytest.importorskip("nova")

from nova.compute import utils as compute_utils  # noqa: E402
from nova.image import glance as nova_glance  # noqa: E402
from nova.virt import images as nova_images  # noqa: E402
from nova.virt.libvirt import imagebackend  # noqa: E402
from nova.virt.libvirt import utils as libvirt_utils  # noqa: E402
from nova.virt.libvirt.driver import LibvirtDriver  # noqa: E402

from nova_torrent_images.virt.libvirt import download as glance_download  # noqa: E402
from tests.integration.test_glance_outage import dead_endpoint  # noqa: E402
from tests.integration.test_nova_libvirt import (  # noqa: E402, F401
    compute,
    context,
    data_gets,
    nova_cache_path,
    nova_conf,
    sha512_of,
)

MiB = 1024 * 1024
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-io") is None or shutil.which("qemu-img") is None,
    reason="qemu-img and qemu-io (Debian qemu-utils, tools/install-system-packages)",
)


def test_libvirt_snapshot_is_kept_and_restored_without_glance(
    compute,  # noqa: F811
    nova_conf,  # noqa: F811
    context,  # noqa: F811
    glance_server,
    tmp_path,
):
    host, hook = compute()
    data = os.urandom(4 * MiB + 512)
    snap_file = tmp_path / "snapshot.raw"  # what Nova's snapshot_extract leaves
    snap_file.write_bytes(data)
    client = glance_server.client()
    image_id = client.images.create(name="snap", disk_format="raw", container_format="bare")["id"]
    try:
        service = nova_glance.GlanceImageServiceV2()
        with open(snap_file, "rb") as f:  # as the libvirt driver's snapshot() does
            service.update(
                context,
                image_id,
                {"disk_format": "raw", "container_format": "bare"},
                data=f,
                purge_props=False,
            )
        base = hook.pipeline().store.lookup(image_id)
        assert base is not None and base.hash_value == hashlib.sha512(data).hexdigest()
        assert base.record["id"] == image_id
        os.unlink(snap_file)  # Nova removes its extract; the base copy is the store's own

        dst = nova_cache_path(nova_conf, image_id) + ".part"
        service.download(context, image_id, dst_path=dst)

        with open(dst, "rb") as f:
            assert f.read() == data
        assert data_gets(glance_server, image_id, expect=0) == 0
    finally:
        client.images.delete(image_id)


# -- this library's upload path --------------------------------------------------------
class LibvirtHost:
    """A libvirt compute host: its own engine, store and state; Nova's CONF is shared."""

    def __init__(self, hosts, tmp_path, glance_server, name: str, **conf) -> None:
        state = tmp_path / f"{name}-state"
        conf.setdefault("glance_endpoint", glance_server.url)
        self.host = hosts(
            name,
            state_dir=str(state),
            image_cache_dir=str(state / "images"),
            glance_noauth=True,
            differential_snapshots=True,
            **conf,
        )
        self.name = name

    def install(self) -> glance_download.TorrentDownloads:
        """This host's hook in Nova (one process plays one host at a time)."""
        return glance_download.install(self.host.conf, engine=self.host.engine)


@pytest.fixture
def libvirt_host(hosts, tmp_path, glance_server, nova_conf):  # noqa: F811
    yield lambda name, **conf: LibvirtHost(hosts, tmp_path, glance_server, name, **conf)
    glance_download.uninstall()


def boot(context, nova_conf, image_id: str, size: int) -> tuple[str, str]:  # noqa: F811
    """An instance disk as Nova's Qcow2 backend makes it: a qcow2 overlay of _base."""
    instance_uuid = str(uuid.uuid4())
    base = nova_cache_path(nova_conf, image_id)
    if not os.path.exists(base):
        libvirt_utils.fetch_image(context, base, image_id)  # fetch_to_raw, through the hook
    disk = os.path.join(nova_conf.instances_path, instance_uuid, "disk")
    os.makedirs(os.path.dirname(disk))
    libvirt_utils.create_image(disk, "qcow2", size, backing_file=base)
    return instance_uuid, disk


def guest_writes(disk: str, size: int, fraction: float) -> None:
    """The guest changes ``fraction`` of its disk, in 1 MiB runs spread over it."""
    runs = max(1, int(size * fraction) // MiB)
    step = size // runs
    commands = []
    for n in range(runs):
        commands += ["-c", f"write -P {0x41 + n % 50} {n * step} {MiB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, disk], check=True, capture_output=True)


def whole_sha512(disk: str, tmp_path) -> str:
    raw = tmp_path / f"whole-{uuid.uuid4().hex}.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", disk, str(raw)], check=True)
    try:
        return sha512_of(str(raw))
    finally:
        raw.unlink()


def nova_snapshot(context, glance_server, instance_uuid: str, parent_id: str, disk, tmp_path):  # noqa: F811
    """The libvirt driver's cold snapshot: Nova's record, its extract, its update call."""
    api = nova_glance.API()
    parent_meta = api.get(context, parent_id)
    from nova import utils as nova_utils

    instance = types.SimpleNamespace(
        uuid=instance_uuid,
        project_id=context.project_id,
        # What the compute API stored at boot: the booted image's properties (torrent
        # ones included), and the image the instance was booted from.
        system_metadata={
            **nova_utils.get_system_metadata_from_image(parent_meta),
            "image_base_image_ref": parent_id,
        },
        kernel_id="",
        ramdisk_id="",
        os_type=None,
    )
    snap_id = compute_utils.create_image(context, instance, "snap", "snapshot", api)["id"]
    out = tmp_path / f"{uuid.uuid4().hex}.extract"
    imagebackend.Qcow2(path=disk).snapshot_extract(str(out), "qcow2")
    image_meta = types.SimpleNamespace(obj_attr_is_set=lambda name: False)
    metadata = LibvirtDriver._create_snapshot_metadata(None, image_meta, instance, "qcow2", "snap")
    with open(out, "rb") as image_file:
        api.update(context, snap_id, metadata, image_file)
    out.unlink()  # Nova removes its extract after the upload
    return snap_id


@needs_qemu
def test_libvirt_differential_snapshot_and_restore_on_another_host(
    make_image,
    hosts,
    libvirt_host,
    nova_conf,  # noqa: F811
    context,  # noqa: F811
    glance_server,
    tmp_path,
):
    """The acceptance run: 256 MiB, 5% changed; under 10% to Glance and from Glance."""
    size = 256 * MiB
    parent = make_image(size)
    seeder = hosts("seeder")
    seeder.seed(parent.torrent.data, parent.path)
    parent.set_magnet(peers=[seeder.endpoint])
    saver = libvirt_host("saver")
    hook = saver.install()
    instance_uuid, disk = boot(context, nova_conf, parent.id, size)
    guest_writes(disk, size, 0.05)
    whole = whole_sha512(disk, tmp_path)
    client = glance_server.client()

    snap_id = nova_snapshot(context, glance_server, instance_uuid, parent.id, disk, tmp_path)
    try:
        record = dict(client.images.get(snap_id))
        assert record["status"] == "active" and record["disk_format"] == "qcow2"
        assert record["nti_parent_image"] == parent.id and record["nti_whole_hash"] == whole
        assert record["size"] < 0.10 * size, record["size"]
        print(f"\nto Glance: {record['size'] / MiB:.1f} MiB, {record['size'] / size:.1%}")
        # Inherited from the booted image by Nova, and wrong for the snapshot: gone.
        assert "is_torrentable" not in record and "torrent_magnet" not in record
        assert record["image_type"] == "snapshot" and record["image_state"] == "available"
        kept = hook.pipeline().store.lookup(snap_id)
        assert kept.hash_value == whole and kept.source == "snapshot"
        assert sha512_of(kept.ref) == whole
        assert not any(".part-" in n for n in os.listdir(hook.pipeline().store.directory))

        # Another host with the parent (from the swarm) restores it through Nova's own
        # fetch_to_raw: Nova's format check passes, the disk is the whole image.
        other = libvirt_host("other")
        other_hook = other.install()
        other_base = os.path.join(str(tmp_path), "other-_base")
        os.makedirs(other_base)
        libvirt_utils.fetch_image(context, os.path.join(other_base, "parent"), parent.id)
        parent_gets = data_gets(glance_server, parent.id)
        snap_gets = data_gets(glance_server, snap_id)
        restored = os.path.join(other_base, "snap")
        nova_images.fetch_to_raw(context, snap_id, restored)
        assert sha512_of(restored) == whole
        fetched = other_hook.pipeline().fetches[snap_id]
        assert fetched.source == "delta" and fetched.bytes_from_glance < 0.10 * size
        print(f"from Glance: {fetched.bytes_from_glance / MiB:.1f} MiB")
        assert data_gets(glance_server, snap_id, expect=snap_gets + 1) == snap_gets + 1
        assert data_gets(glance_server, parent.id) == parent_gets  # the parent: local
        assert other_hook.pipeline().store.lookup(snap_id).hash_value == whole

        # The saving host restores it reading nothing from Glance.
        saver.install()
        again = nova_cache_path(nova_conf, snap_id)
        nova_images.fetch_to_raw(context, snap_id, again)
        assert sha512_of(again) == whole
        assert data_gets(glance_server, snap_id, expect=0) == snap_gets + 1
    finally:
        client.images.delete(snap_id)


_SAVE_IN_A_CHILD = """
import json, sys
import nova.conf
from nova import context as nova_context, service_auth
from nova.image import glance as nova_glance
from nova_torrent_images.virt.libvirt import download as glance_download
from nova_torrent_images.testing.swarm import make_conf

args = json.loads(sys.argv[1])
nova.conf.CONF([], project="nova", default_config_files=[])
nova.conf.CONF.set_override("endpoint_override", args["glance"], "glance")
nova.conf.CONF.set_override("num_retries", 0, "glance")
nova.conf.CONF.set_override("instances_path", args["instances"])
service_auth.reset_globals()
conf = make_conf(**args["conf"])
glance_download.install(conf)
context = nova_context.RequestContext(
    user_id="u", project_id="nti-test", auth_token="noauth", is_admin=True
)
with open(args["file"], "rb") as f:  # as the libvirt driver's snapshot() does
    result = nova_glance.API().update(context, args["image_id"], args["metadata"], f)
glance_download.uninstall()
print(json.dumps({"status": result["status"]}))
"""


@needs_qemu
def test_libvirt_save_while_glance_is_down_is_uploaded_after_a_restart(
    libvirt_host,
    nova_conf,  # noqa: F811
    context,  # noqa: F811
    glance_server,
    tmp_path,
):
    """The save runs in a host process that ends with Glance down; the next one uploads."""
    host = libvirt_host("compute", glance_retries=0)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(6 * MiB) + bytes(2 * MiB))
    extract = tmp_path / "extract.qcow2"  # what snapshot_extract leaves: a whole qcow2
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(extract)], check=True
    )
    client = glance_server.client()
    # Nova's record, inheriting a torrent property from the booted image.
    snap_id = client.images.create(name="snap", image_type="snapshot", is_torrentable="true")["id"]
    metadata = {
        "name": "snap",
        "disk_format": "qcow2",
        "container_format": "bare",
        "properties": {"image_location": "snapshot", "owner_id": "nti-test"},
    }
    opts = host.host.conf.torrent_images
    child_conf = {
        "state_dir": opts.state_dir,
        "image_cache_dir": opts.image_cache_dir,
        "glance_endpoint": dead_endpoint(),
        "glance_noauth": True,
        "glance_retries": 0,
        "differential_snapshots": True,
        "listen_interfaces": "127.0.0.1:0",
    }
    try:
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                _SAVE_IN_A_CHILD,
                json.dumps(
                    {
                        "glance": dead_endpoint(),
                        "instances": nova_conf.instances_path,
                        "conf": child_conf,
                        "file": str(extract),
                        "image_id": snap_id,
                        "metadata": metadata,
                    }
                ),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert child.returncode == 0, child.stderr[-3000:]
        assert json.loads(child.stdout.splitlines()[-1]) == {"status": "queued"}
        assert dict(client.images.get(snap_id))["status"] == "queued"
        store_dir = opts.image_cache_dir
        assert sorted(os.listdir(os.path.join(store_dir, "uploads"))) == [
            f"{snap_id}.disk",
            f"{snap_id}.json",
        ]
        extract_hash = sha512_of(str(extract))
        extract.unlink()  # Nova removed its extract when update() returned

        # The host's next process, Glance back: the queue entry and the tagged copy are
        # all it has to go on.
        hook = host.install()
        pipeline = hook.pipeline()
        assert [e.image_id for e in pipeline.uploads.list()] == [snap_id]
        assert pipeline.retry_uploads(force=True) == [snap_id]
        record = dict(client.images.get(snap_id))
        assert record["status"] == "active" and record["disk_format"] == "qcow2"
        assert record["os_hash_value"] == extract_hash
        assert record["image_location"] == "snapshot" and "is_torrentable" not in record
        assert pipeline.uploads.list() == [] and pipeline.store.kept_for_upload() == {}
        assert os.listdir(os.path.join(store_dir, "uploads")) == []

        # Kept by the saving host: Nova's boot of it reads nothing from Glance.
        path = nova_cache_path(nova_conf, snap_id)
        nova_images.fetch_to_raw(context, snap_id, path)
        assert sha512_of(path) == sha512_of(str(raw))
        assert data_gets(glance_server, snap_id, expect=0) == 0
    finally:
        client.images.delete(snap_id)


@needs_qemu
@pytest.mark.parametrize("glance_client", [False, True])
def test_a_differential_image_never_reaches_nova_as_the_bare_delta(
    glance_client,
    make_image,
    libvirt_host,
    nova_conf,  # noqa: F811
    context,  # noqa: F811
    glance_server,
    tmp_path,
):
    """Without a Glance client of ours, or with the parent gone: Nova's typed error."""
    from nova import exception as nova_exception

    from nova_torrent_images.compute.snapshots import differential

    parent = make_image(4 * MiB)
    body = bytearray(open(parent.path, "rb").read())
    body[MiB : MiB + 4096] = b"x" * 4096
    changed = tmp_path / "changed.raw"
    changed.write_bytes(body)
    delta = tmp_path / "delta.qcow2"
    differential.make_delta(parent.path, parent.id, str(changed), str(delta))
    record = glance_server.create_image(str(delta), name="delta", disk_format="qcow2")
    client = glance_server.client()
    client.images.update(
        record["id"],
        # With a client: a parent Glance does not have (deleted), so nothing to rebuild on.
        nti_parent_image=str(uuid.uuid4()) if glance_client else parent.id,
        nti_whole_size=str(len(body)),
        nti_whole_hash=hashlib.sha512(body).hexdigest(),
    )
    try:
        libvirt_host("restorer", **({} if glance_client else {"glance_endpoint": None})).install()
        path = nova_cache_path(nova_conf, record["id"])

        with pytest.raises(nova_exception.CouldNotFetchImage, match="differential snapshot"):
            nova_images.fetch_to_raw(context, record["id"], path)

        assert not os.path.exists(path) and not os.path.exists(path + ".part")
        assert data_gets(glance_server, record["id"], expect=0) == 0  # Nova read no delta
    finally:
        client.images.delete(record["id"])


def test_libvirt_saved_snapshot_is_seeded_once_published(
    libvirt_host,
    hosts,
    glance,
    nova_conf,  # noqa: F811
    context,  # noqa: F811
    glance_server,
    tmp_path,
):
    """A raw libvirt snapshot kept by the saving host is seeded by it once published."""
    from nova_torrent_images.compute.pipeline import fetch_to_file
    from nova_torrent_images.swarm.torrent import make_torrent

    saver = libvirt_host("saver")
    hook = saver.install()
    data = os.urandom(6 * MiB + 4096)
    extract = tmp_path / "extract.raw"  # Nova's snapshot_extract with snapshot_image_format=raw
    extract.write_bytes(data)
    client = glance_server.client()
    snap_id = client.images.create(name="snap", image_type="snapshot")["id"]
    try:
        with open(extract, "rb") as f:
            nova_glance.API().update(
                context,
                snap_id,
                {"disk_format": "raw", "container_format": "bare", "properties": {}},
                f,
            )
        extract.unlink()
        pipeline = hook.pipeline()
        kept = pipeline.store.lookup(snap_id)
        assert kept.source == "snapshot" and sha512_of(kept.ref) == hashlib.sha512(data).hexdigest()
        assert pipeline.seed_published_snapshots() == []  # not published yet
        assert snap_id not in pipeline.seeds.seeding()

        # The origin publishes it: a torrent of Glance's bytes, named by the image id.
        published = tmp_path / "published.raw"
        published.write_bytes(b"".join(glance.iter_data(snap_id)))
        torrent = make_torrent(str(published), name=snap_id)
        magnet = torrent.magnet(peers=[saver.host.endpoint], max_length=None)
        client.images.update(snap_id, is_torrentable="true", torrent_magnet=magnet)

        assert pipeline.seed_published_snapshots() == [snap_id]
        assert snap_id in pipeline.seeds.seeding()
        assert pipeline.seed_published_snapshots() == []  # once

        # Another host gets it from the saving host alone, verified against Glance.
        peer = hosts("peer", stall_timeout=20)
        gets = data_gets(glance_server, snap_id)
        result = fetch_to_file(
            glance.image_info(snap_id),
            str(tmp_path / "peer.raw"),
            conf=peer.conf,
            glance=None,
            engine=peer.engine,
        )
        assert result.source == "torrent"
        assert (tmp_path / "peer.raw").read_bytes() == data
        assert data_gets(glance_server, snap_id) == gets
    finally:
        client.images.delete(snap_id)
