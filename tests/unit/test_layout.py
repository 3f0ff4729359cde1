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

"""The layout is the architecture: which packages may import what."""

from __future__ import annotations

import ast
import pathlib

import nova_torrent_images

PACKAGE = pathlib.Path(nova_torrent_images.__file__).parent
# The swarm is the only code that talks to libtorrent; testing/ builds peers for tests.
LIBTORRENT_PACKAGES = ("swarm", "testing")


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_libtorrent_is_imported_only_under_swarm_and_testing():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 50  # the walk found the package
    importers = {
        str(path.relative_to(PACKAGE)) for path in sources if "libtorrent" in _imports(path)
    }
    assert importers, "no module imports libtorrent: the check looks in the wrong place"
    outside = {p for p in importers if p.split("/")[0] not in LIBTORRENT_PACKAGES}
    assert outside == set(), f"libtorrent imported outside {LIBTORRENT_PACKAGES}: {outside}"
    # The grep the README's rule is checked with says the same.
    grep = {
        str(path.relative_to(PACKAGE))
        for path in sources
        if "import libtorrent" in path.read_text()
    }
    assert {p.split("/")[0] for p in grep} <= set(LIBTORRENT_PACKAGES), grep
