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

"""opentracker whitelist: format, atomic and change-only rewrites, reload by pid file."""

import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

from nova_torrent_images import exception
from nova_torrent_images.origin import tracker

V1 = "a032c04529155591311086ece722fe9fc98d7051"
V2 = "9c570948fe2719895f5376ab18e177f3598f76c12a505e71127633f1af60ae5f"


def test_tracker_hashes_are_v1_and_truncated_v2():
    assert tracker.tracker_hashes(V1, V2) == [V1, V2[:40]]
    assert tracker.tracker_hashes(None, V2.upper()) == [V2[:40]]
    assert tracker.tracker_hashes(V1, None) == [V1]


def test_whitelist_format(tmp_path):
    path = str(tmp_path / "whitelist.txt")
    assert tracker.write_whitelist(path, [V2[:40], V1, V1.upper()]) is True
    text = open(path).read()
    lines = text.splitlines()
    # Comment lines do not start with 40 hex digits, so opentracker skips them.
    assert all(line.startswith("#") for line in lines[:2])
    assert lines[2:] == sorted({V1, V2[:40]})
    assert text.endswith("\n")  # opentracker reads past the end of an unterminated last line
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # read by opentracker as nobody
    assert tracker.read_whitelist(path) == {V1, V2[:40]}


def test_unchanged_whitelist_is_not_rewritten(tmp_path):
    path = str(tmp_path / "whitelist.txt")
    tracker.write_whitelist(path, [V1])
    inode, mtime = os.stat(path).st_ino, os.stat(path).st_mtime_ns
    assert tracker.write_whitelist(path, [V1]) is False
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (inode, mtime)
    assert tracker.write_whitelist(path, []) is True
    assert os.stat(path).st_ino != inode  # replaced by rename, never truncated in place
    assert tracker.read_whitelist(path) == set()
    assert os.listdir(tmp_path) == ["whitelist.txt"]  # no temporary file left


def test_bad_hash_and_unwritable_directory(tmp_path):
    with pytest.raises(ValueError):
        tracker.render_whitelist(["xyz"])
    with pytest.raises(exception.TrackerError, match="tracker_whitelist_path"):
        tracker.write_whitelist(str(tmp_path / "missing-dir" / "whitelist.txt"), [V1])
    assert not os.path.exists(tmp_path / "missing-dir")  # a mistyped path is not created


def test_read_whitelist_like_opentracker(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text(f"{V1}\n{V1[:39]}\n{V1}a\n# {V1}\n{V2[:40]} trailing text\n")
    assert tracker.read_whitelist(str(path)) == {V1, V2[:40]}


def spawn_named(binary, name="opentracker") -> subprocess.Popen:
    """Start ``binary`` and wait until the kernel shows it under its own name.

    Between fork and exec the child still has the parent's name; the reload would
    (rightly) refuse to signal it.
    """
    # SIGHUP as by default even where the tests run under nohup (an ignored signal stays
    # ignored across exec, and the reload under test could not end the process).
    proc = subprocess.Popen(
        [str(binary), "60"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)
    )
    deadline = time.monotonic() + 5
    while tracker._process_name(proc.pid) != name:
        assert time.monotonic() < deadline, tracker._process_name(proc.pid)
        time.sleep(0.01)
    return proc


@pytest.fixture
def fake_opentracker(tmp_path):
    """A process whose name is 'opentracker' (a copy of sleep): SIGHUP ends it."""
    binary = tmp_path / "opentracker"
    shutil.copy(shutil.which("sleep"), binary)
    proc = spawn_named(binary)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_reload_sends_sighup_to_the_tracker(tmp_path, fake_opentracker):
    pidfile = tmp_path / "opentracker.pid"
    pidfile.write_text(f"{fake_opentracker.pid}\n")
    assert tracker.reload_tracker(str(pidfile)) is True
    assert fake_opentracker.wait(timeout=5) == -signal.SIGHUP


def test_reload_refuses_other_processes_and_stale_pidfiles(tmp_path, caplog):
    other = spawn_named(shutil.which("sleep"), "sleep")
    try:
        pidfile = tmp_path / "opentracker.pid"
        pidfile.write_text(f"{other.pid}\n")
        assert tracker.reload_tracker(str(pidfile)) is False
        assert other.poll() is None  # not signalled: SIGHUP would have ended it
        assert "not opentracker" in caplog.text
    finally:
        other.kill()
        other.wait()
    assert tracker.reload_tracker(str(tmp_path / "missing.pid")) is False
    assert "tracker_pidfile" in caplog.text


def test_sync_reloads_only_on_change(tmp_path, fake_opentracker):
    pidfile = tmp_path / "opentracker.pid"
    pidfile.write_text(f"{fake_opentracker.pid}\n")
    whitelist = tracker.TrackerWhitelist(str(tmp_path / "whitelist.txt"), str(pidfile))
    whitelist.sync([])  # first write: the file is created, the tracker reloaded
    fake_opentracker.wait(timeout=5)
    # Another "tracker": an unchanged list must not signal it.
    again = spawn_named(tmp_path / "opentracker")
    try:
        pidfile.write_text(f"{again.pid}\n")
        assert whitelist.sync([]) is False
        assert again.poll() is None
        assert whitelist.sync([V1]) is True
        assert again.wait(timeout=5) == -signal.SIGHUP
    finally:
        if again.poll() is None:
            again.kill()
        again.wait()
