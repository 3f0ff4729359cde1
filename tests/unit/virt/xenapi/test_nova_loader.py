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

"""The XenAPI registration with a Nova that has no XenAPI driver (Nova 34, this venv).

Nova 21's own loader is exercised in tests/integration/test_nova_xenapi.py.
"""

import pytest
from oslo_config import cfg

from nova_torrent_images import exception
from nova_torrent_images.virt.xenapi import nova_loader as xenapi


def test_without_the_xenapi_driver_install_is_a_typed_error_naming_the_setting():
    pytest.importorskip("nova")
    assert not xenapi.available()
    with pytest.raises(exception.ConfigError, match="image_handler") as err:
        xenapi.install(cfg.ConfigOpts())
    assert "XenAPI driver (Queens to Ussuri)" in str(err.value)
