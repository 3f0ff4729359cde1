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

"""Strict parsing of Glance image records: every bad value is a typed, named error."""

import hashlib

import pytest

from nova_torrent_images import exception
from nova_torrent_images.glance.image import BoundHash, parse_image
from tests.unit.glance.test_magnet import BAD_MAGNETS

V1 = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a"
V2 = "e1f2" * 16
DATA = b"image bytes"


def record(**props):
    base = {
        "id": "6d0f-image",
        "name": "cirros",
        "status": "active",
        "size": len(DATA),
        "disk_format": "raw",
        "container_format": "bare",
        "os_hash_algo": "sha512",
        "os_hash_value": hashlib.sha512(DATA).hexdigest(),
        "checksum": hashlib.md5(DATA).hexdigest(),  # noqa: S324 - Glance's legacy field
        "visibility": "public",
        "is_torrentable": "true",
        "torrent_magnet": f"magnet:?xt=urn:btih:{V1}",
    }
    base.update(props)
    return {k: v for k, v in base.items() if v is not None}


def test_good_record():
    image = parse_image(
        record(
            torrent_magnet=f"magnet:?xt=urn:btih:{V1}&xt=urn:btmh:1220{V2}"
            "&tr=udp%3A%2F%2F10.0.0.1%3A6969&x.pe=10.0.0.2:6881"
        )
    )
    assert image.torrent_error is None
    assert image.is_torrentable is True
    assert image.magnet.info_hash_v1 == V1
    assert image.magnet.info_hash_v2 == V2
    assert image.magnet.trackers == ("udp://10.0.0.1:6969",)
    assert image.magnet.peers == (("10.0.0.2", 6881),)
    assert image.hash_algo == "sha512"
    assert image.size == len(DATA)
    assert image.properties["is_torrentable"] == "true"
    assert "size" not in image.properties


@pytest.mark.parametrize(
    "flag,expected", [("true", True), ("False", False), ("1", True), ("no", False)]
)
def test_is_torrentable_accepts_booleans(flag, expected):
    image = parse_image(record(is_torrentable=flag))
    assert image.torrent_error is None
    assert image.is_torrentable is expected


@pytest.mark.parametrize("flag", ["yes please", "", "2", "truee"])
def test_is_torrentable_is_strict(flag):
    image = parse_image(record(is_torrentable=flag))
    err = image.torrent_error
    assert isinstance(err, exception.InvalidImageMetadata)
    assert "6d0f-image" in str(err) and "is_torrentable" in str(err)
    assert image.is_torrentable is None


@pytest.mark.parametrize("case", sorted(BAD_MAGNETS))
def test_bad_magnet_is_a_typed_error(case):
    # What parse_magnet refuses (tests/unit/test_magnet.py) is an error naming the image.
    image = parse_image(record(torrent_magnet=BAD_MAGNETS[case]))
    err = image.torrent_error
    assert isinstance(err, exception.InvalidMagnet), case
    assert "6d0f-image" in str(err) and "torrent_magnet" in str(err)
    assert image.magnet is None


def test_custom_property_names():
    image = parse_image(
        record(
            is_torrentable=None, torrent_magnet=None, p2p="true", mag=f"magnet:?xt=urn:btih:{V1}"
        ),
        torrentable_property="p2p",
        magnet_property="mag",
    )
    assert image.is_torrentable is True and image.magnet.info_hash_v1 == V1


@pytest.mark.parametrize(
    "props,prop",
    [
        ({"size": "big"}, "size"),
        ({"size": -1}, "size"),
        ({"os_hash_algo": "sha512", "os_hash_value": None}, "os_hash_algo/os_hash_value"),
        ({"os_hash_algo": "rot13"}, "os_hash_algo"),
        ({"os_hash_value": "abc"}, "os_hash_value"),
        # A malformed legacy checksum fails here, not at every download later.
        ({"os_hash_algo": None, "os_hash_value": None, "checksum": "not-md5"}, "checksum"),
        ({"os_hash_algo": None, "os_hash_value": None, "checksum": 12345}, "checksum"),
        ({"os_hash_value": 12345}, "os_hash_value"),
    ],
)
def test_bad_size_or_hash_raises(props, prop):
    with pytest.raises(exception.InvalidImageMetadata) as ctx:
        parse_image(record(**props))
    assert "6d0f-image" in str(ctx.value) and prop in str(ctx.value)


@pytest.mark.parametrize(
    "props,prop",
    [
        ({"size": None}, "size"),
        ({"os_hash_algo": None, "os_hash_value": None, "checksum": None}, "os_hash_value"),
    ],
)
def test_unverifiable_image_is_refused_before_download(props, prop):
    image = parse_image(record(**props))
    with pytest.raises(exception.InvalidImageMetadata) as ctx:
        image.require_verifiable()
    assert "6d0f-image" in str(ctx.value) and prop in str(ctx.value)


def test_md5_checksum_is_the_fallback_hash():
    image = parse_image(record(os_hash_algo=None, os_hash_value=None))
    assert image.hash_algo == "md5"
    assert image.hash_value == hashlib.md5(DATA).hexdigest()  # noqa: S324


# -- the bound hash ---------------------------------------------------------------------

SHA512 = hashlib.sha512(DATA).hexdigest()


def test_bound_hash_is_parsed():
    image = parse_image(record(torrent_bound_hash=f"sha512:{SHA512.upper()}:{V2.upper()}"))
    assert image.bound_hash == BoundHash("sha512", SHA512, V2)
    assert str(image.bound_hash) == f"sha512:{SHA512}:{V2}"
    assert image.bound_hash_error is None and image.torrent_error is None
    assert len(str(image.bound_hash)) <= 255


def test_no_bound_hash():
    image = parse_image(record())
    assert image.bound_hash is None and image.bound_hash_error is None


def test_bound_hash_under_a_custom_property_name():
    image = parse_image(record(nti_bound=f"sha512:{SHA512}:{V2}"), bound_hash_property="nti_bound")
    assert image.bound_hash.info_hash_v2 == V2
    assert parse_image(record(nti_bound="x"), bound_hash_property="nti_bound").bound_hash_error


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "is not <os_hash_algo>"),
        (f"sha512:{SHA512}", "is not <os_hash_algo>"),
        (f"sha512:{SHA512}:{V2}:extra", "is not <os_hash_algo>"),
        (f"sha512:{SHA512}:{V2[:-1]}", "v2 info-hash is not 64 hex digits"),
        (f"sha512:{SHA512}:{V2[:-1]}g", "v2 info-hash is not 64 hex digits"),
        (f"sha512:{SHA512}:{'ab' * 20}", "v2 info-hash is not 64 hex digits"),  # a v1 hash
        (f"sha512:{SHA512[:-2]}:{V2}", "is not 128 hex digits of sha512"),
        (f"sha512: {SHA512[1:]}:{V2}", "is not 128 hex digits of sha512"),
        (f"sha256:{SHA512}:{V2}", "is not 64 hex digits of sha256"),
        (f"nosuchhash:{SHA512}:{V2}", "not a hash algorithm"),
        (f"md5:{hashlib.md5(DATA).hexdigest()}:{V2}", "too weak"),  # noqa: S324
        (f"sha1:{hashlib.sha1(DATA).hexdigest()}:{V2}", "too weak"),  # noqa: S324
        (42, "not a string"),
    ],
)
def test_bad_bound_hash_is_a_typed_error_and_never_breaks_the_image(value, reason):
    image = parse_image(record(torrent_bound_hash=value))
    assert image.bound_hash is None
    error = image.bound_hash_error
    assert isinstance(error, exception.InvalidImageMetadata)
    assert "torrent_bound_hash" in str(error) and "6d0f-image" in str(error)
    assert reason in str(error)
    # The torrent properties and the plain download are unaffected.
    assert image.torrent_error is None and image.magnet.info_hash_v1 == V1
    image.require_verifiable()
