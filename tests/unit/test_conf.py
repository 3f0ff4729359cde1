import subprocess
import sys

from oslo_config import cfg

from nova_torrent_images import conf as nti_conf


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
    import pytest

    from nova_torrent_images import exception
    from nova_torrent_images.testing.swarm import make_conf

    nti_conf.check(make_conf())
    for option, value in [
        ("allowed_peer_cidrs", ["10.0.0.0/33"]),
        ("listen_interfaces", ["6881"]),
        ("trackers", ["ftp://tracker/announce"]),
    ]:
        with pytest.raises(exception.ConfigError, match=option):
            nti_conf.check(make_conf(**{option: value}))
