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

"""Typed errors of nova-torrent-images.

Every message names the image (and, where one is involved, the setting) so an operator can
act on it from the log line alone. ``TorrentFetchError`` subclasses are the failures after
which a fetch falls back to plain Glance; ``IntegrityError`` is never swallowed silently.
"""

from __future__ import annotations


class TorrentImagesError(Exception):
    """Base class of every error raised by this library."""

    msg_fmt = "An unknown error occurred."

    def __init__(self, message: str | None = None, **kwargs: object) -> None:
        self.kwargs = kwargs
        if message is None:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError, ValueError):
                # A wrong format key is a bug of ours; keep the raw template rather than
                # hiding the original error behind a formatting one.
                message = f"{self.msg_fmt} {kwargs!r}"
        super().__init__(message)


class ConfigError(TorrentImagesError):
    msg_fmt = "Invalid setting [torrent_images] %(option)s: %(reason)s"


class InvalidImageMetadata(TorrentImagesError):
    """A Glance property of the image is missing or malformed."""

    msg_fmt = "Image %(image_id)s: property %(prop)s is invalid: %(reason)s"


class InvalidMagnet(InvalidImageMetadata):
    msg_fmt = "Image %(image_id)s: property %(prop)s is not a usable magnet URI: %(reason)s"


class ImageNotFound(TorrentImagesError):
    msg_fmt = "Image %(image_id)s was not found in Glance"


class GlanceError(TorrentImagesError):
    msg_fmt = "Glance request for image %(image_id)s failed: %(reason)s"


class GlanceForbidden(GlanceError):
    """Glance refused the caller (HTTP 401 or 403); retrying would not help."""

    msg_fmt = (
        "Glance refused to %(operation)s image %(image_id)s: %(reason)s; "
        "check the request's token or the [torrent_images_glance] credentials (or "
        "[torrent_images] glance_noauth), and that the project may see the image"
    )


class GlanceUnavailable(GlanceError):
    """Glance kept failing transiently (5xx, 408/429, connection errors, timeouts)."""

    msg_fmt = (
        "Glance could not %(operation)s image %(image_id)s after %(attempts)s attempt(s) "
        "([torrent_images] glance_retries, glance_retry_delay): %(reason)s; "
        "check [torrent_images] %(option)s"
    )


class OfflineBootRefused(GlanceError):
    """Glance is unreachable and the base copy on this host may not stand in for it."""

    msg_fmt = (
        "Image %(image_id)s cannot be booted while Glance is unreachable: %(reason)s "
        "([torrent_images] offline_boot_max_age); Glance said: %(glance_error)s"
    )


class ImageNotActive(TorrentImagesError):
    """Glance answers, and the image is not ``active`` (deactivated, pending delete...)."""

    msg_fmt = (
        "Image %(image_id)s is %(status)s in Glance, not active: it is not booted, not even "
        "from the base copy this host holds"
    )


class IntegrityError(TorrentImagesError):
    """Bytes do not match what Glance says the image is. Never handed on."""

    msg_fmt = (
        "Image %(image_id)s: %(algo)s of the downloaded data is %(actual)s, "
        "Glance says %(expected)s; the data was discarded"
    )


class TorrentFetchError(TorrentImagesError):
    """The swarm could not deliver the image; the caller may fall back to Glance."""

    msg_fmt = "Image %(image_id)s: torrent fetch failed: %(reason)s"


class MetadataTimeout(TorrentFetchError):
    msg_fmt = (
        "Image %(image_id)s: no peer sent the torrent metadata within %(timeout)ss "
        "([torrent_images] metadata_timeout); peers seen: %(peers)s"
    )


class TorrentStalled(TorrentFetchError):
    msg_fmt = (
        "Image %(image_id)s: download made no progress for %(timeout)ss "
        "([torrent_images] stall_timeout) at %(percent).1f%% with %(peers)s peers"
    )


class TorrentTimeout(TorrentFetchError):
    msg_fmt = (
        "Image %(image_id)s: download did not finish within %(timeout)ss "
        "([torrent_images] overall_timeout), reached %(percent).1f%%"
    )


class TorrentMismatch(TorrentFetchError):
    """The torrent behind the magnet does not describe the Glance image."""

    msg_fmt = "Image %(image_id)s: the torrent does not match the image: %(reason)s"


class TorrentStorageError(TorrentFetchError):
    msg_fmt = "Image %(image_id)s: libtorrent could not write %(path)s: %(reason)s"


class NotTorrentable(TorrentImagesError):
    msg_fmt = "Image %(image_id)s is not delivered by torrent: %(reason)s"


class StoreError(TorrentImagesError):
    msg_fmt = "Image store error: %(reason)s"


class StoreFull(StoreError):
    msg_fmt = (
        "Not enough space for image %(image_id)s in %(store)s: "
        "need %(needed)s bytes, %(available)s bytes free"
    )


class FetchFailed(TorrentImagesError):
    """Neither the swarm nor the Glance fallback produced a verified image."""

    msg_fmt = "Image %(image_id)s could not be fetched: %(reason)s"


class DeltaChainError(TorrentImagesError):
    """A differential snapshot could not be rebuilt: a parent is missing, a delta corrupt.

    Nothing half-built is left: the restore's slot is aborted.
    """

    msg_fmt = "Differential image %(image_id)s (chain %(chain)s) cannot be restored: %(reason)s"


class UnsafeImage(TorrentImagesError):
    """Untrusted image data failed a format check; qemu-img never opened it."""

    msg_fmt = (
        "Image %(image_id)s: its data failed the format check '%(check)s' (%(reason)s); "
        "it was not handed to qemu-img, and was discarded"
    )


class NotPublishable(TorrentImagesError):
    """The image cannot be published as a torrent; nothing was changed."""

    msg_fmt = "Image %(image_id)s cannot be published: %(reason)s"


class PublishError(TorrentImagesError):
    msg_fmt = "Image %(image_id)s: publishing failed: %(reason)s"


class MagnetTooLong(PublishError):
    msg_fmt = (
        "Image %(image_id)s: the magnet is %(length)s characters even with one tracker and "
        "one peer hint, more than the %(limit)s Glance allows in a property; use shorter "
        "[torrent_images] origin_trackers / origin_advertise_addresses"
    )


class RegistryError(TorrentImagesError):
    msg_fmt = "Origin registry %(path)s ([torrent_images] origin_state_dir): %(reason)s"


class TrackerError(TorrentImagesError):
    msg_fmt = "Tracker whitelist %(path)s ([torrent_images] %(option)s): %(reason)s"


class LocationError(TorrentImagesError):
    """One of the image's locations (or a zone cache) could not be read; the next is tried."""

    msg_fmt = "Image %(image_id)s: location %(location)s failed: %(reason)s"


class NoLocations(LocationError):
    msg_fmt = "Image %(image_id)s: no location this host can read (%(reason)s)"


class StripeError(TorrentImagesError):
    """An origin node's stripe server failed a request; the swarm goes on without it."""

    msg_fmt = "Image %(image_id)s: origin stripes at %(url)s failed: %(reason)s"


class OriginStatusError(TorrentImagesError):
    """``origin-status`` cannot ask the image's origin nodes (not published, no node)."""

    msg_fmt = "Image %(image_id)s: origin status: %(reason)s"
