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

"""Simulated hosts for tests and the demo: real libtorrent sessions on 127.0.0.x.

Each :class:`SimulatedHost` has its own loopback address, its own engine and its own
configuration, exactly as a separate compute or Glance host would. Linux routes all of
127.0.0.0/8 to the loopback interface, so no setup is needed to bind 127.0.0.2, .3, ...
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading

import libtorrent as lt
from oslo_config import cfg

from nova_torrent_images import conf as nti_conf
from nova_torrent_images.swarm.engine import SwarmEngine, TorrentWatch
from nova_torrent_images.swarm.torrent import load_torrent
from nova_torrent_images.swarm.transfer import TransferSettings

# libtorrent requests pieces in blocks of this size (its fixed block size).
BLOCK_SIZE = 16 * 1024

_next_octet = itertools.count(0)
_octet_lock = threading.Lock()


def next_loopback_address() -> str:
    """A fresh 127.0.0.x address for a simulated host (2..254, then wraps to 127.0.1.x)."""
    with _octet_lock:
        n = next(_next_octet)
    return f"127.0.{n // 250}.{n % 250 + 2}"


def write_corrupt_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` with the first byte of every 16 KiB block flipped.

    Every block differs, so any block a lying peer serves from this copy fails the
    hash check of whatever piece it lands in, not just the first block of each piece.
    """
    with open(src, "rb") as f, open(dst, "wb") as out:
        while block := f.read(BLOCK_SIZE):
            out.write(bytes([block[0] ^ 0xFF]) + block[1:])


def transfer_settings(scratch_root: str | os.PathLike, **overrides: object) -> TransferSettings:
    """Transfer settings with a test's short timeouts; ``overrides`` replace any of them."""
    values: dict[str, object] = {
        "metadata_timeout": 10,
        "stall_timeout": 10,
        "overall_timeout": 30,
        "progress_interval": 30,
        "trackers": (),
        "scratch_root": str(scratch_root),
    }
    values.update(overrides)
    return TransferSettings(**values)


def make_conf(**overrides: object) -> cfg.ConfigOpts:
    """A fresh ConfigOpts with this library's options and test-friendly overrides.

    Each gets a state directory of its own (locks, resume data, scratch) unless
    ``state_dir`` is given, as a separate host would.
    """
    conf = cfg.ConfigOpts()
    nti_conf.register_opts(conf)
    conf([], project="nova-torrent-images", default_config_files=[])
    defaults = {
        "min_announce_interval": 1,
        "progress_interval": 2,
        "state_dir": tempfile.mkdtemp(prefix="nti-state-"),
    }
    for name, value in {**defaults, **overrides}.items():
        conf.set_override(name, value, group=nti_conf.GROUP)
    return conf


class SimulatedHost:
    """A host with its own address and libtorrent session."""

    def __init__(self, name: str, address: str | None = None, **conf_overrides: object) -> None:
        self.name = name
        self.address = address or next_loopback_address()
        self.conf = make_conf(**conf_overrides)
        # A state directory make_conf created is this host's to remove.
        self._own_state_dir = "state_dir" not in conf_overrides
        self.engine = SwarmEngine(self.conf, listen_interfaces=[f"{self.address}:0"]).start()
        self.seeds: list[TorrentWatch] = []

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.address, self.engine.listen_port

    def seed(
        self,
        torrent_data: bytes,
        data_path: str,
        *,
        trackers: list[str] | None = None,
        lying: bool = False,
        extra_flags: int = 0,
        super_seed: bool = False,
        seed_mode: bool = True,
    ) -> TorrentWatch:
        """Seed ``data_path`` without a full check first (like a verified base copy).

        Seed mode hashes each piece the first time a peer asks for it and stops serving
        pieces that fail, so a corrupted file alone makes no lying peer. With ``lying``
        the host claims every piece through resume data instead and serves whatever the
        file holds: a peer that sends corrupt pieces.
        """
        params = lt.add_torrent_params()
        params.ti = load_torrent(torrent_data)
        params.save_path = os.path.dirname(os.path.abspath(data_path))
        params.renamed_files = {0: os.path.abspath(data_path)}
        if trackers:
            params.trackers = trackers
        # Never paused or auto-managed: a queue could otherwise park the seed.
        flags = lt.torrent_flags.default_flags & ~lt.torrent_flags.auto_managed
        flags &= ~lt.torrent_flags.paused
        if lying or not seed_mode:
            # Claimed through resume data: served without hashing (a verified copy, or a
            # liar). seed_mode instead hashes each piece on its first request.
            params.have_pieces = [True] * params.ti.num_pieces()
            flags |= lt.torrent_flags.no_verify_files
        else:
            flags |= lt.torrent_flags.seed_mode
        if super_seed:
            # Initial seeding: hand each peer pieces nobody else has yet, so an origin
            # sends about one copy and the peers trade the rest.
            flags |= lt.torrent_flags.super_seeding
        params.flags = flags | extra_flags
        watch = self.engine.add_torrent(params, label=f"seed on {self.name}")
        self.seeds.append(watch)
        return watch

    @property
    def peer_key(self) -> str:
        """How a downloader's ``SwarmStats.per_peer`` names this host."""
        return f"{self.address}:{self.engine.listen_port}"

    def uploaded_bytes(self) -> int:
        return sum(w.handle.status().total_payload_upload for w in self.seeds)

    def stop(self) -> None:
        self.engine.shutdown()
        if self._own_state_dir:
            shutil.rmtree(self.conf.torrent_images.state_dir, ignore_errors=True)

    def __enter__(self) -> SimulatedHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
