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
"""The image's swarm as a source: pieces straight into the slot, then the Glance hash check."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.compute.sources.base import FetchResult, ProgressCallback
from nova_torrent_images.compute.stores.base import Slot
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import ImageInfo

if TYPE_CHECKING:  # libtorrent is loaded only when a swarm download runs
    from nova_torrent_images.swarm.engine import SwarmEngine
    from nova_torrent_images.swarm.transfer import TransferSettings

LOG = logging.getLogger(__name__)


class SwarmSource:
    """The image's swarm: pieces straight into the slot, then the Glance hash check."""

    name = "torrent"

    def __init__(
        self,
        engine_factory: Callable[[], SwarmEngine],
        settings: TransferSettings,
        *,
        verify_hash: bool,
        trust_torrent_root: bool = False,
        will_seed: bool = True,
        glance: GlanceClient | None = None,
    ):
        """``glance``: fills in what the swarm cannot deliver (its origin gone, a stall),
        keeping every verified piece (:mod:`nova_torrent_images.swarm.glance_fill`)."""
        self._engine_factory = engine_factory
        self.settings = settings
        self.verify_hash = verify_hash
        self.trust_torrent_root = trust_torrent_root  # [torrent_images] trust_torrent_root
        # A host that will not seed the image hands over what only it has before leaving.
        self.will_seed = will_seed
        self.glance = glance

    def untrusted_root(self, image: ImageInfo) -> str | None:
        """Why the whole-image hash check must run after a swarm download; None: it need not.

        It need not when libtorrent's piece checks already prove the bytes are Glance's:
        the magnet names a v2 torrent only (so libtorrent accepted only metadata hashing to
        that SHA-256 info-hash, and passed every piece on its Merkle tree), and the bound
        hash says the publisher built exactly that torrent from bytes it verified against
        the very hash Glance has for the image now. A v1 (SHA-1) hash never counts, and
        neither does a hybrid torrent: libtorrent passes a hybrid piece on its SHA-1 alone
        while the piece's v2 hashes are still unknown.
        """
        if not self.trust_torrent_root:
            return "trust_torrent_root is off"
        bound = image.bound_hash
        if bound is None:
            if image.bound_hash_error is not None:
                return str(image.bound_hash_error)
            return "the image has no bound hash property"
        if (bound.algo, bound.value) != (image.hash_algo, (image.hash_value or "").lower()):
            return f"the bound hash is not Glance's {image.hash_algo} of the image"
        v2 = image.magnet.info_hash_v2 if image.magnet is not None else None
        if v2 is None:
            return "the magnet names no v2 torrent (a v1 SHA-1 info-hash is never trusted)"
        if image.magnet.info_hash_v1 is not None:
            return "the magnet names a hybrid torrent (its pieces may pass on SHA-1 alone)"
        if bound.info_hash_v2 != v2:
            return "the bound hash names another v2 torrent than the magnet"
        return None

    def fetch_into(
        self, image: ImageInfo, slot: Slot, progress: ProgressCallback | None = None
    ) -> FetchResult:
        """Raise :class:`~nova_torrent_images.exception.TorrentFetchError` on any failure."""
        from nova_torrent_images.swarm.transfer import Transfer  # libtorrent: only when used

        start = time.monotonic()
        try:
            # Bytes that arrive in order (the origin's stripes) are hashed as they come and
            # never read back; only the rest is read for the whole-image check.
            needed = self.verify_hash and self.untrusted_root(image) is not None
            check = verify.StreamingCheck(image) if needed else None
            glance = self.glance
            fill = None
            if glance is not None:

                def fill(start: int, end: int) -> bytes:
                    return glance.read_range(image.id, start, end)

            transfer = Transfer(
                self._engine_factory(), image, slot.path, self.settings, progress, check, fill
            )
            stats = transfer.run()
            try:
                checked = self._verify(image, slot, check)
            except BaseException:
                transfer.leave()
                raise
            # The swarm kept the pieces while the image was verified; libtorrent lets go of
            # the slot before the store commits it.
            transfer.leave(share=not self.will_seed)
        except exception.TorrentFetchError:
            raise
        except exception.TorrentImagesError as exc:
            raise exception.TorrentFetchError(image_id=image.id, reason=str(exc)) from exc
        except Exception as exc:  # noqa: BLE001  libtorrent raises bare RuntimeErrors
            LOG.exception("Image %s: swarm download failed unexpectedly", image.id)
            raise exception.TorrentFetchError(
                image_id=image.id, reason=f"unexpected {type(exc).__name__}: {exc}"
            ) from exc
        seconds = time.monotonic() - start
        LOG.info(
            "Image %s: %d MiB from the swarm in %.1fs (%d MiB from peers, %d MiB from "
            "origin seeders, %d MiB filled in by Glance, %d peers, %d failed pieces), %s",
            image.id,
            image.size >> 20,
            seconds,
            stats.bytes_from_peers >> 20,
            stats.bytes_from_origin >> 20,
            stats.bytes_from_glance >> 20,
            stats.peers_seen,
            stats.hash_failures,
            checked,
        )
        return FetchResult(
            image_id=image.id,
            destination=slot.path,
            source=self.name,
            seconds=seconds,
            bytes_from_peers=stats.bytes_from_peers,
            bytes_from_origin=stats.bytes_from_origin,
            bytes_from_glance=stats.bytes_from_glance,
            fallback_reason=stats.glance_fill_reason,
            swarm=stats,
            resume_data=transfer.resume_data,
        )

    def _verify(self, image: ImageInfo, slot: Slot, check: verify.StreamingCheck | None) -> str:
        """The whole-image check of a finished download; says how it was checked."""
        if not self.verify_hash:
            return "unverified"
        untrusted = self.untrusted_root(image)
        if untrusted is None:
            # The torrent's size was checked against Glance before any piece; a new
            # file's length is a stat, not a read.
            if not slot.preallocated and not verify.is_block_device(slot.path):
                verify.check_digest(image, os.path.getsize(slot.path), None)
            LOG.info(
                "Image %s: whole-image %s read skipped (trust_torrent_root): libtorrent "
                "checked every piece of the v2 torrent %s, which the publisher bound to "
                "Glance's %s of the image (bound hash property)",
                image.id,
                image.hash_algo,
                image.magnet.info_hash_v2,
                image.hash_algo,
            )
            return "trusted torrent root"
        if self.trust_torrent_root:
            LOG.info("Image %s: verifying the whole image: %s", image.id, untrusted)
        check.finish(slot.path, exact_size=not slot.preallocated)
        checked = "verified"
        if check.streamed:
            checked += f" ({check.streamed >> 20} MiB hashed during the download)"
        return checked
