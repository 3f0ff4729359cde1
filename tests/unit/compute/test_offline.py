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

"""Boots while Glance is down rely on the record Glance returned last, never a wider one.

Each scenario runs against the filesystem store (a JSON sidecar per base copy) and the
XenAPI store (VDI ``other_config``, against the fake XAPI), through the pipeline as the
image handlers drive it: an online boot is ``ensure_base`` with the record Glance just
returned, an offline one ``offline_image`` then ``ensure_base`` with the kept record.
"""

from __future__ import annotations

import errno
import json
import os
import types

import pytest
import XenAPI

from nova_torrent_images import exception
from nova_torrent_images.compute import offline
from nova_torrent_images.compute.pipeline import ImagePipeline
from nova_torrent_images.compute.stores import open_store
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore
from nova_torrent_images.compute.stores.filesystem import FilesystemStore
from nova_torrent_images.compute.stores.xenapi import TAG
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.testing.fake_xenapi import FakeXenAPI, MiB
from nova_torrent_images.testing.http_origin import SCHEMA
from nova_torrent_images.testing.images import image_info
from nova_torrent_images.testing.local_http import CappedHTTPServer, OwnedHandler
from nova_torrent_images.testing.swarm import make_conf
from nova_torrent_images.virt.xenapi.handler import GlanceImageHandler

DATA = os.urandom(MiB + 4093)
IMAGE_ID = "img-1"
OWNER, OTHER = "p-owner", "p-other"
DOWN = exception.GlanceUnavailable(
    image_id=IMAGE_ID, operation="show", attempts=1, reason="refused", option="glance_endpoint"
)


def record(**fields):
    """The image as Glance shows it: ``fields`` say what changed (visibility, owner...)."""
    return image_info(DATA, IMAGE_ID, name="cirros", **{"owner": OWNER, **fields})


class StubGlance(GlanceClient):
    """Glance answering with fixed bytes (the record is the test's ``image``)."""

    def __init__(self, image=None) -> None:
        super().__init__(client=None)
        self.image = image

    def image_info(self, image_id):
        return self.image

    def iter_data(self, image_id):
        return (DATA[i : i + 65536] for i in range(0, len(DATA), 65536))


class Host:
    """One compute host: a store, its pipeline, and boots as the handlers make them."""

    def __init__(self, kind, store, conf, fake=None):
        self.kind, self.store, self.conf, self.fake = kind, store, conf, fake
        self.pipeline = ImagePipeline(conf, store, seeding=False)
        self.instances = 0

    def _use(self, base: BaseCopy) -> str:
        self.instances += 1
        return self.store.clone(base, f"vm-{self.instances}")

    def boot(self, image, project):
        """An online boot: Glance just returned ``image`` to ``project``."""
        return self.pipeline.ensure_base(
            image, StubGlance(image), use_torrent=False, project_id=project, use=self._use
        )

    def boot_offline(self, project):
        """A boot while Glance is down, as the handlers make it."""
        image = self.pipeline.offline_image(IMAGE_ID, project, DOWN)
        return self.pipeline.ensure_base(
            image, None, use_torrent=False, project_id=project, use=self._use
        )

    def restart(self):
        """A new process: nothing in memory, the store and state_dir as they are."""
        offline._failed.clear()
        self.pipeline = ImagePipeline(self.conf, self.store, seeding=False)

    def kept(self) -> BaseCopy:
        base = self.store.lookup(IMAGE_ID)
        assert base is not None
        return base

    def note_path(self) -> str:
        return offline._note_path(self.conf.torrent_images.state_dir, self.store.name, IMAGE_ID)

    def break_refresh(self, monkeypatch, at="first"):
        """Make the store's writes of a refreshed record fail (a full disk, XAPI down).

        ``at``: ``first``, nothing is written; ``last`` (XenAPI), all but the record.
        """
        if self.kind == "filesystem":
            update = self.store._update_tags

            def failing_update(base, **changes):
                if "record" in changes:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return update(base, **changes)

            monkeypatch.setattr(self.store, "_update_tags", failing_update)
            return
        call = self.store.call
        method = "VDI.remove_from_other_config" if at == "first" else "VDI.add_to_other_config"

        def failing_call(name, *args):
            if name == method and args[1:2] == (TAG + "record",):
                raise XenAPI.Failure(["INTERNAL_ERROR", "injected"])
            return call(name, *args)

        monkeypatch.setattr(self.store, "call", failing_call)


@pytest.fixture(autouse=True)
def _no_failures_noted_before():
    offline._failed.clear()
    yield
    offline._failed.clear()


def make_host(kind, tmp_path):
    conf = make_conf(state_dir=str(tmp_path / "state"), mode="none")
    if kind == "filesystem":
        return Host(kind, FilesystemStore(str(tmp_path / "images")), conf), None
    fake = FakeXenAPI.create(tmp_path / "xapi", sr_size=64 * MiB, use_loop_devices=False)
    session = fake.session()
    fake.configure(conf)
    return Host(kind, open_store(conf, "xenapi", session=session), conf, fake), session


@pytest.fixture(params=["filesystem", "xenapi"])
def host(request, tmp_path):
    made, session = make_host(request.param, tmp_path)
    try:
        yield made
    finally:
        if session is not None:
            session.xenapi.session.logout()
            made.fake.close()


# -- issue 26, item 6: a record Glance changed is what offline boots rely on ---------------
def test_an_image_made_private_boots_offline_only_for_its_owner(host):
    host.boot(record(visibility="public"), OWNER)  # downloaded: public, first boot
    assert host.kept().record["visibility"] == "public"
    # The owner makes it private; the owner boots it again here while Glance answers.
    delivery = host.boot(record(visibility="private"), OWNER)
    assert not delivery.downloaded
    kept = host.kept()  # read back from the sidecar / the VDI's other_config
    assert kept.record["visibility"] == "private" and kept.record["owner"] == OWNER
    assert kept.projects == (OWNER,)

    # Glance goes down.
    with pytest.raises(exception.OfflineBootRefused, match=IMAGE_ID) as refused:
        host.boot_offline(OTHER)
    assert OTHER in str(refused.value) and "private" in str(refused.value)
    booted = host.boot_offline(OWNER)
    assert not booted.downloaded and booted.used
    assert host.instances == 3  # nothing made for the refused boot


def test_a_project_remembered_while_public_loses_offline_access_once_private(host):
    host.boot(record(visibility="public"), OWNER)
    host.boot(record(visibility="public"), OTHER)  # remembered: Glance showed it (public)
    assert set(host.kept().projects) == {OWNER, OTHER}
    host.boot(record(visibility="private"), OWNER)

    assert host.kept().projects == (OWNER,)
    with pytest.raises(exception.OfflineBootRefused, match=OTHER):
        host.boot_offline(OTHER)
    host.boot_offline(OWNER)


def test_every_online_boot_refreshes_the_kept_record(host):
    host.boot(record(visibility="public", min_ram=64, os_distro="cirros"), OWNER)
    host.boot(record(visibility="shared", min_ram=128, os_distro="ubuntu"), OTHER)
    kept = host.kept()
    assert kept.record["visibility"] == "shared" and kept.record["min_ram"] == 128
    assert kept.record["os_distro"] == "ubuntu"
    assert kept.projects == (OTHER,)  # a member Glance just showed it to
    host.boot_offline(OTHER)
    assert host.pipeline.offline_image(IMAGE_ID, OWNER, DOWN).record["min_ram"] == 128
    with pytest.raises(exception.OfflineBootRefused):
        host.boot_offline("p-third")


def test_an_image_deactivated_in_glance_is_not_booted_offline(host):
    host.boot(record(visibility="public"), OWNER)
    with pytest.raises(exception.ImageNotActive, match=IMAGE_ID):
        host.boot(record(visibility="public", status="deactivated"), OWNER)
    assert host.kept().record["status"] == "deactivated"
    with pytest.raises(exception.OfflineBootRefused, match="deactivated"):
        host.boot_offline(OWNER)

    host.boot(record(visibility="public"), OWNER)  # reactivated: the owner's call again
    host.boot_offline(OTHER)


# -- a refresh that failed never widens access ----------------------------------------------
@pytest.mark.parametrize(
    ("kind", "at", "owner_boots"),
    [
        ("filesystem", "first", True),  # the sidecar write failed: the old one stays whole
        ("xenapi", "first", True),  # XAPI refused the first call: the old tags stay
        ("xenapi", "last", False),  # the record tag is gone: no offline boot at all
    ],
)
def test_a_failed_refresh_does_not_widen_access(
    tmp_path, monkeypatch, caplog, kind, at, owner_boots
):
    host, session = make_host(kind, tmp_path)
    try:
        host.boot(record(visibility="public"), OWNER)
        with monkeypatch.context() as patch:
            host.break_refresh(patch, at)
            delivery = host.boot(record(visibility="private"), OWNER)  # Glance allows it
        assert delivery.used and not delivery.downloaded
        assert any("cannot keep the Glance record" in r.getMessage() for r in caplog.records)
        assert host.kept().record.get("visibility") in ("public", None)  # stale or gone
        assert os.path.exists(host.note_path())

        for _ in ("this process", "after a restart"):
            # The kept record says public, Glance said private: the stricter applies.
            with pytest.raises(exception.OfflineBootRefused, match=IMAGE_ID) as refused:
                host.boot_offline(OTHER)
            if owner_boots:
                assert "could not be refreshed" in str(refused.value)
                host.boot_offline(OWNER)
            else:
                with pytest.raises(exception.OfflineBootRefused, match="no verified base copy"):
                    host.boot_offline(OWNER)
            host.restart()

        # The store works again: the next online boot refreshes it, and the note goes.
        host.boot(record(visibility="private"), OWNER)
        assert host.kept().record["visibility"] == "private"
        assert not os.path.exists(host.note_path())
        with pytest.raises(exception.OfflineBootRefused, match=OTHER):
            host.boot_offline(OTHER)
        host.boot_offline(OWNER)
    finally:
        if session is not None:
            session.xenapi.session.logout()
            host.fake.close()


def test_a_failed_refresh_that_cannot_be_noted_still_holds_in_the_process(host, monkeypatch):
    host.boot(record(visibility="public"), OWNER)
    host.break_refresh(monkeypatch)

    notes = os.path.dirname(host.note_path())
    with open(notes, "w"):  # a file where the notes' directory would be: no note written
        pass
    host.boot(record(visibility="private"), OWNER)
    os.unlink(notes)  # no note on disk either: only this process knows of the failure
    with pytest.raises(exception.OfflineBootRefused, match="could not be refreshed"):
        host.boot_offline(OTHER)
    host.boot_offline(OWNER)


def test_an_unreadable_note_of_a_failed_refresh_refuses_every_offline_boot(host):
    host.boot(record(visibility="public"), OWNER)
    os.makedirs(os.path.dirname(host.note_path()), exist_ok=True)
    with open(host.note_path(), "w") as f:
        f.write("{not json")
    for project in (OWNER, OTHER):
        with pytest.raises(exception.OfflineBootRefused, match="unreadable"):
            host.boot_offline(project)


def test_a_note_about_a_replaced_base_copy_is_ignored(host):
    host.boot(record(visibility="public"), OWNER)
    base = host.kept()
    stale = {"base": "another-base-copy", "created": base.created_at, "projects": []}
    stale["record"] = {**base.record, "visibility": "private"}
    os.makedirs(os.path.dirname(host.note_path()), exist_ok=True)
    with open(host.note_path(), "w") as f:
        json.dump(stale, f)
    host.boot_offline(OTHER)  # the note is about another base copy: the kept record rules


@pytest.mark.parametrize(
    ("old", "old_projects", "new", "expected"),
    [
        # Public now: everyone remembered stays (anyone may boot it anyway).
        ({"visibility": "public", "owner": "a"}, ("a", "b"), {"visibility": "public"}, "abc"),
        # Made private or shared: only the project Glance just showed it to.
        ({"visibility": "public", "owner": "a"}, ("a", "b"), {"visibility": "private"}, "c"),
        ({"visibility": "community", "owner": "a"}, ("b",), {"visibility": "shared"}, "c"),
        ({"visibility": "shared", "owner": "a"}, ("b",), {"visibility": "private"}, "c"),
        # Same visibility and owner: what was remembered still means the same.
        ({"visibility": "shared", "owner": "a"}, ("b",), {"visibility": "shared"}, "bc"),
        ({"visibility": "private", "owner": "a"}, ("a",), {"visibility": "private"}, "ac"),
        # Another owner: members of the old owner's image are no longer known to be any.
        ({"visibility": "shared", "owner": "z"}, ("b",), {"visibility": "shared"}, "c"),
        # Nova's translation (libvirt hosts): is_public in place of the visibility.
        ({"is_public": True, "owner": "a"}, ("a", "b"), {"is_public": True}, "abc"),
        ({"is_public": True, "owner": "a"}, ("a", "b"), {"is_public": False}, "c"),
        # Nothing kept (a refresh a crash cut short): nothing to carry over.
        ({}, ("b",), {"visibility": "shared"}, "c"),
    ],
)
def test_which_projects_stay_remembered(old, old_projects, new, expected):
    base = BaseCopy(IMAGE_ID, 1, "sha512", "0", None, None, 0.0, 0.0, "ref", record=old)
    base.projects = old_projects
    got = offline.refreshed_projects(base, {"owner": "a", **new}, "c")
    assert got == tuple(expected)


# -- issue 26, item 7: Glance's 500 with any body is an outage, and the cache stands in ---
class Failing500(OwnedHandler):
    """Glance (or a proxy in front of it) answering every image request 500 with ``body``."""

    body: tuple[bytes, str | None] = (b"", None)

    def do_GET(self):  # noqa: N802
        if self.path == "/v2/schemas/image":
            return self._answer(200, json.dumps(SCHEMA).encode(), "application/json")
        return self._answer(500, *self.owner.body)

    def _answer(self, status, body, content_type):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize(
    "body",
    [
        (b'{"error": "injected"}', "application/json"),
        (b"[1,2]", "application/json"),
        (b'"x"', "application/json"),
        (b"<html><body><h1>500 Internal Server Error</h1></body></html>", "text/html"),
        (b"<html><body>not json</body></html>", "application/json"),
        (b"", "application/json"),
        (b"oops", None),
    ],
    ids=["json-object", "json-list", "json-string", "html", "html-as-json", "empty", "no-type"],
)
def test_a_cached_image_boots_offline_when_glance_answers_500_with_any_body(tmp_path, body):
    """The XenAPI handler, the real Glance client and a local server answering 500."""
    fake = FakeXenAPI.create(tmp_path / "xapi", sr_size=64 * MiB, use_loop_devices=False)
    session = fake.session()
    server = CappedHTTPServer(Failing500)
    server.body = body
    server.start()
    try:
        conf = make_conf(state_dir=str(tmp_path / "state"), glance_retries=1)
        conf.set_override("glance_retry_delay", 0.01, group="torrent_images")
        fake.configure(conf)
        current = {"glance": StubGlance(record(visibility="private"))}
        handler = GlanceImageHandler(
            conf,
            glance_factory=lambda context: current["glance"],
            store_factory=lambda s: open_store(conf, "xenapi", session=s),
        )
        owner = types.SimpleNamespace(project_id=OWNER, auth_token=None)
        first = handler.download_image(owner, session, {"name": "vm-1"}, IMAGE_ID)

        current["glance"] = GlanceClient.for_endpoint(server.url, conf, timeout=5)
        with pytest.raises(exception.GlanceUnavailable, match="HTTP 500"):
            current["glance"].image_info(IMAGE_ID)  # what the handler meets
        second = handler.download_image(owner, session, {"name": "vm-2"}, IMAGE_ID)
        assert second["root"]["uuid"] not in ("", first["root"]["uuid"])
        other = types.SimpleNamespace(project_id=OTHER, auth_token=None)
        with pytest.raises(exception.OfflineBootRefused, match="HTTP 500"):
            handler.download_image(other, session, {"name": "vm-3"}, IMAGE_ID)
        handler.shutdown()
    finally:
        server.stop()
        session.xenapi.session.logout()
        fake.close()


def test_a_store_driver_that_cannot_refresh_fails_closed(tmp_path):
    """A driver written before refresh_record existed gets the base class's: it fails."""

    class OldDriver(FilesystemStore):
        refresh_record = BaseCopyStore.refresh_record

    conf = make_conf(state_dir=str(tmp_path / "state"), mode="none")
    host = Host("filesystem", OldDriver(str(tmp_path / "images")), conf)
    host.boot(record(visibility="public"), OWNER)
    host.boot(record(visibility="private"), OWNER)  # the online boot goes on
    assert host.kept().record["visibility"] == "public"  # never refreshed...
    with pytest.raises(exception.OfflineBootRefused, match="could not be refreshed"):
        host.boot_offline(OTHER)  # ...and never trusted as it is
    host.boot_offline(OWNER)
