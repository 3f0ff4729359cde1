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

"""The fake XAPI, exercised through the real ``XenAPI.Session`` client over XML-RPC."""

import concurrent.futures
import os
import shutil
import stat
import subprocess
import xmlrpc.client

import pytest
import XenAPI

from nova_torrent_images.testing.fake_xenapi import (
    COMPUTE_VM_KEY,
    NULL_REF,
    FakeXenAPI,
    GiB,
    MiB,
    loop_devices_available,
)

LOOP_DEVICES = loop_devices_available()
DEVICE_MODES = [
    pytest.param(False, id="file"),
    pytest.param(
        True,
        id="loop",
        marks=pytest.mark.skipif(
            not LOOP_DEVICES, reason="loop devices need root and a working `losetup --find`"
        ),
    ),
]


def loop_devices_on(path):
    """Lines of `losetup -a` whose backing file lies under `path`."""
    if shutil.which("losetup") is None:
        return []
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def make_fake(tmp_path, use_loop_devices=False, **kwargs):
    kwargs.setdefault("sr_size", 10 * GiB)
    return FakeXenAPI.create(tmp_path / "xapi", use_loop_devices=use_loop_devices, **kwargs)


@pytest.fixture
def fake(tmp_path):
    fake = make_fake(tmp_path)
    yield fake
    fake.close()


@pytest.fixture(params=DEVICE_MODES)
def device_fake(request, tmp_path):
    """A fake in file mode, and in loop-device mode where that works."""
    fake = make_fake(tmp_path, use_loop_devices=request.param)
    assert fake.use_loop_devices is request.param
    yield fake
    fake.close()
    assert loop_devices_on(tmp_path) == []
    assert not (tmp_path / "xapi" / "sr").exists()


def login(url, user="root", password="pw"):
    session = XenAPI.Session(url)
    session.login_with_password(user, password, "1.0", "nova-torrent-images")
    return session


@pytest.fixture
def xapi(fake):
    session = login(fake.start_server())
    yield session.xenapi
    if session.handle:
        session.xenapi.session.logout()


@pytest.fixture
def dev_xapi(device_fake):
    session = login(device_fake.start_server())
    yield session.xenapi
    session.xenapi.session.logout()


def details(excinfo):
    return excinfo.value.details


def create_vdi(x, sr, size, name="vdi", **extra):
    record = {
        "name_label": name,
        "name_description": "",
        "SR": sr,
        "virtual_size": str(size),
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
    }
    return x.VDI.create({**record, **extra})


def create_vbd(x, vm, vdi, mode="RW", userdevice="autodetect"):
    return x.VBD.create(
        {
            "VM": vm,
            "VDI": vdi,
            "userdevice": userdevice,
            "bootable": False,
            "mode": mode,
            "type": "Disk",
            "unpluggable": True,
            "empty": False,
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )


def default_sr(x):
    return x.pool.get_default_SR(x.pool.get_all()[0])


def compute_vm(fake, x):
    return x.VM.get_by_uuid(fake.compute_vm_uuid)


# ----------------------------------------------------------------------- sessions


def test_login_logout(fake):
    session = login(fake.start_server())
    assert session.handle.startswith("OpaqueRef:")
    record = session.xenapi.session.get_record(session.handle)
    assert record["originator"] == "nova-torrent-images"
    assert session.xenapi.session.get_this_host(session.handle) == fake.host_ref
    assert session.API_version == "2.21"  # pool.get_master + host.get_API_version_*
    assert fake.leaks().sessions == (session.handle,)

    session.xenapi.session.logout()
    assert not fake.leaks()
    # The client sends a null session; SESSION_INVALID with nothing to re-login with.
    with pytest.raises(xmlrpc.client.Fault, match="You must log in"):
        session.xenapi.VDI.get_all()


def test_wrong_password(tmp_path):
    with make_fake(tmp_path, password="secret") as fake:
        url = fake.start_server()
        with pytest.raises(XenAPI.Failure) as excinfo:
            login(url, password="wrong")
        assert details(excinfo)[0] == "SESSION_AUTHENTICATION_FAILED"
        login(url, password="secret").xenapi.session.logout()


def test_session_invalid_on_the_wire_and_transparent_relogin(fake, xapi):
    proxy = xmlrpc.client.ServerProxy(fake.start_server(), allow_none=True)
    assert proxy.VDI.get_all("OpaqueRef:bogus") == {
        "Status": "Failure",
        "ErrorDescription": ["SESSION_INVALID", "OpaqueRef:bogus"],
    }
    session = login(fake.url)
    old = session.handle
    fake.expire_session(old)  # as after a xapi restart
    assert session.xenapi.VDI.get_all() == []  # the client logged in again by itself
    assert session.handle != old
    session.xenapi.session.logout()


def test_in_process_session_marshals_like_the_network(fake):
    session = fake.session()
    x = session.xenapi
    sr = default_sr(x)
    assert x.SR.get_physical_size(sr) == str(10 * GiB)
    with pytest.raises(OverflowError):  # plain ints above 2**31-1 fail in xmlrpc.client
        x.VDI.resize(sr, 3 * GiB)
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.get_record("OpaqueRef:nope")
    assert details(excinfo) == ["HANDLE_INVALID", "VDI", "OpaqueRef:nope"]
    session.logout()
    assert not fake.leaks()


def test_concurrent_clients(fake):
    url = fake.start_server()

    def worker(_):
        session = login(url)
        x = session.xenapi
        sr = default_sr(x)
        for _ in range(5):
            x.VDI.destroy(create_vdi(x, sr, GiB))
        session.xenapi.session.logout()

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(worker, range(8)))  # re-raises any worker's failure
    assert fake.get_record("SR", fake.sr_ref)["physical_utilisation"] == 0
    fake.check_leaks()


# ----------------------------------------------------------------------- host layout


def test_ready_host(fake, xapi):
    x = xapi
    (pool,) = x.pool.get_all()
    (host,) = x.host.get_all()
    assert x.pool.get_master(pool) == host
    sr = x.pool.get_default_SR(pool)
    assert sr == fake.sr_ref
    (pbd,) = x.SR.get_PBDs(sr)
    assert x.PBD.get_host(pbd) == host
    assert x.PBD.get_currently_attached(pbd) is True
    assert x.host.get_PBDs(host) == [pbd]

    vm = compute_vm(fake, x)
    vm_record = x.VM.get_record(vm)
    assert vm_record["is_control_domain"] is True
    assert vm_record["power_state"] == "Running"
    assert vm_record["resident_on"] == host
    assert vm_record["other_config"] == {COMPUTE_VM_KEY: "true"}
    assert list(x.VM.get_all_records_where('field "is_control_domain"="true"')) == [vm]
    assert vm in x.host.get_resident_VMs(host)


# ----------------------------------------------------------------------- VDIs and SR space


def test_vdi_create_destroy_with_64bit_sizes_and_sr_accounting(fake, xapi):
    x = xapi
    sr = default_sr(x)
    big = 3 * GiB  # above 2**31: must travel as a string
    vdi = create_vdi(x, sr, big, name="big")
    record = x.VDI.get_record(vdi)
    assert record["virtual_size"] == str(big)
    assert record["physical_utilisation"] == str(big)
    assert record["SR"] == sr
    assert record["snapshot_time"] == xmlrpc.client.DateTime("19700101T00:00:00Z")
    path = fake.vdi_path(vdi)
    assert path.stat().st_size == big
    assert path.stat().st_blocks * 512 < MiB  # sparse

    small = create_vdi(x, sr, 1000, name="small")  # ints accepted too; rounded like VHD
    assert x.VDI.get_virtual_size(small) == str(2 * MiB)
    sr_record = x.SR.get_record(sr)
    assert sr_record["physical_size"] == str(10 * GiB)
    assert sr_record["physical_utilisation"] == str(big + 2 * MiB)
    assert sr_record["virtual_allocation"] == str(big + 2 * MiB)
    assert sorted(sr_record["VDIs"]) == sorted([vdi, small])
    assert x.VDI.get_by_uuid(record["uuid"]) == vdi

    with pytest.raises(OverflowError):
        x.VDI.create({**x.VDI.get_record(vdi), "virtual_size": big})  # an int: client fails

    x.VDI.destroy(vdi)
    x.VDI.destroy(small)
    assert not path.exists()
    assert x.SR.get_physical_utilisation(sr) == "0"
    assert x.SR.get_virtual_allocation(sr) == "0"
    assert x.SR.get_VDIs(sr) == []


def test_vdi_create_checks_the_record(fake, xapi):
    record = {"name_label": "x", "SR": default_sr(xapi), "virtual_size": "1"}
    with pytest.raises(XenAPI.Failure) as excinfo:
        xapi.VDI.create(record)
    assert details(excinfo) == ["FIELD_TYPE_ERROR", "name_description"]
    with pytest.raises(XenAPI.Failure) as excinfo:
        create_vdi(xapi, default_sr(xapi), MiB, other_config={"size": 5})
    assert details(excinfo) == ["FIELD_TYPE_ERROR", "other_config"]


def test_sr_out_of_space(fake, xapi):
    x = xapi
    sr = default_sr(x)
    vdi = create_vdi(x, sr, 6 * GiB)
    for attempt in (
        lambda: create_vdi(x, sr, 5 * GiB),
        lambda: x.VDI.snapshot(vdi, {}),
        lambda: x.VDI.clone(vdi, {}),
        lambda: x.VDI.copy(vdi, sr),
        lambda: x.VDI.resize(vdi, str(11 * GiB)),
    ):
        with pytest.raises(XenAPI.Failure) as excinfo:
            attempt()
        code, _, message, _ = details(excinfo)
        assert code == "SR_BACKEND_FAILURE_44"
        assert "insufficient space" in message
    assert x.SR.get_VDIs(sr) == [vdi]
    assert x.SR.get_physical_utilisation(sr) == str(6 * GiB)
    x.VDI.destroy(vdi)


def test_resize_copy_and_scan(fake, xapi):
    x = xapi
    sr = default_sr(x)
    vdi = create_vdi(x, sr, 4 * MiB, other_config={"image-id": "abc"})
    fake.vdi_path(vdi).write_bytes(b"A" * MiB)  # write_bytes truncates: resize back
    x.VDI.resize(vdi, str(8 * MiB))
    assert x.VDI.get_virtual_size(vdi) == str(8 * MiB)
    assert fake.vdi_path(vdi).stat().st_size == 8 * MiB
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.resize(vdi, str(2 * MiB))
    assert details(excinfo)[0] == "SR_BACKEND_FAILURE_79"

    other = fake.add_sr("other", GiB)
    copied = x.VDI.copy(vdi, other)
    record = x.VDI.get_record(copied)
    assert record["SR"] == other
    assert record["other_config"] == {"image-id": "abc"}
    assert fake.vdi_path(copied).read_bytes()[: 2 * MiB] == b"A" * MiB + bytes(MiB)
    assert x.SR.get_physical_utilisation(other) == str(8 * MiB)

    fake.vdi_path(copied).unlink()  # deleted behind XAPI's back
    x.SR.scan(other)
    assert x.SR.get_VDIs(other) == []
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.get_record(copied)
    assert details(excinfo)[0] == "HANDLE_INVALID"
    x.VDI.destroy(vdi)


# ----------------------------------------------------------------------- VBDs and contents


def test_vbd_plug_unplug_device_paths(device_fake, dev_xapi):
    fake, x = device_fake, dev_xapi
    sr, vm = default_sr(x), compute_vm(device_fake, x)
    vdi_a = create_vdi(x, sr, 4 * MiB, name="a")
    vdi_b = create_vdi(x, sr, 4 * MiB, name="b")
    vbd_a, vbd_b = create_vbd(x, vm, vdi_a), create_vbd(x, vm, vdi_b)
    assert x.VBD.get_userdevice(vbd_a) == "1"
    assert sorted(x.VM.get_VBDs(vm)) == sorted([vbd_a, vbd_b])
    assert x.VDI.get_VBDs(vdi_a) == [vbd_a]

    x.VBD.plug(vbd_a)
    x.VBD.plug(vbd_b)
    record = x.VBD.get_record(vbd_a)
    assert (record["device"], record["currently_attached"]) == ("xvdb", True)
    assert x.VBD.get_device(vbd_b) == "xvdc"
    path = fake.device_path(vbd_a)
    link = fake.dev_dir() / "xvdb"
    if fake.use_loop_devices:
        assert path.startswith("/dev/loop")
        assert stat.S_ISBLK(os.stat(path).st_mode)
        assert loop_devices_on(fake.vdi_path(vdi_a))
        assert os.readlink(link) == path
    else:
        assert path == str(link)
        assert os.path.realpath(path) == str(fake.vdi_path(vdi_a))

    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VBD.plug(vbd_a)
    assert details(excinfo) == ["DEVICE_ALREADY_ATTACHED", vbd_a]

    x.VBD.unplug(vbd_a)
    assert x.VBD.get_currently_attached(vbd_a) is False
    assert not link.exists()
    assert loop_devices_on(fake.vdi_path(vdi_a)) == []
    with pytest.raises(ValueError):
        fake.device_path(vbd_a)
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VBD.unplug(vbd_a)
    assert details(excinfo) == ["DEVICE_ALREADY_DETACHED", vbd_a]

    x.VBD.unplug(vbd_b)
    for vbd in (vbd_a, vbd_b):
        x.VBD.destroy(vbd)
    assert x.VM.get_VBDs(vm) == []
    x.VDI.destroy(vdi_a)
    x.VDI.destroy(vdi_b)


def test_write_through_rw_plug_read_back_through_snapshot(device_fake, dev_xapi):
    fake, x = device_fake, dev_xapi
    sr, vm = default_sr(x), compute_vm(device_fake, x)
    vdi = create_vdi(x, sr, 4 * MiB, name="base", other_config={"image-id": "abc"})
    vbd = create_vbd(x, vm, vdi)
    x.VBD.plug(vbd)
    with open(fake.device_path(vbd), "r+b", buffering=0) as dev:
        dev.seek(MiB)
        dev.write(b"hello" + bytes(507))
        # Still open: the snapshot must see writes the device has not written back yet.
        snap = x.VDI.snapshot(vdi, {})
    x.VBD.unplug(vbd)
    x.VBD.destroy(vbd)

    record = x.VDI.get_record(snap)
    assert record["is_a_snapshot"] is True
    assert record["snapshot_of"] == vdi
    assert record["read_only"] is False  # XAPI does not make snapshots read-only
    assert record["other_config"] == {"image-id": "abc"}
    assert record["name_label"] == "base"
    assert record["snapshot_time"] != xmlrpc.client.DateTime("19700101T00:00:00Z")
    assert x.VDI.get_snapshots(vdi) == [snap]

    ro_vbd = create_vbd(x, vm, snap, mode="RO")
    x.VBD.plug(ro_vbd)
    ro_path = fake.device_path(ro_vbd)
    with open(ro_path, "rb") as dev:
        dev.seek(MiB)
        assert dev.read(5) == b"hello"
    if fake.use_loop_devices:
        with pytest.raises(OSError), open(ro_path, "r+b", buffering=0) as dev:
            dev.write(bytes(512))
    else:  # root ignores mode bits: only the mode can be checked
        assert os.stat(ro_path).st_mode & 0o222 == 0

    clone = x.VDI.clone(snap, {})
    assert x.VDI.get_is_a_snapshot(clone) is False
    assert x.VDI.get_other_config(clone) == {"image-id": "abc"}
    with open(fake.vdi_path(clone), "rb") as f:
        f.seek(MiB)
        assert f.read(5) == b"hello"

    x.VBD.unplug(ro_vbd)
    assert os.stat(fake.vdi_path(snap)).st_mode & 0o200  # writable again
    x.VBD.destroy(ro_vbd)
    for ref in (clone, snap, vdi):
        x.VDI.destroy(ref)
    assert not fake.leaks().vdis


def test_close_detaches_and_removes_everything(tmp_path):
    fake = make_fake(tmp_path, use_loop_devices=LOOP_DEVICES)
    x = fake.session().xenapi
    vdi = create_vdi(x, default_sr(x), MiB)
    vbd = create_vbd(x, compute_vm(fake, x), vdi)
    x.VBD.plug(vbd)
    assert os.path.exists(fake.device_path(vbd))
    fake.close()
    assert loop_devices_on(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "xapi").iterdir()) == []
    assert fake.get_record("VBD", vbd)["currently_attached"] is False


# ----------------------------------------------------------------------- XAPI errors


def test_vdi_in_use(fake, xapi):
    x = xapi
    vm = compute_vm(fake, x)
    vdi = create_vdi(x, default_sr(x), MiB)
    vbd = create_vbd(x, vm, vdi)
    x.VBD.plug(vbd)
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.destroy(vdi)
    assert details(excinfo) == ["VDI_IN_USE", vdi, "destroy"]
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VBD.destroy(vbd)
    assert details(excinfo)[0] == "OPERATION_NOT_ALLOWED"
    second = create_vbd(x, vm, vdi, mode="RO")
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VBD.plug(second)  # someone has it RW
    assert details(excinfo) == ["VDI_IN_USE", vdi]

    x.VBD.unplug(vbd)
    x.VDI.destroy(vdi)  # destroys its unplugged VBDs too, as XAPI does
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VBD.get_record(vbd)
    assert details(excinfo) == ["HANDLE_INVALID", "VBD", vbd]
    assert x.VM.get_VBDs(vm) == []


def test_vdi_readonly(fake, xapi):
    x = xapi
    vm = compute_vm(fake, x)
    vdi = create_vdi(x, default_sr(x), MiB)
    rw = create_vbd(x, vm, vdi)
    x.VDI.set_read_only(vdi, True)
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VBD.plug(rw)
    assert details(excinfo) == ["VDI_READONLY", vdi]
    with pytest.raises(XenAPI.Failure) as excinfo:
        create_vbd(x, vm, vdi)
    assert details(excinfo) == ["VDI_READONLY", vdi]
    ro = create_vbd(x, vm, vdi, mode="RO")
    ro2 = create_vbd(x, vm, vdi, mode="RO")
    x.VBD.plug(ro)
    x.VBD.plug(ro2)  # read-only sharing is fine
    x.VBD.unplug(ro)
    x.VBD.unplug(ro2)
    x.VDI.destroy(vdi)


def test_maps_setters_and_queries(fake, xapi):
    x = xapi
    vdi = create_vdi(x, default_sr(x), MiB, name="base")
    x.VDI.add_to_other_config(vdi, "image-id", "abc")
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.add_to_other_config(vdi, "image-id", "def")
    assert details(excinfo) == ["MAP_DUPLICATE_KEY", "VDI", "other_config", vdi, "image-id"]
    x.VDI.remove_from_other_config(vdi, "image-id")
    x.VDI.remove_from_other_config(vdi, "image-id")  # absent key: no error, as in XAPI
    x.VDI.set_other_config(vdi, {"a": "1"})
    x.VDI.set_name_label(vdi, "renamed")
    assert x.VDI.get_other_config(vdi) == {"a": "1"}
    assert x.VDI.get_by_name_label("renamed") == [vdi]

    where = x.VDI.get_all_records_where
    assert list(where('field "name_label"="renamed" and field "type"="user"')) == [vdi]
    assert list(where('field "name_label"="renamed" and field "read_only"="true"')) == []
    assert list(where('not (field "name_label"="x") or false')) == [vdi]
    with pytest.raises(XenAPI.Failure):
        where('field "name_label"=')

    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.set_virtual_size(vdi, "1")  # kept true by the fake: use VDI.resize
    assert details(excinfo) == ["MESSAGE_METHOD_UNKNOWN", "VDI.set_virtual_size"]
    x.VDI.destroy(vdi)


def test_invalid_handles_and_calls(fake, xapi):
    x = xapi
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.get_record("OpaqueRef:nope")
    assert details(excinfo) == ["HANDLE_INVALID", "VDI", "OpaqueRef:nope"]
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.SR.get_physical_size(NULL_REF)
    assert details(excinfo) == ["HANDLE_INVALID", "SR", NULL_REF]
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.get_by_uuid("not-a-uuid")
    assert details(excinfo) == ["UUID_INVALID", "VDI", "not-a-uuid"]
    with pytest.raises(XenAPI.Failure) as excinfo:
        create_vbd(x, compute_vm(fake, x), "OpaqueRef:nope")
    assert details(excinfo) == ["HANDLE_INVALID", "VDI", "OpaqueRef:nope"]
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.frobnicate()
    assert details(excinfo) == ["MESSAGE_METHOD_UNKNOWN", "VDI.frobnicate"]
    with pytest.raises(XenAPI.Failure) as excinfo:
        x.VDI.get_record()
    assert details(excinfo) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VDI.get_record", "2", "1"]


def test_tasks(fake, xapi):
    task = xapi.task.create("download", "image abc")
    record = xapi.task.get_record(task)
    assert (record["name_label"], record["status"]) == ("download", "pending")
    assert fake.leaks().tasks == (task,)
    xapi.task.destroy(task)
    assert fake.leaks().tasks == ()


# ----------------------------------------------------------------------- leak reporting


def test_leak_report(fake):
    url = fake.start_server()
    leaked_session = login(url)
    session = login(url)
    x = session.xenapi
    vdi = create_vdi(x, default_sr(x), MiB, name="leaky")
    baseline = fake.snapshot_state()
    vbd = create_vbd(x, compute_vm(fake, x), vdi)
    x.VBD.plug(vbd)

    report = fake.leaks()
    assert set(report.sessions) == {leaked_session.handle, session.handle}
    assert report.vbds == report.attached_vbds == (vbd,)
    assert report.vdis == (vdi,)
    with pytest.raises(AssertionError, match=r"attached as xvdb.*'leaky'"):
        fake.check_leaks()
    assert fake.leaks(baseline).vdis == ()  # against a later baseline, only the VBD

    x.VBD.unplug(vbd)
    x.VBD.destroy(vbd)
    x.VDI.destroy(vdi)
    session.xenapi.session.logout()
    assert fake.leaks().sessions == (leaked_session.handle,)
    leaked_session.xenapi.session.logout()
    fake.check_leaks()


def test_clones_are_copy_on_write_and_outlive_their_parent(fake, xapi):
    base = create_vdi(xapi, fake.sr_ref, 4 * 1024 * 1024, name="base")
    payload = os.urandom(4 * 1024 * 1024)
    fake.vdi_path(base).write_bytes(payload)
    clones = [xapi.VDI.clone(base, {}) for _ in range(3)]
    # Nothing copied yet: a clone is O(1), like a VHD child.
    assert all(not fake._files[c].exists() for c in clones)
    assert fake.vdi_path(clones[0]).read_bytes() == payload  # reading materializes it
    xapi.VDI.destroy(base)
    for clone in clones:
        assert fake.vdi_path(clone).read_bytes() == payload
    for clone in clones:
        xapi.VDI.destroy(clone)


# ----------------------------------------------------------------------- crash tests

KILL_CHILD = """
import sys, XenAPI
session = XenAPI.Session(sys.argv[1])
sys.stdin.readline()  # "go": the parent has armed the kill
session.login_with_password("root", "pw", "1.0", "kill-test")
x = session.xenapi
sr = x.pool.get_default_SR(x.pool.get_all()[0])
for n in range(5):
    x.VDI.create({"name_label": f"vdi-{n}", "name_description": "", "SR": sr,
                  "virtual_size": "1048576", "type": "user", "sharable": False,
                  "read_only": False, "other_config": {}})
    x.SR.get_record(sr)
print("survived", flush=True)
"""


def test_call_log_counts_every_call(fake, xapi):
    fake.clear_calls()
    sr = default_sr(xapi)
    with pytest.raises(XenAPI.Failure):
        xapi.VDI.get_record("OpaqueRef:nothing")
    create_vdi(xapi, sr, MiB)
    assert fake.calls == ("pool.get_all", "pool.get_default_SR", "VDI.get_record", "VDI.create")
    fake.clear_calls()
    assert fake.calls == ()


def test_kill_after_the_nth_call_of_interest(fake):
    import signal
    import sys

    url = fake.start_server()
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    fake.clear_calls()
    trigger = fake.kill_after(child.pid, 3, methods={"VDI.create"})
    out, _ = child.communicate(b"go\n", timeout=60)

    assert child.returncode == -signal.SIGKILL and b"survived" not in out
    assert trigger.fired.is_set()
    # Killed right after its third VDI.create was carried out, before the answer came:
    # the VDI exists, and no later call of the child reached the fake.
    index, method = trigger.call
    assert method == "VDI.create" and index == len(fake.calls) - 1
    assert fake.calls.count("VDI.create") == 3 and fake.calls.count("SR.get_record") == 2
    labels = sorted(fake.get_record("VDI", r)["name_label"] for r in fake.leaks().vdis)
    assert labels == ["vdi-0", "vdi-1", "vdi-2"]
    # The fake answers others as before, and a disarmed trigger does nothing.
    fake.kill_after(child.pid, 1)
    fake.cancel_kill()
    session = login(url)
    session.xenapi.session.logout()
    with pytest.raises(ValueError):
        fake.kill_after(child.pid, 0)
