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

"""What a Glance v2 image record says, parsed strictly into :class:`ImageInfo`.

Glance custom properties are free-form strings set by users, so every property this library
acts on is validated here, once. A bad torrent property never raises out of
:func:`parse_image`: it is kept in ``ImageInfo.torrent_error`` so policy can log it and send
the image down the plain Glance path, which needs none of those properties. A bad bound
hash (the publisher's binding of Glance's hash to a v2 torrent) is kept in
``ImageInfo.bound_hash_error`` in the same way: it only means the image is verified as usual.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from oslo_utils import strutils

from nova_torrent_images import exception
from nova_torrent_images.glance.magnet import Magnet, MagnetError, parse_magnet

_HEX = re.compile(r"[0-9a-fA-F]+")
_MD5_HEX = re.compile(r"[0-9a-fA-F]{32}")

DEFAULT_TORRENTABLE_PROPERTY = "is_torrentable"
DEFAULT_MAGNET_PROPERTY = "torrent_magnet"
DEFAULT_BOUND_HASH_PROPERTY = "torrent_bound_hash"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# Too weak to vouch for the bytes in place of reading them (collisions are practical).
WEAK_HASH_ALGOS = frozenset({"md5", "sha1"})

# Glance's core attributes; everything else in a v2 record is a custom property.
_CORE_FIELDS = frozenset(
    {
        "id",
        "name",
        "status",
        "visibility",
        "protected",
        "os_hidden",
        "checksum",
        "os_hash_algo",
        "os_hash_value",
        "owner",
        "size",
        "virtual_size",
        "min_ram",
        "min_disk",
        "disk_format",
        "container_format",
        "created_at",
        "updated_at",
        "tags",
        "direct_url",
        "locations",
        "self",
        "file",
        "schema",
        "stores",
    }
)


@dataclass(frozen=True)
class BoundHash:
    """The publisher's statement: the v2 torrent ``info_hash_v2`` holds exactly the bytes
    whose Glance hash is ``algo``:``value`` (checked by the publisher in one download)."""

    algo: str
    value: str  # lowercase hex
    info_hash_v2: str  # 64 lowercase hex digits

    def __str__(self) -> str:
        return f"{self.algo}:{self.value}:{self.info_hash_v2}"


# A differential image's properties (written by compute/snapshots/differential.py).
PARENT_PROPERTY = "nti_parent_image"
WHOLE_SIZE_PROPERTY = "nti_whole_size"
WHOLE_HASH_PROPERTY = "nti_whole_hash"


@dataclass
class ImageInfo:
    """A Glance image as far as delivery is concerned."""

    id: str
    name: str | None
    status: str | None
    size: int | None
    disk_format: str | None
    container_format: str | None
    hash_algo: str | None
    hash_value: str | None
    is_torrentable: bool | None
    magnet: Magnet | None
    magnet_uri: str | None
    properties: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # as Glance sent it
    # True when Glance was unreachable and this comes from the record kept with a base copy.
    offline: bool = False
    # The first problem found in the torrent properties, if any.
    torrent_error: exception.InvalidImageMetadata | None = None
    # The bound hash property (see BoundHash), and a problem found in it, if any.
    bound_hash: BoundHash | None = None
    bound_hash_error: exception.InvalidImageMetadata | None = None

    @property
    def parent_id(self) -> str | None:
        """The parent image of a differential image (doc/source/snapshots.rst), else None.

        Asked here and nowhere else: the image record decides whether it is a chain.
        """
        value = self.properties.get(PARENT_PROPERTY)
        return str(value) if value else None

    def require_verifiable(self) -> None:
        """Raise unless the image has the size and hash that verification needs."""
        if self.size is None or self.size <= 0:
            raise exception.InvalidImageMetadata(
                image_id=self.id,
                prop="size",
                reason=f"it is {self.size!r}; the image must be active with data",
            )
        if not self.hash_algo or not self.hash_value:
            raise exception.InvalidImageMetadata(
                image_id=self.id,
                prop="os_hash_value",
                reason="Glance has no hash for this image, so its bytes cannot be verified",
            )

    def new_hasher(self) -> hashlib._Hash:
        """A hashlib object for the image's Glance hash algorithm."""
        self.require_verifiable()
        return hashlib.new(self.hash_algo)


def _parse_size(image_id: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise exception.InvalidImageMetadata(
            image_id=image_id, prop="size", reason=f"{value!r} is not an integer"
        ) from None
    if size < 0:
        raise exception.InvalidImageMetadata(
            image_id=image_id, prop="size", reason=f"{size} is negative"
        )
    return size


def _parse_hash(image_id: str, record: Mapping[str, Any]) -> tuple[str | None, str | None]:
    algo, value = record.get("os_hash_algo"), record.get("os_hash_value")
    if algo or value:
        if not algo or not value:
            raise exception.InvalidImageMetadata(
                image_id=image_id,
                prop="os_hash_algo/os_hash_value",
                reason="only one of the two is set",
            )
        if algo not in hashlib.algorithms_available:
            raise exception.InvalidImageMetadata(
                image_id=image_id,
                prop="os_hash_algo",
                reason=f"{algo!r} is not a hash algorithm this host knows",
            )
        expected_len = hashlib.new(algo).digest_size * 2
        if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) != expected_len:
            raise exception.InvalidImageMetadata(
                image_id=image_id,
                prop="os_hash_value",
                reason=f"it is not {expected_len} hex digits of {algo}",
            )
        return algo, value.lower()
    checksum = record.get("checksum")
    if checksum:
        # Images uploaded before Glance had multihash carry only an MD5 checksum.
        if not isinstance(checksum, str) or not _MD5_HEX.fullmatch(checksum):
            raise exception.InvalidImageMetadata(
                image_id=image_id, prop="checksum", reason="it is not 32 hex digits of md5"
            )
        return "md5", checksum.lower()
    return None, None


def parse_bound_hash(image_id: str, prop: str, value: Any) -> BoundHash:
    """Parse ``<algo>:<hex digest>:<64 hex v2 info-hash>``; raise InvalidImageMetadata."""

    def bad(reason: str) -> exception.InvalidImageMetadata:
        return exception.InvalidImageMetadata(image_id=image_id, prop=prop, reason=reason)

    if not isinstance(value, str):
        raise bad(f"it is a {type(value).__name__}, not a string")
    parts = value.split(":")
    if len(parts) != 3:
        raise bad("it is not <os_hash_algo>:<os_hash_value>:<v2 info-hash>")
    algo, digest, info_hash_v2 = parts
    if algo in WEAK_HASH_ALGOS:
        raise bad(f"{algo} is too weak to bind a torrent to")
    if algo not in hashlib.algorithms_available:
        raise bad(f"{algo!r} is not a hash algorithm this host knows")
    expected_len = hashlib.new(algo).digest_size * 2
    if not _HEX.fullmatch(digest) or len(digest) != expected_len:
        raise bad(f"its digest is not {expected_len} hex digits of {algo}")
    if not _HEX64.fullmatch(info_hash_v2):
        raise bad("its v2 info-hash is not 64 hex digits")
    return BoundHash(algo, digest.lower(), info_hash_v2.lower())


def parse_image(
    record: Mapping[str, Any],
    *,
    torrentable_property: str = DEFAULT_TORRENTABLE_PROPERTY,
    magnet_property: str = DEFAULT_MAGNET_PROPERTY,
    bound_hash_property: str = DEFAULT_BOUND_HASH_PROPERTY,
) -> ImageInfo:
    """Parse a Glance v2 image record (a dict, or glanceclient's model).

    Raises :class:`~nova_torrent_images.exception.InvalidImageMetadata` only for problems
    that also stop a plain Glance download from being verified (size, hash); torrent
    property problems are recorded in ``torrent_error``, and a bad bound hash in
    ``bound_hash_error``.
    """
    image_id = str(record.get("id") or "<unknown>")
    size = _parse_size(image_id, record.get("size"))
    algo, value = _parse_hash(image_id, record)
    properties = {k: v for k, v in record.items() if k not in _CORE_FIELDS}

    torrent_error: exception.InvalidImageMetadata | None = None
    is_torrentable: bool | None = None
    raw_flag = record.get(torrentable_property)
    if raw_flag is not None:
        try:
            is_torrentable = strutils.bool_from_string(raw_flag, strict=True)
        except ValueError:
            torrent_error = exception.InvalidImageMetadata(
                image_id=image_id,
                prop=torrentable_property,
                reason=f"{raw_flag!r} is not true or false",
            )

    magnet: Magnet | None = None
    magnet_uri = record.get(magnet_property)
    if magnet_uri is not None:
        try:
            magnet = parse_magnet(magnet_uri)
        except MagnetError as exc:
            torrent_error = torrent_error or exception.InvalidMagnet(
                image_id=image_id, prop=magnet_property, reason=str(exc)
            )

    bound_hash: BoundHash | None = None
    bound_hash_error: exception.InvalidImageMetadata | None = None
    raw_bound = record.get(bound_hash_property)
    if raw_bound is not None:
        try:
            bound_hash = parse_bound_hash(image_id, bound_hash_property, raw_bound)
        except exception.InvalidImageMetadata as exc:
            bound_hash_error = exc

    return ImageInfo(
        id=image_id,
        name=record.get("name"),
        status=record.get("status"),
        size=size,
        disk_format=record.get("disk_format"),
        container_format=record.get("container_format"),
        hash_algo=algo,
        hash_value=value,
        is_torrentable=is_torrentable,
        magnet=magnet,
        magnet_uri=magnet_uri,
        properties=properties,
        record=dict(record),
        torrent_error=torrent_error,
        bound_hash=bound_hash,
        bound_hash_error=bound_hash_error,
    )
