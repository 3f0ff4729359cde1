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

"""FakeXenAPI: the state of one fake host and the XAPI calls on it (see the package doc)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import XenAPI

from ._devices import LocalDevices, copy_sparse, device_name, loop_devices_available
from ._schema import (
    BACKREFS,
    CLASSES,
    COPIED_VDI_FIELDS,
    DEFAULTS,
    LOGIN_METHODS,
    NULL_REF,
    PROTECTED,
    VBD_CREATE_FIELDS,
    VBD_TYPES,
    VDI_CREATE_FIELDS,
    VDI_TYPES,
    Filter,
    GiB,
    MiB,
    coerce,
    failure,
    now,
    parse_int,
    to_wire,
)
from ._server import InProcessTransport, RequestHandler, ServerDispatch, XMLRPCServer

#: ``other_config`` key marking the VM that stands for the nova-compute VM.
COMPUTE_VM_KEY = "nova_torrent_images_compute_vm"
#: How long :meth:`FakeXenAPI.kill_after` waits for the killed process to be dead.
KILL_WAIT = 10.0


def _url(server: XMLRPCServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


@dataclasses.dataclass(frozen=True)
class FakeState:
    """The refs of every object at one moment: a baseline for :meth:`FakeXenAPI.leaks`."""

    refs: Mapping[str, frozenset[str]]


def process_dead(pid: int) -> bool:
    """True when ``pid`` is gone or a zombie (dead, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel (a zombie counts as alive here)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the
    # last closing parenthesis.
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


@dataclasses.dataclass
class KillTrigger:
    """A kill armed by :meth:`FakeXenAPI.kill_after`; ``fired`` is set when it strikes
    (just before the signal is sent: wait for the process itself to see it dead)."""

    pid: int
    n: int
    methods: frozenset[str] | None
    sig: int = signal.SIGKILL
    seen: int = 0  # calls of interest carried out since it was armed
    #: ``(index in FakeXenAPI.calls, method)`` of the call after which it killed.
    call: tuple[int, str] | None = None
    fired: threading.Event = dataclasses.field(default_factory=threading.Event)

    def matches(self, method: str) -> bool:
        return self.methods is None or method in self.methods


@dataclasses.dataclass(frozen=True)
class LeakReport:
    """What a test left behind. Falsy when nothing leaked; ``str()`` describes it."""

    sessions: tuple[str, ...] = ()
    vbds: tuple[str, ...] = ()
    attached_vbds: tuple[str, ...] = ()
    vdis: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    descriptions: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def __bool__(self) -> bool:
        return any((self.sessions, self.vbds, self.attached_vbds, self.vdis, self.tasks))

    def __str__(self) -> str:
        parts = []
        for name in ("sessions", "vbds", "attached_vbds", "vdis", "tasks"):
            refs = getattr(self, name)
            if refs:
                items = ", ".join(self.descriptions.get(r, r) for r in refs)
                parts.append(f"{len(refs)} {name}: {items}")
        return "; ".join(parts) or "no leaks"


class FakeXenAPI:
    """One fake XenServer host: pool, host, SRs, VDIs, VBDs, VMs, tasks and sessions.

    Build a ready host with :meth:`create`; use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str] | None = None,
        *,
        use_loop_devices: bool | None = None,
        username: str = "root",
        password: str | None = None,
        vdi_size_granularity: int = 2 * MiB,
    ) -> None:
        """An empty fake (no host yet). ``password=None`` accepts any credentials."""
        if root_dir is None:
            self._root, self._owns_root = Path(tempfile.mkdtemp(prefix="fake-xapi-")), True
        else:
            self._root, self._owns_root = Path(root_dir), False
        self._sr_root = self._root / "sr"
        self._dev_root = self._root / "dev"
        self._sr_root.mkdir(parents=True, exist_ok=True)
        self._dev_root.mkdir(parents=True, exist_ok=True)
        if use_loop_devices is None:
            use_loop_devices = loop_devices_available(self._root)
        elif use_loop_devices and not loop_devices_available(self._root):
            raise RuntimeError("use_loop_devices=True but losetup does not work here")
        self._devices = LocalDevices(use_loop_devices)
        self._username, self._password = username, password
        self._granularity = max(1, vdi_size_granularity)
        self._lock = threading.RLock()
        self._db: dict[str, dict[str, dict[str, Any]]] = {cls: {} for cls in DEFAULTS}
        self._files: dict[str, Path] = {}
        # Copy on write, like VHD chains: a snapshot or clone names its source here and
        # gets its own bytes only when something reads, attaches or destroys along the
        # chain. VDI.clone is then O(1), as on a real SR.
        self._pending_copy: dict[str, str] = {}
        self._handlers: dict[tuple[str, str], Callable[..., Any]] = {
            ("session", "logout"): self._session_logout,
            ("session", "local_logout"): self._session_logout,
            ("session", "get_this_host"): self._session_get_this_host,
            ("task", "create"): self._task_create,
            ("task", "destroy"): self._task_destroy,
            ("SR", "scan"): self._sr_scan,
            ("VDI", "create"): self._vdi_create,
            ("VDI", "destroy"): self._vdi_destroy,
            ("VDI", "snapshot"): self._vdi_snapshot,
            ("VDI", "clone"): self._vdi_clone,
            ("VDI", "copy"): self._vdi_copy,
            ("VDI", "resize"): self._vdi_resize,
            ("VBD", "create"): self._vbd_create,
            ("VBD", "destroy"): self._vbd_destroy,
            ("VBD", "plug"): self._vbd_plug,
            ("VBD", "unplug"): self._vbd_unplug,
            ("VBD", "unplug_force"): self._vbd_unplug,
        }
        self._server: XMLRPCServer | None = None
        self._server_thread: threading.Thread | None = None
        self._closed = False
        self._calls: list[str] = []  # the method of every call carried out, in order
        self._kill: KillTrigger | None = None
        self.host_ref = self.pool_ref = self.sr_ref = self.compute_vm_ref = NULL_REF
        self._baseline = self.snapshot_state()

    @classmethod
    def create(
        cls,
        root_dir: str | os.PathLike[str] | None = None,
        *,
        sr_size: int = 100 * GiB,
        sr_name: str = "Local storage",
        sr_type: str = "ext",
        use_loop_devices: bool | None = None,
        username: str = "root",
        password: str | None = None,
        vdi_size_granularity: int = 2 * MiB,
    ) -> FakeXenAPI:
        """A ready host: one pool, one host, the compute VM, one SR (the pool's default)."""
        fake = cls(
            root_dir,
            use_loop_devices=use_loop_devices,
            username=username,
            password=password,
            vdi_size_granularity=vdi_size_granularity,
        )
        with fake._lock:
            fake.host_ref = fake._new("host", name_label="fake-host", hostname="fake-host")
            fake.pool_ref = fake._new("pool", master=fake.host_ref)
            fake.compute_vm_ref = fake.add_vm(
                "nova-compute", is_control_domain=True, other_config={COMPUTE_VM_KEY: "true"}
            )
            fake.sr_ref = fake.add_sr(sr_name, sr_size, sr_type=sr_type, default=True)
            fake._baseline = fake.snapshot_state()
        return fake

    # ----------------------------------------------------------------- helpers for tests

    @property
    def use_loop_devices(self) -> bool:
        """True when plugged VBDs are loop devices, False when symlinks to files."""
        return self._devices.use_loop_devices

    @property
    def root_dir(self) -> Path:
        return self._root

    @property
    def compute_vm_uuid(self) -> str:
        """uuid of the VM that runs nova-compute (VBDs for downloads are plugged into it)."""
        return self._db["VM"][self.compute_vm_ref]["uuid"]

    def configure(self, conf: Any) -> None:
        """Point ``[torrent_images]`` of ``conf`` at this fake (compute VM, device dir), so
        the store is built as in production, by
        :func:`nova_torrent_images.compute.stores.open_store`.
        """
        conf.set_override("xenapi_compute_vm_uuid", self.compute_vm_uuid, group="torrent_images")
        conf.set_override("xenapi_device_dir", str(self.dev_dir()), group="torrent_images")

    def add_sr(
        self,
        name_label: str,
        physical_size: int,
        *,
        sr_type: str = "ext",
        shared: bool = False,
        default: bool = False,
    ) -> str:
        """Add an SR with a plugged PBD on the host; ``default`` makes it pool.default_SR."""
        with self._lock:
            sr_ref = self._new(
                "SR",
                name_label=name_label,
                physical_size=int(physical_size),
                type=sr_type,
                shared=shared,
            )
            self._new("PBD", host=self.host_ref, SR=sr_ref, currently_attached=True)
            (self._sr_root / self._db["SR"][sr_ref]["uuid"]).mkdir()
            if default and self.pool_ref != NULL_REF:
                self._db["pool"][self.pool_ref]["default_SR"] = sr_ref
            return sr_ref

    def add_vm(
        self,
        name_label: str,
        *,
        power_state: str = "Running",
        is_control_domain: bool = False,
        other_config: Mapping[str, str] | None = None,
    ) -> str:
        """Add a VM (VBDs can only be plugged into a Running one)."""
        with self._lock:
            running = power_state == "Running"
            return self._new(
                "VM",
                name_label=name_label,
                power_state=power_state,
                is_control_domain=is_control_domain,
                resident_on=self.host_ref if running else NULL_REF,
                domid=(0 if is_control_domain else len(self._db["VM"]) + 1) if running else -1,
                other_config=dict(other_config or {}),
            )

    def get_record(self, cls: str, ref: str) -> dict[str, Any]:
        """A copy of a record as stored (ints as ints), without going through a session."""
        with self._lock:
            return copy.deepcopy(self._get(cls, ref))

    def all_refs(self, cls: str) -> list[str]:
        with self._lock:
            return list(self._db[cls])

    def vdi_path(self, vdi_ref: str) -> Path:
        """The sparse file holding a VDI's contents."""
        with self._lock:
            self._get("VDI", vdi_ref)
            self._materialize(vdi_ref)
            return self._files[vdi_ref]

    def device_path(self, vbd_ref: str) -> str:
        """Local path of a plugged VBD: ``/dev/loopN`` (loop mode) or a symlink to the file."""
        with self._lock:
            self._get("VBD", vbd_ref)
            path = self._devices.path(vbd_ref)
            if path is None:
                raise ValueError(f"VBD {vbd_ref} is not plugged")
            return path

    def dev_dir(self, vm_ref: str | None = None) -> Path:
        """Directory with one ``<VBD.device>`` symlink per plugged VBD of a VM (default:
        the compute VM): the fake's stand-in for that VM's ``/dev``."""
        with self._lock:
            vm = self._get("VM", vm_ref or self.compute_vm_ref)
            return self._dev_root / vm["uuid"]

    def expire_session(self, session_ref: str) -> None:
        """Forget a session, as XAPI does on restart or timeout (clients log in again)."""
        with self._lock:
            self._db["session"].pop(session_ref, None)

    def snapshot_state(self) -> FakeState:
        with self._lock:
            return FakeState({cls: frozenset(refs) for cls, refs in self._db.items()})

    def leaks(self, baseline: FakeState | None = None) -> LeakReport:
        """Sessions, VBDs, VDIs and tasks that exist now but not in ``baseline`` (default:
        the state right after :meth:`create`)."""
        with self._lock:
            base = (baseline or self._baseline).refs

            def new(cls: str) -> tuple[str, ...]:
                return tuple(r for r in self._db[cls] if r not in base.get(cls, ()))

            vbds = new("VBD")
            attached = tuple(r for r in vbds if self._db["VBD"][r]["currently_attached"])
            sessions, vdis, tasks = new("session"), new("VDI"), new("task")
            descriptions = {
                ref: self._describe(cls, ref)
                for cls, refs in (
                    ("session", sessions),
                    ("VBD", vbds),
                    ("VDI", vdis),
                    ("task", tasks),
                )
                for ref in refs
            }
            return LeakReport(sessions, vbds, attached, vdis, tasks, descriptions)

    def check_leaks(self, baseline: FakeState | None = None) -> None:
        """Raise AssertionError describing any leak (see :meth:`leaks`)."""
        report = self.leaks(baseline)
        if report:
            raise AssertionError(f"fake XAPI leaks: {report}")

    @property
    def calls(self) -> tuple[str, ...]:
        """The method (``"VDI.create"``, ``"session.login_with_password"``) of every call
        carried out since :meth:`create` or the last :meth:`clear_calls`, failed ones
        included, in the order the fake ran them."""
        with self._lock:
            return tuple(self._calls)

    def clear_calls(self) -> None:
        """Start :attr:`calls` afresh (e.g. to count the calls of one operation)."""
        with self._lock:
            self._calls.clear()

    def kill_after(
        self,
        pid: int,
        n: int,
        methods: Collection[str] | None = None,
        *,
        sig: int = signal.SIGKILL,
    ) -> KillTrigger:
        """Kill process ``pid`` right after the ``n``-th call (1-based, counted from now)
        whose method is in ``methods`` (None: every call) has been carried out.

        The call's effect on the state is done, its answer is not sent yet: the client
        dies not knowing whether its call happened, as a ``kill -9`` of nova-compute
        would leave it. The fake's lock is held from the kill until the process is dead
        (a zombie counts as dead), so no later call of that process, from any of its
        threads, reaches the state. One kill at a time: arming replaces an earlier one.
        Returns the trigger; its ``fired`` event is set when it strikes.
        """
        if n < 1:
            raise ValueError("n counts calls from 1")
        trigger = KillTrigger(pid, n, None if methods is None else frozenset(methods), sig)
        with self._lock:
            self._kill = trigger
        return trigger

    def cancel_kill(self) -> None:
        """Disarm the trigger of :meth:`kill_after`, if it has not struck yet."""
        with self._lock:
            self._kill = None

    def session(
        self, username: str = "root", password: str = "", originator: str = "fake-xapi"
    ) -> XenAPI.Session:
        """A logged-in real ``XenAPI.Session`` talking to this fake in process."""
        session = XenAPI.Session("http://fake-xapi/", transport=InProcessTransport(self))
        session.login_with_password(username, password, "1.0", originator)
        return session

    def remote_session(
        self, username: str = "root", password: str = "", originator: str = "fake-xapi"
    ) -> XenAPI.Session:
        """A logged-in real ``XenAPI.Session`` over HTTP (starts the server if needed)."""
        session = XenAPI.Session(self.start_server())
        session.login_with_password(username, password, "1.0", originator)
        return session

    # ----------------------------------------------------------------- server, lifetime

    @property
    def url(self) -> str | None:
        """The XML-RPC server's URL, or None when not serving."""
        server = self._server
        return None if server is None else _url(server)

    def start_server(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve XML-RPC on ``host:port`` (0: a free port) in a thread; return the URL."""
        with self._lock:
            if self._server is None:
                server = XMLRPCServer(
                    (host, port), requestHandler=RequestHandler, logRequests=False, allow_none=True
                )
                server.register_instance(ServerDispatch(self))
                self._server_thread = threading.Thread(
                    target=server.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name=f"fake-xapi-{server.server_address[1]}",
                    daemon=True,
                )
                self._server_thread.start()
                self._server = server
            return _url(self._server)

    def stop(self) -> None:
        """Stop the XML-RPC server (the state stays)."""
        server, thread = self._server, self._server_thread
        self._server = self._server_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def close(self) -> None:
        """Stop the server, detach every loop device and remove the content directories."""
        self.stop()
        with self._lock:
            for vbd_ref in self._devices.keys():
                self._devices.detach(vbd_ref)
                self._db["VBD"][vbd_ref]["currently_attached"] = False
            shutil.rmtree(self._sr_root, ignore_errors=True)
            shutil.rmtree(self._dev_root, ignore_errors=True)
            if self._owns_root:
                shutil.rmtree(self._root, ignore_errors=True)
            self._closed = True

    def __enter__(self) -> FakeXenAPI:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------- dispatcher

    def call(self, method: str, params: tuple[Any, ...] | list[Any]) -> dict[str, Any]:
        """Run one XAPI call, e.g. ``call("VDI.get_record", [session, ref])``, and return
        the wire answer: ``{"Status": "Success", "Value": ...}`` or a Failure."""
        with self._lock:
            try:
                if self._closed:
                    raise failure("INTERNAL_ERROR", "fake XAPI is closed")
                value = self._invoke(method, list(params))
                answer = {"Status": "Success", "Value": to_wire(value)}
            except XenAPI.Failure as exc:
                answer = {"Status": "Failure", "ErrorDescription": [str(d) for d in exc.details]}
            if not self._closed:
                self._calls.append(method)
                self._maybe_kill(method)
        return answer

    def _maybe_kill(self, method: str) -> None:
        """Carry out an armed :meth:`kill_after` if ``method`` is its ``n``-th call."""
        trigger = self._kill
        if trigger is None or not trigger.matches(method):
            return
        trigger.seen += 1
        if trigger.seen < trigger.n:
            return
        self._kill = None
        trigger.call = (len(self._calls) - 1, method)
        trigger.fired.set()  # before the kill: whoever waits for the process sees it set
        try:
            os.kill(trigger.pid, trigger.sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + KILL_WAIT
        while trigger.sig == signal.SIGKILL and not process_dead(trigger.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {trigger.pid} still alive after SIGKILL")
            time.sleep(0.001)

    def _invoke(self, method: str, params: list[Any]) -> Any:
        cls_name, _, name = method.partition(".")
        cls = CLASSES.get(cls_name.lower())
        handler = self._resolve(cls, name) if cls else None
        if cls is None or handler is None:
            raise failure("MESSAGE_METHOD_UNKNOWN", method)
        signature = inspect.signature(handler)
        try:
            signature.bind(*params)
        except TypeError:
            expected = len(signature.parameters)
            raise failure(
                "MESSAGE_PARAMETER_COUNT_MISMATCH", method, expected, len(params)
            ) from None
        if not (cls == "session" and name in LOGIN_METHODS):
            session = self._db["session"].get(params[0]) if isinstance(params[0], str) else None
            if session is None:
                raise failure("SESSION_INVALID", params[0])
            session["last_active"] = now()
        return handler(*params)

    def _resolve(self, cls: str, name: str) -> Callable[..., Any] | None:
        if cls == "session" and name in LOGIN_METHODS:
            return self._session_login
        handler = self._handlers.get((cls, name))
        if handler is not None:
            return handler
        fields = DEFAULTS[cls]
        generic: dict[str, Callable[..., Any]] = {
            "get_record": self._get_record,
            "get_all": self._get_all,
            "get_all_records": self._get_all_records,
            "get_all_records_where": self._get_all_records_where,
            "get_by_uuid": self._get_by_uuid,
        }
        if "name_label" in fields:
            generic["get_by_name_label"] = self._get_by_name_label
        if name in generic:
            return functools.partial(generic[name], cls)
        writable = {f for f in fields if f not in PROTECTED[cls]}
        maps = {f for f in writable if isinstance(fields[f], dict)}
        for prefix, allowed, func in (
            ("get_", set(fields), self._get_field),
            ("set_", writable, self._set_field),
            ("add_to_", maps, self._add_to_map),
            ("remove_from_", maps, self._remove_from_map),
        ):
            field = name.removeprefix(prefix)
            if name.startswith(prefix) and field in allowed:
                return functools.partial(func, cls, field)
        return None

    # ----------------------------------------------------------------- database

    def _new(self, cls: str, **fields: Any) -> str:
        ref = f"OpaqueRef:{uuid.uuid4()}"
        record = copy.deepcopy(DEFAULTS[cls])
        record.update(fields)
        record["uuid"] = record["uuid"] or str(uuid.uuid4())
        self._db[cls][ref] = record
        for field, parent_cls, children in BACKREFS.get(cls, ()):
            parent = self._db[parent_cls].get(record[field])
            if parent is not None:
                parent[children].append(ref)
        return ref

    def _delete(self, cls: str, ref: str) -> dict[str, Any]:
        record = self._db[cls].pop(ref)
        for field, parent_cls, children in BACKREFS.get(cls, ()):
            parent = self._db[parent_cls].get(record[field])
            if parent is not None and ref in parent[children]:
                parent[children].remove(ref)
        return record

    def _get(self, cls: str, ref: Any) -> dict[str, Any]:
        record = self._db[cls].get(ref) if isinstance(ref, str) else None
        if record is None:
            raise failure("HANDLE_INVALID", cls, ref)
        return record

    def _describe(self, cls: str, ref: str) -> str:
        record = self._db[cls][ref]
        if cls == "VBD":
            vdi = self._db["VDI"].get(record["VDI"], {})
            what = f"{record['mode']} on VDI {vdi.get('name_label', record['VDI'])!r}"
            if record["currently_attached"]:
                what += f", attached as {record['device']}"
        elif cls == "session":
            what = f"user {record['auth_user_name']!r}, originator {record['originator']!r}"
        else:
            what = repr(record["name_label"])
        return f"{cls} {record['uuid']} ({what})"

    def _from_record(
        self, cls: str, record: Any, required: tuple[str, ...], optional: tuple[str, ...]
    ) -> dict[str, Any]:
        """Fields of a ``<class>.create`` record: missing or mistyped -> FIELD_TYPE_ERROR."""
        if not isinstance(record, dict):
            raise failure("FIELD_TYPE_ERROR", "args")
        missing = [f for f in required if f not in record]
        if missing:
            raise failure("FIELD_TYPE_ERROR", missing[0])
        return {f: coerce(cls, f, record[f]) for f in required + optional if f in record}

    # ----------------------------------------------------------------- generic calls

    def _get_record(self, cls: str, session: str, ref: str) -> dict[str, Any]:
        return copy.deepcopy(self._get(cls, ref))

    def _get_all(self, cls: str, session: str) -> list[str]:
        return list(self._db[cls])

    def _get_all_records(self, cls: str, session: str) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self._db[cls])

    def _get_all_records_where(
        self, cls: str, session: str, expr: str
    ) -> dict[str, dict[str, Any]]:
        try:
            match = Filter(str(expr)).match
        except ValueError as exc:
            raise failure(
                "INTERNAL_ERROR", f"Db_filter.Expression_error({expr!r}): {exc}"
            ) from None
        return {ref: copy.deepcopy(rec) for ref, rec in self._db[cls].items() if match(rec)}

    def _get_by_uuid(self, cls: str, session: str, uuid_: str) -> str:
        for ref, record in self._db[cls].items():
            if record["uuid"] == uuid_:
                return ref
        raise failure("UUID_INVALID", cls, uuid_)

    def _get_by_name_label(self, cls: str, session: str, label: str) -> list[str]:
        return [ref for ref, rec in self._db[cls].items() if rec["name_label"] == label]

    def _get_field(self, cls: str, field: str, session: str, ref: str) -> Any:
        return copy.deepcopy(self._get(cls, ref)[field])

    def _set_field(self, cls: str, field: str, session: str, ref: str, value: Any) -> None:
        record = self._get(cls, ref)
        record[field] = coerce(cls, field, value)

    def _add_to_map(
        self, cls: str, field: str, session: str, ref: str, key: Any, value: Any
    ) -> None:
        record = self._get(cls, ref)
        if not isinstance(key, str) or not isinstance(value, str):
            raise failure("FIELD_TYPE_ERROR", field)
        if key in record[field]:
            raise failure("MAP_DUPLICATE_KEY", cls, field, ref, key)
        record[field][key] = value

    def _remove_from_map(self, cls: str, field: str, session: str, ref: str, key: Any) -> None:
        self._get(cls, ref)[field].pop(key, None)

    # ----------------------------------------------------------------- session, task

    def _session_login(
        self, username: Any, password: Any, version: Any = "", originator: Any = ""
    ) -> str:
        if self._password is not None and (username, password) != (
            self._username,
            self._password,
        ):
            raise failure("SESSION_AUTHENTICATION_FAILED", username, "Authentication failure")
        return self._new(
            "session",
            this_host=self.host_ref,
            last_active=now(),
            validation_time=now(),
            auth_user_name=str(username),
            originator=str(originator),
        )

    def _session_logout(self, session: str) -> None:
        self._delete("session", session)

    def _session_get_this_host(self, session: str, self_ref: str) -> str:
        return self._get("session", self_ref)["this_host"]

    def _task_create(self, session: str, label: Any, description: Any) -> str:
        return self._new(
            "task",
            name_label=coerce("task", "name_label", label),
            name_description=coerce("task", "name_description", description),
            created=now(),
            resident_on=self.host_ref,
        )

    def _task_destroy(self, session: str, task: str) -> None:
        self._get("task", task)
        self._delete("task", task)

    # ----------------------------------------------------------------- SR and VDI

    def _refresh_sr(self, sr_ref: str) -> None:
        sr = self._db["SR"].get(sr_ref)
        if sr is not None:
            vdis = [self._db["VDI"][ref] for ref in sr["VDIs"]]
            sr["virtual_allocation"] = sum(v["virtual_size"] for v in vdis)
            sr["physical_utilisation"] = sum(v["physical_utilisation"] for v in vdis)

    def _reserve(self, sr_ref: str, size: int) -> None:
        sr = self._get("SR", sr_ref)
        free = sr["physical_size"] - sr["physical_utilisation"]
        if size > free:
            raise failure(
                "SR_BACKEND_FAILURE_44",
                "",
                f"There is insufficient space [opterr=needs {size} bytes, {free} free]",
                "",
            )

    def _round_size(self, size: int) -> int:
        if size < 0:
            raise failure("SR_BACKEND_FAILURE_79", "", "VDI Invalid size", "")
        return -(-size // self._granularity) * self._granularity

    def _is_attached(self, vdi: Mapping[str, Any], mode: str | None = None) -> bool:
        return any(
            self._db["VBD"][v]["currently_attached"] and mode in (None, self._db["VBD"][v]["mode"])
            for v in vdi["VBDs"]
        )

    def _new_vdi(self, sr_ref: str, size: int, source: str | None, **fields: Any) -> str:
        """Create a VDI record and its file (a copy of ``source``'s, or an empty sparse one)."""
        sr = self._get("SR", sr_ref)
        if not any(self._db["PBD"][p]["currently_attached"] for p in sr["PBDs"]):
            raise failure("SR_NO_PBDS", sr_ref)
        self._reserve(sr_ref, size)
        vdi_uuid = str(uuid.uuid4())
        path = self._sr_root / sr["uuid"] / f"{vdi_uuid}.img"
        if source is None:
            with open(path, "xb") as f:
                f.truncate(size)
        ref = self._new(
            "VDI",
            uuid=vdi_uuid,
            SR=sr_ref,
            virtual_size=size,
            physical_utilisation=size,
            location=vdi_uuid,
            **fields,
        )
        self._files[ref] = path
        if source is not None:
            self._materialize(source)
            if self._is_attached(self._db["VDI"][source], "RW"):
                # A source written right now: copy at once, as a snapshot would freeze it.
                self._devices.flush(self._files[source])
                copy_sparse(self._files[source], path)
            else:
                self._pending_copy[ref] = source
        self._refresh_sr(sr_ref)
        return ref

    def _materialize(self, vdi_ref: str) -> None:
        """Give a copy-on-write VDI its own file, copied from its source."""
        source = self._pending_copy.pop(vdi_ref, None)
        if source is None:
            return
        self._materialize(source)
        self._devices.flush(self._files[source])
        copy_sparse(self._files[source], self._files[vdi_ref])

    def _vdi_create(self, session: str, record: Any) -> str:
        fields = self._from_record(
            "VDI", record, VDI_CREATE_FIELDS, ("xenstore_data", "sm_config", "tags")
        )
        if fields["type"] not in VDI_TYPES:
            raise failure("FIELD_TYPE_ERROR", "type")
        self._get("SR", fields["SR"])
        size = self._round_size(fields.pop("virtual_size"))
        return self._new_vdi(fields.pop("SR"), size, None, **fields)

    def _vdi_destroy(self, session: str, vdi_ref: str) -> None:
        vdi = self._get("VDI", vdi_ref)
        if self._is_attached(vdi):
            raise failure("VDI_IN_USE", vdi_ref, "destroy")
        for vbd_ref in list(vdi["VBDs"]):  # XAPI destroys the (unplugged) VBDs too
            self._delete("VBD", vbd_ref)
        for child, source in list(self._pending_copy.items()):
            if source == vdi_ref:  # children keep their bytes when the parent goes
                self._materialize(child)
        self._pending_copy.pop(vdi_ref, None)
        self._files.pop(vdi_ref).unlink(missing_ok=True)
        self._delete("VDI", vdi_ref)
        self._refresh_sr(vdi["SR"])

    def _copied_fields(self, vdi: Mapping[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(vdi[k]) for k in COPIED_VDI_FIELDS}

    def _vdi_snapshot(self, session: str, vdi_ref: str, driver_params: Any) -> str:
        vdi = self._get("VDI", vdi_ref)
        coerce("VDI", "sm_config", driver_params)
        if vdi["sharable"]:
            raise failure("VDI_IS_SHARABLE", vdi_ref)
        return self._new_vdi(
            vdi["SR"],
            vdi["virtual_size"],
            vdi_ref,
            is_a_snapshot=True,
            snapshot_of=vdi_ref,
            snapshot_time=now(),
            **self._copied_fields(vdi),
        )

    def _vdi_clone(self, session: str, vdi_ref: str, driver_params: Any = None) -> str:
        # XAPI defaults driver_params to {}; Nova's _clone_vdi passes the VDI alone.
        driver_params = {} if driver_params is None else driver_params
        vdi = self._get("VDI", vdi_ref)
        coerce("VDI", "sm_config", driver_params)
        return self._new_vdi(vdi["SR"], vdi["virtual_size"], vdi_ref, **self._copied_fields(vdi))

    def _vdi_copy(
        self,
        session: str,
        vdi_ref: str,
        sr_ref: str,
        base_vdi: str = NULL_REF,
        into_vdi: str = NULL_REF,
    ) -> str:
        vdi = self._get("VDI", vdi_ref)
        self._get("SR", sr_ref)
        if (base_vdi, into_vdi) != (NULL_REF, NULL_REF):
            raise failure("OPERATION_NOT_ALLOWED", "fake XAPI: VDI.copy base/into unsupported")
        if self._is_attached(vdi, "RW"):
            raise failure("VDI_IN_USE", vdi_ref, "copy")
        # XAPI always makes the copy writable (CA-64962).
        return self._new_vdi(sr_ref, vdi["virtual_size"], vdi_ref, **self._copied_fields(vdi))

    def _vdi_resize(self, session: str, vdi_ref: str, size: Any) -> None:
        vdi = self._get("VDI", vdi_ref)
        new_size = self._round_size(parse_int(size, "size"))
        if self._is_attached(vdi):
            raise failure("VDI_IN_USE", vdi_ref, "resize")
        if new_size < vdi["virtual_size"]:
            raise failure(
                "SR_BACKEND_FAILURE_79", "", "VDI Invalid size [opterr=shrinking not allowed]", ""
            )
        self._reserve(vdi["SR"], new_size - vdi["virtual_size"])
        self._materialize(vdi_ref)
        os.truncate(self._files[vdi_ref], new_size)
        vdi["virtual_size"] = vdi["physical_utilisation"] = new_size
        self._refresh_sr(vdi["SR"])

    def _sr_scan(self, session: str, sr_ref: str) -> None:
        """Forget VDIs whose file was deleted behind XAPI's back; recount the space."""
        sr = self._get("SR", sr_ref)
        for vdi_ref in list(sr["VDIs"]):
            if (
                vdi_ref not in self._pending_copy
                and not self._files[vdi_ref].exists()
                and not self._is_attached(self._db["VDI"][vdi_ref])
            ):
                for vbd_ref in list(self._db["VDI"][vdi_ref]["VBDs"]):
                    self._delete("VBD", vbd_ref)
                self._files.pop(vdi_ref)
                self._delete("VDI", vdi_ref)
        self._refresh_sr(sr_ref)

    # ----------------------------------------------------------------- VBD

    def _vbd_create(self, session: str, record: Any) -> str:
        fields = self._from_record("VBD", record, VBD_CREATE_FIELDS, ("unpluggable",))
        vm = self._get("VM", fields["VM"])
        fields["mode"] = fields["mode"].upper()
        fields["type"] = VBD_TYPES.get(fields["type"].lower(), "")
        if fields["mode"] not in ("RO", "RW") or not fields["type"]:
            raise failure("FIELD_TYPE_ERROR", "mode" if fields["type"] else "type")
        if fields["empty"]:
            if fields["type"] != "CD":
                raise failure("VBD_NOT_REMOVABLE_MEDIA", "in constructor")
            fields["VDI"] = NULL_REF
        elif self._get("VDI", fields["VDI"])["read_only"] and fields["mode"] == "RW":
            raise failure("VDI_READONLY", fields["VDI"])
        used = {self._db["VBD"][v]["userdevice"] for v in vm["VBDs"]}
        userdevice = fields["userdevice"]
        if userdevice == "autodetect":
            free = [str(n) for n in range(1, 16) if str(n) not in used]
            if not free:
                raise failure("INVALID_DEVICE", userdevice)
            userdevice = free[0]
        elif not (userdevice.isdigit() and int(userdevice) < 256):
            raise failure("INVALID_DEVICE", userdevice)
        elif userdevice in used:
            raise failure("DEVICE_ALREADY_EXISTS", userdevice)
        fields["userdevice"] = str(int(userdevice))
        return self._new("VBD", **fields)

    def _vbd_destroy(self, session: str, vbd_ref: str) -> None:
        vbd = self._get("VBD", vbd_ref)
        if vbd["currently_attached"]:
            vm_uuid = self._db["VM"][vbd["VM"]]["uuid"]
            raise failure(
                "OPERATION_NOT_ALLOWED", f"VBD '{vbd['uuid']}' still attached to '{vm_uuid}'"
            )
        self._delete("VBD", vbd_ref)

    def _assert_running(self, vm_ref: str) -> dict[str, Any]:
        vm = self._get("VM", vm_ref)
        if vm["power_state"] != "Running":
            raise failure("VM_BAD_POWER_STATE", vm_ref, "running", vm["power_state"].lower())
        return vm

    def _vbd_plug(self, session: str, vbd_ref: str) -> None:
        vbd = self._get("VBD", vbd_ref)
        if vbd["currently_attached"]:
            raise failure("DEVICE_ALREADY_ATTACHED", vbd_ref)
        vm = self._assert_running(vbd["VM"])
        if not vbd["empty"]:
            vdi_ref = vbd["VDI"]
            vdi = self._get("VDI", vdi_ref)
            others = [
                self._db["VBD"][v]
                for v in vdi["VBDs"]
                if v != vbd_ref and self._db["VBD"][v]["currently_attached"]
            ]
            rw_elsewhere = any(o["mode"] == "RW" for o in others)
            if not vdi["sharable"] and (rw_elsewhere or (vbd["mode"] == "RW" and others)):
                raise failure("VDI_IN_USE", vdi_ref)
            if vbd["mode"] == "RW" and vdi["read_only"]:
                raise failure("VDI_READONLY", vdi_ref)
            device = device_name(int(vbd["userdevice"]))
            link = self._dev_root / vm["uuid"] / device
            try:
                self._materialize(vdi_ref)
                self._devices.attach(vbd_ref, self._files[vdi_ref], link, vbd["mode"] == "RO")
            except subprocess.CalledProcessError as exc:
                raise failure("INTERNAL_ERROR", f"losetup: {exc.stderr.strip()}") from None
            vbd["device"] = device
        vbd["currently_attached"] = True

    def _vbd_unplug(self, session: str, vbd_ref: str) -> None:
        vbd = self._get("VBD", vbd_ref)
        if not vbd["unpluggable"]:
            raise failure("VBD_NOT_UNPLUGGABLE", vbd_ref)
        if not vbd["currently_attached"]:
            raise failure("DEVICE_ALREADY_DETACHED", vbd_ref)
        self._assert_running(vbd["VM"])
        self._devices.detach(vbd_ref)
        vbd["currently_attached"] = False

    def __repr__(self) -> str:
        mode = "loop" if self.use_loop_devices else "file"
        return f"<FakeXenAPI root={self._root} devices={mode} url={self.url}>"
