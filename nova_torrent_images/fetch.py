"""Fetch an image into a destination: by torrent when policy says so, else from Glance.

This is the core action every integration (XenAPI store, libvirt image cache, the CLI)
stands on. Whatever the swarm does, the caller gets either verified bytes at
``destination`` or an exception, never a wrong file: any swarm failure removes the partial
data and, when ``[torrent_images] fallback_to_glance`` is on, streams the image from Glance
with hash verification into the same destination.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception, policy, verify
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.image import ImageInfo
from nova_torrent_images.swarm.engine import SwarmEngine, get_engine
from nova_torrent_images.swarm.transfer import ProgressCallback, SwarmStats, Transfer

LOG = logging.getLogger(__name__)


@dataclass
class FetchResult:
    """How an image reached its destination."""

    image_id: str
    destination: str
    source: str  # "torrent" or "glance"
    seconds: float
    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    bytes_from_glance: int = 0
    fallback_reason: str | None = None
    swarm: SwarmStats | None = None
    resume_data: bytes | None = None  # libtorrent resume data, when the swarm delivered it


def fetch(
    image: ImageInfo,
    destination: str,
    *,
    conf: cfg.ConfigOpts,
    glance: GlanceClient | None,
    engine: SwarmEngine | None = None,
    disk_formats: tuple[str, ...] | None = None,
    progress: ProgressCallback | None = None,
    preallocated: bool = False,
) -> FetchResult:
    """Put the verified bytes of ``image`` at ``destination``: swarm first, then Glance.

    ``destination`` is a path that does not exist yet (it is created), or, with
    ``preallocated``, a file or device the caller owns (a store slot) that is written in
    place and never removed here. Raises
    :class:`~nova_torrent_images.exception.FetchFailed` when the swarm failed and there is
    no fallback (turned off, or no Glance client); errors of the Glance download itself
    come as they are (:class:`IntegrityError`, :class:`GlanceError`, :class:`ImageNotFound`).
    """
    destination = _check_destination(image, destination, preallocated)
    opts = conf.torrent_images
    start = time.monotonic()
    decision = policy.decide(image, conf, disk_formats=disk_formats)
    if image.torrent_error is not None:
        LOG.warning("%s; the image is fetched from Glance", image.torrent_error)

    fallback_reason = None
    if decision:
        try:
            return fetch_by_torrent(
                image,
                destination,
                conf=conf,
                engine=engine,
                progress=progress,
                preallocated=preallocated,
            )
        except exception.TorrentFetchError as exc:
            fallback_reason = str(exc)
        if not opts.fallback_to_glance:
            raise exception.FetchFailed(
                image_id=image.id,
                reason=f"{fallback_reason}; [torrent_images] fallback_to_glance is off",
            )
        LOG.info("Image %s: falling back to a verified Glance download", image.id)
    else:
        LOG.info("Image %s: plain Glance download: %s", image.id, decision.reason)

    if glance is None:
        raise exception.FetchFailed(
            image_id=image.id,
            reason=(fallback_reason or decision.reason) + "; no Glance client to fall back to",
        )
    result = fetch_from_glance(
        image, destination, conf=conf, glance=glance, preallocated=preallocated
    )
    result.seconds = time.monotonic() - start
    result.fallback_reason = fallback_reason
    return result


def _check_destination(image: ImageInfo, destination: str, preallocated: bool) -> str:
    destination = os.path.abspath(destination)
    if preallocated:
        if not os.path.exists(destination):
            raise exception.StoreError(
                reason=f"preallocated destination {destination} of image {image.id} does not exist"
            )
    elif os.path.lexists(destination):
        raise exception.StoreError(
            reason=f"destination {destination} of image {image.id} already exists; "
            "refusing to overwrite it"
        )
    return destination


def fetch_by_torrent(
    image: ImageInfo,
    destination: str,
    *,
    conf: cfg.ConfigOpts,
    engine: SwarmEngine | None = None,
    progress: ProgressCallback | None = None,
    preallocated: bool = False,
) -> FetchResult:
    """Swarm download into ``destination``, verified; no fallback.

    Raises :class:`~nova_torrent_images.exception.TorrentFetchError` (or its subclasses)
    on any failure, after removing the partial data unless the destination is
    ``preallocated`` (then its owner cleans up).
    """
    destination = _check_destination(image, destination, preallocated)
    start = time.monotonic()
    try:
        engine = engine or get_engine(conf)
        transfer = Transfer(engine, image, destination, conf, progress)
        stats = transfer.run()
        if conf.torrent_images.verify_image_hash:
            verify.verify_file(image, destination, exact_size=not preallocated)
    except exception.TorrentImagesError as exc:
        _discard_after_failure(image, destination, preallocated, exc)
        if isinstance(exc, exception.TorrentFetchError):
            raise
        raise exception.TorrentFetchError(image_id=image.id, reason=str(exc)) from exc
    except Exception as exc:  # noqa: BLE001  libtorrent raises bare RuntimeErrors
        LOG.exception("Image %s: swarm download failed unexpectedly", image.id)
        _discard_after_failure(image, destination, preallocated, exc)
        raise exception.TorrentFetchError(
            image_id=image.id, reason=f"unexpected {type(exc).__name__}: {exc}"
        ) from exc
    seconds = time.monotonic() - start
    LOG.info(
        "Image %s: %d MiB from the swarm in %.1fs (%d MiB from peers, %d MiB from "
        "origin seeders, %d peers, %d failed pieces)%s",
        image.id,
        image.size >> 20,
        seconds,
        stats.bytes_from_peers >> 20,
        stats.bytes_from_origin >> 20,
        stats.peers_seen,
        stats.hash_failures,
        ", verified" if conf.torrent_images.verify_image_hash else "",
    )
    return FetchResult(
        image_id=image.id,
        destination=destination,
        source="torrent",
        seconds=seconds,
        bytes_from_peers=stats.bytes_from_peers,
        bytes_from_origin=stats.bytes_from_origin,
        swarm=stats,
        resume_data=transfer.resume_data,
    )


def _discard_after_failure(
    image: ImageInfo, destination: str, preallocated: bool, exc: BaseException
) -> None:
    if not preallocated:
        verify.discard(destination)
    LOG.warning(
        "Image %s: swarm download failed%s: %s",
        image.id,
        "" if preallocated else ", partial data removed",
        exc,
    )


def fetch_from_glance(
    image: ImageInfo,
    destination: str,
    *,
    conf: cfg.ConfigOpts,
    glance: GlanceClient,
    preallocated: bool = False,
) -> FetchResult:
    """Verified Glance HTTP download into ``destination``; no swarm involved."""
    destination = _check_destination(image, destination, preallocated)
    start = time.monotonic()
    written = glance.download(
        image,
        destination,
        verify_hash=conf.torrent_images.verify_image_hash,
        preallocated=preallocated,
    )
    return FetchResult(
        image_id=image.id,
        destination=destination,
        source="glance",
        seconds=time.monotonic() - start,
        bytes_from_glance=written,
    )
