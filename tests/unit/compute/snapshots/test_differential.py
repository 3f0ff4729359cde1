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

"""Differential snapshots: qcow2 deltas against the parent image, chains, typed failures.

Restores run on both the XenAPI store (fake XAPI) and the filesystem store, with a stub
Glance; qemu-img is real (tools/install-system-packages installs it).
"""

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from nova_torrent_images import exception
from nova_torrent_images.cmd import main as cli
from nova_torrent_images.compute.pipeline import ImagePipeline
from nova_torrent_images.compute.snapshots import differential
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.testing.swarm import make_conf
from tests.unit.compute.snapshots.test_uploads import SnapshotGlance, project
from tests.unit.virt.xenapi.test_handler import DATA, Host

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


class ChainGlance(SnapshotGlance):
    def set_properties(self, image_id, **properties):
        self.records[image_id].update(properties)

    def add(self, image_id, body, **props):
        self.records[image_id] = {
            "id": image_id,
            "status": "active",
            "disk_format": props.pop("disk_format", "raw"),
            "container_format": "bare",
            "visibility": "public",
            "size": len(body),
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(body).hexdigest(),
            **props,
        }
        self.data[image_id] = body

    def add_delta(self, tmp_path, image_id, parent_id, parent_body, body):
        """A differential image of ``body`` against ``parent_body``, made as uploads make it."""
        parent_path, disk_path = tmp_path / f"{image_id}.p", tmp_path / f"{image_id}.d"
        parent_path.write_bytes(parent_body)
        disk_path.write_bytes(body)
        delta_path = tmp_path / f"{image_id}.qcow2"
        differential.make_delta(str(parent_path), parent_id, str(disk_path), str(delta_path))
        delta = delta_path.read_bytes()
        self.add(
            image_id,
            delta,
            disk_format="qcow2",
            nti_parent_image=parent_id,
            nti_whole_size=str(len(body)),
            nti_whole_hash=hashlib.sha512(body).hexdigest(),
        )
        return delta


def changed(body: bytes, at: int, what: bytes) -> bytes:
    return body[:at] + what + body[at + len(what) :]


D1 = changed(DATA, 70000, b"first snapshot" * 50)
D2 = changed(D1, 300000, b"second snapshot" * 50)


@pytest.fixture
def glance(tmp_path):
    g = ChainGlance()
    g.add_delta(tmp_path, "s-1", "img-1", DATA, D1)
    g.add_delta(tmp_path, "s-2", "s-1", D1, D2)
    return g


@pytest.fixture
def xen(tmp_path, glance):
    h = Host(tmp_path / "xen")
    h.glance = glance
    try:
        yield h
    finally:
        h.close()


class FsHost:
    def __init__(self, tmp_path, glance):
        self.dir = tmp_path / "images"
        self.conf = make_conf(state_dir=str(tmp_path / "fs-state"))
        self.store = FilesystemStore(str(self.dir))
        self.pipeline = ImagePipeline(self.conf, self.store, seeding=False)
        self.glance = glance

    def restore(self, image_id):
        return self.pipeline.ensure_base(self.glance.image_info(image_id), self.glance).base

    def files(self):
        return sorted(os.listdir(self.dir)) if self.dir.exists() else []


@pytest.fixture
def fs(tmp_path, glance):
    return FsHost(tmp_path, glance)


def scratch_empty(state_dir):
    deltas = os.path.join(state_dir, "deltas")
    return not os.path.exists(deltas) or os.listdir(deltas) == []


def test_the_delta_is_a_qcow2_overlay_real_tools_read(tmp_path, glance):
    delta = tmp_path / "s-1.qcow2"
    delta.write_bytes(glance.data["s-1"])
    assert len(glance.data["s-1"]) < len(DATA) / 2
    info = subprocess.run(
        ["qemu-img", "info", str(delta)], capture_output=True, text=True, check=True
    ).stdout
    assert "file format: qcow2" in info and "backing file" not in info  # Glance takes it
    parent = tmp_path / "img-1"
    parent.write_bytes(DATA)
    out = tmp_path / "whole.raw"
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-b", "img-1", "-F", "raw", str(delta)],
        cwd=tmp_path,
        check=True,
    )
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(delta), str(out)],
        cwd=tmp_path,
        check=True,
    )
    assert out.read_bytes()[: len(D1)] == D1  # qcow2 sizes are whole sectors


def test_xenapi_differential_upload_and_restore_on_another_host(tmp_path, glance):
    saver = Host(tmp_path / "saver")
    saver.glance = glance
    other = Host(tmp_path / "other")
    other.glance = glance
    try:
        handler = saver.handler(differential_snapshots=True)
        root = handler.download_image(project(), saver.session, {"name": "vm"}, "img-1")
        root = root["root"]["uuid"]
        with open(saver.fake.vdi_path(saver.vdi(root)), "r+b") as f:
            f.seek(200000)
            f.write(b"changed by the instance" * 40)
        whole = saver.read(root)
        glance.create("snap-d")

        handler.upload_image(project(), saver.session, {"name": "vm"}, "snap-d", [root])

        rec = glance.records["snap-d"]
        delta, _ = glance.uploads["snap-d"]
        assert rec["disk_format"] == "qcow2" and rec["nti_parent_image"] == "img-1"
        assert int(rec["nti_whole_size"]) == len(whole)
        assert rec["nti_whole_hash"] == hashlib.sha512(whole).hexdigest()
        assert len(delta) < len(whole) / 4, "the delta is not small"
        # The saving host keeps the whole image: a restore there reads nothing.
        reads = glance.data_requests
        again = handler.download_image(project(), saver.session, {"name": "vm-2"}, "snap-d")
        assert glance.data_requests == reads
        assert saver.read(again["root"]["uuid"], len(whole)) == whole

        # Another host: the parent from Glance (as any image), then only the delta.
        restored = other.handler().download_image(project(), other.session, {"name": "r"}, "snap-d")
        assert other.read(restored["root"]["uuid"], len(whole)) == whole
        assert sorted(other.roles()) == ["base", "base", "instance"]
        assert scratch_empty(other.conf.torrent_images.state_dir)
    finally:
        saver.close()
        other.close()


def test_xenapi_chain_of_three_restores_verified(xen, glance, caplog):
    caplog.set_level("INFO")
    handler = xen.handler()
    result = handler.download_image(project(), xen.session, {"name": "vm"}, "s-2")
    assert xen.read(result["root"]["uuid"], len(D2)) == D2
    # Copy on write: each rebuild starts from a clone of its parent's base copy.
    cloned = [r for r in caplog.records if "cloned from the base copy" in r.getMessage()]
    assert len(cloned) == 2
    bases = {b.image_id: b for b in handler.pipeline(xen.session).store.list()}
    assert set(bases) == {"img-1", "s-1", "s-2"}
    assert bases["s-2"].hash_value == hashlib.sha512(D2).hexdigest()
    assert bases["s-1"].size == len(D1)
    assert "slot" not in xen.roles()
    reads = glance.data_requests
    handler.download_image(project(), xen.session, {"name": "vm-2"}, "s-2")
    assert glance.data_requests == reads


def test_filesystem_chain_of_three_restores_verified(fs):
    base = fs.restore("s-2")
    with open(base.ref, "rb") as f:
        assert f.read() == D2
    assert [b.image_id for b in sorted(fs.store.list(), key=lambda b: b.image_id)] == [
        "img-1",
        "s-1",
        "s-2",
    ]
    assert not any(".part-" in name for name in fs.files())


def corrupt_delta(glance, image_id, *, keep_glance_hash=False):
    body = bytearray(glance.data[image_id])
    body[-100] ^= 0xFF  # a data cluster: the last one written
    body = bytes(body)
    glance.data[image_id] = body
    if not keep_glance_hash:  # Glance holds the corrupt bytes: only the whole hash can tell
        glance.records[image_id]["os_hash_value"] = hashlib.sha512(body).hexdigest()


@pytest.mark.parametrize("keep_glance_hash", [False, True])
def test_xenapi_corrupt_delta_fails_typed_and_leaves_nothing(xen, glance, keep_glance_hash):
    corrupt_delta(glance, "s-2", keep_glance_hash=keep_glance_hash)
    handler = xen.handler()
    with pytest.raises(exception.DeltaChainError) as err:
        handler.download_image(project(), xen.session, {"name": "vm"}, "s-2")
    assert "img-1 <- s-1 <- s-2" in str(err.value)
    assert "corrupt" in str(err.value)
    assert xen.roles() == ["base", "base"]  # the verified parents; no slot, no s-2
    assert not xen.fake.leaks(xen.baseline).vbds
    assert scratch_empty(xen.conf.torrent_images.state_dir)


def test_filesystem_corrupt_delta_fails_typed_and_leaves_nothing(fs, glance):
    corrupt_delta(glance, "s-1")
    with pytest.raises(exception.DeltaChainError, match="img-1 <- s-1 <- s-2"):
        fs.restore("s-2")
    assert fs.files() == ["img-1.base", "img-1.json"]
    assert scratch_empty(fs.conf.torrent_images.state_dir)


def test_a_delta_that_is_no_qcow2_fails_typed(fs, glance):
    glance.add(
        "s-bad",
        b"not a qcow2 image" * 100,
        disk_format="qcow2",
        nti_parent_image="img-1",
        nti_whole_size=str(len(DATA)),
        nti_whole_hash=hashlib.sha512(DATA).hexdigest(),
    )
    with pytest.raises(exception.DeltaChainError, match="img-1 <- s-bad"):
        fs.restore("s-bad")
    assert fs.files() == ["img-1.base", "img-1.json"]


def test_missing_parent_fails_typed_on_both_stores(xen, fs, glance):
    del glance.records["img-1"]
    with pytest.raises(exception.DeltaChainError) as err:
        xen.handler().download_image(project(), xen.session, {"name": "vm"}, "s-2")
    assert "img-1 <- s-1 <- s-2" in str(err.value) and "not in Glance" in str(err.value)
    assert xen.roles() == []
    with pytest.raises(exception.DeltaChainError, match="img-1 <- s-1 <- s-2"):
        fs.restore("s-2")
    assert fs.files() == []


def test_export_writes_the_whole_image_of_a_chain(tmp_path, glance, monkeypatch):
    from nova_torrent_images.glance import client as glance_module

    monkeypatch.setattr(
        glance_module.GlanceClient, "from_conf", classmethod(lambda c, conf: glance)
    )
    conf_file = tmp_path / "nti.conf"
    conf_file.write_text(f"[torrent_images]\nstate_dir = {tmp_path / 'cli-state'}\nmode = none\n")
    out = tmp_path / "s-2.raw"
    assert cli.main(["--config-file", str(conf_file), "export", "s-2", "--output", str(out)]) == 0
    assert out.read_bytes() == D2
    assert cli.main(["--config-file", str(conf_file), "export", "s-2", "--output", str(out)]) == 1


def test_a_differential_save_while_glance_is_down_is_queued_as_a_delta(tmp_path, glance):
    saver = Host(tmp_path / "saver")
    saver.glance = glance
    try:
        handler = saver.handler(differential_snapshots=True)
        root = handler.download_image(project(), saver.session, {"name": "vm"}, "img-1")
        root = root["root"]["uuid"]
        with open(saver.fake.vdi_path(saver.vdi(root)), "r+b") as f:
            f.seek(500000)
            f.write(b"changed while Glance was down" * 30)
        whole = saver.read(root)
        glance.create("snap-q")
        glance.down = True
        handler.upload_image(project(), saver.session, {"name": "vm"}, "snap-q", [root])
        [entry] = handler.pipeline(saver.session).uploads.list()
        assert entry.parent_ref  # the parent base copy, for the delta later
        handler.shutdown()

        glance.down = False
        restarted = saver.handler(differential_snapshots=True)
        assert restarted.pipeline(saver.session).retry_uploads(force=True) == ["snap-q"]
        rec = glance.records["snap-q"]
        assert rec["disk_format"] == "qcow2" and rec["nti_parent_image"] == "img-1"
        assert rec["nti_whole_hash"] == hashlib.sha512(whole).hexdigest()
        assert len(glance.uploads["snap-q"][0]) < len(whole) / 4
        reads = glance.data_requests
        again = restarted.download_image(project(), saver.session, {"name": "r"}, "snap-q")
        assert glance.data_requests == reads
        assert saver.read(again["root"]["uuid"], len(whole)) == whole
        assert "queued-upload" not in saver.roles()
    finally:
        saver.close()


def test_a_disk_that_changed_most_of_its_parent_is_uploaded_whole(xen, glance):
    handler = xen.handler(differential_snapshots=True)
    root = handler.download_image(project(), xen.session, {"name": "vm"}, "img-1")
    root = root["root"]["uuid"]
    with open(xen.fake.vdi_path(xen.vdi(root)), "r+b") as f:
        f.write(os.urandom(len(DATA)))  # every cluster differs
    whole = xen.read(root)
    glance.create("snap-w")

    handler.upload_image(project(), xen.session, {"name": "vm"}, "snap-w", [root])

    rec = glance.records["snap-w"]
    assert rec["disk_format"] == "raw" and "nti_parent_image" not in rec
    assert glance.uploads["snap-w"][0] == whole
    assert "snap-w" in {b.image_id for b in handler.pipeline(xen.session).store.list()}


# -- untrusted deltas: checked before qemu-img opens them -----------------------------

QEMU_LOG = "qemu-img.log"


@pytest.fixture
def recorded_qemu_img(tmp_path, monkeypatch):
    """A qemu-img first on PATH that logs its limits and arguments, then runs the real one."""
    real = shutil.which("qemu-img")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    log = tmp_path / QEMU_LOG
    script = wrappers / "qemu-img"
    script.write_text(
        f'#!/bin/sh\necho "cpu=$(ulimit -t) as=$(ulimit -v) $*" >> {log}\nexec {real} "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")
    log.write_text("")
    return log


def qemu(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def craft(tmp_path, kind):
    """A qcow2 delta of D1 over DATA made hostile in one way; the host file it points at."""
    secret = tmp_path / "host-secret"
    path = tmp_path / f"{kind}.qcow2"
    size = str(len(D1))
    if kind == "data_file":
        # Its clusters are the bytes of a file of the host (the external data file).
        qemu("create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on",
             str(path), size)  # fmt: skip
        secret.write_bytes(b"a file of the host " * (len(D1) // 19 + 1))
    elif kind == "json_backing":
        spec = json.dumps({"driver": "raw", "file": {"driver": "file", "filename": str(secret)}})
        secret.write_bytes(b"a file of the host " * (len(D1) // 19 + 1))
        qemu("create", "-q", "-f", "qcow2", "-u", "-b", f"json:{spec}", "-F", "raw",
             str(path), size)  # fmt: skip
    elif kind == "virtual_size":
        parent, disk = tmp_path / "vs.parent", tmp_path / "vs.disk"
        parent.write_bytes(DATA)
        disk.write_bytes(D1)
        differential.make_delta(str(parent), "img-1", str(disk), str(path))
        qemu("resize", "-q", "-f", "qcow2", str(path), "1T")  # a TiB for a 1 MiB record
    elif kind == "unknown_features":
        parent, disk = tmp_path / "uf.parent", tmp_path / "uf.disk"
        parent.write_bytes(DATA)
        disk.write_bytes(D1)
        differential.make_delta(str(parent), "img-1", str(disk), str(path))
        header = bytearray(path.read_bytes())
        header[0x48 + 7] |= 0x80  # an incompatible feature bit nobody defined
        path.write_bytes(bytes(header))
    return path.read_bytes()


def add_crafted(glance, tmp_path, kind, image_id="s-evil"):
    glance.add(
        image_id,
        craft(tmp_path, kind),
        disk_format="qcow2",
        nti_parent_image="img-1",
        nti_whole_size=str(len(D1)),
        nti_whole_hash=hashlib.sha512(D1).hexdigest(),
    )


HOSTILE = {
    "data_file": "data_file",
    "json_backing": "backing_file",
    "virtual_size": "virtual_size",
    "unknown_features": "unknown_features",
}


def refused_check(err) -> str:
    cause = err.value.__cause__
    assert isinstance(cause, exception.UnsafeImage), repr(cause)
    assert "s-evil" in str(err.value) and "img-1 <- s-evil" in str(err.value)
    return cause.kwargs["check"]


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_xenapi_a_hostile_delta_is_refused_before_qemu_img_runs(
    xen, glance, tmp_path, kind, recorded_qemu_img
):
    add_crafted(glance, tmp_path, kind)
    recorded_qemu_img.write_text("")  # crafting ran the real qemu-img
    with pytest.raises(exception.DeltaChainError) as err:
        xen.handler().download_image(project(), xen.session, {"name": "vm"}, "s-evil")
    assert recorded_qemu_img.read_text() == "", "qemu-img ran on the hostile delta"
    assert refused_check(err) == HOSTILE[kind]
    assert xen.roles() == ["base"]  # the verified parent; the clone slot is gone
    assert not xen.fake.leaks(xen.baseline).vbds
    assert scratch_empty(xen.conf.torrent_images.state_dir)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_filesystem_a_hostile_delta_is_refused_before_qemu_img_runs(
    fs, glance, tmp_path, kind, recorded_qemu_img
):
    add_crafted(glance, tmp_path, kind)
    recorded_qemu_img.write_text("")
    with pytest.raises(exception.DeltaChainError) as err:
        fs.restore("s-evil")
    assert recorded_qemu_img.read_text() == "", "qemu-img ran on the hostile delta"
    assert refused_check(err) == HOSTILE[kind]
    assert fs.files() == ["img-1.base", "img-1.json"]
    assert scratch_empty(fs.conf.torrent_images.state_dir)


def test_a_delta_whose_record_is_not_qcow2_is_refused_unread(fs, glance, recorded_qemu_img):
    glance.records["s-1"]["disk_format"] = "raw"
    requests = glance.data_requests
    with pytest.raises(exception.DeltaChainError) as err:
        fs.restore("s-1")
    assert err.value.__cause__.kwargs["check"] == "disk_format"
    assert glance.data_requests == requests + 1  # the parent only
    assert recorded_qemu_img.read_text() == ""


def test_every_qemu_img_of_a_restore_names_its_format_under_limits(fs, recorded_qemu_img):
    base = fs.restore("s-2")
    with open(base.ref, "rb") as f:
        assert f.read() == D2
    runs = recorded_qemu_img.read_text().splitlines()
    # The filesystem store commits each delta into a clone of its parent.
    assert {line.split()[2] for line in runs} == {"info", "rebase", "commit"}
    for line in runs:
        cpu, address_space, command, *args = line.split()
        assert "-f" in args
        assert cpu != "cpu=unlimited", line
        # Header work also under 1 GiB of address space; the copy is not (it aborts there).
        if command == "commit":
            assert address_space == "as=unlimited", line
        else:
            assert address_space == f"as={1024 * 1024}", line


def test_a_delta_qemu_img_cannot_copy_under_1_gib_is_committed(tmp_path):
    # qemu-img commit of a 64 MiB delta aborts under a 1 GiB address space limit
    # ("qemu_thread_create: Resource temporarily unavailable"): the copy runs without one.
    parent, delta = tmp_path / "parent.raw", tmp_path / "delta.qcow2"
    whole = bytearray(128 << 20)
    whole[16 << 20 : 80 << 20] = b"\x07" * (64 << 20)
    parent.write_bytes(bytes(128 << 20))
    changed = tmp_path / "changed.raw"
    changed.write_bytes(whole)
    differential.make_delta(str(parent), "img-1", str(changed), str(delta))
    clone = tmp_path / "clone.raw"
    shutil.copyfile(parent, clone)
    assert differential.commit_into(str(delta), str(clone), image_id="s-1") == 128 << 20
    assert hashlib.sha512(clone.read_bytes()).digest() == hashlib.sha512(whole).digest()


def test_qemu_img_without_a_format_is_never_run(recorded_qemu_img, tmp_path):
    with pytest.raises(ValueError, match="-f"):
        differential.qemu_img("info", str(tmp_path / "x"), what="read")
    assert recorded_qemu_img.read_text() == ""
