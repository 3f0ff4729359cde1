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

"""swarm.transfer: bounded peer lookups, scratch clean-up, refusing a multi-file torrent,
staying in the swarm until the caller leaves."""

import hashlib
import logging
import os
import socket
import subprocess
import threading
import time

import libtorrent as lt
import pytest

from nova_torrent_images import exception
from nova_torrent_images.glance.magnet import build_magnet
from nova_torrent_images.swarm import transfer
from nova_torrent_images.swarm.torrent import make_torrent
from nova_torrent_images.swarm.transfer import Transfer
from nova_torrent_images.testing.images import image_info
from nova_torrent_images.testing.swarm import SimulatedHost, transfer_settings

MiB = 1024 * 1024


# -- resolve_peers ---------------------------------------------------------------------


def test_ip_literals_pass_unchanged_without_a_lookup(monkeypatch):
    def no_dns(*args, **kwargs):
        raise AssertionError("an IP literal was looked up")

    monkeypatch.setattr(transfer.socket, "getaddrinfo", no_dns)
    peers = (("127.0.0.5", 6881), ("::1", 6882), ("10.1.2.3", 1))
    assert transfer.resolve_peers(peers, timeout=1) == list(peers)


@pytest.fixture
def slow_dns(monkeypatch):
    """getaddrinfo that hangs for names starting with "slow", answers others at once."""
    release = threading.Event()
    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        if host.startswith("slow"):
            release.wait(10)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.9.9", port))]
        if host.startswith("bad"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(transfer.socket, "getaddrinfo", getaddrinfo)
    yield asked
    release.set()  # let the abandoned lookup threads end


def test_a_hanging_lookup_never_holds_the_caller_past_the_timeout(slow_dns, caplog):
    caplog.set_level(logging.WARNING)
    peers = (("slow.example", 1), ("127.0.0.5", 2), ("fast.example", 3), ("slow2.example", 4))
    timeout = 0.3
    start = time.monotonic()
    resolved = transfer.resolve_peers(peers, timeout=timeout)
    elapsed = time.monotonic() - start
    assert elapsed < timeout + 0.5
    assert resolved == [("127.0.0.5", 2), ("10.0.0.7", 3)]  # in the order given
    assert {"slow.example", "slow2.example", "fast.example"} <= set(slow_dns)
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "slow.example:1" in skipped and "slow2.example:4" in skipped


def test_a_name_that_does_not_resolve_is_skipped(slow_dns, caplog):
    caplog.set_level(logging.WARNING)
    resolved = transfer.resolve_peers((("bad.example", 1), ("ok.example", 2)), timeout=1)
    assert resolved == [("10.0.0.7", 2)]
    assert any("bad.example:1" in r.getMessage() for r in caplog.records)


# -- scratch directories ---------------------------------------------------------------


def test_remove_stale_scratch_removes_only_dead_processes_dirs(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = tmp_path / f"{proc.pid}-123"
    live = tmp_path / f"{os.getpid()}-456"
    other = tmp_path / "not-a-transfer"
    for d in (dead, live, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "file").write_bytes(b"x")
    assert transfer.remove_stale_scratch(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])
    assert (live / "sub" / "file").exists()


def test_remove_stale_scratch_without_a_root(tmp_path):
    assert transfer.remove_stale_scratch(str(tmp_path / "missing")) == 0


# -- a torrent that is not an image ----------------------------------------------------


def multi_file_torrent(root, empty_name):
    """A hybrid torrent of a directory: a 1 MiB file, a zero-length one, one in a subdir."""
    files = {"a.bin": os.urandom(MiB), empty_name: b"", "sub/b.bin": os.urandom(64 * 1024)}
    for name, data in files.items():
        path = root / "img-dir" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    entries = [lt.create_file_entry(f"img-dir/{n}", len(d)) for n, d in files.items()]
    creator = lt.create_torrent(entries, 256 * 1024, 0)
    lt.set_piece_hashes(creator, str(root))
    return lt.torrent_info(lt.bencode(creator.generate()))


@pytest.mark.parametrize(
    ("empty_name", "first"),
    [("0-empty", "img-dir/0-empty"), ("z-empty", "img-dir/a.bin")],
    ids=["zero-length-file-first", "zero-length-file-last"],
)
def test_a_multi_file_torrent_is_refused_and_leaves_nothing(tmp_path, empty_name, first):
    origin = tmp_path / "origin"
    info = multi_file_torrent(origin, empty_name)
    assert info.layout().file_path(0) == first  # libtorrent sorts a hybrid's files by path
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "other.base").write_bytes(b"a base copy already here")
    scratch_root = tmp_path / "scratch"

    with SimulatedHost("origin") as seeder, SimulatedHost("compute") as compute:
        params = lt.add_torrent_params()
        params.ti = info
        params.save_path = str(origin)
        flags = lt.torrent_flags.default_flags | lt.torrent_flags.seed_mode
        params.flags = flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
        seeder.engine.add_torrent(params, label="multi-file seed")
        hashes = info.info_hashes()
        magnet = build_magnet(
            info_hash_v1=str(hashes.v1), info_hash_v2=str(hashes.v2), peers=[seeder.endpoint]
        )
        image = image_info(
            size=info.total_size(),
            os_hash_value="0" * 128,
            is_torrentable="true",
            torrent_magnet=magnet,
        )
        settings = transfer_settings(scratch_root)
        job = Transfer(compute.engine, image, str(cache / "img.part"), settings)
        with pytest.raises(exception.TorrentMismatch, match="img-1.*files"):
            job.run()
        assert compute.engine.session.get_torrents() == []  # removed from the session

    assert sorted(os.listdir(cache)) == ["other.base"]
    assert (cache / "other.base").read_bytes() == b"a base copy already here"
    assert os.listdir(scratch_root) == []


# -- leaving the swarm -----------------------------------------------------------------


def image_record(torrent, data, peers):
    magnet = build_magnet(
        info_hash_v1=torrent.info_hash_v1, info_hash_v2=torrent.info_hash_v2, peers=peers
    )
    return image_info(data, is_torrentable="true", torrent_magnet=magnet)


def torrent_of(tmp_path, size: int):
    """(image bytes, their file on the origin, the torrent)."""
    data = os.urandom(size)
    source = tmp_path / "origin" / "img-1"
    source.parent.mkdir()
    source.write_bytes(data)
    return data, source, make_torrent(str(source), name="img-1")


def run_in_background(job: Transfer) -> tuple[threading.Thread, dict]:
    """Run ``job`` and leave in a thread; the dict gets ``ok`` or ``error``."""
    outcome: dict = {}

    def fetch():
        try:
            job.run()
            job.leave()
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001  reported by the caller's assertion
            outcome["error"] = exc

    thread = threading.Thread(target=fetch)
    thread.start()
    return thread, outcome


def test_a_finished_host_hands_over_what_a_connected_host_lacks(tmp_path, monkeypatch):
    """The origin is gone; the late host gets the image only because the first one stays."""
    monkeypatch.setattr(transfer, "SHARE_LIMIT", 20.0)
    data, source, torrent = torrent_of(tmp_path, 2 * MiB)
    first_dest, late_dest = tmp_path / "first.img", tmp_path / "late.img"

    with (
        SimulatedHost("origin") as origin,
        SimulatedHost("compute-1") as first,
        SimulatedHost("compute-2", download_rate_limit=1024) as late,  # 2 s for 2 MiB
    ):
        watch = origin.seed(torrent.data, str(source))
        job = Transfer(
            first.engine,
            image_record(torrent, data, [origin.endpoint]),
            str(first_dest),
            transfer_settings(tmp_path / "scratch-1", overall_timeout=60),
        )
        job.run()
        assert len(first.engine.session.get_torrents()) == 1  # still in the swarm
        origin.engine.remove_torrent(watch)  # only the first host has the image now

        late_job = Transfer(
            late.engine,
            image_record(torrent, data, [first.endpoint]),
            str(late_dest),
            transfer_settings(tmp_path / "scratch-2", stall_timeout=5, overall_timeout=60),
        )
        thread, outcome = run_in_background(late_job)
        handle = first.engine.session.get_torrents()[0]
        deadline = time.monotonic() + 10
        while not transfer.peers_lacking_ours(handle):
            assert time.monotonic() < deadline, "the late host never connected"
            time.sleep(0.05)

        job.leave(share=True)
        assert first.engine.session.get_torrents() == []
        assert os.listdir(tmp_path / "scratch-1") == []
        thread.join(30)

    assert outcome == {"ok": True}
    assert hashlib.sha512(late_dest.read_bytes()).hexdigest() == hashlib.sha512(data).hexdigest()
    assert first_dest.read_bytes() == data


def test_hosts_that_finish_together_wait_for_one_still_downloading(tmp_path, monkeypatch):
    """Two prefetching hosts done at once each see the other holding every piece; had both
    left on that, the host still downloading would be stranded with the origin gone."""
    monkeypatch.setattr(transfer, "SHARE_LIMIT", 20.0)
    data, source, torrent = torrent_of(tmp_path, 2 * MiB)
    late_dest = tmp_path / "late.img"

    with (
        SimulatedHost("origin") as origin,
        SimulatedHost("compute-1") as first,
        SimulatedHost("compute-2") as second,
        SimulatedHost("compute-3", download_rate_limit=512) as late,  # 4 s for 2 MiB
    ):
        watch = origin.seed(torrent.data, str(source))
        jobs = []
        for n, host, hints in ((1, first, []), (2, second, [first.endpoint])):
            job = Transfer(
                host.engine,
                image_record(torrent, data, [origin.endpoint, *hints]),
                str(tmp_path / f"done-{n}.img"),
                transfer_settings(tmp_path / f"scratch-{n}", overall_timeout=60),
            )
            job.run()
            jobs.append(job)
        origin.engine.remove_torrent(watch)  # only the two finished hosts have the image

        late_job = Transfer(
            late.engine,
            image_record(torrent, data, [first.endpoint, second.endpoint]),
            str(late_dest),
            transfer_settings(tmp_path / "scratch-3", stall_timeout=5, overall_timeout=60),
        )
        thread, outcome = run_in_background(late_job)
        handles = [h.engine.session.get_torrents()[0] for h in (first, second)]

        def sees_a_seed_and_the_late_host(handle) -> bool:
            seeds = [p for p in handle.get_peer_info() if p.flags & transfer.lt.peer_info.seed]
            return bool(seeds) and transfer.peers_lacking_ours(handle) > 0

        # Each finished host sees the other holding every piece (no piece only here) and
        # the late host lacking them.
        deadline = time.monotonic() + 10
        while not all(sees_a_seed_and_the_late_host(h) for h in handles):
            assert time.monotonic() < deadline, "the hosts never connected to each other"
            time.sleep(0.05)

        leaving = [threading.Thread(target=job.leave, kwargs={"share": True}) for job in jobs]
        for t in leaving:
            t.start()
        for t in leaving:
            t.join(30)
        assert first.engine.session.get_torrents() == second.engine.session.get_torrents() == []
        thread.join(30)

    assert outcome == {"ok": True}
    assert hashlib.sha512(late_dest.read_bytes()).hexdigest() == hashlib.sha512(data).hexdigest()


def test_without_peers_leaving_does_not_wait(tmp_path):
    data, source, torrent = torrent_of(tmp_path, MiB)
    with SimulatedHost("origin") as origin, SimulatedHost("compute-1") as host:
        watch = origin.seed(torrent.data, str(source))
        job = Transfer(
            host.engine,
            image_record(torrent, data, [origin.endpoint]),
            str(tmp_path / "img"),
            transfer_settings(tmp_path / "scratch", overall_timeout=60),
        )
        job.run()
        handle = host.engine.session.get_torrents()[0]
        assert transfer.peers_lacking_ours(handle) == 0  # the origin, a seed, has them all
        origin.engine.remove_torrent(watch)
        started = time.monotonic()
        job.leave(share=True)
        assert time.monotonic() - started < transfer.SHARE_LIMIT  # nothing to hand over
        job.leave()  # idempotent
        assert host.engine.session.get_torrents() == []


@pytest.mark.parametrize("disk_io", ["posix", "pread"])
def test_the_image_hash_reads_behind_only_what_the_backend_wrote(tmp_path, disk_io):
    """posix writes a block before it hashes the piece: the hash may read behind it. pread
    hashes from its write buffer and writes later: the hash waits for the flush."""
    from nova_torrent_images.glance import verify

    data, source, torrent = torrent_of(tmp_path, 4 * MiB)
    dest = tmp_path / "img.part"
    with (
        SimulatedHost("origin") as origin,
        SimulatedHost("compute-1", disk_io=disk_io, download_rate_limit=4096) as host,
    ):
        origin.seed(torrent.data, str(source))
        image = image_record(torrent, data, [origin.endpoint])
        check = verify.StreamingCheck(image)
        job = Transfer(
            host.engine,
            image,
            str(dest),
            transfer_settings(tmp_path / "scratch", overall_timeout=60),
            check=check,
        )
        try:
            job.run()
            read_behind = job._read_behind is not None
            hashed_during = check.streamed
            check.finish(str(dest))  # raises IntegrityError on any wrong byte
        finally:
            job.leave()

    assert read_behind == (disk_io == "posix")
    if disk_io == "pread":
        assert hashed_during == 0
    assert dest.read_bytes() == data
