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

"""Fair share for guests: thread priorities (read back from the kernel) and cgroup files."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from nova_torrent_images.common import qos
from nova_torrent_images.swarm.engine import SwarmEngine
from nova_torrent_images.testing.swarm import make_conf

BE7 = qos.ioprio_value(qos.IOPRIO_CLASS_BE, 7)
IDLE = qos.ioprio_value(qos.IOPRIO_CLASS_IDLE)

pytestmark = pytest.mark.skipif(
    qos.ioprio_get() is None, reason="needs Linux with the ioprio syscalls"
)


@pytest.fixture(autouse=True)
def _process_settings(monkeypatch):
    """Engines and pipelines configure the process's settings: put them back after."""
    monkeypatch.setattr(qos, "_settings", qos.Settings())


def proc_nice(tid: int) -> int:
    """The nice field of /proc/self/task/<tid>/stat (field 19), as the kernel has it."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def on_thread(func):
    """``func()`` on a fresh native thread (priorities never leak into the test's own)."""
    out: list = []
    errors: list = []

    def run():
        try:
            out.append(func())
        except BaseException as exc:  # noqa: BLE001  re-raised below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


def test_lowering_changes_the_calling_thread_only():
    main_tid, main_nice, main_io = (
        threading.get_native_id(),
        proc_nice(threading.get_native_id()),
        qos.ioprio_get(),
    )

    def lowered():
        saved = qos.lower_thread_priority(qos.Settings(nice=10, io_class="best-effort"))
        tid = threading.get_native_id()
        return saved, tid, proc_nice(tid), os.getpriority(os.PRIO_PROCESS, tid), qos.ioprio_get()

    saved, tid, nice, nice_syscall, io = on_thread(lowered)
    assert saved.tid == tid and nice == nice_syscall == 10 and io == BE7
    assert proc_nice(main_tid) == main_nice and qos.ioprio_get() == main_io


def test_idle_class_and_none():
    def idle():
        qos.lower_thread_priority(qos.Settings(nice=0, io_class="idle"))
        return proc_nice(threading.get_native_id()), qos.ioprio_get()

    before = proc_nice(threading.get_native_id())
    assert on_thread(idle) == (before, IDLE)

    def untouched():
        io = qos.ioprio_get()
        saved = qos.lower_thread_priority(qos.Settings(nice=0, io_class="none"))
        return saved, qos.ioprio_get() == io

    saved, same = on_thread(untouched)
    assert saved.nice is None and saved.ioprio is None and same


def test_priority_is_never_raised():
    def already_low():
        qos.lower_thread_priority(qos.Settings(nice=15, io_class="idle"))
        saved = qos.lower_thread_priority(qos.Settings(nice=10, io_class="best-effort"))
        return saved, proc_nice(threading.get_native_id()), qos.ioprio_get()

    saved, nice, io = on_thread(already_low)
    assert (saved.nice, saved.ioprio, nice, io) == (None, None, 15, IDLE)


def test_background_restores_the_thread():
    def scoped():
        tid = threading.get_native_id()
        before = proc_nice(tid), qos.ioprio_get()
        with qos.background(qos.Settings(nice=10, io_class="best-effort")):
            inside = proc_nice(tid), qos.ioprio_get()
        return before, inside, (proc_nice(tid), qos.ioprio_get())

    if not qos.may_raise_priority(0):
        pytest.skip("this process may not raise a nice value again")
    before, inside, after = on_thread(scoped)
    assert inside == (10, BE7) and after == before


def test_background_leaves_the_nice_value_it_could_not_restore(monkeypatch):
    monkeypatch.setattr(qos, "may_raise_priority", lambda to_nice: False)

    def scoped():
        tid = threading.get_native_id()
        before = proc_nice(tid), qos.ioprio_get()
        with qos.background(qos.Settings(nice=10, io_class="idle")):
            inside = proc_nice(tid), qos.ioprio_get()
        return before, inside, (proc_nice(tid), qos.ioprio_get())

    before, inside, after = on_thread(scoped)
    assert inside == (before[0], IDLE) and after == before


def test_green_threads_are_left_alone(monkeypatch):
    monkeypatch.setattr(qos, "_green", lambda: True)

    def green():
        tid = threading.get_native_id()
        with qos.background():
            pass
        return qos.lower_thread_priority(), proc_nice(tid)

    saved, nice = on_thread(green)
    assert saved is None and nice == proc_nice(threading.get_native_id())


def test_threads_a_background_call_creates_inherit_its_priority():
    def make_thread():
        seen = []
        t = threading.Thread(
            target=lambda: seen.append((proc_nice(threading.get_native_id()), qos.ioprio_get()))
        )
        t.start()
        t.join()
        return seen[0]

    settings = qos.Settings(nice=12, io_class="idle")
    assert qos.call_in_background(make_thread, settings) == (12, IDLE)
    with pytest.raises(ZeroDivisionError):
        qos.call_in_background(lambda: 1 / 0)


def test_libtorrents_threads_run_lowered():
    tids = set(os.listdir("/proc/self/task"))
    own = proc_nice(threading.get_native_id()), qos.ioprio_get()
    engine = SwarmEngine(make_conf(listen_interfaces=["127.0.0.1:0"], qos_nice=11)).start()
    try:
        # libtorrent's own threads (the alert pump lowers itself, a moment later).
        new = set(os.listdir("/proc/self/task")) - tids - {str(engine._pump.native_id)}
        assert new, "libtorrent started no threads"
        assert {proc_nice(int(t)) for t in new} == {11}
        assert {qos.ioprio_get(int(t)) for t in new} == {BE7}
    finally:
        engine.shutdown()
    assert (proc_nice(threading.get_native_id()), qos.ioprio_get()) == own


# -- cgroup v2 ----------------------------------------------------------------------------
def cgroup_conf(tmp_path, **overrides):
    cgroup = tmp_path / "nova-compute.service"
    cgroup.mkdir()
    for name in ("cpu.weight", "io.max"):
        (cgroup / name).write_text("")
    return cgroup, make_conf(qos_cgroup=str(cgroup), **overrides)


def test_cgroup_weight_and_write_ceiling(tmp_path, monkeypatch):
    cgroup, conf = cgroup_conf(tmp_path, qos_cpu_weight=40, qos_disk_write_limit=51200)
    monkeypatch.setattr(qos, "block_device_of", lambda path: "8:0")
    written = qos.apply_cgroup(conf, str(tmp_path))
    assert written == {"cpu.weight": "40", "io.max": f"8:0 wbps={50 * 1024 * 1024}"}
    assert (cgroup / "cpu.weight").read_text() == "40\n"
    assert (cgroup / "io.max").read_text() == f"8:0 wbps={50 * 1024 * 1024}\n"


def test_cgroup_defaults_write_the_weight_only(tmp_path):
    cgroup, conf = cgroup_conf(tmp_path)
    assert qos.apply_cgroup(conf, str(tmp_path)) == {"cpu.weight": "50"}
    assert (cgroup / "io.max").read_text() == ""


def test_no_cgroup_no_writes(tmp_path):
    assert qos.apply_cgroup(make_conf(), str(tmp_path)) == {}


def test_unwritable_cgroup_files_are_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    cgroup, conf = cgroup_conf(tmp_path, qos_disk_write_limit=1024)
    (cgroup / "cpu.weight").unlink()
    (cgroup / "cpu.weight").mkdir()  # unwritable even for root
    monkeypatch.setattr(qos, "block_device_of", lambda path: None)  # tmpfs, overlay
    with caplog.at_level(logging.WARNING):
        assert qos.apply_cgroup(conf, str(tmp_path)) == {}
    assert "cpu.weight" in caplog.text and "no block device" in caplog.text
    missing = make_conf(qos_cgroup=str(tmp_path / "nope"))
    with caplog.at_level(logging.WARNING):
        assert qos.apply_cgroup(missing, str(tmp_path)) == {}
    assert "not a directory" in caplog.text


def test_block_device_of_a_partition_is_its_disk(tmp_path):
    device = qos.block_device_of(str(tmp_path))
    if device is None:
        pytest.skip("tmp_path is on no block device here")
    major, minor = device.split(":")
    assert not os.path.exists(f"/sys/dev/block/{major}:{minor}/partition")


# -- where the product lowers its threads ----------------------------------------------
def priority_now():
    return proc_nice(threading.get_native_id()), qos.ioprio_get()


def test_a_download_runs_lowered_and_the_caller_gets_its_priority_back(tmp_path):

    from nova_torrent_images.compute.pipeline import fetch_to_file
    from nova_torrent_images.glance.client import GlanceClient
    from nova_torrent_images.testing.images import image_info

    data = os.urandom(300_000)
    seen = []

    class Glance(GlanceClient):
        def __init__(self):
            super().__init__(client=None)

        def iter_data(self, image_id):
            seen.append(priority_now())
            return iter([data])

    image = image_info(data, "img-qos")
    if not qos.may_raise_priority(0):
        pytest.skip("this process may not raise a nice value again")

    def fetch():
        before = priority_now()
        result = fetch_to_file(image, str(tmp_path / "img"), conf=make_conf(), glance=Glance())
        return before, result.source, priority_now()

    before, source, after = on_thread(fetch)
    assert source == "glance" and seen == [(10, BE7)] and after == before


def test_the_stripe_worker_runs_lowered():
    from nova_torrent_images.swarm.stripe_client import StripeWorker

    seen = []

    class Client:
        image_id, urls = "img-qos", ("http://127.0.0.1:1",)

        def next_batch(self, want=None):
            seen.append(priority_now())
            return None

        def close_connections(self):
            pass

    qos.configure(make_conf())
    worker = StripeWorker(
        Client(),
        piece_length=16384,
        size=16384,
        add_piece=lambda i, b: None,
        missing=list,
        progress=lambda: 0,
    ).start()
    for thread in worker._threads:  # nothing to fetch, nothing missing: each stream ends
        thread.join(timeout=10)
    assert seen == [(10, BE7)] * len(worker._threads) and worker.failed is None


def test_under_eventlet_the_session_thread_is_still_native_and_lowered(monkeypatch):
    pytest.importorskip("eventlet")
    monkeypatch.setattr(qos, "_green", lambda: True)
    caller = threading.get_native_id()

    def probe():
        return threading.get_native_id() != caller, priority_now()

    assert qos.call_in_background(probe, qos.Settings(nice=10, io_class="idle")) == (
        True,
        (10, IDLE),
    )
