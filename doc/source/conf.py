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

# Sphinx configuration of the nova-torrent-images documentation.
#
# Build: ``make docs`` (or ``sphinx-build -W --keep-going -b html doc/source doc/build/html``
# in a venv with the package and doc/requirements.txt installed). Nothing here reaches the
# network: the theme is Sphinx's built-in alabaster and there is no intersphinx.

import datetime
import importlib.metadata

project = "nova-torrent-images"
author = "nova-torrent-images developers"
copyright = f"{datetime.date.today().year}, {author}"
try:
    release = importlib.metadata.version("nova-torrent-images")
except importlib.metadata.PackageNotFoundError:  # building from a tree that is not installed
    release = "unknown"
version = ".".join(release.split(".")[:2])

extensions = [
    # ``.. show-options:: nova_torrent_images`` renders the option reference from the
    # ``oslo.config.opts`` entry point, so the docs cannot drift from conf.py.
    "oslo_config.sphinxext",
    # Writes _static/nova-torrent-images.conf.sample with oslo-config-generator at every
    # build (input: config-generator.conf beside this file).
    "oslo_config.sphinxconfiggen",
    "sphinx.ext.autodoc",
]

config_generator_config_file = [
    ("config-generator.conf", "_static/nova-torrent-images"),
]

# autodoc: signatures without type hints (they name private and TYPE_CHECKING-only
# types that would only add noise), members in source order.
autodoc_typehints = "none"
autodoc_member_order = "bysource"

templates_path = []
exclude_patterns = []
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
language = "en"
pygments_style = "sphinx"

html_theme = "alabaster"
html_theme_options = {
    "description": "Glance images delivered peer to peer to OpenStack compute hosts",
    "fixed_sidebar": True,
    "show_relbars": True,
    # Wider than the default so the diagrams and the module layout fit without scrolling.
    "page_width": "1200px",
    "body_max_width": "none",
}
html_static_path = ["_static"]
html_title = f"{project} {release}"
html_show_sourcelink = False
