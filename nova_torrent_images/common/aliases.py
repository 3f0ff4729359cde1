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
"""Former import paths that operators, Nova configurations or other packages name.

The layout of 2026-12 (doc/source/architecture.rst) moved every module into a package of
its role. These old paths keep working, loading the module where it now is, on first
import only (no module of Nova's is loaded by importing this package); the release notes
list them. New code uses the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

PACKAGE = "nova_torrent_images"

#: former path (package-relative) -> where it is now; a former package's modules follow it.
FORMER_PATHS = {
    "handler": "virt.xenapi.handler",
    "nova_hooks": "virt",
    "nova_hooks.xenapi": "virt.xenapi.nova_loader",
    "nova_hooks.glance_download": "virt.libvirt.download",
    "nova_hooks.glance_upload": "virt.libvirt.upload",
    "pipeline": "compute.pipeline",
    "stores": "compute.stores",
}


def current_path(name: str) -> str | None:
    """Where the module once named ``name`` (absolute) is now, or None."""
    if not name.startswith(PACKAGE + "."):
        return None
    parts = name[len(PACKAGE) + 1 :].split(".")
    for cut in range(len(parts), 0, -1):
        target = FORMER_PATHS.get(".".join(parts[:cut]))
        if target is not None:
            return ".".join([PACKAGE, target, *parts[cut:]])
    return None


class _Loader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        # The module itself, not a copy: one set of globals whichever name imported it.
        return importlib.import_module(self.target)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module ran under its current name."""


class FormerPathFinder(importlib.abc.MetaPathFinder):
    """Finds the former paths in :data:`FORMER_PATHS` (installed by the package)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001  the finder protocol
        current = current_path(fullname)
        if current is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(current))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, FormerPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, FormerPathFinder())  # before the path finder: a former
        # package name (nova_hooks) is a directory of today (virt) whose children differ
