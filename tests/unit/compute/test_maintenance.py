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

"""The periodic maintenance thread: every task runs, a failing one does not stop the rest."""

import logging
import threading
import time

from nova_torrent_images.compute.maintenance import Maintenance


class Counter:
    def __init__(self, name, fail=False):
        self.__name__ = name
        self.calls = 0
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
        if self.fail:
            raise RuntimeError(f"{self.__name__} broke")


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_tasks_run_periodically_and_a_failure_does_not_stop_the_others(caplog):
    caplog.set_level(logging.INFO)
    first, broken, last = Counter("prune"), Counter("broken", fail=True), Counter("publish")
    maintenance = Maintenance(0.02, [first, broken, last])
    maintenance.start()
    try:
        wait_until(lambda: last.calls >= 3)
    finally:
        maintenance.stop()
    assert first.calls >= 3 and broken.calls >= 3
    failures = [r for r in caplog.records if "broken" in r.getMessage()]
    assert failures and all(r.levelno == logging.ERROR for r in failures)
    assert failures[0].exc_info is not None  # the traceback says why


def test_stop_joins_the_thread_and_nothing_runs_afterwards():
    task = Counter("task")
    maintenance = Maintenance(0.01, [task])
    maintenance.start()
    wait_until(lambda: task.calls >= 1)
    thread = maintenance._thread
    maintenance.stop()
    assert thread is not None and not thread.is_alive()
    calls = task.calls
    time.sleep(0.05)
    assert task.calls == calls
    maintenance.stop()  # twice: no error


def test_stop_does_not_wait_for_the_interval():
    maintenance = Maintenance(3600, [Counter("task")])
    maintenance.start()
    start = time.monotonic()
    maintenance.stop()
    assert time.monotonic() - start < 1


def test_first_run_waits_one_interval():
    task = Counter("task")
    maintenance = Maintenance(3600, [task])
    maintenance.start()
    time.sleep(0.05)
    maintenance.stop()
    assert task.calls == 0


def test_interval_zero_never_starts_a_thread():
    task = Counter("task")
    maintenance = Maintenance(0, [task])
    maintenance.start()
    assert maintenance._thread is None
    time.sleep(0.05)
    assert task.calls == 0
    maintenance.run_once()  # an explicit run still works
    assert task.calls == 1


def test_start_twice_runs_one_thread():
    task = Counter("task")
    maintenance = Maintenance(0.01, [task])
    before = set(threading.enumerate())
    maintenance.start()
    thread = maintenance._thread
    maintenance.start()
    try:
        assert maintenance._thread is thread
        new = [t for t in set(threading.enumerate()) - before if t.name == "torrent-maintenance"]
        assert new == [thread]
    finally:
        maintenance.stop()


def test_run_once_runs_every_task_in_order():
    order = []
    tasks = [lambda: order.append(1), Counter("x", fail=True), lambda: order.append(3)]
    Maintenance(0, tasks).run_once()
    assert order == [1, 3]
