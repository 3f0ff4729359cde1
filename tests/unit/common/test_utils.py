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

"""utils: atomic files, host:port parsing and owner tags, against real files and processes."""

import os
import socket
import stat
import subprocess

import pytest

from nova_torrent_images.common import utils


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not utils.pid_alive(proc.pid)
    return proc.pid


def test_atomic_write_replaces_whole_with_mode(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old content, longer than the new one")
    utils.atomic_write(str(path), "new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    utils.atomic_write(str(path), b"\x00bytes", mode=0o600)
    assert path.read_bytes() == b"\x00bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left


def test_atomic_write_creates_missing_directories(tmp_path):
    path = tmp_path / "a" / "b" / "file"
    utils.atomic_write(str(path), b"x")
    assert path.read_bytes() == b"x"


def test_atomic_write_failure_while_writing_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        utils.atomic_write(str(path), 12345)  # not bytes: fails after the temp file exists
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_failed_rename_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(utils.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        utils.atomic_write(str(path), b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:6881", ("::1", 6881)),
        ("[2001:DB8::1]:5", ("2001:db8::1", 5)),  # normalised
        ("example.com:443", ("example.com", 443)),
        ("seeder-1.example:65535", ("seeder-1.example", 65535)),
        ("  h:1 ", ("h", 1)),
    ],
)
def test_parse_host_port_accepts(text, expected):
    assert utils.parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("127.0.0.1", "is not host:port"),
        ("example.com", "is not host:port"),
        ("::1:80", "is not host:port"),  # IPv6 needs brackets to carry a port
        ("[::1]", "is not host:port"),
        (":80", "is not host:port"),
        ("", "is not host:port"),
        (None, "is not host:port"),
        ("h:0", "invalid port"),
        ("h:65536", "invalid port"),
        ("[::1]:99999", "invalid port"),
        ("h:abc", "invalid port"),
        ("1.2.3.4:-1", "invalid port"),
        ("bad_host:80", "invalid host"),
        ("-a:80", "invalid host"),
        ("a b:80", "invalid host"),
    ],
)
def test_parse_host_port_rejects(text, why):
    with pytest.raises(ValueError, match=why):
        utils.parse_host_port(text)


@pytest.mark.parametrize("text", ["127.0.0.1:80", "[::1]:6881", "example.com:443"])
def test_format_host_port_round_trips(text):
    assert utils.format_host_port(*utils.parse_host_port(text)) == text


def test_pid_alive(dead_pid):
    assert utils.pid_alive(os.getpid())
    assert utils.pid_alive(1)
    assert not utils.pid_alive(dead_pid)
    assert not utils.pid_alive(0)
    assert not utils.pid_alive(-1)


def test_owner_is_gone_for_a_dead_process_of_this_host(dead_pid):
    assert utils.owner_is_gone(f"{socket.gethostname()}:{dead_pid}")


def test_owner_is_not_gone_while_it_runs():
    assert utils.owner_tag() == f"{socket.gethostname()}:{os.getpid()}"
    assert not utils.owner_is_gone(utils.owner_tag())


def test_owner_of_another_host_is_never_gone(dead_pid):
    # A shared SR: the pid means nothing here, whatever process has it on this host.
    assert not utils.owner_is_gone(f"other-{socket.gethostname()}:{dead_pid}")


@pytest.mark.parametrize("tag", [None, "", "garbage", f"{socket.gethostname()}:", "h:p:x"])
def test_unreadable_owner_is_never_gone(tag):
    assert not utils.owner_is_gone(tag)


def test_unreadable_owner_with_non_numeric_pid_is_never_gone():
    assert not utils.owner_is_gone(f"{socket.gethostname()}:12ab")


# -- RateLimiter -------------------------------------------------------------------------
def test_rate_limiter_books_senders_one_after_another(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(utils.time, "monotonic", lambda: clock[0])
    limiter = utils.RateLimiter(1000)
    assert limiter.reserve(500) == 100.0  # now
    assert limiter.reserve(1000) == 100.5  # after the first 500 bytes
    assert limiter.reserve(10) == 101.5
    clock[0] = 200.0  # idle for long: no credit piles up
    assert limiter.reserve(10) == 200.0


def test_rate_limiter_without_a_limit_never_waits(monkeypatch):
    monkeypatch.setattr(utils.time, "sleep", lambda s: pytest.fail(f"slept {s}s"))
    limiter = utils.RateLimiter(0)
    for _ in range(3):
        limiter.take(1 << 30)


def test_rate_limiter_take_waits_for_its_turn(monkeypatch):
    clock, slept = [10.0], []
    monkeypatch.setattr(utils.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(utils.time, "sleep", slept.append)
    limiter = utils.RateLimiter(100)
    limiter.take(100)
    limiter.take(50)
    assert slept == [1.0]
