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

"""The command line's progress display for image downloads.

On a terminal each download gets a tqdm bar. Anywhere else (``make demo > log``, CI,
systemd's journal) cursor escapes and carriage returns make a log unreadable, so each
download prints one plain line per milestone instead: started, first bytes (with the
peer count), 50%, done (with seconds and how).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from oslo_utils import units
from tqdm import tqdm

from nova_torrent_images.compute.sources.base import ProgressCallback
from nova_torrent_images.glance.image import ImageInfo


class HostProgress:
    """The progress of one download, as a bar on a terminal or as milestone lines."""

    def __init__(
        self, name: str, total: int, position: int = 0, stream: TextIO | None = None
    ) -> None:
        self.name = name
        self.total = total
        self.stream = stream or sys.stdout
        self.started = time.monotonic()
        self._done = 0
        self._milestones: set[str] = set()
        self._bar: tqdm | None = None
        if self.stream.isatty():
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=name,
                leave=True,
                position=position,
                file=self.stream,
            )
        else:
            self._say("started", f"started, {total / units.Mi:.0f} MiB")

    def update(self, done: int, peers: int) -> None:
        """``done`` bytes of ``total`` so far, with ``peers`` connected."""
        self._done = done
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            self._bar.set_postfix(peers=peers, refresh=False)
            return
        connected = f"{peers} peer{'' if peers == 1 else 's'}"
        if done > 0:
            self._say("first", f"receiving, {connected}")
        if self.total and done * 2 >= self.total:
            self._say("half", f"50% after {self.seconds():.1f} s, {connected}")

    def finish(self, how: str) -> None:
        """The download ended; ``how`` says by which source, or why it failed."""
        if self._bar is not None:
            self._bar.update(self.total - self._bar.n)
            self._bar.set_postfix_str(how)
            self._bar.close()
            return
        self._say("done", f"done in {self.seconds():.1f} s ({how})")

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def _say(self, milestone: str, text: str) -> None:
        # Each milestone once: progress callbacks repeat, a log line should not.
        if milestone in self._milestones:
            return
        self._milestones.add(milestone)
        print(f"{self.name}: {text}", file=self.stream, flush=True)


@contextlib.contextmanager
def download_bar(image: ImageInfo, quiet: bool = False) -> Iterator[ProgressCallback]:
    """A progress callback for one download; its display completes when the block ends."""
    if quiet:
        yield lambda done, total, rate, peers: None
        return
    display = HostProgress(image.id[:13], image.size, stream=sys.stderr)

    def progress(done: int, total: int, rate: int, peers: int) -> None:
        display.update(done, peers)

    try:
        yield progress
    except BaseException:
        display.finish("failed")
        raise
    display.finish("done")
