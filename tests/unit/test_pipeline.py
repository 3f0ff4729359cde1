"""The pipeline without a swarm: the Glance path must never hand on bad bytes."""

import hashlib
import os

import pytest

from nova_torrent_images import exception
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.image import parse_image
from nova_torrent_images.metrics import get_metrics
from nova_torrent_images.pipeline import fetch_to_file
from nova_torrent_images.testing.swarm import make_conf

DATA = os.urandom(300_000)


class StubGlance(GlanceClient):
    """Serves fixed bytes in chunks, the way glanceclient's iterator does."""

    def __init__(self, body: bytes) -> None:
        super().__init__(client=None)
        self.body = body
        self.calls = 0

    def iter_data(self, image_id):
        self.calls += 1
        return (self.body[i : i + 65536] for i in range(0, len(self.body), 65536))


def image(**props):
    rec = {
        "id": "img-1",
        "status": "active",
        "size": len(DATA),
        "disk_format": "raw",
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(DATA).hexdigest(),
    }
    rec.update(props)
    return parse_image(rec)


def test_glance_path_verifies(tmp_path):
    dest = tmp_path / "img"
    result = fetch_to_file(image(), str(dest), conf=make_conf(), glance=StubGlance(DATA))
    assert result.source == "glance" and dest.read_bytes() == DATA


@pytest.mark.parametrize("body", [DATA[:-1] + bytes([DATA[-1] ^ 1]), DATA[:-10], DATA + b"extra"])
def test_glance_corruption_is_never_handed_on(tmp_path, body):
    dest = tmp_path / "img"
    with pytest.raises(exception.IntegrityError, match="img-1"):
        fetch_to_file(image(), str(dest), conf=make_conf(), glance=StubGlance(body))
    assert os.listdir(tmp_path) == []  # no final file, no partial one


def test_existing_destination_is_not_overwritten(tmp_path):
    dest = tmp_path / "img"
    dest.write_bytes(b"something the host already had")
    with pytest.raises(exception.StoreError, match="refusing to overwrite"):
        fetch_to_file(image(), str(dest), conf=make_conf(), glance=StubGlance(DATA))
    assert dest.read_bytes() == b"something the host already had"


def test_bad_magnet_falls_to_glance_with_a_warning(tmp_path, caplog):
    glance = StubGlance(DATA)
    img = image(is_torrentable="true", torrent_magnet="magnet:?xt=urn:btih:nothex")
    result = fetch_to_file(img, str(tmp_path / "img"), conf=make_conf(), glance=glance)
    assert result.source == "glance" and glance.calls == 1
    assert any(
        "torrent_magnet" in r.getMessage() and "img-1" in r.getMessage() for r in caplog.records
    )


def test_no_glance_and_no_torrent_is_a_clear_error(tmp_path):
    with pytest.raises(exception.NotTorrentable, match="img-1"):
        fetch_to_file(image(), str(tmp_path / "img"), conf=make_conf(), glance=None)
    assert os.listdir(tmp_path) == []


def test_glance_fetch_is_counted_in_the_process_metrics(tmp_path):
    m = get_metrics()
    glance_bytes = {"source": "glance"}
    ok = {"source": "glance", "outcome": "ok"}
    before = m.value("nti_image_bytes_total", glance_bytes), m.value("nti_fetches_total", ok)
    conf = make_conf(mode="none")
    fetch_to_file(image(), str(tmp_path / "img"), conf=conf, glance=StubGlance(DATA))
    assert m.value("nti_image_bytes_total", glance_bytes) == before[0] + len(DATA)
    assert m.value("nti_fetches_total", ok) == before[1] + 1
