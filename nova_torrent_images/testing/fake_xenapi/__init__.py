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

"""A stateful fake XAPI (XenServer API) for tests, reachable by the real ``XenAPI`` client.

Why a fake and not mocks: the XenServer store talks to XAPI through ``XenAPI.Session``. Mocked
calls only test our guesses about XAPI. This fake keeps real state instead: records with
back-references, SR space accounting, VDI contents as sparse files, VBDs plugged into loop
devices. It answers with XAPI's error codes and wire conventions, so code written against a
real host runs unchanged against it. It ships in the package (like oslo fixtures) so that
driver authors can use it too.

Typical use::

    with FakeXenAPI.create(tmp_path, sr_size=10 * GiB) as fake:
        session = XenAPI.Session(fake.start_server())          # or fake.session()
        session.login_with_password("root", "pw", "1.0", "nova-torrent-images")
        vm = session.xenapi.VM.get_by_uuid(fake.compute_vm_uuid)
        ...                                                     # code under test
        session.xenapi.session.logout()
        fake.check_leaks()          # no session, VBD, VDI or task left behind

Getting a session (both go through the same dispatcher, :meth:`FakeXenAPI.call`):

* in process: ``fake.session()`` returns a logged-in, real ``XenAPI.Session``. Its transport
  hands the XML-RPC request body to the fake instead of a socket, so marshalling (including the
  2**31 overflow of plain ints) is exactly the network's;
* over HTTP: ``url = fake.start_server()``, then ``XenAPI.Session(url)`` and
  ``login_with_password(...)``, or ``fake.remote_session()``. The server is threaded and the
  state is guarded by one lock.

Wire conventions (as in XAPI): every answer is ``{"Status": "Success", "Value": ...}`` or
``{"Status": "Failure", "ErrorDescription": [code, *params]}``, all strings. Integer fields
(``virtual_size``, ``physical_size``, ...) travel as decimal strings and are accepted as
strings or ints. Datetimes are ``xmlrpc.client.DateTime`` (``19700101T00:00:00Z`` for never).
Void methods return ``""``. Errors reach the client as ``XenAPI.Failure``, and
``SESSION_INVALID`` makes the real client log in again by itself, as it does with XAPI.

Local device of a plugged VBD (``fake.device_path(vbd_ref)``): plugging a VBD sets its
``device`` field to ``xvdb``, ``xvdc``, ... (from ``userdevice``; ``autodetect`` starts at 1,
slot 0 being the VM's own boot disk, which the fake does not model). Locally:

* loop mode (``use_loop_devices=True``, or ``None`` = auto: root and a ``losetup`` probe
  works): the VDI's file is attached with ``losetup --find --show`` (``--read-only`` for
  ``mode='RO'``); ``device_path`` is ``/dev/loopN``. Unplug detaches it.
* file mode (otherwise): ``device_path`` is a symlink to the VDI's file. For ``RO`` VBDs the
  file is made mode 0444 while plugged; that stops non-root writers only (root ignores mode
  bits), so it approximates a read-only device.

In both modes ``fake.dev_dir(vm_ref)`` holds a ``<device>`` symlink (``xvdb`` -> the loop
device or the file) per plugged VBD: code that opens ``<dev_dir>/<VBD.device>`` can be
pointed at it instead of ``/dev``.

XAPI behaviour reproduced because drivers trip on it: ``VDI.snapshot``, ``clone`` and
``copy`` copy ``other_config`` (tags of a base copy end up on its clones); a snapshot is not
read-only; ``VBD.create`` in mode ``RW`` of a read-only VDI already fails (``VDI_READONLY``);
``VDI.destroy`` fails while a VBD is plugged and destroys unplugged VBDs; a VDI plugged
``RW`` cannot be plugged again, nor copied; ``VDI.create`` rejects a record with a missing
field (``FIELD_TYPE_ERROR``) or a non-string ``other_config`` value.

Differences from XAPI, on purpose: storage is thick (a VDI consumes its ``virtual_size``,
rounded up to ``vdi_size_granularity``, 2 MiB like VHD on ext SRs); the RO/RW sharing check
on ``VBD.plug`` applies to control domains too (the nova-compute VM is a domU in practice);
``set_<field>`` works for any field except those the fake keeps consistent (uuid,
references, sizes, attachment state), which answer ``MESSAGE_METHOD_UNKNOWN``; no ``Async.``
calls, events, ``VDI.copy`` into an existing VDI, or ``VDI.resize_online``.

Crash tests: the fake logs the method of every call it carries out (``fake.calls``,
``fake.clear_calls()``), so a test can count the calls of an operation, and
``fake.kill_after(pid, n, methods=None)`` sends SIGKILL to a process right after the
``n``-th call of interest (counted from then on) is carried out, before its answer is sent,
and holds every further call until that process is dead: the state a ``kill -9`` of
nova-compute at exactly that point leaves behind, for the restart to clean up::

    child = subprocess.Popen([...], stdin=subprocess.PIPE)  # waits for "go" on stdin
    trigger = fake.kill_after(child.pid, 7)                # after its 7th XAPI call
    child.communicate(b"go\n")
    assert trigger.fired.is_set() and child.returncode == -signal.SIGKILL

Layout: ``_schema`` (fields, wire encoding, errors, query language), ``_devices`` (sparse
files, loop devices), ``_server`` (in-process transport, HTTP server), ``_fake`` (the state
and the calls).
"""

from ._devices import loop_devices_available
from ._fake import COMPUTE_VM_KEY, FakeState, FakeXenAPI, KillTrigger, LeakReport, process_dead
from ._schema import NULL_REF, GiB, MiB

__all__ = [
    "COMPUTE_VM_KEY",
    "NULL_REF",
    "FakeState",
    "FakeXenAPI",
    "GiB",
    "KillTrigger",
    "LeakReport",
    "MiB",
    "loop_devices_available",
    "process_dead",
]
