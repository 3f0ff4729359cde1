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

"""pytest fixtures around a real glance-api (see nova_torrent_images.testing.glance_server).

Load them from a conftest with ``pytest_plugins = ["tests.integration.glance_fixtures"]``
(top-level ``tests/conftest.py``) or by importing the fixtures into a conftest. One
glance-api serves the whole session: it starts in about two seconds, but tests should
not pay that each time, and images are cheap to create and delete.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from nova_torrent_images.testing.glance_server import GlanceServer

if TYPE_CHECKING:
    from glanceclient.v2.client import Client as GlanceClientV2

LOG = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def glance_installed() -> None:
    """Skip (not fail) where the optional 'glance' extra is missing.

    Checked with find_spec: importing glance into the test process is slow and
    registers glance's global oslo.config options there.
    """
    for module in ("glance", "gunicorn"):
        if importlib.util.find_spec(module) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{module} is not installed; CI must run the glance tests")
            pytest.skip(f"{module} (extra 'glance') is not installed")


@pytest.fixture(scope="session")
def glance_server(
    glance_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GlanceServer]:
    """A running glance-api for the test session; stopped when the session ends."""
    server = GlanceServer(workdir=tmp_path_factory.mktemp("glance"))
    server.start()
    LOG.info(
        "session glance-api at %s (started in %.2fs, log %s)",
        server.url,
        server.startup_seconds,
        server.log_path,
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def glance_client(glance_server: GlanceServer) -> GlanceClientV2:
    """A python-glanceclient v2 client for the session's glance-api."""
    return glance_server.client()
