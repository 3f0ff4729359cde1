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
"""Store drivers, loaded by name from the ``nova_torrent_images.stores`` entry points.

========== =================================================== ==========================
name        driver                                              where
========== =================================================== ==========================
xenapi      :class:`~.xenapi.XenAPIStore` (VDIs of an SR)         XenServer compute hosts
filesystem  :class:`~.filesystem.FilesystemStore` (a directory)   libvirt compute hosts
file        :class:`~.output.OutputFileStore` (one output file)   ``fetch --output``
========== =================================================== ==========================

:func:`open_store` is the one place a store is built. Each driver class has
``from_conf(conf, **context)``; the context carries what only the caller has (the virt
driver's XenAPI session, the output path).
"""

from __future__ import annotations

from typing import Any

from oslo_config import cfg
from stevedore import driver

from nova_torrent_images import exception
from nova_torrent_images.compute.stores.base import BaseCopyStore

NAMESPACE = "nova_torrent_images.stores"


def open_store(conf: cfg.ConfigOpts, name: str | None = None, **context: Any) -> BaseCopyStore:
    """The store driver ``name`` (default ``[torrent_images] store``), built from ``conf``."""
    name = name or conf.torrent_images.store
    if not name:
        raise exception.ConfigError(
            option="store", reason="not set; set it to filesystem or xenapi in the config file"
        )
    try:
        manager: driver.DriverManager = driver.DriverManager(NAMESPACE, name, invoke_on_load=False)
    except (RuntimeError, driver.NoMatches) as exc:
        raise exception.ConfigError(
            option="store", reason=f"no store driver {name!r} in entry point namespace {NAMESPACE}"
        ) from exc
    store_class: Any = manager.driver
    return store_class.from_conf(conf, **context)
