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

"""Torrents of images: creation (v1, v2 or hybrid), piece-size choice, and reading them back.

Magnet URIs are plain text and live in :mod:`nova_torrent_images.glance.magnet`; this module is the
libtorrent side of a torrent.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import libtorrent as lt

from nova_torrent_images.glance.magnet import MAGNET_MAX_LENGTH, build_magnet

MIN_PIECE_SIZE = 256 * 1024
MAX_PIECE_SIZE = 16 * 1024 * 1024
TARGET_PIECES = 1500
VERSIONS = ("hybrid", "v1", "v2")


def choose_piece_size(size: int) -> int:
    """A power of two giving about TARGET_PIECES pieces, within 256 KiB..16 MiB.

    Large pieces keep the metadata small (fast magnet start) and the per-piece overhead low;
    small ones spread an image over more peers sooner. v2 torrents need powers of two.
    """
    piece = MIN_PIECE_SIZE
    while piece < MAX_PIECE_SIZE and size / piece > TARGET_PIECES:
        piece *= 2
    return piece


@dataclass(frozen=True)
class TorrentFile:
    """A created torrent: the bencoded .torrent bytes and what identifies it."""

    data: bytes
    info_hash_v1: str | None
    info_hash_v2: str | None
    name: str
    size: int
    piece_length: int
    num_pieces: int

    def magnet(
        self,
        trackers=(),
        peers=(),
        with_name: bool = True,
        max_length: int | None = MAGNET_MAX_LENGTH,
    ) -> str:
        return build_magnet(
            info_hash_v1=self.info_hash_v1,
            info_hash_v2=self.info_hash_v2,
            name=self.name if with_name else None,
            trackers=trackers,
            peers=peers,
            max_length=max_length,
        )


def make_torrent(
    path: str,
    *,
    name: str | None = None,
    piece_size: int | None = None,
    version: str = "hybrid",
    size: int | None = None,
) -> TorrentFile:
    """Create a single-file torrent of ``path`` (hybrid v1+v2 unless ``version`` says).

    ``name`` is the file name inside the torrent (default: the file's own name); publishing
    uses the Glance image id, so the local file name never leaks into the swarm. ``size``:
    only the first ``size`` bytes (a VDI's device may be larger than its image).
    Deterministic: the same bytes, name, piece size and version give the same .torrent
    on every node and every run (no creation date; the creator is this library's name).
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be hybrid, v1 or v2, not {version!r}")
    size = size or os.path.getsize(path)
    if size <= 0:
        raise ValueError(f"{path} is empty; an empty image cannot be a torrent")
    flags = {"hybrid": 0, "v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only}
    piece_size = piece_size or choose_piece_size(size)
    entry = lt.create_file_entry(name or os.path.basename(path), size)
    creator = lt.create_torrent([entry], piece_size, flags[version])
    creator.set_creator("nova-torrent-images")
    # No creation date (libtorrent writes the current time by default): every origin node
    # that publishes an image builds the same .torrent bytes, not only the same info-hash.
    creator.set_creation_date(0)
    # set_piece_hashes reads <parent>/<name in torrent>; hash the real file through a
    # callback-free path by giving the file's directory when the names agree, else a link.
    parent = os.path.dirname(os.path.abspath(path))
    torrent_name = name or os.path.basename(path)
    if torrent_name == os.path.basename(path):
        lt.set_piece_hashes(creator, parent)
    else:
        _hash_under_other_name(creator, path, torrent_name)
    data = lt.bencode(creator.generate())
    info = lt.torrent_info(data)
    hashes = info.info_hashes()
    return TorrentFile(
        data=data,
        info_hash_v1=str(hashes.v1) if hashes.has_v1() else None,
        info_hash_v2=str(hashes.v2) if hashes.has_v2() else None,
        name=info.name(),
        size=size,
        piece_length=info.piece_length(),
        num_pieces=info.num_pieces(),
    )


def _hash_under_other_name(creator: lt.create_torrent, path: str, torrent_name: str) -> None:
    with tempfile.TemporaryDirectory(prefix="nti-hash-") as tmp:
        os.symlink(os.path.abspath(path), os.path.join(tmp, torrent_name))
        lt.set_piece_hashes(creator, tmp)


def load_torrent(data: bytes) -> lt.torrent_info:
    """Parse .torrent bytes (raises ``RuntimeError`` from libtorrent when invalid)."""
    return lt.torrent_info(lt.bdecode(data))


@dataclass(frozen=True)
class TorrentMeta:
    """What a .torrent says about its content, for callers that never touch libtorrent."""

    num_files: int
    total_size: int
    piece_length: int
    num_pieces: int
    info_hash_v1: str | None
    info_hash_v2: str | None


def content_file_sizes(info: lt.torrent_info) -> list[int]:
    """Sizes of a torrent's real files, without the pad files libtorrent adds.

    A v2-only torrent of one file carries a tail pad file up to a whole piece; it is not
    content and never lands on disk.
    """
    files = info.layout()
    return [
        files.file_size(i)
        for i in range(files.num_files())
        if not files.file_flags(i) & lt.file_storage.flag_pad_file
    ]


def describe(data: bytes) -> TorrentMeta:
    """Read .torrent bytes; raise ``ValueError`` when libtorrent cannot parse them."""
    try:
        info = load_torrent(data)
    except (RuntimeError, TypeError) as exc:  # TypeError: bencoded data, not a dict
        raise ValueError(f"not a valid torrent: {exc}") from exc
    hashes = info.info_hashes()
    sizes = content_file_sizes(info)
    return TorrentMeta(
        num_files=len(sizes),
        total_size=sum(sizes),
        piece_length=info.piece_length(),
        num_pieces=info.num_pieces(),
        info_hash_v1=str(hashes.v1) if hashes.has_v1() else None,
        info_hash_v2=str(hashes.v2) if hashes.has_v2() else None,
    )


def pieces_to_bitfield(pieces: Iterable[int]) -> str:
    """Piece indices as a BitTorrent-style bitfield (bit 0 the high bit of byte 0), base64."""
    indices = sorted(set(pieces))
    field = bytearray((indices[-1] // 8 + 1) if indices else 0)
    for p in indices:
        field[p // 8] |= 0x80 >> (p % 8)
    return base64.b64encode(bytes(field)).decode("ascii")


def bitfield_to_pieces(text: str, num_pieces: int) -> list[int]:
    """The piece indices of :func:`pieces_to_bitfield`; ValueError when it is malformed or
    longer than ``num_pieces`` needs."""
    try:
        field = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"not a base64 bitfield: {exc}") from None
    if len(field) > (num_pieces + 7) // 8:
        raise ValueError(f"a bitfield of {len(field)} bytes for {num_pieces} pieces")
    return [
        i * 8 + bit
        for i, byte in enumerate(field)
        if byte
        for bit in range(8)
        if byte & (0x80 >> bit) and i * 8 + bit < num_pieces
    ]
