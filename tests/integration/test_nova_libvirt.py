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

"""The libvirt integration against the real Nova 34 code, a real glance-api and real peers.

Nova's ``GlanceImageServiceV2`` talks to the session's glance-api through ``[glance]
endpoint_override`` with a ``RequestContext`` carrying a token (no Keystone: noauth glance
ignores the token). Nova's ``CONF`` is process-global, so every override is cleared again.
The launcher itself is only ever imported in child processes (nova_compute_child.py):
Nova's native-threading mode refuses to start in a process that imported eventlet, and
importing Nova here already does (through futurist).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("nova")

import nova.conf  # noqa: E402
from nova import context as nova_context  # noqa: E402
from nova import exception as nova_exception  # noqa: E402
from nova import service_auth  # noqa: E402
from nova.image import glance as nova_glance  # noqa: E402
from nova.virt import images as nova_images  # noqa: E402
from oslo_utils import imageutils  # noqa: E402

from nova_torrent_images.compute.pipeline import fetch_to_file  # noqa: E402
from nova_torrent_images.swarm.torrent import make_torrent  # noqa: E402
from nova_torrent_images.testing.swarm import next_loopback_address  # noqa: E402
from nova_torrent_images.virt.libvirt import download as glance_download  # noqa: E402
from tests.integration.conftest import PublishedImage  # noqa: E402

MiB = 1024 * 1024
CHILD = os.path.join(os.path.dirname(__file__), "nova_compute_child.py")


def sha512_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()


def data_gets(glance_server, image_id: str, expect: int | None = None) -> int:
    """Image data requests glance-api served for ``image_id`` (its access log).

    gunicorn writes the access log line after the response, so a count taken right after
    a download can lag: with ``expect``, wait (2 s at most) until the count reaches it.
    """
    needle = f"GET /v2/images/{image_id}/file "
    if expect == 0:
        time.sleep(0.5)  # give a request that should not exist time to show up
    deadline = time.monotonic() + 2.0
    while True:
        with open(glance_server.access_log_path) as f:
            count = sum(needle in line for line in f)
        if expect is None or count >= expect or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


@pytest.fixture
def nova_conf(glance_server, tmp_path):
    """Nova's global CONF pointed at the test glance-api, cleaned up afterwards."""
    conf = nova.conf.CONF
    instances = tmp_path / "instances"
    (instances / "_base").mkdir(parents=True)
    overrides = [
        ("endpoint_override", glance_server.url, "glance"),
        ("num_retries", 0, "glance"),
        ("instances_path", str(instances), None),
    ]
    for name, value, group in overrides:
        conf.set_override(name, value, group)
    service_auth.reset_globals()  # Nova caches the [glance] keystoneauth session
    yield conf
    for name, _, group in overrides:
        conf.clear_override(name, group)
    service_auth.reset_globals()


@pytest.fixture
def context():
    return nova_context.RequestContext(
        user_id="nti-test", project_id="nti-test", auth_token="noauth", is_admin=True
    )


@pytest.fixture
def compute(hosts, tmp_path, nova_conf):
    """A compute host (own 127.0.0.x engine) with the hook installed into Nova."""

    def make(**conf):
        conf.setdefault("state_dir", str(tmp_path / "nti-state"))
        conf.setdefault("image_cache_dir", str(tmp_path / "nti-state" / "images"))
        host = hosts("compute", **conf)
        return host, glance_download.install(host.conf, engine=host.engine)

    yield make
    glance_download.uninstall()


def base_dir(nova_conf) -> str:
    return os.path.join(nova_conf.instances_path, "_base")


def nova_cache_path(nova_conf, image_id: str) -> str:
    """The cache file name Nova's libvirt driver uses: sha1 of the image id in _base."""
    return os.path.join(base_dir(nova_conf), hashlib.sha1(image_id.encode()).hexdigest())


def test_torrentable_image_comes_from_the_swarm(
    make_image, hosts, compute, nova_conf, context, glance_server, tmp_path
):
    image = make_image(16 * MiB)
    seeder = hosts("seeder")
    seeder.seed(image.torrent.data, image.path)
    image.set_magnet(peers=[seeder.endpoint])
    host, hook = compute()
    dst = nova_cache_path(nova_conf, image.id) + ".part"

    nova_glance.GlanceImageServiceV2().download(context, image.id, dst_path=dst)

    assert sha512_of(dst) == image.record["os_hash_value"]
    assert data_gets(glance_server, image.id, expect=0) == 0
    assert 16 * MiB <= seeder.uploaded_bytes() < 17 * MiB
    local = hook.pipeline()
    base = local.store.lookup(image.id)
    assert base is not None and base.in_use  # Nova's name links to it
    assert os.stat(base.ref).st_ino == os.stat(dst).st_ino
    assert local.seeds.seeding() == [image.id]
    # Only Nova's own name went into _base; the store's names are not 40-character ones.
    assert os.listdir(base_dir(nova_conf)) == [os.path.basename(dst)]
    assert all(len(name) != 40 for name in os.listdir(local.store.directory))

    # Nova's cache manager drops its file; the next download links the base copy again.
    os.unlink(dst)
    again = nova_cache_path(nova_conf, image.id)
    nova_glance.GlanceImageServiceV2().download(context, image.id, dst_path=again)
    assert os.stat(again).st_ino == os.stat(base.ref).st_ino
    assert seeder.uploaded_bytes() < 17 * MiB and data_gets(glance_server, image.id, expect=0) == 0

    # What the host seeds is the downloaded image: with the origin gone, another host
    # gets all of it from here.
    seeder.stop()
    image.set_magnet(peers=[host.endpoint])
    peer = hosts("peer")
    result = fetch_to_file(
        glance_download.image_from_nova(
            nova_glance.GlanceImageServiceV2().show(context, image.id), peer.conf
        ),
        str(tmp_path / "peer.raw"),
        conf=peer.conf,
        glance=None,
        engine=peer.engine,
    )
    assert result.source == "torrent" and result.swarm.per_peer
    assert all(peer_key.startswith(f"{host.address}:") for peer_key in result.swarm.per_peer)
    assert sha512_of(result.destination) == image.record["os_hash_value"]


def test_non_torrentable_image_goes_through_nova_unchanged(
    make_image, compute, nova_conf, context, glance_server
):
    image = make_image(4 * MiB)  # no torrent properties at all
    _, hook = compute()
    dst = nova_cache_path(nova_conf, image.id) + ".part"

    nova_glance.GlanceImageServiceV2().download(context, image.id, dst_path=dst)

    assert sha512_of(dst) == image.record["os_hash_value"]
    assert data_gets(glance_server, image.id, expect=1) == 1
    assert not hook.pipeline().fetches  # the swarm side downloaded nothing
    # Streaming callers (no dst_path) get Nova's iterator, torrentable or not.
    image.set_magnet()
    chunks = nova_glance.GlanceImageServiceV2().download(context, image.id)
    assert hashlib.sha512(b"".join(chunks)).hexdigest() == image.record["os_hash_value"]
    assert data_gets(glance_server, image.id, expect=2) == 2 and not hook.pipeline().fetches


def test_swarm_failure_falls_back_to_nova_and_leaves_nothing(
    make_image, compute, nova_conf, context, glance_server, tmp_path
):
    image = make_image(4 * MiB)
    image.set_magnet()  # nobody to ask
    _, hook = compute(metadata_timeout=1)
    dst = nova_cache_path(nova_conf, image.id) + ".part"

    nova_glance.GlanceImageServiceV2().download(context, image.id, dst_path=dst)

    assert sha512_of(dst) == image.record["os_hash_value"]
    assert data_gets(glance_server, image.id, expect=1) == 1
    store = hook.pipeline().store
    assert os.listdir(store.directory) == []
    assert os.listdir(base_dir(nova_conf)) == [os.path.basename(dst)]
    assert not os.path.exists(tmp_path / "nti-state" / "seeds" / f"{image.id}.resume")


def test_swarm_failure_without_fallback_reaches_nova(
    make_image, compute, nova_conf, context, glance_server
):
    image = make_image(4 * MiB)
    image.set_magnet()
    _, hook = compute(metadata_timeout=1, fallback_to_glance=False)
    dst = nova_cache_path(nova_conf, image.id) + ".part"

    with pytest.raises(nova_exception.CouldNotFetchImage, match="fallback_to_glance is off"):
        nova_glance.GlanceImageServiceV2().download(context, image.id, dst_path=dst)

    assert not os.path.exists(dst) and data_gets(glance_server, image.id, expect=0) == 0
    assert os.listdir(hook.pipeline().store.directory) == []


def test_fetch_to_raw_keeps_nova_cache_and_base_copy(
    make_image, hosts, compute, nova_conf, context, glance_server
):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img (Debian qemu-utils, tools/install-system-packages) is missing")
    image = make_image(8 * MiB)
    seeder = hosts("seeder")
    seeder.seed(image.torrent.data, image.path)
    image.set_magnet(peers=[seeder.endpoint])
    _, hook = compute()
    path = nova_cache_path(nova_conf, image.id)

    nova_images.fetch_to_raw(context, image.id, path)

    assert os.listdir(base_dir(nova_conf)) == [os.path.basename(path)]  # .part renamed
    assert sha512_of(path) == image.record["os_hash_value"]
    assert data_gets(glance_server, image.id, expect=0) == 0
    base = hook.pipeline().store.lookup(image.id)
    assert os.stat(base.ref).st_ino == os.stat(path).st_ino and os.stat(path).st_nlink == 2
    assert sha512_of(base.ref) == image.record["os_hash_value"]


def test_fetch_to_raw_converts_qcow2_but_seeds_the_downloaded_bytes(
    hosts, compute, nova_conf, context, glance_server, tmp_path
):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img (Debian qemu-utils, tools/install-system-packages) is missing")
    raw = tmp_path / "source.raw"
    raw.write_bytes(os.urandom(6 * MiB) + bytes(2 * MiB))
    qcow2 = tmp_path / "source.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    record = glance_server.create_image(str(qcow2), name="qcow2-image", disk_format="qcow2")
    image = PublishedImage(
        glance_server, str(qcow2), record, make_torrent(str(qcow2), name=record["id"])
    )
    try:
        seeder = hosts("seeder")
        seeder.seed(image.torrent.data, image.path)
        image.set_magnet(peers=[seeder.endpoint])
        _, hook = compute()
        path = nova_cache_path(nova_conf, image.id)

        nova_images.fetch_to_raw(context, image.id, path)

        # Nova's cache file is its converted raw image, a file of its own ...
        info = imageutils.QemuImgInfo(
            subprocess.run(
                ["qemu-img", "info", "--output=json", path],
                check=True,
                capture_output=True,
                text=True,
            ).stdout,
            format="json",
        )
        assert info.file_format == "raw"
        assert sha512_of(path) == sha512_of(str(raw))
        assert os.listdir(base_dir(nova_conf)) == [os.path.basename(path)]
        # ... while the base copy, which this host seeds, is the qcow2 that was downloaded.
        local = hook.pipeline()
        base = local.store.lookup(image.id)
        assert sha512_of(base.ref) == record["os_hash_value"]
        assert os.stat(base.ref).st_nlink == 1 and not base.in_use
        assert local.seeds.seeding() == [image.id]
        assert data_gets(glance_server, image.id, expect=0) == 0
    finally:
        glance_server.client().images.delete(record["id"])


def test_base_copy_on_another_filesystem_is_copied(
    make_image, hosts, compute, nova_conf, context, tmp_path
):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to put the store on")
    image = make_image(4 * MiB)
    seeder = hosts("seeder")
    seeder.seed(image.torrent.data, image.path)
    image.set_magnet(peers=[seeder.endpoint])
    with tempfile.TemporaryDirectory(dir=shm) as store_dir:
        _, hook = compute(image_cache_dir=store_dir)
        dst = nova_cache_path(nova_conf, image.id) + ".part"

        nova_glance.GlanceImageServiceV2().download(context, image.id, dst_path=dst)

        base = hook.pipeline().store.lookup(image.id)
        assert os.stat(base.ref).st_ino != os.stat(dst).st_ino
        assert sha512_of(dst) == sha512_of(base.ref) == image.record["os_hash_value"]
        assert os.stat(dst).st_mode & 0o777 == 0o644  # Nova's file, writable as before
        glance_download.uninstall()


def test_launcher_help_is_nova_computes():
    bindir = os.path.dirname(sys.executable)
    ours = subprocess.run(
        [os.path.join(bindir, "nova-torrent-compute"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    theirs = subprocess.run(
        [os.path.join(bindir, "nova-compute"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.startswith("usage: nova-torrent-compute ")
    assert "--config-file" in ours.stdout and "--config-dir" in ours.stdout
    # The usage line wraps differently with a longer program name; the rest is the same.
    assert re.findall(r"--[\w-]+", ours.stdout) == re.findall(r"--[\w-]+", theirs.stdout)
    assert ours.stdout.split("\n\n", 1)[1] == theirs.stdout.split("\n\n", 1)[1]


@pytest.mark.parametrize("backend", ["eventlet", "threading"])
def test_launcher_runs_nova_compute_with_the_hook(
    backend, make_image, hosts, glance_server, tmp_path
):
    """Launcher main() in a child: Nova's setup for real, then a download under ``backend``.

    eventlet comes from ``[DEFAULT] concurrency_backend`` in nova.conf, native threads
    from nova-compute's own default (auto); the environment variable is cleared so that
    nova.conf decides.
    """
    image = make_image(16 * MiB)
    seeder = hosts("seeder")
    seeder.seed(image.torrent.data, image.path)
    image.set_magnet(peers=[seeder.endpoint])
    state = tmp_path / "state"
    config = tmp_path / "nova.conf"
    config.write_text(
        "[DEFAULT]\n"
        + ("concurrency_backend = eventlet\n" if backend == "eventlet" else "")
        + f"instances_path = {tmp_path / 'instances'}\n"
        f"state_path = {tmp_path}\n"
        "[glance]\n"
        f"endpoint_override = {glance_server.url}\n"
        "num_retries = 0\n"
        "[oslo_concurrency]\n"
        f"lock_path = {tmp_path / 'locks'}\n"
        "[torrent_images]\n"
        f"state_dir = {state}\n"
        f"image_cache_dir = {state / 'images'}\n"
        f"listen_interfaces = {next_loopback_address()}:0\n"
        "min_announce_interval = 1\n"
        "metadata_timeout = 30\n"
    )
    dst = tmp_path / "instances" / "_base" / "image.part"
    dst.parent.mkdir(parents=True)
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "OS_NOVA_DISABLE_EVENTLET_PATCHING"}
    env.update(
        NTI_CHILD_IMAGE_ID=image.id, NTI_CHILD_DST=str(dst), NTI_CHILD_REPORT=str(report_path)
    )

    child = subprocess.run(
        [sys.executable, CHILD, "--config-file", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert child.returncode == 0, child.stderr[-4000:]
    report = json.loads(report_path.read_text())
    print(f"\n{backend}: {json.dumps(report, indent=1)}")
    assert report["patched"] is (backend == "eventlet")
    assert report["green_threads"] is (backend == "eventlet")
    if backend == "threading":
        assert report["eventlet_imported"] is False  # Nova poisons the import in this mode
    assert report["hook_installed"] and report["started_before_serving"]
    assert report["conf_state_dir"] == str(state)  # our options came from nova.conf
    assert report["no_fork"] is True
    assert report["sha512"] == image.record["os_hash_value"]
    assert report["same_inode"] and report["seeding"] == [image.id]
    assert data_gets(glance_server, image.id, expect=0) == 0
    assert seeder.uploaded_bytes() >= 16 * MiB
    if backend == "eventlet":
        # The hub kept running: other green threads of nova-compute were never starved.
        assert report["max_hub_gap"] < 0.5, report["max_hub_gap"]


def test_cached_image_boots_while_glance_is_down(
    make_image, hosts, compute, nova_conf, context, glance_server
):
    from tests.integration.test_glance_outage import dead_endpoint

    image = make_image(8 * MiB)
    seeder = hosts("seeder")
    seeder.seed(image.torrent.data, image.path)
    image.set_magnet(peers=[seeder.endpoint])
    never_cached = make_image(4 * MiB, name="never-cached")
    _, hook = compute()
    first = nova_cache_path(nova_conf, image.id) + ".part"
    nova_glance.GlanceImageServiceV2().download(context, image.id, dst_path=first)
    os.unlink(first)  # Nova's cache manager removed its file; the base copy stays

    nova_conf.set_override("endpoint_override", dead_endpoint(), "glance")
    service_auth.reset_globals()
    again = nova_cache_path(nova_conf, image.id) + ".part"
    nova_glance.GlanceImageServiceV2().download(context, image.id, dst_path=again)

    assert sha512_of(again) == image.record["os_hash_value"]
    # Another project, and an image this host never verified: typed errors naming it.
    other = nova_context.RequestContext(
        user_id="other", project_id="other-project", auth_token="noauth", is_admin=True
    )
    with pytest.raises(nova_exception.CouldNotFetchImage, match=image.id):
        nova_glance.GlanceImageServiceV2().download(other, image.id, dst_path=again + "-other")
    with pytest.raises(nova_exception.CouldNotFetchImage, match=never_cached.id):
        nova_glance.GlanceImageServiceV2().download(
            context, never_cached.id, dst_path=nova_cache_path(nova_conf, never_cached.id)
        )
    assert not os.path.exists(again + "-other")
