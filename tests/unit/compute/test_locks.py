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

"""locks: the per-image host lock, between threads and between processes."""

import subprocess
import sys
import textwrap
import threading
import time

from nova_torrent_images.compute.locks import ImageLocks


def holder_thread(locks, image_id):
    """A thread that holds the image's lock until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def run():
        with locks.hold(image_id):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    assert held.wait(5)
    return thread, release


def test_lock_files_live_in_the_state_dir(tmp_path):
    locks = ImageLocks.in_state_dir(str(tmp_path))
    with locks.hold("img-1"):
        pass
    assert (tmp_path / "locks" / "nti-image-img-1").exists()


def test_try_hold_is_true_when_free(tmp_path):
    locks = ImageLocks.in_state_dir(str(tmp_path))
    with locks.try_hold("img-1") as got:
        assert got is True
    with locks.try_hold("img-1") as got:  # released again
        assert got is True


def test_try_hold_is_false_while_another_thread_holds(tmp_path):
    locks = ImageLocks.in_state_dir(str(tmp_path))
    thread, release = holder_thread(locks, "img-1")
    try:
        start = time.monotonic()
        with locks.try_hold("img-1") as got:
            assert got is False
        assert time.monotonic() - start < 1  # it does not wait
        with locks.try_hold("img-2") as other:  # other images are not affected
            assert other is True
    finally:
        release.set()
        thread.join(5)
    with locks.try_hold("img-1") as got:
        assert got is True


def test_try_hold_is_false_while_another_process_holds(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, time
        from nova_torrent_images.compute.locks import ImageLocks
        with ImageLocks({str(tmp_path)!r}).hold("img-1"):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with ImageLocks(str(tmp_path)).try_hold("img-1") as got:
            assert got is False
    finally:
        proc.communicate("\n", timeout=10)
    assert proc.returncode == 0
    with ImageLocks(str(tmp_path)).try_hold("img-1") as got:
        assert got is True


def test_hold_serialises_two_threads(tmp_path):
    locks = ImageLocks.in_state_dir(str(tmp_path))
    inside = 0
    overlaps = []
    spans = []
    guard = threading.Lock()
    barrier = threading.Barrier(2)

    def worker(n):
        nonlocal inside
        barrier.wait()
        for _ in range(5):
            with locks.hold("img-1"):
                with guard:
                    inside += 1
                    overlaps.append(inside)
                start = time.monotonic()
                time.sleep(0.02)
                spans.append((start, time.monotonic(), n))
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(spans) == 10
    assert max(overlaps) == 1
    spans.sort()
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        assert start >= end


def test_hold_waits_for_the_holder(tmp_path):
    locks = ImageLocks.in_state_dir(str(tmp_path))
    thread, release = holder_thread(locks, "img-1")
    entered = threading.Event()

    def waiter():
        with locks.hold("img-1"):
            entered.set()

    second = threading.Thread(target=waiter)
    second.start()
    try:
        assert not entered.wait(0.3)  # blocked while the first thread holds it
    finally:
        release.set()
    assert entered.wait(5)
    thread.join(5)
    second.join(5)
