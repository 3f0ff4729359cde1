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


"""libvirt integration: torrentable images reach Nova's image cache through the swarm.

Why a wrapper: Nova 34 has no plug-in point for image downloads. The only extension left in
:class:`nova.image.glance.GlanceImageServiceV2` is ``_download_handlers``, hard-coded to
``rbd``. Every libvirt image download goes through one funnel, though::

    imagebackend.Image.cache()                holds Nova's lock on the cache file name
      fetch_func_sync(target=_base/<sha1>)    (external, <instances_path>/locks)
        libvirt_utils.fetch_image()
          nova.virt.images.fetch_to_raw()     downloads <sha1>.part, converts/renames it
            nova.virt.images.fetch()
              nova.image.glance.API.download()
                GlanceImageServiceV2.download(context, image_id, data, dst_path, ...)

:func:`install` wraps that last method (the name of this module says what it wraps; the
callers are libvirt's). For a torrentable image the wrapper makes sure this library's base
copy exists (through the one pipeline, :class:`~nova_torrent_images.compute.pipeline.ImagePipeline`,
by swarm and verified, in the ``filesystem`` store), then makes ``dst_path`` a hard link of
it, or a reflink/copy where linking is impossible (another filesystem,
``fs.protected_hardlinks``). Nova then inspects, converts (qcow2 to raw) or renames *its own
name* for the bytes; the base copy keeps the exact downloaded bytes and is what this host
seeds. Nova's converted file is never seeded.

Nova's image cache, respected:

* Locks: Nova holds its external lock on the cache file name around ``fetch_to_raw``; inside
  it :meth:`ImagePipeline.ensure_base` takes this library's own per-image lock
  (``nti-image-<image_id>`` in ``<state_dir>/locks``), so one image is downloaded once per
  host even when the CLI prefetches it at the same time. The order is always Nova's lock,
  then ours; this library never takes Nova's lock, so the two cannot deadlock.
* Names: Nova's cache manager treats any 40-character name in ``_base`` (and
  ``<40 chars>_<suffix>``) as its own and deletes unused ones. This library writes nothing
  into ``_base`` but ``dst_path`` itself, which Nova named; the store's files are
  ``<image_id>.base`` / ``.json`` / ``.part-<n>`` in ``[torrent_images] image_cache_dir``.
* Lifetime: while Nova's cache file is a hard link of a base copy, the store counts the base
  copy as in use and never evicts it; once Nova's cache manager removes its unused file, the
  store's own expiry and quota apply.

Everything else goes through Nova's original method, unchanged: images policy keeps off the
swarm, ``data`` or no ``dst_path`` (streaming callers), image signature verification
(``trusted_certs``, ``[glance] verify_glance_signatures``, default trusted certificates:
Nova's verifier needs the bytes to pass through it), destinations that are not regular
files, and any failure of the swarm path (after it removed what it wrote). Only when the
pipeline says the fallback is off (``[torrent_images] fallback_to_glance = false``, raised
as ``FetchFailed``) does a swarm failure reach Nova, as ``nova.exception.CouldNotFetchImage``.

Concurrency: the same code runs under Nova's eventlet and native-threading modes; waits are
short sleeps and queue polls, which eventlet's monkey patching turns into green waits, and
hashing yields between chunks (see :mod:`nova_torrent_images.swarm.engine`). The launcher
(:mod:`nova_torrent_images.cmd.compute`) imports Nova's compute command first, so Nova's
monkey patching precedes every lock this library creates.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import threading
from collections.abc import Callable, Mapping
from typing import Any

from nova import exception as nova_exception
from nova.image import glance as nova_glance
from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.compute import stores
from nova_torrent_images.compute.pipeline import ImagePipeline
from nova_torrent_images.compute.snapshots import differential
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore
from nova_torrent_images.compute.stores.filesystem import reflink_copy
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import ImageInfo, parse_image
from nova_torrent_images.virt.libvirt import upload as glance_upload

LOG = logging.getLogger(__name__)

_TARGET = nova_glance.GlanceImageServiceV2
_ORIGINAL_ATTR = "_nova_torrent_images_original"

_LOCK = threading.Lock()
_ACTIVE: TorrentDownloads | None = None


def image_from_nova(meta: Mapping[str, Any], conf: cfg.ConfigOpts) -> ImageInfo:
    """:class:`ImageInfo` from the image dict ``GlanceImageServiceV2.show()`` returns.

    Nova's translation keeps the attributes of Glance's image schema at the top level
    (``id``, ``status``, ``size``, ``checksum``, ``os_hash_algo``, ``os_hash_value``, ...;
    ``visibility`` becomes ``is_public``, ``virtual_size``/``tags``/``file`` are dropped) and
    moves custom properties such as ``is_torrentable`` under ``properties``. A Glance whose
    schema lacks ``os_hash_*`` would put them under ``properties``; flattening finds them
    either way, and top-level attributes win over a property of the same name.
    """
    record: dict[str, Any] = dict(meta.get("properties") or {})
    record.update((k, v) for k, v in meta.items() if k != "properties")
    opts = conf.torrent_images
    return parse_image(
        record,
        torrentable_property=opts.torrentable_property,
        magnet_property=opts.magnet_property,
        bound_hash_property=opts.bound_hash_property,
    )


def _verifies_signatures(trusted_certs: Any) -> bool:
    """Whether Nova's download would verify an image signature (see ``_get_verifier``)."""
    glance_opts = nova_glance.CONF.glance
    return bool(
        trusted_certs
        or glance_opts.verify_glance_signatures
        or (
            glance_opts.enable_certificate_validation
            and glance_opts.default_trusted_certificate_ids
        )
    )


def _swarm_refusal(data: Any, dst_path: str | None, trusted_certs: Any) -> str | None:
    """Why this call must stay on Nova's own path, or None when the swarm may serve it."""
    if dst_path is None or data is not None:
        return "the caller streams the data instead of naming a destination file"
    if _verifies_signatures(trusted_certs):
        return "Nova verifies the image signature"
    try:
        mode = os.lstat(dst_path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        return f"destination {dst_path} exists and is not a regular file"
    return None


class TorrentDownloads:
    """The swarm side of Nova's image downloads in one process (one per process)."""

    def __init__(
        self,
        conf: cfg.ConfigOpts,
        *,
        engine: Any = None,
        store: BaseCopyStore | None = None,
    ) -> None:
        """``engine``/``store`` default to the process's engine and ``image_cache_dir``."""
        nti_conf.register_opts(conf)
        self.conf = conf
        self._engine = engine
        self._store = store
        self._pipeline: ImagePipeline | None = None
        self._pipeline_lock = threading.Lock()
        self._warned_copy = False

    # -- this library's own Glance client (snapshots, differential images) -------------
    def glance_configured(self) -> bool:
        """Whether ``[torrent_images] glance_endpoint`` or Keystone settings are given.

        Downloads need no Glance client of ours (Nova's own download is their fallback);
        snapshots through this library and differential images do.
        """
        opts = self.conf.torrent_images
        return bool(opts.glance_endpoint) or bool(self.conf[nti_conf.GLANCE_GROUP].auth_type)

    def glance(self, context: Any) -> GlanceClient:
        """A Glance client acting as the request's user, or ConfigError saying what to set."""
        if not self.glance_configured():
            raise exception.ConfigError(
                option="glance_endpoint",
                reason="not set, and no [torrent_images_glance] auth_type either: snapshots "
                "through this library and differential images need a Glance client of its "
                "own on libvirt hosts (doc/source/snapshots.rst)",
            )
        return GlanceClient.for_context(context, self.conf)

    def pipeline(self) -> ImagePipeline:
        """The store, swarm engine and seeds of this process, recovered on first use.

        With a Glance client of its own it also retries queued snapshot uploads and seeds
        kept snapshots once published (the service's credentials: no user token lasts).
        """
        with self._pipeline_lock:
            if self._pipeline is None:
                store = self._store or stores.open_store(self.conf, "filesystem")
                factory = None
                if self.glance_configured():
                    factory = functools.partial(self.glance, None)
                pipeline = ImagePipeline(
                    self.conf, store, engine=self._engine, glance_factory=factory
                )
                # Drop slots a crash left behind, seed base copies again, start the policy.
                pipeline.start()
                self._pipeline = pipeline
            return self._pipeline

    def start(self) -> None:
        """Recover and resume seeding now rather than at the first download."""
        self.pipeline()

    def shutdown(self) -> None:
        """Stop seeding (the engine is left to its owner)."""
        with self._pipeline_lock:
            pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.shutdown()

    # -- the download ------------------------------------------------------------------
    def download(
        self,
        service: nova_glance.GlanceImageServiceV2,
        context: Any,
        image_id: str,
        data: Any,
        dst_path: str | None,
        trusted_certs: Any,
    ) -> bool:
        """True when ``dst_path`` now holds the verified image; False: use Nova's path.

        Raises ``nova.exception.CouldNotFetchImage`` only when the swarm failed and the
        pipeline allows no fallback.
        """
        refusal = _swarm_refusal(data, dst_path, trusted_certs)
        if refusal is not None:
            self._refuse_delta(service, context, image_id, refusal)
            LOG.debug("Image %s: Nova's own download: %s", image_id, refusal)
            return False
        project_id = getattr(context, "project_id", None)
        try:
            image = image_from_nova(service.show(context, image_id), self.conf)
        except nova_exception.GlanceConnectionFailed as exc:
            # Glance is down: a verified base copy here may stand in (the zones design).
            try:
                image = self.pipeline().offline_image(image_id, project_id, exc)
            except exception.OfflineBootRefused as refused:
                LOG.error("%s", refused)
                raise nova_exception.CouldNotFetchImage(
                    message=str(refused), image_id=image_id
                ) from refused
        except Exception as exc:  # noqa: BLE001  Nova's own download reports it properly
            LOG.warning(
                "Image %s: cannot read its Glance record for the swarm path (%s); "
                "Nova's own download follows",
                image_id,
                exc,
            )
            return False
        if image.parent_id:
            return self._download_delta(context, image, dst_path, project_id)
        try:
            how = self._place(image, dst_path, project_id)
        except exception.NotTorrentable as exc:
            if image.torrent_error is not None:
                LOG.warning("%s; Nova downloads the image from Glance", image.torrent_error)
            else:
                reason = exc.kwargs.get("reason", exc)
                LOG.info("Image %s: Nova's own Glance download: %s", image_id, reason)
            return False
        except exception.FetchFailed as exc:
            LOG.error("Image %s: %s", image_id, exc)
            raise nova_exception.CouldNotFetchImage(message=str(exc), image_id=image_id) from exc
        except exception.TorrentImagesError as exc:
            LOG.warning(
                "Image %s: the swarm path failed: %s; Nova's own download from Glance follows",
                image_id,
                exc,
            )
            return False
        except Exception:  # noqa: BLE001  any bug of ours must not stop a boot
            LOG.warning(
                "Image %s: the swarm path failed unexpectedly; Nova's own download from "
                "Glance follows",
                image_id,
                exc_info=True,
            )
            return False
        LOG.info("Image %s: %s is a %s of the verified base copy", image_id, dst_path, how)
        return True

    # -- differential images (doc/source/snapshots.rst) --------------------------------
    def _download_delta(
        self, context: Any, image: ImageInfo, dst_path: str, project_id: str | None
    ) -> bool:
        """Rebuild a differential image over its parent's base copy; never Nova's download.

        Nova's own download would hand over the delta alone: a qcow2 without its backing
        file, which boots as a disk of zeros where the instance did not write. Any failure
        is therefore Nova's ``CouldNotFetchImage``. Nova gets the whole image as the qcow2
        its Glance record announces (Nova checks the bytes against ``disk_format``).
        """
        try:
            glance = self.glance(context)
            delivery = self.pipeline().ensure_base(
                image,
                glance,
                use=lambda base: self._export_qcow2(image.id, base, dst_path),
                project_id=project_id,
            )
        except Exception as exc:  # noqa: BLE001  typed for Nova, whatever it was
            LOG.error(
                "Image %s is a differential snapshot and could not be rebuilt: %s",
                image.id,
                exc,
                exc_info=not isinstance(exc, exception.TorrentImagesError),
            )
            raise nova_exception.CouldNotFetchImage(
                message=f"image {image.id} is a differential snapshot (its parent "
                f"{image.parent_id}) that could not be rebuilt: {exc}",
                image_id=image.id,
            ) from exc
        LOG.info(
            "Image %s: %s is the whole image rebuilt over its parent, as qcow2 (%s)",
            image.id,
            dst_path,
            "rebuilt now" if delivery.downloaded else "base copy already here",
        )
        return True

    def _refuse_delta(self, service: Any, context: Any, image_id: str, refusal: str) -> None:
        """Raise ``CouldNotFetchImage`` if Nova's own download would be of a delta."""
        try:
            image = image_from_nova(service.show(context, image_id), self.conf)
        except Exception:  # noqa: BLE001  Nova's own download reports it properly
            return
        parent = image.parent_id
        if parent:
            raise nova_exception.CouldNotFetchImage(
                message=f"image {image_id} is a differential snapshot (its parent {parent}) "
                f"and this download stays on Nova's own path ({refusal}), which would give "
                "the delta alone; restore it into a file (or 'nova-torrent-images export')",
                image_id=image_id,
            )

    def _export_qcow2(self, image_id: str, base: BaseCopy, dst_path: str) -> str:
        """Write the whole image (a raw base copy) into ``dst_path`` as qcow2."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst_path)  # never written through: see _link_or_copy
        try:
            differential.convert(base.ref, "raw", dst_path, "qcow2")
            os.chmod(dst_path, 0o644)
            with open(dst_path, "rb") as f:
                utils.fsync(f.fileno())
        except BaseException:
            verify.discard(dst_path)
            raise
        return "qcow2 conversion"

    def _place(self, image: ImageInfo, dst_path: str, project_id: str | None) -> str:
        # Linked under the image's lock: eviction cannot take the base copy meanwhile.
        delivery = self.pipeline().ensure_base(
            image,
            None,
            use=lambda base: self._link_or_copy(image.id, base, dst_path),
            project_id=project_id,
        )
        if not delivery.downloaded:
            LOG.info("Image %s: base copy %s already on this host", image.id, delivery.base.ref)
        return delivery.used

    def _link_or_copy(self, image_id: str, base: BaseCopy, dst_path: str) -> str:
        """Give Nova ``dst_path`` with the base copy's bytes; the base copy stays as it is.

        The old ``dst_path`` (a stale ``.part`` of a crash) is unlinked first, never
        written through: it could share an inode with a base copy.
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst_path)
        try:
            os.link(base.ref, dst_path)
            return "hard link"
        except OSError as exc:
            # Another filesystem (EXDEV) or fs.protected_hardlinks (EPERM): copy instead.
            log = LOG.debug if self._warned_copy else LOG.warning
            self._warned_copy = True
            log(
                "Image %s: cannot hard-link base copy %s to %s (%s); copying it (a reflink "
                "where the filesystem can). Put [torrent_images] image_cache_dir on the "
                "filesystem of Nova's instances_path to share the bytes instead",
                image_id,
                base.ref,
                dst_path,
                exc,
            )
        try:
            reflink_copy(
                base.ref,
                dst_path,
                f"copying base copy {base.ref} of image {image_id} to {dst_path}",
            )
            os.chmod(dst_path, 0o644)  # a file of Nova's, as Nova would have written it
            with open(dst_path, "rb") as f:
                utils.fsync(f.fileno())  # as Nova does: no corrupt backing file after a crash
        except BaseException:
            verify.discard(dst_path)
            raise
        return "copy"


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def download(
        self: nova_glance.GlanceImageServiceV2,
        context: Any,
        image_id: str,
        data: Any = None,
        dst_path: str | None = None,
        trusted_certs: Any = None,
    ) -> Any:
        active = _ACTIVE
        if active is not None and active.download(
            self, context, image_id, data, dst_path, trusted_certs
        ):
            return None  # what Nova's download returns after writing dst_path
        return original(
            self, context, image_id, data=data, dst_path=dst_path, trusted_certs=trusted_certs
        )

    setattr(download, _ORIGINAL_ATTR, original)
    return download


def install(
    conf: cfg.ConfigOpts,
    *,
    engine: Any = None,
    store: BaseCopyStore | None = None,
) -> TorrentDownloads:
    """Route Nova's Glance downloads of torrentable images through the swarm.

    Idempotent: the method is wrapped once; installing again with the same arguments
    returns the active :class:`TorrentDownloads`, with other arguments replaces it.
    """
    global _ACTIVE
    with _LOCK:
        active = _ACTIVE
        # Identity, not ==: a ConfigOpts is a Mapping, equal to any other with equal values.
        if (
            active is not None
            and active.conf is conf
            and active._engine is engine
            and active._store is store
        ):
            return active
        if not hasattr(_TARGET.download, _ORIGINAL_ATTR):
            _TARGET.download = _wrap(_TARGET.download)
        glance_upload.install(installed)  # the saving host keeps its snapshots (upload.py)
        _ACTIVE = TorrentDownloads(conf, engine=engine, store=store)
    if active is not None:
        active.shutdown()
    LOG.info(
        "nova-torrent-images: Glance downloads into files go through the swarm for images "
        "that [torrent_images] mode=%s allows; all others through Nova's own download",
        conf.torrent_images.mode,
    )
    return _ACTIVE


def uninstall() -> None:
    """Restore Nova's own download method and stop the seeds of the active hook."""
    global _ACTIVE
    with _LOCK:
        active, _ACTIVE = _ACTIVE, None
        original = getattr(_TARGET.download, _ORIGINAL_ATTR, None)
        if original is not None:
            _TARGET.download = original
        glance_upload.uninstall()
    if active is not None:
        active.shutdown()


def installed() -> TorrentDownloads | None:
    """The active hook, if :func:`install` was called."""
    return _ACTIVE
