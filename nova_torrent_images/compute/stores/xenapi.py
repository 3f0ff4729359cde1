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

"""XenServer store: downloads land in a VDI of the SR, base copies are VDI snapshots.

Write path (doc/source/architecture.rst, "Disk I/O and block devices"): ``VDI.create`` in
the SR, a read-write VBD on the VM that runs nova-compute, ``VBD.plug``; the device
(``/dev/xvdX``) is where libtorrent writes with the posix disk backend. After verification
the VBD goes away, ``VDI.snapshot`` makes the base copy, tagged in ``other_config``, and the
download VDI is destroyed. Base copies are only ever attached read-only; instances get
``VDI.clone`` of them.

Tags (``other_config``, all strings) are the registry:
``nti_role`` = ``slot`` (a download in progress), ``base`` or ``instance``;
``nti_image_id``; on base copies ``nti_size``, ``nti_hash_algo``, ``nti_hash_value``,
``nti_info_hash_v1``, ``nti_info_hash_v2``, ``nti_created``, ``nti_last_used``,
``nti_record`` (the Glance record, JSON) and ``nti_projects``; on instance disks
``nti_base`` (uuid of their base copy). Slots, instance disks and every VBD this library
plugs carry ``nti_owner`` (host:pid). A crash can leave slots, VBDs (a seed's read-only
view), a clone still carrying its base's tags, or an instance disk nobody took:
:meth:`XenAPIStore.remove_stale_slots` finds each by its tags and owner and removes it.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import XenAPI
from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.compute.stores.base import (
    BaseCopy,
    BaseCopyStore,
    Capacity,
    CommitInfo,
    Slot,
    StoreCapabilities,
)

LOG = logging.getLogger(__name__)

TAG = "nti_"
# Nova's XenAPI driver tags the VDI an image handler returned as its image cache with this
# key (vm_utils._create_cached_image); from then on the VDI is Nova's, not a leftover.
NOVA_IMAGE_CACHE_KEY = "image-id"
DEVICE_WAIT = 10.0
SYS_HYPERVISOR_UUID = "/sys/hypervisor/uuid"


class XapiCaller:
    """Calls XAPI through a ``XenAPI.Session`` or Nova's ``XenAPISession`` alike."""

    def __init__(self, session: Any) -> None:
        self.session = session
        # XenAPI.Session answers every attribute with an XML-RPC dispatcher, so asking it
        # for "call_xenapi" would look like Nova's session; check its type first.
        self._nova_style = not isinstance(session, XenAPI.Session) and hasattr(
            session, "call_xenapi"
        )

    def __call__(self, method: str, *args: Any) -> Any:
        if self._nova_style:
            return self.session.call_xenapi(method, *args)
        target = self.session.xenapi
        for part in method.split("."):
            target = getattr(target, part)
        return target(*args)


def failure_code(exc: BaseException) -> str:
    details = getattr(exc, "details", None) or [""]
    return str(details[0])


@dataclass
class VDISlot(Slot):
    """A download VDI and the read-write VBD that attaches it to the compute VM."""

    vdi_ref: str = ""
    vbd_ref: str | None = None


def login(url: str, username: str, password: str) -> XenAPI.Session:
    """A XAPI session for processes outside nova-compute (the command line tools)."""
    session = XenAPI.Session(url)
    session.login_with_password(username, password, "1.0", "nova-torrent-images")
    return session


def this_vm_uuid() -> str:
    """The uuid of the VM this process runs in, as Xen publishes it to the guest."""
    try:
        with open(SYS_HYPERVISOR_UUID) as f:
            return f.read().strip()
    except OSError as exc:
        raise exception.ConfigError(
            option="xenapi_compute_vm_uuid",
            reason=f"not set, and {SYS_HYPERVISOR_UUID} cannot be read ({exc}); set it to "
            "the uuid of the VM running nova-compute",
        ) from exc


def _slot_label(image_id: str) -> str:
    return f"nova-torrent-images download of {image_id}"


def _slot_tags(image_id: str) -> dict[str, str]:
    """A download VDI's tags; the owner lets a restarted process tell its own crashed
    downloads from live downloads of other processes on this host."""
    return {TAG + "role": "slot", TAG + "image_id": image_id, TAG + "owner": utils.owner_tag()}


class XenAPIStore(BaseCopyStore):
    """Base copies as tagged VDI snapshots in one SR."""

    capabilities = StoreCapabilities(
        writes_in_place=True,
        disk_formats=("raw",),
        seeds=True,
        clones=True,
        attach_for_upload=True,
        adopts_disks=True,
        clone_slots=True,
    )

    def __init__(
        self,
        session: Any,
        *,
        sr_uuid: str | None = None,
        compute_vm_uuid: str | None = None,
        device_dir: str = "/dev",
    ) -> None:
        self.call = XapiCaller(session)
        self.device_dir = device_dir
        try:
            if sr_uuid:
                self.sr_ref = self.call("SR.get_by_uuid", sr_uuid)
            else:
                pool = self.call("pool.get_all")[0]
                self.sr_ref = self.call("pool.get_default_SR", pool)
            sr = self.call("SR.get_record", self.sr_ref)
            self.vm_ref = self.call("VM.get_by_uuid", compute_vm_uuid or this_vm_uuid())
        except XenAPI.Failure as exc:
            option = "xenapi_sr_uuid" if "SR" in str(exc) else "xenapi_compute_vm_uuid"
            raise exception.ConfigError(option=option, reason=f"XAPI says {exc.details}") from exc
        self.sr_uuid = sr["uuid"]
        self._name = f"SR {sr['name_label']!r} ({sr['uuid']})"

    @classmethod
    def from_conf(
        cls, conf: cfg.ConfigOpts, *, session: Any = None, **_context: object
    ) -> XenAPIStore:
        """The store of ``session`` (the virt driver's), or of a session of our own."""
        opts = conf.torrent_images
        if session is None:
            if not opts.xenapi_connection_url:
                raise exception.ConfigError(
                    option="xenapi_connection_url",
                    reason="the xenapi store needs it outside nova-compute",
                )
            session = login(
                opts.xenapi_connection_url,
                opts.xenapi_connection_username,
                opts.xenapi_connection_password or "",
            )
        return cls(
            session,
            sr_uuid=opts.xenapi_sr_uuid,
            compute_vm_uuid=opts.xenapi_compute_vm_uuid,
            device_dir=opts.xenapi_device_dir,
        )

    @property
    def name(self) -> str:
        return self._name

    # -- registry ----------------------------------------------------------------------
    def _our_vdis(self) -> dict[str, dict[str, Any]]:
        records = self.call("VDI.get_all_records_where", f'field "SR" = "{self.sr_ref}"')
        return {ref: rec for ref, rec in records.items() if TAG + "role" in rec["other_config"]}

    def _to_base(self, ref: str, rec: dict[str, Any], vdis: dict[str, dict[str, Any]]) -> BaseCopy:
        tags = rec["other_config"]
        # In use: a clone still exists, or something other than our own seed attached it.
        in_use = any(
            v["other_config"].get(TAG + "base") == rec["uuid"] for v in vdis.values()
        ) or any(self._attached_by_others(vbd) for vbd in rec["VBDs"])
        return BaseCopy(
            image_id=tags[TAG + "image_id"],
            size=int(tags[TAG + "size"]),
            hash_algo=tags[TAG + "hash_algo"],
            hash_value=tags[TAG + "hash_value"],
            info_hash_v1=tags.get(TAG + "info_hash_v1") or None,
            info_hash_v2=tags.get(TAG + "info_hash_v2") or None,
            created_at=float(tags[TAG + "created"]),
            # touch() replaces the key in two calls; a reader in between sees none.
            last_used=float(tags.get(TAG + "last_used") or tags[TAG + "created"]),
            ref=rec["uuid"],
            in_use=in_use,
            record=_json_tag(tags.get(TAG + "record")),
            projects=tuple(p for p in tags.get(TAG + "projects", "").split(",") if p),
            source=tags.get(TAG + "source") or None,
        )

    def _attached_by_others(self, vbd_ref: str) -> bool:
        try:
            vbd = self.call("VBD.get_record", vbd_ref)
        except XenAPI.Failure as exc:
            if failure_code(exc) == "HANDLE_INVALID":  # detached meanwhile
                return False
            raise
        return bool(vbd["currently_attached"]) and vbd["other_config"].get(TAG + "role") != "seed"

    @staticmethod
    def _is_base(rec: dict[str, Any]) -> bool:
        # Base copies are made by VDI.snapshot; a VDI that carries base tags without being
        # a snapshot is a clone whose retag a crash prevented.
        return rec["other_config"].get(TAG + "role") == "base" and bool(rec["is_a_snapshot"])

    def list(self) -> list[BaseCopy]:
        vdis = self._our_vdis()
        return [self._to_base(ref, rec, vdis) for ref, rec in vdis.items() if self._is_base(rec)]

    def lookup(self, image_id: str) -> BaseCopy | None:
        for base in self.list():
            if base.image_id == image_id:
                return base
        return None

    def remove_stale_slots(self, try_lock: Callable[[str], Any] | None = None) -> int:
        """Remove what crashed processes of this host left in the SR.

        * download VDIs (``slot``) whose owner process is gone;
        * VBDs this library plugged (a seed's read-only view, a download, an upload) for a
          process that is gone: otherwise the VDI stays in use for ever;
        * clones that still carry their base's tags (a crash between ``VDI.clone`` and the
          retag), removed under the image's lock (``try_lock(image_id)`` a context
          manager yielding whether it got the lock) so a live clone is never touched;
        * instance disks whose owner process is gone and that no VM took (no VBD), unless
          Nova's XenAPI driver made one its image cache VDI (``image-id`` in other_config).
        Base copies are never touched.
        """
        removed = 0
        vdis = self._our_vdis()
        for rec in vdis.values():
            for vbd in rec["VBDs"]:
                removed += self._remove_stale_vbd(vbd)
        for ref, rec in vdis.items():
            tags = rec["other_config"]
            role, owner = tags.get(TAG + "role"), tags.get(TAG + "owner")
            image_id = tags.get(TAG + "image_id")
            if role == "slot" and utils.owner_is_gone(owner):
                what = f"download VDI (left by {owner})"
            elif (
                role == "instance"
                and NOVA_IMAGE_CACHE_KEY not in tags  # Nova adopted it as its image cache
                and utils.owner_is_gone(owner)
                and not self._vbds(ref)
            ):
                what = f"instance disk nobody took (made by {owner})"
            elif role == "base" and not rec["is_a_snapshot"] and try_lock is not None:
                with try_lock(image_id) as locked:
                    if locked and not self._is_base(self.call("VDI.get_record", ref)):
                        self._remove_stale_vdi(ref, rec, "clone a crash left with base tags")
                        removed += 1
                continue
            else:
                continue
            self._remove_stale_vdi(ref, rec, what)
            removed += 1
        return removed

    def _vbds(self, vdi_ref: str) -> builtins.list[str]:
        try:
            return self.call("VDI.get_VBDs", vdi_ref)
        except XenAPI.Failure as exc:
            if failure_code(exc) == "HANDLE_INVALID":
                return []
            raise

    def _remove_stale_vdi(self, ref: str, rec: dict[str, Any], what: str) -> None:
        LOG.warning(
            "Removing stale %s: VDI %s of image %s in %s",
            what,
            rec["uuid"],
            rec["other_config"].get(TAG + "image_id"),
            self.name,
        )
        for vbd in self._vbds(ref):
            self._detach(vbd)
        self._destroy_vdi(ref)

    def _remove_stale_vbd(self, vbd_ref: str) -> int:
        try:
            vbd = self.call("VBD.get_record", vbd_ref)
        except XenAPI.Failure as exc:
            if failure_code(exc) == "HANDLE_INVALID":
                return 0
            raise
        tags = vbd["other_config"]
        if TAG + "role" not in tags or not utils.owner_is_gone(tags.get(TAG + "owner")):
            return 0
        LOG.warning(
            "Removing stale %s VBD %s (left by %s) in %s",
            tags[TAG + "role"],
            vbd.get("uuid", vbd_ref),
            tags.get(TAG + "owner"),
            self.name,
        )
        self._detach(vbd_ref)
        return 1

    # -- downloads ---------------------------------------------------------------------
    def begin_download(self, image_id: str, size: int) -> Slot:
        cap = self.capacity()
        if size > cap.free:
            raise exception.StoreFull(
                image_id=image_id, store=self.name, needed=size, available=cap.free
            )
        record = {
            "name_label": _slot_label(image_id),
            "name_description": "in progress; destroyed if the download fails",
            "SR": self.sr_ref,
            "virtual_size": str(size),  # 64-bit integers travel as strings
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": _slot_tags(image_id),
            "xenstore_data": {},
            "sm_config": {},
            "tags": [],
        }
        try:
            vdi_ref = self.call("VDI.create", record)
        except XenAPI.Failure as exc:
            self._raise_if_full(exc, image_id, size)
            raise exception.StoreError(
                reason=f"VDI.create for image {image_id} in {self.name} failed: {exc.details}"
            ) from exc
        return self._attach_slot(vdi_ref, image_id, size, "new")

    def _attach_slot(
        self, vdi_ref: str, image_id: str, size: int, how: str, prepare: Any = None
    ) -> VDISlot:
        """The slot of the download VDI ``vdi_ref``, attached read-write; aborted on failure.

        ``prepare()`` runs first (under the same cleanup), ``how`` is said in the log.
        """
        slot = VDISlot(image_id=image_id, size=size, path="", preallocated=True, vdi_ref=vdi_ref)
        try:
            if prepare is not None:
                prepare()
            slot.vbd_ref, slot.path = self._attach(vdi_ref, "RW", role="slot")
        except BaseException:
            self.abort(slot)
            raise
        LOG.info(
            "Image %s: download VDI %s (%s) attached read-write at %s",
            image_id,
            self.call("VDI.get_uuid", vdi_ref),
            how,
            slot.path,
        )
        return slot

    def commit(self, slot: Slot, info: CommitInfo) -> BaseCopy:
        assert isinstance(slot, VDISlot), slot
        image = info.image
        vbd, slot.vbd_ref = slot.vbd_ref, None
        self._detach(vbd)
        try:
            base_ref = self.call("VDI.snapshot", slot.vdi_ref, {})
        except XenAPI.Failure as exc:
            self.abort(slot)
            self._raise_if_full(exc, image.id, slot.size)
            raise exception.StoreError(
                reason=f"VDI.snapshot for image {image.id} in {self.name} failed: {exc.details}"
            ) from exc
        self._tag_base(base_ref, info)
        vdi, slot.vdi_ref = slot.vdi_ref, ""
        self._destroy_vdi(vdi)
        base_uuid = self.call("VDI.get_uuid", base_ref)
        LOG.info("Image %s: base copy VDI %s in %s", image.id, base_uuid, self.name)
        return self._to_base(base_ref, self.call("VDI.get_record", base_ref), {})

    def _tag_base(self, base_ref: str, info: CommitInfo) -> None:
        image = info.image
        now = repr(info.created_at)
        tags = {
            TAG + "role": "base",
            TAG + "image_id": image.id,
            TAG + "size": str(image.size),
            TAG + "hash_algo": image.hash_algo,
            TAG + "hash_value": image.hash_value,
            TAG + "info_hash_v1": info.info_hash_v1 or "",
            TAG + "info_hash_v2": info.info_hash_v2 or "",
            TAG + "created": now,
            TAG + "last_used": now,
            TAG + "record": json.dumps(info.record, sort_keys=True),
            TAG + "projects": ",".join(info.projects),
            TAG + "source": info.source or "",
        }
        # The snapshot carries the slot's tags; replace them in one call so that a crash
        # leaves either a "slot" (cleaned up later) or a complete base copy, never half.
        self.call("VDI.set_other_config", base_ref, tags)
        self.call("VDI.set_name_label", base_ref, f"nova-torrent-images base copy of {image.id}")
        self.call(
            "VDI.set_name_description",
            base_ref,
            f"read-only image {image.id}; instances are clones of it",
        )

    # -- snapshots of instances (doc/source/snapshots.rst) -------------------------------
    def _snapshot_tagged(self, ref: str, image_id: str, tags: dict[str, str]) -> str:
        """``VDI.snapshot`` of the VDI with uuid ``ref``, its tags replaced by ``tags``.

        A snapshot of an instance disk inherits its tags; until the retag it carries the
        instance role and owner, so a crash in between leaves what a restart removes.
        """
        vdi_ref = self.call("VDI.get_by_uuid", ref)
        size = int(self.call("VDI.get_virtual_size", vdi_ref))
        try:
            snap_ref = self.call("VDI.snapshot", vdi_ref, {})
        except XenAPI.Failure as exc:
            self._raise_if_full(exc, image_id, size)
            raise exception.StoreError(
                reason=f"VDI.snapshot of VDI {ref} for image {image_id} in {self.name} "
                f"failed: {exc.details}"
            ) from exc
        try:
            self.call("VDI.set_other_config", snap_ref, tags)
        except BaseException:
            self._destroy_vdi(snap_ref)
            raise
        return snap_ref

    def adopt_disk(self, ref: str, info: CommitInfo) -> BaseCopy:
        image = info.image
        base_ref = self._snapshot_tagged(
            ref,
            image.id,
            {TAG + "role": "slot", TAG + "image_id": image.id, TAG + "owner": utils.owner_tag()},
        )
        try:
            self._tag_base(base_ref, info)
        except BaseException:
            self._destroy_vdi(base_ref)
            raise
        rec = self.call("VDI.get_record", base_ref)
        LOG.info(
            "Image %s: base copy VDI %s in %s, a snapshot of VDI %s (no download)",
            image.id,
            rec["uuid"],
            self.name,
            ref,
        )
        return self._to_base(base_ref, rec, {})

    def keep_for_upload(self, ref: str, image_id: str, project_id: str | None) -> str:
        kept_ref = self._snapshot_tagged(
            ref,
            image_id,
            {
                TAG + "role": "queued-upload",
                TAG + "image_id": image_id,
                TAG + "project": project_id or "",
                TAG + "created": repr(time.time()),
            },
        )
        self.call(
            "VDI.set_name_label", kept_ref, f"nova-torrent-images queued upload of {image_id}"
        )
        self.call(
            "VDI.set_name_description",
            kept_ref,
            f"read-only snapshot for image {image_id}, uploaded when Glance is back",
        )
        return self.call("VDI.get_uuid", kept_ref)

    def drop_kept(self, ref: str) -> None:
        try:
            vdi_ref = self.call("VDI.get_by_uuid", ref)
        except XenAPI.Failure as exc:
            if failure_code(exc) in ("UUID_INVALID", "HANDLE_INVALID"):
                return
            raise
        for vbd in self._vbds(vdi_ref):
            self._detach(vbd)
        self._destroy_vdi(vdi_ref)

    def disk_size(self, ref: str) -> int:
        """A kept copy's virtual size, from its record (no attach)."""
        return int(self.call("VDI.get_virtual_size", self.call("VDI.get_by_uuid", ref)))

    def begin_from(self, base: BaseCopy, image_id: str, size: int) -> Slot:
        """A download VDI that is a ``VDI.clone`` of ``base`` (copy on write), attached RW.

        Until its retag the clone carries the base's tags; a crash then leaves what
        :meth:`remove_stale_slots` removes under the base image's lock.
        """
        try:
            vdi_ref = self.call("VDI.clone", self.call("VDI.get_by_uuid", base.ref), {})
        except XenAPI.Failure as exc:
            self._raise_if_full(exc, image_id, size)
            raise exception.StoreError(
                reason=f"VDI.clone of base copy {base.ref} for image {image_id} in "
                f"{self.name} failed: {exc.details}"
            ) from exc

        def retag() -> None:
            self.call("VDI.set_other_config", vdi_ref, _slot_tags(image_id))
            self.call("VDI.set_name_label", vdi_ref, _slot_label(image_id))
            if int(self.call("VDI.get_virtual_size", vdi_ref)) < size:
                self.call("VDI.resize", vdi_ref, str(size))

        how = f"cloned from the base copy of image {base.image_id}"
        return self._attach_slot(vdi_ref, image_id, size, how, retag)

    def parent_base(self, ref: str) -> BaseCopy | None:
        tags = self.call("VDI.get_other_config", self.call("VDI.get_by_uuid", ref))
        parent = tags.get(TAG + "base")
        if not parent:
            return None
        return next((b for b in self.list() if b.ref == parent), None)

    def kept_for_upload(self) -> dict[str, str]:
        return {
            rec["uuid"]: rec["other_config"].get(TAG + "image_id", "")
            for rec in self._our_vdis().values()
            if rec["other_config"].get(TAG + "role") == "queued-upload"
        }

    def abort(self, slot: Slot) -> None:
        assert isinstance(slot, VDISlot), slot
        vbd, slot.vbd_ref = slot.vbd_ref, None
        vdi, slot.vdi_ref = slot.vdi_ref, ""
        try:
            self._detach(vbd)
        except XenAPI.Failure:
            LOG.exception("Image %s: could not detach download VBD %s", slot.image_id, vbd)
        if vdi:
            try:
                self._destroy_vdi(vdi)
                LOG.info("Image %s: download VDI destroyed", slot.image_id)
            except XenAPI.Failure:
                LOG.exception(
                    "Image %s: could not destroy download VDI %s; it is tagged "
                    "as a slot and removed at the next start",
                    slot.image_id,
                    vdi,
                )

    # -- base copies -------------------------------------------------------------------
    @contextlib.contextmanager
    def seed_path(self, base: BaseCopy) -> Iterator[str]:
        with self.attached(base.ref, "RO", role="seed") as path:
            yield path

    @contextlib.contextmanager
    def attached(self, ref: str, mode: str = "RO", role: str = "attach") -> Iterator[str]:
        """Attach the VDI with uuid ``ref`` to the compute VM for the context's duration."""
        vdi_ref = self.call("VDI.get_by_uuid", ref)
        vbd_ref, path = self._attach(vdi_ref, mode, role)
        try:
            yield path
        finally:
            self._detach(vbd_ref)

    def clone(self, base: BaseCopy, label: str) -> str:
        base_ref = self.call("VDI.get_by_uuid", base.ref)
        try:
            clone_ref = self.call("VDI.clone", base_ref, {})
        except XenAPI.Failure as exc:
            self._raise_if_full(exc, base.image_id, base.size)
            raise
        # A clone inherits its base's tags: rewrite them, or it would pose as a base copy.
        self.call(
            "VDI.set_other_config",
            clone_ref,
            {
                TAG + "role": "instance",
                TAG + "image_id": base.image_id,
                TAG + "base": base.ref,
                TAG + "owner": utils.owner_tag(),
            },
        )
        self.call("VDI.set_name_label", clone_ref, label)
        self.call("VDI.set_name_description", clone_ref, f"clone of image {base.image_id}")
        self.touch(base)
        return self.call("VDI.get_uuid", clone_ref)

    def touch(self, base: BaseCopy) -> None:
        base.last_used = time.time()
        ref = self.call("VDI.get_by_uuid", base.ref)
        # XAPI has no map update: remove, then add. A concurrent touch may add first; its
        # time is as good as ours.
        self.call("VDI.remove_from_other_config", ref, TAG + "last_used")
        try:
            self.call("VDI.add_to_other_config", ref, TAG + "last_used", repr(base.last_used))
        except XenAPI.Failure as exc:
            if failure_code(exc) != "MAP_DUPLICATE_KEY":
                raise

    def add_project(self, base: BaseCopy, project_id: str) -> None:
        if project_id in base.projects:
            return
        ref = self.call("VDI.get_by_uuid", base.ref)
        known = self.call("VDI.get_other_config", ref).get(TAG + "projects", "")
        projects = dict.fromkeys([*known.split(","), *base.projects, project_id])
        base.projects = tuple(p for p in projects if p)
        self.call("VDI.remove_from_other_config", ref, TAG + "projects")
        try:
            self.call("VDI.add_to_other_config", ref, TAG + "projects", ",".join(base.projects))
        except XenAPI.Failure as exc:
            if failure_code(exc) != "MAP_DUPLICATE_KEY":
                raise

    def refresh_record(
        self, base: BaseCopy, record: dict[str, Any], projects: tuple[str, ...]
    ) -> None:
        # XAPI has no map update, and VDI.set_other_config would undo what other hosts
        # of a shared SR write meanwhile: key by key, in an order that fails closed. The
        # record is removed first and added last, so that a failure or a crash in between
        # leaves a base copy without nti_record (no offline boot at all, until the next
        # online boot writes it), never the old record with new projects or the reverse.
        ref = self.call("VDI.get_by_uuid", base.ref)
        self.call("VDI.remove_from_other_config", ref, TAG + "record")
        base.record = {}
        self.call("VDI.remove_from_other_config", ref, TAG + "projects")
        base.projects = ()
        values = (
            (TAG + "projects", ",".join(projects)),
            (TAG + "record", json.dumps(record, sort_keys=True)),  # as _tag_base writes it
        )
        for key, value in values:
            try:
                self.call("VDI.add_to_other_config", ref, key, value)
            except XenAPI.Failure as exc:
                # Another host of the SR refreshed it from Glance just now: as fresh.
                if failure_code(exc) != "MAP_DUPLICATE_KEY":
                    raise
        base.record, base.projects = dict(record), tuple(projects)

    def destroy(self, base: BaseCopy) -> None:
        try:
            self._destroy_vdi(self.call("VDI.get_by_uuid", base.ref))
        except XenAPI.Failure as exc:
            if failure_code(exc) == "VDI_IN_USE":
                raise exception.StoreError(
                    reason=f"the base copy of image {base.image_id} (VDI {base.ref}) is "
                    "attached, most likely seeded by nova-compute; it is removed when "
                    "that process stops seeding it (next prune, or stop the seed first)"
                ) from exc
            raise
        LOG.info("Image %s: base copy VDI %s destroyed", base.image_id, base.ref)

    def capacity(self) -> Capacity:
        sr = self.call("SR.get_record", self.sr_ref)
        total = int(sr["physical_size"])
        free = total - int(sr["physical_utilisation"])
        ours = sum(b.size for b in self.list())
        return Capacity(total=total, free=free, ours=ours)

    # -- plumbing ----------------------------------------------------------------------
    def _raise_if_full(self, exc: XenAPI.Failure, image_id: str, needed: int) -> None:
        """Turn the SR's out-of-space failure into StoreFull naming the SR and sizes."""
        if failure_code(exc) == "SR_BACKEND_FAILURE_44":
            raise exception.StoreFull(
                image_id=image_id,
                store=self.name,
                needed=needed,
                available=self.capacity().free,
            ) from exc

    def _attach(self, vdi_ref: str, mode: str, role: str = "attach") -> tuple[str, str]:
        vbd_ref = self.call(
            "VBD.create",
            {
                "VM": self.vm_ref,
                "VDI": vdi_ref,
                "userdevice": "autodetect",
                "bootable": False,
                "mode": mode,
                "type": "Disk",
                "empty": False,
                "other_config": {TAG + "role": role, TAG + "owner": utils.owner_tag()},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            },
        )
        try:
            self.call("VBD.plug", vbd_ref)
            path = os.path.join(self.device_dir, self.call("VBD.get_device", vbd_ref))
            deadline = time.monotonic() + DEVICE_WAIT
            while not os.path.exists(path):  # udev may lag behind the plug
                if time.monotonic() > deadline:
                    raise exception.StoreError(
                        reason=f"device {path} did not appear within {DEVICE_WAIT:.0f}s "
                        "after VBD.plug (check [torrent_images] xenapi_device_dir)"
                    )
                time.sleep(0.1)
        except BaseException:
            self._detach(vbd_ref)
            raise
        return vbd_ref, path

    def _detach(self, vbd_ref: str | None) -> None:
        if vbd_ref is None:
            return
        try:
            if self.call("VBD.get_currently_attached", vbd_ref):
                self.call("VBD.unplug", vbd_ref)
            self.call("VBD.destroy", vbd_ref)
        except XenAPI.Failure as exc:
            if failure_code(exc) != "HANDLE_INVALID":
                raise

    def _destroy_vdi(self, vdi_ref: str) -> None:
        try:
            self.call("VDI.destroy", vdi_ref)
        except XenAPI.Failure as exc:
            if failure_code(exc) != "HANDLE_INVALID":
                raise


def _json_tag(value: str | None) -> dict[str, Any]:
    try:
        record = json.loads(value) if value else {}
    except ValueError:
        LOG.warning("Ignoring an unreadable nti_record tag")
        return {}
    return record if isinstance(record, dict) else {}
