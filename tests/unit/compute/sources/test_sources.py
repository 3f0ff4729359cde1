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

"""Sources: the Glance stream and the swarm, each into a store slot, failures typed."""

import hashlib
import os

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute.sources.glance import GlanceSource
from nova_torrent_images.compute.sources.swarm import SwarmSource
from nova_torrent_images.compute.stores.base import Slot
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.magnet import build_magnet
from nova_torrent_images.swarm import transfer
from nova_torrent_images.swarm.torrent import make_torrent
from nova_torrent_images.swarm.transfer import SwarmStats
from nova_torrent_images.testing.images import image_info
from nova_torrent_images.testing.swarm import SimulatedHost, transfer_settings

MiB = 1024 * 1024
DATA = os.urandom(MiB)
MAGNET = build_magnet(info_hash_v2="ab" * 32, peers=[("127.0.0.1", 6881)])


class StubGlance(GlanceClient):
    """Serves fixed bytes in chunks, the way glanceclient's iterator does."""

    def __init__(self, body: bytes) -> None:
        super().__init__(client=None)
        self.body = body
        self.calls = 0

    def iter_data(self, image_id):
        self.calls += 1
        return (self.body[i : i + 65536] for i in range(0, len(self.body), 65536))


def image(data=DATA, **props):
    return image_info(data, **props)


def settings(tmp_path, **overrides):
    return transfer_settings(tmp_path / "scratch", **overrides)


@pytest.fixture
def store(tmp_path):
    return FilesystemStore(str(tmp_path / "images"))


# -- Glance ----------------------------------------------------------------------------


def test_glance_into_a_slot(store):
    img = image()
    slot = store.begin_download(img.id, img.size)
    glance = StubGlance(DATA)
    result = GlanceSource(glance, verify_hash=True).fetch_into(img, slot)
    assert result.source == "glance" and result.bytes_from_glance == len(DATA)
    assert result.destination == slot.path and glance.calls == 1
    with open(slot.path, "rb") as f:
        assert hashlib.sha512(f.read()).hexdigest() == img.hash_value


def test_glance_corruption_into_a_new_slot_leaves_nothing(store):
    img = image()
    slot = store.begin_download(img.id, img.size)
    bad = DATA[:-1] + bytes([DATA[-1] ^ 1])
    with pytest.raises(exception.IntegrityError, match="img-1"):
        GlanceSource(StubGlance(bad), verify_hash=True).fetch_into(img, slot)
    assert os.listdir(store.directory) == []


def test_glance_into_a_preallocated_slot_writes_in_place(tmp_path):
    device = tmp_path / "xvdb"
    device.write_bytes(b"\0" * (2 * MiB))  # a VDI rounded up to its SR's allocation unit
    img = image()
    slot = Slot(image_id=img.id, size=img.size, path=str(device), preallocated=True)
    GlanceSource(StubGlance(DATA), verify_hash=True).fetch_into(img, slot)
    content = device.read_bytes()
    assert len(content) == 2 * MiB and content[: len(DATA)] == DATA

    with pytest.raises(exception.IntegrityError):
        GlanceSource(StubGlance(DATA[:-5]), verify_hash=True).fetch_into(img, slot)
    assert device.exists()  # the store's to clean up, never removed by the source


# -- the swarm -------------------------------------------------------------------------


class BrokenEngine:
    def add_torrent(self, params, label):
        raise RuntimeError("libtorrent said no")


class BrokenLaterEngine:
    def add_torrent(self, params, label):
        raise ValueError("something else broke")


def test_swarm_names_a_refused_torrent(tmp_path, store):
    img = image(is_torrentable="true", torrent_magnet=MAGNET)
    slot = store.begin_download(img.id, img.size)
    source = SwarmSource(BrokenEngine, settings(tmp_path), verify_hash=True)
    with pytest.raises(exception.TorrentFetchError, match="img-1") as excinfo:
        source.fetch_into(img, slot)
    assert "libtorrent refused the torrent" in str(excinfo.value)
    assert "libtorrent said no" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, RuntimeError)
    assert os.listdir(tmp_path / "scratch") == []  # the transfer's scratch dir is gone


def test_swarm_wraps_an_unexpected_error_naming_the_image(tmp_path, store):
    img = image(is_torrentable="true", torrent_magnet=MAGNET)
    slot = store.begin_download(img.id, img.size)
    source = SwarmSource(BrokenLaterEngine, settings(tmp_path), verify_hash=True)
    with pytest.raises(exception.TorrentFetchError, match="img-1") as excinfo:
        source.fetch_into(img, slot)
    assert "unexpected ValueError: something else broke" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, ValueError)
    assert os.listdir(tmp_path / "scratch") == []  # the transfer's scratch dir is gone


def test_swarm_wraps_our_own_errors(tmp_path, store):
    img = image()  # no magnet
    slot = store.begin_download(img.id, img.size)
    source = SwarmSource(BrokenEngine, settings(tmp_path), verify_hash=True)
    with pytest.raises(exception.TorrentFetchError, match="img-1") as excinfo:
        source.fetch_into(img, slot)
    assert isinstance(excinfo.value.__cause__, exception.NotTorrentable)


@pytest.mark.parametrize("verify_hash", [True, False])
def test_swarm_bytes_are_verified_against_glance(tmp_path, store, monkeypatch, verify_hash):
    img = image(is_torrentable="true", torrent_magnet=MAGNET)
    slot = store.begin_download(img.id, img.size)

    def lying_swarm(self):  # pieces that pass their hashes, bytes that are not the image
        with open(self.destination, "wb") as f:
            f.write(os.urandom(len(DATA)))
        return SwarmStats(bytes_total=len(DATA))

    monkeypatch.setattr(transfer.Transfer, "run", lying_swarm)
    source = SwarmSource(BrokenEngine, settings(tmp_path), verify_hash=verify_hash)
    if verify_hash:
        with pytest.raises(exception.TorrentFetchError, match="img-1") as excinfo:
            source.fetch_into(img, slot)
        assert isinstance(excinfo.value.__cause__, exception.IntegrityError)
    else:
        assert source.fetch_into(img, slot).source == "torrent"


def test_swarm_passes_its_typed_errors_through(tmp_path, store, monkeypatch):
    img = image(is_torrentable="true", torrent_magnet=MAGNET)
    slot = store.begin_download(img.id, img.size)
    stalled = exception.TorrentStalled(image_id="img-1", timeout=1, percent=50.0, peers=0)

    def stall(self):
        raise stalled

    monkeypatch.setattr(transfer.Transfer, "run", stall)
    source = SwarmSource(BrokenEngine, settings(tmp_path), verify_hash=True)
    with pytest.raises(exception.TorrentStalled) as excinfo:
        source.fetch_into(img, slot)
    assert excinfo.value is stalled


def test_swarm_into_a_slot_from_a_real_seeder(tmp_path, store):
    src = tmp_path / "origin" / "img-1"
    src.parent.mkdir()
    src.write_bytes(DATA)
    torrent = make_torrent(str(src))
    with SimulatedHost("origin") as seeder, SimulatedHost("compute") as compute:
        seeder.seed(torrent.data, str(src))
        magnet = torrent.magnet(peers=[seeder.endpoint])
        img = image(is_torrentable="true", torrent_magnet=magnet)
        slot = store.begin_download(img.id, img.size)
        source = SwarmSource(lambda: compute.engine, settings(tmp_path), verify_hash=True)
        result = source.fetch_into(img, slot)
    assert result.source == "torrent" and result.resume_data
    assert result.bytes_from_origin == len(DATA) and result.bytes_from_peers == 0
    with open(slot.path, "rb") as f:
        assert hashlib.sha512(f.read()).hexdigest() == img.hash_value
    assert os.listdir(tmp_path / "scratch") == []


# -- trusting the torrent root -----------------------------------------------------------

V2 = "ab" * 32
SHA512 = hashlib.sha512(DATA).hexdigest()
BOUND = f"sha512:{SHA512}:{V2}"


def swarm_writes(monkeypatch, data):
    """Transfer.run writes ``data`` (pieces that passed their hashes, as far as we know)."""

    def run(self):
        with open(self.destination, "wb") as f:
            f.write(data)
        return SwarmStats(bytes_total=len(data))

    monkeypatch.setattr(transfer.Transfer, "run", run)


@pytest.fixture
def full_reads(monkeypatch):
    """Every whole-image hash check the source makes."""
    calls = []
    real = verify.StreamingCheck.finish

    def spy(self, path, **kwargs):
        calls.append(path)
        return real(self, path, **kwargs)

    monkeypatch.setattr(verify.StreamingCheck, "finish", spy)
    return calls


def trusting(tmp_path, trust=True, verify_hash=True):
    return SwarmSource(
        BrokenEngine, settings(tmp_path), verify_hash=verify_hash, trust_torrent_root=trust
    )


def test_trusted_root_skips_the_whole_image_read(tmp_path, store, monkeypatch, full_reads, caplog):
    img = image(is_torrentable="true", torrent_magnet=MAGNET, torrent_bound_hash=BOUND)
    slot = store.begin_download(img.id, img.size)
    swarm_writes(monkeypatch, DATA)
    caplog.set_level("INFO", logger="nova_torrent_images.compute.sources.swarm")

    result = trusting(tmp_path).fetch_into(img, slot)

    assert result.source == "torrent" and full_reads == []
    assert "whole-image sha512 read skipped (trust_torrent_root)" in caplog.text
    assert V2 in caplog.text and "trusted torrent root" in caplog.text


OTHER_SHA512 = hashlib.sha512(b"other bytes").hexdigest()
V1_MAGNET = build_magnet(info_hash_v1="cd" * 20, peers=[("127.0.0.1", 6881)])
# libtorrent passes a hybrid torrent's piece on SHA-1 while its v2 hashes are unknown.
HYBRID_MAGNET = build_magnet(info_hash_v1="cd" * 20, info_hash_v2=V2, peers=[("127.0.0.1", 1)])


@pytest.mark.parametrize(
    ("trust", "props", "why"),
    [
        (False, {"torrent_bound_hash": BOUND}, "trust_torrent_root is off"),
        (True, {}, "no bound hash"),
        (True, {"torrent_bound_hash": f"sha512:{SHA512}"}, "torrent_bound_hash is invalid"),
        (True, {"torrent_bound_hash": f"sha512:{OTHER_SHA512}:{V2}"}, "not Glance's sha512"),
        (
            True,
            {"torrent_bound_hash": f"sha3_512:{OTHER_SHA512}:{V2}"},
            "not Glance's sha512",
        ),
        (True, {"torrent_bound_hash": f"sha512:{SHA512}:{'ef' * 32}"}, "another v2 torrent"),
        (True, {"torrent_bound_hash": BOUND, "torrent_magnet": V1_MAGNET}, "names no v2"),
        (True, {"torrent_bound_hash": BOUND, "torrent_magnet": HYBRID_MAGNET}, "hybrid"),
    ],
)
def test_each_failed_condition_reads_the_whole_image(
    tmp_path, store, monkeypatch, full_reads, caplog, trust, props, why
):
    img = image(**{"is_torrentable": "true", "torrent_magnet": MAGNET, **props})
    slot = store.begin_download(img.id, img.size)
    swarm_writes(monkeypatch, DATA)
    caplog.set_level("INFO", logger="nova_torrent_images.compute.sources.swarm")

    result = trusting(tmp_path, trust=trust).fetch_into(img, slot)

    assert result.source == "torrent" and full_reads == [slot.path]
    assert "read skipped" not in caplog.text and ", verified" in caplog.text
    source = trusting(tmp_path, trust=trust)
    assert why in source.untrusted_root(img)
    if trust:
        assert f"verifying the whole image: {source.untrusted_root(img)}" in caplog.text


def test_verify_image_hash_off_reads_nothing_whatever_the_trust(
    tmp_path, store, monkeypatch, full_reads
):
    img = image(is_torrentable="true", torrent_magnet=MAGNET)
    swarm_writes(monkeypatch, DATA)
    source = trusting(tmp_path, trust=True, verify_hash=False)
    assert source.fetch_into(img, store.begin_download(img.id, img.size)).source == "torrent"
    assert full_reads == []


def test_a_corrupt_byte_is_caught_when_the_bound_hash_does_not_match(
    tmp_path, store, monkeypatch, full_reads
):
    other = f"sha512:{OTHER_SHA512}:{V2}"  # bound to other bytes than Glance's
    img = image(is_torrentable="true", torrent_magnet=MAGNET, torrent_bound_hash=other)
    slot = store.begin_download(img.id, img.size)
    swarm_writes(monkeypatch, DATA[:-1] + bytes([DATA[-1] ^ 1]))

    with pytest.raises(exception.TorrentFetchError, match="img-1") as excinfo:
        trusting(tmp_path).fetch_into(img, slot)

    assert isinstance(excinfo.value.__cause__, exception.IntegrityError)
    assert full_reads == [slot.path]


def test_a_trusted_download_still_checks_the_length(tmp_path, store, monkeypatch, full_reads):
    img = image(is_torrentable="true", torrent_magnet=MAGNET, torrent_bound_hash=BOUND)
    slot = store.begin_download(img.id, img.size)
    swarm_writes(monkeypatch, DATA[:-1])

    with pytest.raises(exception.TorrentFetchError, match="img-1") as excinfo:
        trusting(tmp_path).fetch_into(img, slot)

    assert isinstance(excinfo.value.__cause__, exception.IntegrityError)
    assert full_reads == []


def test_trusted_v2_torrent_from_a_real_seeder(tmp_path, store, caplog):
    src = tmp_path / "origin" / "img-1"
    src.parent.mkdir()
    src.write_bytes(DATA)
    torrent = make_torrent(str(src), version="v2")
    caplog.set_level("INFO", logger="nova_torrent_images.compute.sources.swarm")
    with SimulatedHost("origin") as seeder, SimulatedHost("compute") as compute:
        seeder.seed(torrent.data, str(src))
        magnet = torrent.magnet(peers=[seeder.endpoint])
        bound = f"sha512:{SHA512}:{torrent.info_hash_v2}"
        img = image(is_torrentable="true", torrent_magnet=magnet, torrent_bound_hash=bound)
        slot = store.begin_download(img.id, img.size)
        source = SwarmSource(
            lambda: compute.engine,
            settings(tmp_path),
            verify_hash=True,
            trust_torrent_root=True,
        )
        result = source.fetch_into(img, slot)
    assert result.source == "torrent" and "read skipped" in caplog.text
    with open(slot.path, "rb") as f:
        assert f.read() == DATA
