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

"""``[xenserver] image_handler = torrent``: this library's handler behind Nova's own loader.

Nova's XenAPI driver (Queens to Ussuri; removed in Victoria) builds its image handler in
``VMOps.__init__``: ``nova.virt.xenapi.image.utils.get_image_handler(name)`` looks the
short name of ``[xenserver] image_handler`` up in ``IMAGE_HANDLERS`` (name to
``module.Class`` under ``nova.virt.xenapi.image``; an unknown name is
``ImageHandlerUnsupported``) and builds the class with no arguments
(``importutils.import_object``). It calls the handler at two sites:

* ``vm_utils._fetch_vhd_image``: ``download_image(context, session, instance, image_id)``
  returns ``{'root': {'uuid': ...}}``; Nova then scans the SR, checks the VDI chain's size
  against the flavor (destroying the VDIs when it is too large), tags the VDI as its image
  cache (``Glance Image <id>``, ``image-id``, ``cached-time``) and clones it for the
  instance (``_create_cached_image``);
* ``VMOps.snapshot``: ``upload_image(context, session, instance, image_id, vdi_uuids)``.

Nova's own handlers raise ``CouldNotFetchImage`` / ``CouldNotUploadImage`` when they fail.
Nova hands only ``vhd`` images to its handler (``vm_utils._fetch_image``) and streams raw
ones through the compute VM itself; this library writes raw images, so :func:`install`
(run by ``nova-torrent-compute`` before Nova parses its configuration):

1. adds ``torrent`` to ``IMAGE_HANDLERS`` and to the choices of ``[xenserver]
   image_handler``, naming :class:`NovaTorrentHandler` as ``nova.virt.xenapi.image.torrent``;
2. wraps ``vm_utils._fetch_image`` so that, with this handler, a raw image takes Nova's
   handler path (``_fetch_vhd_image``: its size check, cache tagging and clone all run)
   to this library, and a vhd image goes to the Nova handler named by ``[torrent_images]
   nova_vhd_image_handler``, as it would without this library.

Nothing of Nova's is copied: its loader and call sites run as they are.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception

LOG = logging.getLogger(__name__)

HANDLER_NAME = "torrent"
_PACKAGE = "nova.virt.xenapi.image"
_MODULE = f"{_PACKAGE}.{HANDLER_NAME}"
_ROUTED = "_nova_torrent_images_routed"


class NovaTorrentHandler:
    """The handler Nova's loader builds for ``[xenserver] image_handler = torrent``.

    Nova builds it with no arguments and its own global configuration; the work is done
    by this library's ``torrent`` handler (swarm first, then a verified Glance download,
    a read-only base copy kept and seeded). Vhd images go to Nova's own handler.
    """

    def __init__(self) -> None:
        from nova_torrent_images.virt.xenapi.handler import load_handler

        conf = cfg.CONF  # nova.conf.CONF is oslo.config's global object
        nti_conf.register_opts(conf)
        self.handler = load_handler(HANDLER_NAME, conf)
        self._vhd_handler_name = conf.torrent_images.nova_vhd_image_handler
        self._vhd_handler: Any = None

    @property
    def vhd_handler(self) -> Any:
        """Nova's own handler for vhd images (``nova_vhd_image_handler``), built once."""
        if self._vhd_handler is None:
            from nova.virt.xenapi.image import utils as image_utils

            if self._vhd_handler_name == HANDLER_NAME:
                raise exception.ConfigError(
                    option="nova_vhd_image_handler",
                    reason="must name one of Nova's own handlers (direct_vhd, vdi_local_dev, "
                    "vdi_remote_stream), not this library's",
                )
            self._vhd_handler = image_utils.get_image_handler(self._vhd_handler_name)
        return self._vhd_handler

    def download_image(
        self, context: Any, session: Any, instance: Any, image_id: str
    ) -> dict[str, dict[str, str]]:
        from nova import exception as nova_exception

        try:
            return self.handler.download_image(context, session, instance, image_id)
        except exception.ImageNotFound as exc:
            LOG.error("Image %s: %s", image_id, exc)
            raise nova_exception.ImageNotFound(image_id=image_id) from exc
        except exception.TorrentImagesError as exc:
            # The swarm and the verified Glance download have both failed by now.
            LOG.error("Image %s could not be fetched: %s", image_id, exc)
            raise nova_exception.CouldNotFetchImage(image_id=image_id) from exc

    def upload_image(
        self, context: Any, session: Any, instance: Any, image_id: str, vdi_uuids: list[str]
    ) -> None:
        from nova import exception as nova_exception

        try:
            self.handler.upload_image(context, session, instance, image_id, vdi_uuids)
        except exception.TorrentImagesError as exc:
            LOG.error("Image %s could not be uploaded: %s", image_id, exc)
            raise nova_exception.CouldNotUploadImage(image_id=image_id) from exc

    def shutdown(self) -> None:
        """Stop seeding before the process exits."""
        self.handler.shutdown()


def available() -> bool:
    """Whether the installed Nova carries the XenAPI driver's image handler loader."""
    try:
        from nova.virt.xenapi.image import utils  # noqa: F401
    except ImportError:
        return False
    return True


def install(conf: cfg.ConfigOpts | None = None) -> None:
    """Make ``[xenserver] image_handler = torrent`` load :class:`NovaTorrentHandler`.

    Idempotent. Run before Nova parses its configuration (the option's choices change).
    """
    conf = cfg.CONF if conf is None else conf
    try:
        import nova.virt.xenapi.image as image_package
        from nova.virt.xenapi import vm_utils
        from nova.virt.xenapi.image import utils as image_utils

        handlers = image_utils.IMAGE_HANDLERS
        fetch_image = vm_utils._fetch_image
        image_type = vm_utils.ImageType
    except (ImportError, AttributeError) as exc:
        raise exception.ConfigError(
            option="image_handler",
            reason=f"this Nova has no XenAPI image handler loader to register with ({exc}); "
            "[xenserver] image_handler = torrent needs Nova's XenAPI driver (Queens to Ussuri)",
        ) from exc
    _add_choice(conf)
    module = sys.modules[__name__]
    sys.modules.setdefault(_MODULE, module)
    setattr(image_package, HANDLER_NAME, module)
    handlers[HANDLER_NAME] = f"{HANDLER_NAME}.{NovaTorrentHandler.__name__}"
    if not getattr(fetch_image, _ROUTED, False):
        vm_utils._fetch_image = _route(fetch_image, image_type)
    LOG.info("nova-torrent-images: [xenserver] image_handler = %s is available", HANDLER_NAME)


_INSTALLED_ON: list[cfg.ConfigOpts] = []  # the configurations whose choices include ours


def _add_choice(conf: cfg.ConfigOpts) -> None:
    """Add ``torrent`` to the choices of Nova's ``[xenserver] image_handler``.

    The option is registered again, as Nova's ``list_opts()`` declares it plus one choice
    (oslo.config has no public way to change a registered option's choices).
    """
    if any(done is conf for done in _INSTALLED_ON):
        return
    from nova.conf import xenserver as nova_xenserver_conf

    opt = next(
        (
            o
            for opts in nova_xenserver_conf.list_opts().values()
            for o in opts
            if o.dest == "image_handler"
        ),
        None,
    )
    if opt is None:
        raise exception.ConfigError(
            option="image_handler",
            reason="this Nova declares no [xenserver] image_handler option",
        )
    choices = dict(getattr(opt.type, "choices", None) or {})
    choices[HANDLER_NAME] = (
        "nova-torrent-images: raw images from the BitTorrent swarm straight into a VDI, "
        "kept as a read-only base copy and seeded, a verified Glance download as fallback; "
        "vhd images through [torrent_images] nova_vhd_image_handler."
    )
    ours = cfg.StrOpt(opt.name, default=opt.default, choices=list(choices.items()), help=opt.help)
    try:
        conf.unregister_opt(opt, group="xenserver")  # by name: Nova's or an earlier ours
        conf.register_opt(ours, group="xenserver")
    except cfg.ArgsAlreadyParsedError as exc:
        raise exception.ConfigError(
            option="image_handler",
            reason="nova_torrent_images.virt.xenapi.nova_loader.install() must run before Nova "
            "parses its configuration (nova-torrent-compute does this)",
        ) from exc
    _INSTALLED_ON.append(conf)


def _route(original: Any, image_type: Any) -> Any:
    """``vm_utils._fetch_image`` sending raw images to this handler, vhd ones to Nova's."""

    @functools.wraps(original)
    def _fetch_image(
        context: Any,
        session: Any,
        instance: Any,
        name_label: str,
        image_id: str,
        fetched_type: Any,
        image_handler: Any,
    ) -> Any:
        if isinstance(image_handler, NovaTorrentHandler):
            if fetched_type == image_type.DISK_RAW:
                # Nova's handler path (size check, cache tags, clone) with our handler.
                fetched_type = image_type.DISK_VHD
            elif fetched_type == image_type.DISK_VHD:
                image_handler = image_handler.vhd_handler
        return original(
            context, session, instance, name_label, image_id, fetched_type, image_handler
        )

    setattr(_fetch_image, _ROUTED, True)
    return _fetch_image
