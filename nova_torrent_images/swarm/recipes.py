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

"""How a torrent joins the session: the add-torrent recipes, in one place.

* :func:`download_params` -- a compute host fetching an image by magnet, straight into
  its destination, in upload mode until the metadata is checked;
* :func:`seed_params` -- a compute host seeding a verified base copy from its resume data;
* :func:`origin_params` -- an origin node seeding published data from the .torrent, or
  fetching it again through a web seed when its data is missing;
* :func:`local_resume_data` -- resume data for local bytes nobody downloaded (a snapshot
  the host saved), made through a paused torrent of the session.

None of them is auto-managed or paused: libtorrent's queue would otherwise park a seed or
a download behind others.
"""

from __future__ import annotations

import os
from typing import Any

import libtorrent as lt

from nova_torrent_images.glance.magnet import Magnet
from nova_torrent_images.swarm.torrent import load_torrent


def _flags(extra: int = 0) -> int:
    flags = lt.torrent_flags.default_flags | extra
    return flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused


def info_hashes(magnet: Magnet) -> lt.info_hash_t:
    v1 = lt.sha1_hash(bytes.fromhex(magnet.info_hash_v1)) if magnet.info_hash_v1 else None
    v2 = lt.sha256_hash(bytes.fromhex(magnet.info_hash_v2)) if magnet.info_hash_v2 else None
    if v1 is not None and v2 is not None:
        return lt.info_hash_t(v1, v2)
    return lt.info_hash_t(v1 if v1 is not None else v2)


def download_params(
    magnet: Magnet,
    *,
    name: str,
    destination: str,
    scratch_dir: str,
    trackers: list[str],
    peers: list[tuple[str, int]],
    torrent: bytes | None = None,
) -> lt.add_torrent_params:
    """Join a swarm by magnet; the torrent's one file is ``destination`` itself.

    ``torrent``: the .torrent, already checked against the magnet's info-hashes (the
    origin's stripes serve it), so no peer has to send the metadata first.

    ``scratch_dir`` is the save path: a directory of its own that the caller removes
    afterwards. libtorrent creates the zero-length files of a torrent (and their
    directories) there as soon as the metadata arrives, before the one-file check can
    refuse it; they must never land next to the destination (``/dev``, the image cache).
    """
    params = lt.add_torrent_params()
    if torrent is not None:
        params.ti = load_torrent(torrent)
    else:
        params.info_hashes = info_hashes(magnet)
    params.name = name
    params.save_path = scratch_dir
    params.renamed_files = {0: destination}
    params.trackers = trackers
    params.peers = peers
    # Upload mode: nothing is requested until the metadata is checked against Glance.
    # duplicate_is_error: without it libtorrent hands back the handle of a torrent the
    # session already has (this process seeding the same image, or a v1-only magnet of a
    # hybrid torrent it seeds), and the transfer would treat that seed as its download.
    # no_verify_files: a slot is always new (a download never resumes), so a preallocated
    # one (a VDI's device) holds nothing of the image; checking it would read it all first.
    params.flags = _flags(
        lt.torrent_flags.upload_mode
        | lt.torrent_flags.duplicate_is_error
        | lt.torrent_flags.no_verify_files
    )
    return params


def seed_params(resume_data: bytes, *, path: str, trackers: list[str]) -> lt.add_torrent_params:
    """Seed a verified base copy at ``path`` (a read-only view) from its resume data.

    Seed mode with no file check: a device's size reads as 0, which would otherwise force
    a full recheck; pieces are still hashed lazily the first time a peer asks for them.
    The base copy is whole and verified, whatever the download's libtorrent saw of it (a
    lone host lands the origin's stripes itself, swarm/landing.py): libtorrent turns seed
    mode off when resume data lists a missing piece or a piece not to download, so the
    resume data's piece state is dropped.
    """
    params = lt.read_resume_data(resume_data)
    params.have_pieces = []
    params.piece_priorities = []
    params.unfinished_pieces = {}
    params.save_path = os.path.dirname(path)
    params.renamed_files = {0: path}
    params.trackers = list(dict.fromkeys([*params.trackers, *trackers]))
    params.flags = _flags(lt.torrent_flags.seed_mode | lt.torrent_flags.no_verify_files)
    return params


def origin_params(
    torrent_data: bytes,
    *,
    path: str,
    trackers: list[str],
    web_seed: str | None = None,
) -> lt.add_torrent_params:
    """Seed published data at ``path``, or with ``web_seed`` download it into ``path`` again.

    Published data was verified against Glance when it was written, so a seed starts in
    seed mode (no rehash at start-up; each piece is checked the first time it is served).
    """
    params = lt.add_torrent_params()
    params.ti = load_torrent(torrent_data)
    params.save_path = os.path.dirname(path)
    params.renamed_files = {0: path}
    params.trackers = trackers
    if web_seed is None:
        params.flags = _flags(lt.torrent_flags.seed_mode)
    else:
        params.url_seeds = [web_seed]
        params.flags = _flags()
    return params


def local_resume_data(engine: Any, torrent_data: bytes, path: str, label: str) -> bytes | None:
    """Resume data to seed ``path`` (its bytes already checked) under ``torrent_data``.

    It comes from ``engine``, through a paused torrent in seed mode that is removed again:
    resume data written without a session lacks the v2 hash trees, and peers then get
    nothing. None when libtorrent gave none within 10 seconds.
    """
    params = lt.add_torrent_params()
    params.ti = load_torrent(torrent_data)
    params.save_path = os.path.dirname(os.path.abspath(path))
    params.renamed_files = {0: os.path.abspath(path)}
    flags = lt.torrent_flags.default_flags | lt.torrent_flags.seed_mode | lt.torrent_flags.paused
    params.flags = flags & ~lt.torrent_flags.auto_managed
    watch = engine.add_torrent(params, label=label)
    try:
        watch.handle.save_resume_data(lt.save_resume_flags_t.save_info_dict)
        saved = watch.wait_for(lt.save_resume_data_alert, 10.0)
    finally:
        engine.remove_torrent(watch)
    return saved.resume_data if saved is not None else None
