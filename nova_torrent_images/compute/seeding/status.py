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
"""The status file: live numbers of the seeding process for ``nova-torrent-images status``.

Seeding happens in nova-compute's process; it writes ``<state_dir>/status.json`` at every
maintenance run, and the command line merges it in while that process is alive.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from nova_torrent_images.common import utils
from nova_torrent_images.compute.seeding.seeds import SeedStatus

FILE_NAME = "status.json"


def write(state_dir: str, store_name: str, statuses: Iterable[SeedStatus]) -> None:
    utils.atomic_write(
        os.path.join(state_dir, FILE_NAME),
        json.dumps(
            {
                "pid": os.getpid(),
                "time": time.time(),
                "store": store_name,
                "images": [asdict(s) for s in statuses],
            },
            indent=1,
        ),
    )


def read_live(state_dir: str) -> dict[str, dict[str, Any]]:
    """Image id -> live numbers, when the process that wrote them still runs.

    Anything unreadable reads as no live numbers: ``status`` still lists the store.
    """
    try:
        with open(os.path.join(state_dir, FILE_NAME)) as f:
            status = json.load(f)
        if not utils.pid_alive(int(status["pid"])):
            return {}
        return {entry["image_id"]: dict(entry) for entry in status.get("images", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
