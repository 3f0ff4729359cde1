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

"""open_store: every store driver is built by name through its entry point, or a ConfigError."""

import os

import pytest

from nova_torrent_images import exception
from nova_torrent_images.compute import stores
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.compute.stores.output import OutputFileStore
from nova_torrent_images.compute.stores.xenapi import XenAPIStore
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, MiB
from nova_torrent_images.testing.swarm import make_conf


@pytest.fixture
def conf(tmp_path):
    return make_conf(state_dir=str(tmp_path / "state"))


def test_entry_points_name_every_driver():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group=stores.NAMESPACE)}
    assert names == {
        "filesystem": "nova_torrent_images.compute.stores.filesystem:FilesystemStore",
        "xenapi": "nova_torrent_images.compute.stores.xenapi:XenAPIStore",
        "output-file": "nova_torrent_images.compute.stores.output:OutputFileStore",
        "file": "nova_torrent_images.compute.stores.output:OutputFileStore",  # former name
    }


def test_filesystem_store_from_conf(conf, tmp_path):
    store = stores.open_store(conf, "filesystem")
    assert type(store) is FilesystemStore
    assert store.directory == str(tmp_path / "state" / "images")  # $state_dir/images
    assert os.path.isdir(store.directory)


def test_default_name_is_the_store_option(conf, tmp_path):
    conf.set_override("store", "filesystem", group="torrent_images")
    conf.set_override("image_cache_dir", str(tmp_path / "cache"), group="torrent_images")
    store = stores.open_store(conf)
    assert type(store) is FilesystemStore and store.directory == str(tmp_path / "cache")


def test_output_file_store_takes_the_path(conf, tmp_path):
    store = stores.open_store(conf, "output-file", path=str(tmp_path / "out.img"))
    assert type(store) is OutputFileStore and store.path == str(tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


def test_xenapi_store_takes_the_session(conf, tmp_path):
    with FakeXenAPI.create(tmp_path / "xapi", sr_size=64 * MiB, use_loop_devices=False) as fake:
        fake.configure(conf)
        session = fake.session()
        try:
            store = stores.open_store(conf, "xenapi", session=session)
            assert type(store) is XenAPIStore
            assert store.capacity().total == 64 * MiB
        finally:
            session.xenapi.session.logout()
        fake.check_leaks()


def test_xenapi_store_without_session_needs_a_connection_url(conf):
    with pytest.raises(exception.ConfigError, match="xenapi_connection_url"):
        stores.open_store(conf, "xenapi")


def test_unknown_name_is_a_config_error_naming_store(conf):
    with pytest.raises(exception.ConfigError, match=r"\] store: .*'ceph'") as excinfo:
        stores.open_store(conf, "ceph")
    assert excinfo.value.kwargs["option"] == "store"


def test_unset_store_is_a_config_error_naming_store(conf):
    assert conf.torrent_images.store is None
    with pytest.raises(exception.ConfigError, match=r"\] store: not set") as excinfo:
        stores.open_store(conf)
    assert excinfo.value.kwargs["option"] == "store"
