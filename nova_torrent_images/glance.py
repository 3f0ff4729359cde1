"""Glance v2 through python-glanceclient: image records, verified downloads, properties.

Inside nova-compute the Nova integration uses Nova's own Glance client; this wrapper serves
the command line tools, the origin seeder and the fallback of the library's own fetch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from glanceclient import exc as glance_exc
from glanceclient.v2 import client as glance_v2
from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception, verify
from nova_torrent_images.image import ImageInfo, parse_image

LOG = logging.getLogger(__name__)

NOAUTH_HEADERS = {
    "X-Roles": "admin,member",
    "X-Project-Id": "nova-torrent-images",
    "X-Tenant-Id": "nova-torrent-images",
    "X-User-Id": "nova-torrent-images",
}


class GlanceClient:
    """The few Glance operations this library needs, with typed errors."""

    def __init__(self, client: Any, conf: cfg.ConfigOpts | None = None) -> None:
        self.client = client
        self.conf = conf

    @classmethod
    def for_endpoint(
        cls,
        endpoint: str,
        conf: cfg.ConfigOpts | None = None,
        *,
        token: str | None = None,
        timeout: int = 600,
    ) -> GlanceClient:
        """A client for ``endpoint``; without ``token``, Glance must run with noauth."""
        kwargs: dict[str, Any] = {"timeout": timeout, "token": token or "noauth"}
        if not token:
            kwargs["identity_headers"] = dict(NOAUTH_HEADERS)
        return cls(glance_v2.Client(endpoint=endpoint, **kwargs), conf)

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts) -> GlanceClient:
        opts = conf.torrent_images
        if opts.glance_noauth:
            if not opts.glance_endpoint:
                raise exception.ConfigError(
                    option="glance_endpoint", reason="glance_noauth needs an endpoint"
                )
            return cls.for_endpoint(opts.glance_endpoint, conf, timeout=opts.glance_timeout)
        try:
            auth = ks_loading.load_auth_from_conf_options(conf, nti_conf.GLANCE_GROUP)
            session = ks_loading.load_session_from_conf_options(
                conf, nti_conf.GLANCE_GROUP, auth=auth
            )
        except ks_exc.ClientException as exc:
            raise exception.ConfigError(
                option="glance_endpoint",
                reason=f"not set, and no usable Keystone credentials in "
                f"[{nti_conf.GLANCE_GROUP}] ({exc}); set glance_endpoint (with glance_noauth "
                "for a Glance without Keystone) or the auth_type and credentials",
            ) from exc
        kwargs: dict[str, Any] = {"session": session}
        if opts.glance_endpoint:
            kwargs["endpoint"] = opts.glance_endpoint
        return cls(glance_v2.Client(**kwargs), conf)

    @classmethod
    def for_context(cls, context: Any, conf: cfg.ConfigOpts) -> GlanceClient:
        """A client acting as the request's user (Nova's ``RequestContext``), if any.

        With ``[torrent_images] glance_endpoint`` set, the context's token is used against
        it; otherwise the ``[torrent_images_glance]`` Keystone settings apply.
        """
        opts = conf.torrent_images
        token = getattr(context, "auth_token", None)
        if opts.glance_endpoint and (token or opts.glance_noauth):
            return cls.for_endpoint(
                opts.glance_endpoint,
                conf,
                token=None if opts.glance_noauth else token,
                timeout=opts.glance_timeout,
            )
        return cls.from_conf(conf)

    # -- records -----------------------------------------------------------------------
    def get_image(self, image_id: str) -> dict[str, Any]:
        try:
            return dict(self.client.images.get(image_id))
        except glance_exc.HTTPNotFound:
            raise exception.ImageNotFound(image_id=image_id) from None
        except (glance_exc.BaseException, ks_exc.ClientException, OSError) as exc:
            raise exception.GlanceError(image_id=image_id, reason=str(exc)) from exc

    def image_info(self, image_id: str) -> ImageInfo:
        kwargs = {}
        if self.conf is not None:
            kwargs = {
                "torrentable_property": self.conf.torrent_images.torrentable_property,
                "magnet_property": self.conf.torrent_images.magnet_property,
            }
        return parse_image(self.get_image(image_id), **kwargs)

    def set_properties(self, image_id: str, **properties: str) -> None:
        try:
            self.client.images.update(image_id, **properties)
        except glance_exc.HTTPNotFound:
            raise exception.ImageNotFound(image_id=image_id) from None
        except (glance_exc.BaseException, ks_exc.ClientException) as exc:
            raise exception.GlanceError(image_id=image_id, reason=str(exc)) from exc

    def remove_properties(self, image_id: str, names: Iterable[str]) -> None:
        try:
            self.client.images.update(image_id, remove_props=list(names))
        except (glance_exc.BaseException, ks_exc.ClientException) as exc:
            raise exception.GlanceError(image_id=image_id, reason=str(exc)) from exc

    # -- data --------------------------------------------------------------------------
    def upload(self, image_id: str, data: Any, size: int) -> None:
        """Upload image data (a file object) to an image record Nova created."""
        try:
            self.client.images.upload(image_id, data, image_size=size)
        except glance_exc.HTTPNotFound:
            raise exception.ImageNotFound(image_id=image_id) from None
        except (glance_exc.BaseException, ks_exc.ClientException, OSError) as exc:
            raise exception.GlanceError(image_id=image_id, reason=str(exc)) from exc

    def iter_data(self, image_id: str) -> Iterable[bytes]:
        try:
            body = self.client.images.data(image_id, do_checksum=False)
        except glance_exc.HTTPNotFound:
            raise exception.ImageNotFound(image_id=image_id) from None
        except (glance_exc.BaseException, ks_exc.ClientException, OSError) as exc:
            raise exception.GlanceError(image_id=image_id, reason=str(exc)) from exc
        if body is None:
            raise exception.GlanceError(image_id=image_id, reason="the image has no data")
        return body

    def download(
        self,
        image: ImageInfo,
        destination: str,
        *,
        verify_hash: bool = True,
        preallocated: bool = False,
    ) -> int:
        """Stream the image into ``destination`` and verify it; return bytes written.

        ``destination`` is a new file, or with ``preallocated`` a file or device owned by
        the caller (written in place, never removed here). On any error a new file is
        removed again; the hash is checked before returning, so a mismatch never escapes.
        """
        image.require_verifiable()
        hasher = image.new_hasher()
        written = 0
        start = time.monotonic()
        in_place = preallocated or verify.is_block_device(destination)
        try:
            with open(destination, "r+b" if in_place else "wb") as out:
                for chunk in self.iter_data(image.id):
                    out.write(chunk)
                    hasher.update(chunk)
                    written += len(chunk)
                    if written > image.size:
                        break
                out.flush()
                os.fsync(out.fileno())
            if written != image.size:
                raise exception.IntegrityError(
                    image_id=image.id,
                    algo="length",
                    actual=f"{written} bytes",
                    expected=f"{image.size} bytes",
                )
            digest = hasher.hexdigest()
            if verify_hash and digest != image.hash_value:
                raise exception.IntegrityError(
                    image_id=image.id,
                    algo=image.hash_algo,
                    actual=digest,
                    expected=image.hash_value,
                )
        except BaseException:
            if not in_place:
                verify.discard(destination)
            raise
        LOG.info(
            "Image %s: %d MiB downloaded from Glance over HTTP in %.1fs and verified (%s)",
            image.id,
            written >> 20,
            time.monotonic() - start,
            image.hash_algo,
        )
        return written
