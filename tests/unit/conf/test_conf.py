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

import subprocess
import sys

import pytest
from oslo_config import cfg

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception
from nova_torrent_images.conf import origin as origin_conf
from nova_torrent_images.testing.swarm import make_conf


def test_registers_on_any_configopts_twice():
    conf = cfg.ConfigOpts()
    nti_conf.register_opts(conf)
    nti_conf.register_opts(conf)  # Nova and our launcher may both register
    conf([], default_config_files=[])
    assert conf.torrent_images.mode == "some"
    assert conf.torrent_images.fallback_to_glance is True
    assert conf.torrent_images.disk_io == "posix"


def test_config_file_values(tmp_path):
    path = tmp_path / "nova.conf"
    path.write_text(
        "[torrent_images]\nmode = all\nupload_rate_limit = 4096\nallowed_peer_cidrs = 10.1.0.0/16\n"
    )
    conf = cfg.ConfigOpts()
    nti_conf.register_opts(conf)
    conf(["--config-file", str(path)], default_config_files=[])
    assert conf.torrent_images.mode == "all"
    assert conf.torrent_images.upload_rate_limit == 4096
    assert conf.torrent_images.allowed_peer_cidrs == ["10.1.0.0/16"]


def test_every_option_has_help():
    for _group, opts in nti_conf.list_opts():
        for opt in opts:
            assert opt.help and len(opt.help) > 20, opt.name


def test_oslo_config_generator_prints_sample():
    gen = [
        sys.executable,
        "-c",
        "import sys; from oslo_config.generator import main; sys.exit(main())",
    ]
    out = subprocess.run(
        gen + ["--namespace", "nova_torrent_images"], capture_output=True, text=True, check=True
    ).stdout
    assert "[torrent_images]" in out
    for name in ("mode", "stall_timeout", "allowed_peer_cidrs", "upload_rate_limit"):
        assert f"#{name} = " in out


def test_overrides_do_not_leak_between_configopts():
    first, second = cfg.ConfigOpts(), cfg.ConfigOpts()
    for conf in (first, second):
        nti_conf.register_opts(conf)
        conf([], default_config_files=[])
    first.set_override("fallback_to_glance", False, group="torrent_images")
    assert first.torrent_images.fallback_to_glance is False
    assert second.torrent_images.fallback_to_glance is True


def test_check_names_the_bad_option():
    nti_conf.check(make_conf())
    for option, value in [
        ("allowed_peer_cidrs", ["10.0.0.0/33"]),
        ("listen_interfaces", ["6881"]),
        ("trackers", ["ftp://tracker/announce"]),
    ]:
        with pytest.raises(exception.ConfigError, match=option):
            nti_conf.check(make_conf(**{option: value}))


@pytest.mark.parametrize(
    "value",
    [
        ["0.0.0.0:6881"],
        ["[::]:6881"],
        ["127.0.0.5:0"],  # port 0: any free port, as simulated hosts use
        ["[::1]:0"],
        ["10.0.0.7:6890", "compute-1.example:6881"],
    ],
)
def test_check_accepts_listen_interfaces(value):
    nti_conf.check(make_conf(listen_interfaces=value))


@pytest.mark.parametrize(
    "value",
    ["6881", "10.0.0.7", "10.0.0.7:", "10.0.0.7:65536", "10.0.0.7:http", "::1:6881", "bad host:0"],
)
def test_check_rejects_listen_interfaces(value):
    with pytest.raises(exception.ConfigError, match="listen_interfaces") as info:
        nti_conf.check(make_conf(listen_interfaces=[value]))
    assert repr(value) in str(info.value)


def test_conf_loads_no_origin_code():
    # A compute host registers every option; none of the origin package may come along.
    code = (
        "import sys, nova_torrent_images.conf; "
        "print(sorted(m for m in sys.modules if m == 'nova_torrent_images.origin' "
        "or m.startswith('nova_torrent_images.origin.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_list_opts_lists_what_register_opts_registers():
    conf = cfg.ConfigOpts()
    nti_conf.register_opts(conf)
    conf([], default_config_files=[])
    listed = {}
    for group, opts in nti_conf.list_opts():
        name = getattr(group, "name", group)
        assert name not in listed, f"group {name} listed twice"
        listed[name] = sorted(opt.dest for opt in opts)  # sorted, not a set: no duplicates
    assert set(listed) == {nti_conf.GROUP, nti_conf.GLANCE_GROUP}
    for name, opt_names in listed.items():
        assert opt_names == sorted(conf[name]), name


def test_origin_options_are_in_torrent_images_group():
    conf = cfg.ConfigOpts()
    nti_conf.register_opts(conf)
    conf([], default_config_files=[])
    group = conf[nti_conf.GROUP]
    for opt in origin_conf.ALL_OPTS:
        assert opt.name in group, opt.name
        assert opt in nti_conf.ALL_OPTS, opt.name
    assert group.origin_state_dir == "/var/lib/nova-torrent-images/origin"
    assert group.promotion_source == "notifications"
    assert group.origin_upload_rate_limit == 65536
