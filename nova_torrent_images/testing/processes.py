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

"""The real services the tests run (glance-api, opentracker, nginx), as process groups."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

from oslo_log import log as logging

LOG = logging.getLogger(__name__)


def signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    """Signal the process group a service was started as (``start_new_session``)."""
    try:
        with contextlib.suppress(ProcessLookupError):  # already gone: nothing to signal
            os.killpg(process.pid, sig)
    except PermissionError:
        LOG.exception("cannot signal process group %s", process.pid)


def stop_group(process: subprocess.Popen, timeout: float, name: str) -> None:
    """SIGTERM the group, SIGKILL it after ``timeout`` seconds, and reap the leader.

    Children (gunicorn's worker) may outlive the leader by a moment, so the group gets a
    last SIGKILL either way.
    """
    signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        LOG.warning("%s (pid %s) ignored SIGTERM for %.0fs; killing", name, process.pid, timeout)
        signal_group(process, signal.SIGKILL)
        process.wait(timeout=timeout)
    signal_group(process, signal.SIGKILL)


class ServiceProcess:
    """A service started as a process group in a work directory; ``with`` runs it.

    Subclasses define :meth:`start`, set ``_process`` and ``port`` there, and name their
    work directory ``workdir`` (removed by :meth:`stop` when they created it).
    """

    name = "service"
    _process: subprocess.Popen[bytes] | None
    port: int | None
    workdir: Path | None
    _owns_workdir: bool

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process group (SIGTERM, then SIGKILL); remove an owned workdir."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            stop_group(process, timeout, self.name)
        self.port = None
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
