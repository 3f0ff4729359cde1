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

"""XAPI's data model as the fake needs it.

Record fields and defaults (names as in XAPI's datamodel), the XML-RPC wire encoding, error
construction, and the expression language of ``get_all_records_where``.
"""

from __future__ import annotations

import re
import time
import xmlrpc.client
from collections.abc import Callable, Mapping
from typing import Any

import XenAPI

NULL_REF = "OpaqueRef:NULL"
MiB = 1024**2
GiB = 1024**3
NEVER = "19700101T00:00:00Z"
LOGIN_METHODS = ("login_with_password", "slave_local_login_with_password")
VDI_TYPES = ("system", "user", "ephemeral", "suspend", "crashdump", "ha_statefile", "metadata")
VBD_TYPES = {"disk": "Disk", "cd": "CD", "floppy": "Floppy"}


def dt(value: str = NEVER) -> xmlrpc.client.DateTime:
    return xmlrpc.client.DateTime(value)


def now() -> xmlrpc.client.DateTime:
    return dt(time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime()))


# Field names and default values as in XAPI's datamodel (the subset tests and drivers use).
# The type of each default is the field's type: it drives input coercion and the wire format.
# fmt: off
DEFAULTS: dict[str, dict[str, Any]] = {
    "session": {
        "uuid": "", "this_host": NULL_REF, "this_user": NULL_REF, "last_active": dt(),
        "pool": False, "other_config": {}, "is_local_superuser": True, "subject": NULL_REF,
        "validation_time": dt(), "auth_user_sid": "", "auth_user_name": "",
        "rbac_permissions": [], "tasks": [], "parent": NULL_REF, "originator": "",
    },
    "pool": {
        "uuid": "", "name_label": "", "name_description": "", "master": NULL_REF,
        "default_SR": NULL_REF, "suspend_image_SR": NULL_REF, "crash_dump_SR": NULL_REF,
        "ha_enabled": False, "other_config": {}, "tags": [],
    },
    "host": {
        "uuid": "", "name_label": "", "name_description": "", "hostname": "",
        "address": "127.0.0.1", "enabled": True, "API_version_major": 2,
        "API_version_minor": 21, "API_version_vendor": "XenSource",
        "software_version": {"product_version": "8.2.1", "xapi": "1.20"},
        "PBDs": [], "resident_VMs": [], "other_config": {}, "tags": [],
    },
    "SR": {
        "uuid": "", "name_label": "", "name_description": "", "allowed_operations": [],
        "current_operations": {}, "VDIs": [], "PBDs": [], "virtual_allocation": 0,
        "physical_utilisation": 0, "physical_size": 0, "type": "ext", "content_type": "user",
        "shared": False, "other_config": {}, "tags": [], "sm_config": {}, "blobs": {},
        "local_cache_enabled": False, "introduced_by": NULL_REF, "clustered": False,
        "is_tools_sr": False,
    },
    "PBD": {
        "uuid": "", "host": NULL_REF, "SR": NULL_REF, "device_config": {},
        "currently_attached": False, "other_config": {},
    },
    "VDI": {
        "uuid": "", "name_label": "", "name_description": "", "allowed_operations": [],
        "current_operations": {}, "SR": NULL_REF, "VBDs": [], "crash_dumps": [],
        "virtual_size": 0, "physical_utilisation": 0, "type": "user", "sharable": False,
        "read_only": False, "other_config": {}, "storage_lock": False, "location": "",
        "managed": True, "missing": False, "parent": NULL_REF, "xenstore_data": {},
        "sm_config": {}, "is_a_snapshot": False, "snapshot_of": NULL_REF, "snapshots": [],
        "snapshot_time": dt(), "tags": [], "allow_caching": False, "on_boot": "persist",
        "metadata_of_pool": NULL_REF, "metadata_latest": False, "is_tools_iso": False,
        "cbt_enabled": False,
    },
    "VBD": {
        "uuid": "", "allowed_operations": [], "current_operations": {}, "VM": NULL_REF,
        "VDI": NULL_REF, "device": "", "userdevice": "", "bootable": False, "mode": "RW",
        "type": "Disk", "unpluggable": True, "storage_lock": False, "empty": False,
        "other_config": {}, "currently_attached": False, "status_code": 0,
        "status_detail": "", "runtime_properties": {}, "qos_algorithm_type": "",
        "qos_algorithm_params": {}, "qos_supported_algorithms": [], "metrics": NULL_REF,
    },
    "VM": {
        "uuid": "", "name_label": "", "name_description": "", "power_state": "Halted",
        "is_control_domain": False, "is_a_template": False, "is_a_snapshot": False,
        "resident_on": NULL_REF, "VBDs": [], "domid": -1, "other_config": {}, "tags": [],
    },
    "task": {
        "uuid": "", "name_label": "", "name_description": "", "allowed_operations": [],
        "current_operations": {}, "created": dt(), "finished": dt(), "status": "pending",
        "resident_on": NULL_REF, "progress": 0.0, "type": "", "result": "", "error_info": [],
        "other_config": {}, "subtask_of": NULL_REF, "subtasks": [],
    },
}
VDI_CREATE_FIELDS = (
    "name_label", "name_description", "SR", "virtual_size", "type", "sharable", "read_only",
    "other_config",
)
VBD_CREATE_FIELDS = (
    "VM", "VDI", "userdevice", "bootable", "mode", "type", "empty", "other_config",
    "qos_algorithm_type", "qos_algorithm_params",
)
# The metadata XAPI copies onto a snapshot, clone or copy (xapi_vdi.ml snapshot_and_clone).
COPIED_VDI_FIELDS = (
    "name_label", "name_description", "type", "sharable", "other_config", "xenstore_data",
    "on_boot", "allow_caching",
)
# fmt: on
CLASSES = {name.lower(): name for name in DEFAULTS}

# child class -> (field holding the parent's ref, parent class, parent's set of children)
BACKREFS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "PBD": (("SR", "SR", "PBDs"), ("host", "host", "PBDs")),
    "VDI": (("SR", "SR", "VDIs"), ("snapshot_of", "VDI", "snapshots")),
    "VBD": (("VDI", "VDI", "VBDs"), ("VM", "VM", "VBDs")),
    "VM": (("resident_on", "host", "resident_VMs"),),
}
# Fields the fake keeps true itself: no set_<field> for them.
PROTECTED: dict[str, set[str]] = {cls: {"uuid"} for cls in DEFAULTS}
for _child, _links in BACKREFS.items():
    for _field, _parent, _children in _links:
        PROTECTED[_child].add(_field)
        PROTECTED[_parent].add(_children)
PROTECTED["SR"] |= {"virtual_allocation", "physical_utilisation"}
PROTECTED["VDI"] |= {"virtual_size", "physical_utilisation", "location"}
PROTECTED["VBD"] |= {"currently_attached", "device", "userdevice"}


def failure(code: str, *params: object) -> XenAPI.Failure:
    """An XAPI error as the client raises it: a list of strings, the code first."""
    return XenAPI.Failure([code, *(str(p) for p in params)])


def coerce(cls: str, field: str, value: Any) -> Any:
    """Check and convert an input value to the field's type (ints may come as strings)."""
    template = DEFAULTS[cls][field]
    if isinstance(template, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(template, int):
        if isinstance(value, int | str) and not isinstance(value, bool):
            return parse_int(value, field)
    elif isinstance(template, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(template, xmlrpc.client.DateTime):
        if isinstance(value, xmlrpc.client.DateTime | str):
            return dt(str(value))
    elif isinstance(template, dict):
        if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            return dict(value)
    elif isinstance(template, list):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif isinstance(value, str):
        return value
    raise failure("FIELD_TYPE_ERROR", field)


def parse_int(value: Any, what: str) -> int:
    """XAPI ints are 64-bit and travel as decimal strings; accept both forms."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise failure("FIELD_TYPE_ERROR", what)


def to_wire(value: Any) -> Any:
    """XAPI's XML-RPC encoding: ints as decimal strings, void as ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_wire(v) for v in value]
    return value


def _db_string(value: Any) -> str | None:
    """A field as XAPI's database stores it, for get_all_records_where comparisons."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str | xmlrpc.client.DateTime):
        return str(value)
    return None  # maps and sets never compare equal to a literal


class Filter:
    """Parser for get_all_records_where expressions (XAPI's Db_filter syntax).

    Grammar: ``expr := and ("or" and)*``, ``and := unary ("and" unary)*``,
    ``unary := "not" unary | "(" expr ")" | "true" | "false" | operand "=" operand``,
    ``operand := field "name" | "literal"``. Example: ``field "name__label"="base"``.
    """

    _TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|(=|\(|\))|([A-Za-z_]+))')

    def __init__(self, expr: str) -> None:
        self._tokens = self._tokenize(expr)
        self._pos = 0
        self.match = self._or()
        if self._pos != len(self._tokens):
            raise ValueError(f"unexpected {self._tokens[self._pos][1]!r}")

    @classmethod
    def _tokenize(cls, expr: str) -> list[tuple[str, str]]:
        tokens, pos, expr = [], 0, expr.rstrip()
        while pos < len(expr):
            m = cls._TOKEN.match(expr, pos)
            if m is None:
                raise ValueError(f"cannot parse at {expr[pos:]!r}")
            string, op, word = m.groups()
            if string is not None:
                tokens.append(("str", re.sub(r"\\(.)", r"\1", string)))
            elif op is not None:
                tokens.append(("op", op))
            else:
                tokens.append(("word", word.lower()))
            pos = m.end()
        return tokens

    def _peek(self) -> tuple[str, str] | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _take(self, kind: str, text: str | None = None) -> str:
        token = self._peek()
        if token is None or token[0] != kind or (text is not None and token[1] != text):
            raise ValueError(f"expected {text or kind} at token {self._pos}")
        self._pos += 1
        return token[1]

    def _or(self) -> Callable[[Mapping[str, Any]], bool]:
        terms = [self._and()]
        while self._peek() == ("word", "or"):
            self._pos += 1
            terms.append(self._and())
        return lambda r: any(t(r) for t in terms)

    def _and(self) -> Callable[[Mapping[str, Any]], bool]:
        terms = [self._unary()]
        while self._peek() == ("word", "and"):
            self._pos += 1
            terms.append(self._unary())
        return lambda r: all(t(r) for t in terms)

    def _unary(self) -> Callable[[Mapping[str, Any]], bool]:
        token = self._peek()
        if token == ("word", "not"):
            self._pos += 1
            inner = self._unary()
            return lambda r: not inner(r)
        if token == ("op", "("):
            self._pos += 1
            inner = self._or()
            self._take("op", ")")
            return inner
        if token in (("word", "true"), ("word", "false")):
            self._pos += 1
            return lambda r, v=token[1] == "true": v
        left = self._operand()
        self._take("op", "=")
        right = self._operand()
        return lambda r: (lv := left(r)) is not None and lv == right(r)

    def _operand(self) -> Callable[[Mapping[str, Any]], str | None]:
        if self._peek() == ("word", "field"):
            self._pos += 1
            # XAPI's database names a namespaced field with "__" (name__label for the
            # API's name_label), as Nova's _find_cached_image writes it.
            name = self._take("str").replace("__", "_")
            return lambda r: _db_string(r.get(name))
        literal = self._take("str")
        return lambda r: literal
