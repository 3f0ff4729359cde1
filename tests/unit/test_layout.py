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

"""The layout is the architecture (doc/source/architecture.rst): which packages may import what.

Layers, lowest first; a package imports only from its own layer's packages or lower ones:

    exception, common  ->  conf  ->  glance  ->  swarm  ->  compute | origin  ->  virt
    ->  testing  ->  demo  ->  cmd

``compute`` and ``origin`` are side by side: neither imports the other. Every import counts,
also those inside functions and under ``TYPE_CHECKING``. No two modules import each other.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

import nova_torrent_images

PACKAGE = pathlib.Path(nova_torrent_images.__file__).parent
NAME = "nova_torrent_images"
# The swarm is the only code that talks to libtorrent; testing/ builds peers for tests.
LIBTORRENT_PACKAGES = ("swarm", "testing")
LAYERS = {
    "exception": 0,
    "common": 0,
    "conf": 1,
    "glance": 2,
    "swarm": 3,
    "compute": 4,
    "origin": 4,
    "virt": 5,
    "testing": 6,
    "demo": 7,
    "cmd": 8,
}
SIBLINGS = {frozenset({"compute", "origin"})}  # same layer, and no arrow either way
TOP_LEVEL_FILES = {"__init__.py", "exception.py"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return found


def _imports(path: pathlib.Path, *, annotations: bool = True) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved).

    ``annotations=False`` leaves out imports under ``if TYPE_CHECKING:``.
    """
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = set() if annotations else _type_checking_nodes(tree)
    names = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            submodules = {f"{origin}.{a.name}" for a in node.names} & _modules()
            # "from pkg import module" depends on the module, not on pkg's __init__
            names.update(submodules or {origin})
            if len(submodules) < len(node.names):
                names.add(origin)
    return names


def _sources() -> list[pathlib.Path]:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 50  # the walk found the package
    return sources


def _role(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == NAME else None


@functools.cache
def _modules() -> frozenset[str]:
    return frozenset(_module_name(p) for p in _sources())


def layer_violations(imports: dict[str, set[str]]) -> list[str]:
    """Arrows that run up a layer or between siblings, as ``importer -> imported``."""
    known = _modules()
    found = []
    for importer, names in sorted(imports.items()):
        here = _role(importer)
        if here is None:
            continue
        for name in sorted(names):
            there = _role(name)
            if there is None or there == here or name not in known:
                continue
            up = LAYERS[there] > LAYERS[here]
            sideways = frozenset({here, there}) in SIBLINGS
            if up or sideways:
                found.append(f"{importer} -> {name}")
    return found


def circles(imports: dict[str, set[str]]) -> list[str]:
    """Pairs of modules that import each other (at run time: annotations do not count)."""
    return sorted(
        f"{a} <-> {b}"
        for a, names in imports.items()
        for b in names
        if a < b and a in imports.get(b, ())
    )


def _package_imports(*, annotations: bool = True) -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, annotations=annotations) for p in _sources()}


def test_the_top_level_holds_only_packages_and_the_errors():
    loose = {p.name for p in PACKAGE.glob("*.py")} - TOP_LEVEL_FILES
    assert loose == set(), f"modules outside a role's package: {loose}"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS) - {"exception"}, "a package without a layer, or a layer gone"


def test_every_package_imports_only_its_own_layer_and_below():
    assert layer_violations(_package_imports()) == []


def test_no_two_modules_import_each_other():
    assert circles(_package_imports(annotations=False)) == []


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("nova_torrent_images.glance.image", "nova_torrent_images.compute.pipeline"),
        ("nova_torrent_images.origin.publisher", "nova_torrent_images.compute.stores"),
        ("nova_torrent_images.compute.pipeline", "nova_torrent_images.origin.registry"),
        ("nova_torrent_images.swarm.engine", "nova_torrent_images.virt.xenapi.handler"),
    ],
)
def test_the_check_fails_on_a_deliberate_violation(importer, imported):
    imports = _package_imports()
    imports[importer] = imports[importer] | {imported}
    assert layer_violations(imports) == [f"{importer} -> {imported}"]


def test_the_check_finds_a_deliberate_circle():
    imports = _package_imports(annotations=False)
    a, b = "nova_torrent_images.compute.locks", "nova_torrent_images.compute.queue"
    imports[a] = imports[a] | {b}
    imports[b] = imports[b] | {a}
    assert circles(imports) == [f"{a} <-> {b}"]


def test_libtorrent_is_imported_only_under_swarm_and_testing():
    sources = _sources()
    importers = {
        str(path.relative_to(PACKAGE))
        for path in sources
        if any(n.split(".")[0] == "libtorrent" for n in _imports(path))
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


def test_former_paths_lead_to_the_same_modules():
    import importlib

    from nova_torrent_images.common import aliases

    for former, current in aliases.FORMER_PATHS.items():
        old = importlib.import_module(f"{NAME}.{former}")
        assert old is importlib.import_module(f"{NAME}.{current}"), former
