"""XenServer store: downloads land in a VDI of the SR, base copies are VDI snapshots.

Write path (DESIGN section 4): ``VDI.create`` in the SR, a read-write VBD on the VM that
runs nova-compute, ``VBD.plug``; the device (``/dev/xvdX``) is where libtorrent writes with
the posix disk backend. After verification the VBD goes away, ``VDI.snapshot`` makes the
base copy, tagged in ``other_config``, and the download VDI is destroyed. Base copies are
only ever attached read-only; instances get ``VDI.clone`` of them.

Tags (``other_config``, all strings) are the registry:
``nti_role`` = ``slot`` (a download in progress), ``base`` or ``instance``;
``nti_image_id``; on base copies ``nti_size``, ``nti_hash_algo``, ``nti_hash_value``,
``nti_info_hash_v1``, ``nti_info_hash_v2``, ``nti_created``, ``nti_last_used``; on
instance disks ``nti_base`` (uuid of their base copy). A crash leaves at most ``slot``
VDIs, which :meth:`XenAPIStore.remove_stale_slots` destroys.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import XenAPI
from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.stores.base import BaseCopy, BaseCopyStore, Capacity, CommitInfo, Slot

LOG = logging.getLogger(__name__)

TAG = "nti_"
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


def _owner_is_gone(owner: str | None) -> bool:
    """True when ``host:pid`` names a process of this host that no longer runs."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's (shared SR) or unknown: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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


class XenAPIStore(BaseCopyStore):
    """Base copies as tagged VDI snapshots in one SR."""

    disk_formats = ("raw",)

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
    def from_conf(cls, session: Any, conf: cfg.ConfigOpts) -> XenAPIStore:
        opts = conf.torrent_images
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
        )

    def _attached_by_others(self, vbd_ref: str) -> bool:
        try:
            vbd = self.call("VBD.get_record", vbd_ref)
        except XenAPI.Failure as exc:
            if failure_code(exc) == "HANDLE_INVALID":  # detached meanwhile
                return False
            raise
        return bool(vbd["currently_attached"]) and vbd["other_config"].get(TAG + "role") != "seed"

    def list(self) -> list[BaseCopy]:
        vdis = self._our_vdis()
        return [
            self._to_base(ref, rec, vdis)
            for ref, rec in vdis.items()
            if rec["other_config"].get(TAG + "role") == "base"
        ]

    def lookup(self, image_id: str) -> BaseCopy | None:
        for base in self.list():
            if base.image_id == image_id:
                return base
        return None

    def remove_stale_slots(self) -> int:
        """Destroy download VDIs that crashed processes of this host left behind.

        A slot belongs to a process (``nti_owner`` = host name and pid); one whose process
        is gone is detached and destroyed. Base copies are never touched.
        """
        removed = 0
        for ref, rec in self._our_vdis().items():
            tags = rec["other_config"]
            if tags.get(TAG + "role") != "slot" or not _owner_is_gone(tags.get(TAG + "owner")):
                continue
            LOG.warning(
                "Removing stale download VDI %s of image %s (left by %s) in %s",
                rec["uuid"],
                tags.get(TAG + "image_id"),
                tags.get(TAG + "owner"),
                self.name,
            )
            for vbd in rec["VBDs"]:
                self._detach(vbd)
            self._destroy_vdi(ref)
            removed += 1
        return removed

    # -- downloads ---------------------------------------------------------------------
    def begin_download(self, image_id: str, size: int) -> Slot:
        cap = self.capacity()
        if size > cap.free:
            raise exception.StoreFull(
                image_id=image_id, store=self.name, needed=size, available=cap.free
            )
        record = {
            "name_label": f"nova-torrent-images download of {image_id}",
            "name_description": "in progress; destroyed if the download fails",
            "SR": self.sr_ref,
            "virtual_size": str(size),  # 64-bit integers travel as strings
            "type": "user",
            "sharable": False,
            "read_only": False,
            # The owner lets a restarted process tell its own crashed downloads from
            # live downloads of other processes on this host.
            "other_config": {
                TAG + "role": "slot",
                TAG + "image_id": image_id,
                TAG + "owner": f"{socket.gethostname()}:{os.getpid()}",
            },
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
        slot = Slot(image_id=image_id, size=size, path="", handle={"vdi": vdi_ref})
        try:
            vbd_ref, path = self._attach(vdi_ref, "RW")
        except BaseException:
            self.abort(slot)
            raise
        slot.handle["vbd"] = vbd_ref
        slot.path = path
        LOG.info(
            "Image %s: download VDI %s attached read-write at %s",
            image_id,
            self.call("VDI.get_uuid", vdi_ref),
            path,
        )
        return slot

    def commit(self, slot: Slot, info: CommitInfo) -> BaseCopy:
        image = info.image
        self._detach(slot.handle.pop("vbd", None))
        try:
            base_ref = self.call("VDI.snapshot", slot.handle["vdi"], {})
        except XenAPI.Failure as exc:
            self.abort(slot)
            self._raise_if_full(exc, image.id, slot.size)
            raise exception.StoreError(
                reason=f"VDI.snapshot for image {image.id} in {self.name} failed: {exc.details}"
            ) from exc
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
        self._destroy_vdi(slot.handle.pop("vdi"))
        base_uuid = self.call("VDI.get_uuid", base_ref)
        LOG.info("Image %s: base copy VDI %s in %s", image.id, base_uuid, self.name)
        return self._to_base(base_ref, self.call("VDI.get_record", base_ref), {})

    def abort(self, slot: Slot) -> None:
        vbd = slot.handle.pop("vbd", None)
        vdi = slot.handle.pop("vdi", None)
        try:
            self._detach(vbd)
        except XenAPI.Failure:
            LOG.exception("Image %s: could not detach download VBD %s", slot.image_id, vbd)
        if vdi is not None:
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
    def attached(self, vdi_uuid: str, mode: str = "RO", role: str = "attach") -> Iterator[str]:
        """Attach a VDI to the compute VM for the duration of the context."""
        vdi_ref = self.call("VDI.get_by_uuid", vdi_uuid)
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
                "other_config": {TAG + "role": role},
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
