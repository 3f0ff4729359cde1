"""Torrents and magnet URIs: strict parsing, building, and torrent creation.

A magnet in Glance metadata is the trust root of a swarm download, so parsing is strict and
only the parts we understand are kept: info-hashes, trackers and origin peer hints. Nothing
in a magnet is fetched or executed; ``ws=``/``as=``/``xs=`` style sources are dropped, so
compute hosts never use a web seed a magnet points at.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field

import libtorrent as lt

MAGNET_MAX_LENGTH = 255  # Glance limits a property value to 255 characters.
MIN_PIECE_SIZE = 256 * 1024
MAX_PIECE_SIZE = 16 * 1024 * 1024
TARGET_PIECES = 1500
TRACKER_SCHEMES = ("http", "https", "udp")

_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")
_BASE32_32 = re.compile(r"^[A-Za-z2-7]{32}$")
_BTMH_SHA256 = re.compile(r"^1220([0-9a-fA-F]{64})$")


class MagnetError(ValueError):
    """A magnet URI is malformed; the message says which part and why."""


@dataclass(frozen=True)
class Magnet:
    """The parts of a magnet URI this library acts on."""

    info_hash_v1: str | None = None  # 40 lowercase hex digits (SHA-1)
    info_hash_v2: str | None = None  # 64 lowercase hex digits (SHA-256)
    name: str | None = None
    trackers: tuple[str, ...] = ()
    peers: tuple[tuple[str, int], ...] = field(default=())

    @property
    def best_hash(self) -> str:
        """The strongest info-hash present, as hex (used for naming and logging)."""
        return self.info_hash_v2 or self.info_hash_v1 or ""

    def info_hashes(self) -> lt.info_hash_t:
        v1 = lt.sha1_hash(bytes.fromhex(self.info_hash_v1)) if self.info_hash_v1 else None
        v2 = lt.sha256_hash(bytes.fromhex(self.info_hash_v2)) if self.info_hash_v2 else None
        if v1 is not None and v2 is not None:
            return lt.info_hash_t(v1, v2)
        return lt.info_hash_t(v1 if v1 is not None else v2)

    def to_uri(self) -> str:
        return build_magnet(
            info_hash_v1=self.info_hash_v1,
            info_hash_v2=self.info_hash_v2,
            name=self.name,
            trackers=self.trackers,
            peers=self.peers,
            max_length=None,
        )


def _parse_peer(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise MagnetError(f"x.pe {value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        # Not an IP literal: accept a plain DNS name, nothing else.
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
            raise MagnetError(f"x.pe {value!r} has an invalid host") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise MagnetError(f"x.pe {value!r} has an invalid port")
    return host, int(port_text)


def _parse_tracker(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in TRACKER_SCHEMES:
        raise MagnetError(f"tracker {value!r} must use one of {', '.join(TRACKER_SCHEMES)}")
    if not parsed.hostname:
        raise MagnetError(f"tracker {value!r} has no host")
    try:
        parsed.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise MagnetError(f"tracker {value!r} has an invalid port") from None
    return value


def parse_magnet(uri: str) -> Magnet:
    """Parse and validate a magnet URI; raise :class:`MagnetError` on anything off."""
    if not isinstance(uri, str) or not uri:
        raise MagnetError("it is empty")
    if not uri.startswith("magnet:?"):
        raise MagnetError("it does not start with 'magnet:?'")
    try:
        pairs = urllib.parse.parse_qsl(uri[len("magnet:?") :], strict_parsing=True)
    except ValueError as exc:
        raise MagnetError(f"its query is malformed ({exc})") from None
    v1 = v2 = name = None
    trackers: list[str] = []
    peers: list[tuple[str, int]] = []
    for key, value in pairs:
        if key == "xt":
            if value.startswith("urn:btih:"):
                digest = value[len("urn:btih:") :]
                if _HEX40.match(digest):
                    new_v1 = digest.lower()
                elif _BASE32_32.match(digest):
                    new_v1 = binascii.hexlify(base64.b32decode(digest.upper())).decode()
                else:
                    raise MagnetError("urn:btih must be 40 hex digits or 32 base32 characters")
                if v1 is not None and v1 != new_v1:
                    raise MagnetError("it has two different urn:btih hashes")
                v1 = new_v1
            elif value.startswith("urn:btmh:"):
                match = _BTMH_SHA256.match(value[len("urn:btmh:") :])
                if not match:
                    raise MagnetError("urn:btmh must be '1220' followed by 64 hex digits")
                if v2 is not None and v2 != match.group(1).lower():
                    raise MagnetError("it has two different urn:btmh hashes")
                v2 = match.group(1).lower()
            else:
                raise MagnetError(f"xt {value!r} is neither urn:btih nor urn:btmh")
        elif key == "tr":
            trackers.append(_parse_tracker(value))
        elif key == "x.pe":
            peers.append(_parse_peer(value))
        elif key == "dn":
            name = value
        # Any other key (ws, as, xs, kt, so, ...) is ignored on purpose: it would make
        # hosts fetch from places Glance metadata does not vouch for.
    if v1 is None and v2 is None:
        raise MagnetError("it has no xt=urn:btih or xt=urn:btmh info-hash")
    return Magnet(v1, v2, name, tuple(dict.fromkeys(trackers)), tuple(dict.fromkeys(peers)))


def _format_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_magnet(
    *,
    info_hash_v1: str | None = None,
    info_hash_v2: str | None = None,
    name: str | None = None,
    trackers: tuple[str, ...] | list[str] = (),
    peers: tuple[tuple[str, int], ...] | list[tuple[str, int]] = (),
    max_length: int | None = MAGNET_MAX_LENGTH,
) -> str:
    """Build a magnet URI. Raise :class:`MagnetError` if it exceeds ``max_length``.

    The v2 hash alone identifies a hybrid torrent, so callers short of space can leave out
    the v1 hash, the name or hints; this function never drops parts by itself.
    """
    if not info_hash_v1 and not info_hash_v2:
        raise MagnetError("a magnet needs at least one info-hash")
    parts = []
    if info_hash_v1:
        parts.append(f"xt=urn:btih:{info_hash_v1.lower()}")
    if info_hash_v2:
        parts.append(f"xt=urn:btmh:1220{info_hash_v2.lower()}")
    if name:
        parts.append("dn=" + urllib.parse.quote(name, safe=""))
    parts.extend("tr=" + urllib.parse.quote(t, safe="") for t in trackers)
    parts.extend("x.pe=" + urllib.parse.quote(_format_peer(h, p), safe=":[]") for h, p in peers)
    uri = "magnet:?" + "&".join(parts)
    if max_length is not None and len(uri) > max_length:
        raise MagnetError(f"the magnet is {len(uri)} characters, more than {max_length}")
    parse_magnet(uri)  # what we publish must parse back
    return uri


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
    trackers: tuple[str, ...] | list[str] = (),
    web_seeds: tuple[str, ...] | list[str] = (),
    comment: str | None = None,
    private: bool = False,
) -> TorrentFile:
    """Create a single-file torrent of ``path`` (hybrid v1+v2 unless ``version`` says).

    ``name`` is the file name inside the torrent (default: the file's own name); publishing
    uses the Glance image id, so the local file name never leaks into the swarm.
    """
    if version not in ("hybrid", "v1", "v2"):
        raise ValueError(f"version must be hybrid, v1 or v2, not {version!r}")
    size = os.path.getsize(path)
    if size <= 0:
        raise ValueError(f"{path} is empty; an empty image cannot be a torrent")
    flags = {"hybrid": 0, "v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only}
    piece_size = piece_size or choose_piece_size(size)
    entry = lt.create_file_entry(name or os.path.basename(path), size)
    creator = lt.create_torrent([entry], piece_size, flags[version])
    for tier, url in enumerate(trackers):
        creator.add_tracker(url, tier)
    for url in web_seeds:
        creator.add_url_seed(url)
    if comment:
        creator.set_comment(comment)
    creator.set_creator("nova-torrent-images")
    creator.set_priv(private)
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
