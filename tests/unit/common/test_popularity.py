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

"""Request counting: the sliding window shared by threads, processes and restarts."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
import threading

import pytest

from nova_torrent_images.common.popularity import RequestCounter
from nova_torrent_images.testing.swarm import make_conf
from nova_torrent_images.virt.xenapi.handler import record_request

IMAGE_ID = "7b4c2b36-5e0f-4d61-9d4f-0e6f3f6a2c11"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def conf(tmp_path):
    return make_conf(origin_state_dir=str(tmp_path / "origin"), promotion_enabled=True)


@pytest.fixture
def clock():
    return Clock()


def test_counter_survives_restarts(conf, clock):
    state = conf.torrent_images.origin_state_dir
    first = RequestCounter(state, 600, clock=clock)
    for _ in range(5):
        first.record(IMAGE_ID)
    second = RequestCounter(state, 600, clock=clock)
    assert second.count(IMAGE_ID) == 5
    assert second.record(IMAGE_ID, threshold=6) == (6, True)
    assert second.count(IMAGE_ID) == 0  # crossing clears the count in the same step


def _count_in_process(state_dir: str, n: int) -> None:
    counter = RequestCounter(state_dir, 600)
    for _ in range(n):
        counter.record(IMAGE_ID)


def test_counter_is_safe_across_processes_and_threads(tmp_path):
    state = str(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_count_in_process, args=(state, 25)) for _ in range(3)]
    threads = [threading.Thread(target=_count_in_process, args=(state, 25)) for _ in range(2)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert RequestCounter(state, 600).count(IMAGE_ID) == 125


def test_old_requests_leave_the_window_and_the_file(tmp_path, clock):
    counter = RequestCounter(str(tmp_path), 600, clock=clock)
    assert counter.record(IMAGE_ID) == (1, False)
    assert stat.S_IMODE(os.stat(counter.path).st_mode) == 0o600
    clock.now += 601
    assert counter.count(IMAGE_ID) == 0
    with open(counter.path) as f:
        assert f.read() == "{}"
    assert os.listdir(counter.directory) == ["requests.json"]  # no temporary file left


def test_an_unreadable_counter_starts_afresh(tmp_path, clock, caplog):
    counter = RequestCounter(str(tmp_path), 600, clock=clock)
    os.makedirs(counter.directory)
    with open(counter.path, "w") as f:
        f.write("[not json")
    assert counter.record(IMAGE_ID) == (1, False)
    assert "unreadable" in caplog.text
    counter.reset(IMAGE_ID)
    assert counter.count(IMAGE_ID) == 0


def test_the_hook_is_a_no_op_by_default():
    assert record_request(IMAGE_ID, make_conf()) is False


def test_counting_imports_nothing_of_the_origin():
    """nova-compute imports this module for every boot: no publisher, tracker or registry."""
    code = (
        "import sys\n"
        "from nova_torrent_images.virt.xenapi import handler\n"
        "from nova_torrent_images.testing.swarm import make_conf\n"
        "assert handler.record_request('x', make_conf()) is False\n"
        "print(sorted(m for m in sys.modules if m.startswith('nova_torrent_images.origin')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
