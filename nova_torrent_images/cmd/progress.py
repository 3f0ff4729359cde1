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

"""The command line's progress bar for one image download (tqdm)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm

from nova_torrent_images.image import ImageInfo
from nova_torrent_images.sources import ProgressCallback


@contextlib.contextmanager
def download_bar(image: ImageInfo, quiet: bool = False) -> Iterator[ProgressCallback]:
    """A progress callback drawing a bar; the bar completes when the block ends."""
    with tqdm(
        total=image.size, unit="B", unit_scale=True, desc=image.id[:13], disable=quiet
    ) as bar:

        def progress(done: int, total: int, rate: int, peers: int) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(peers=peers)

        yield progress
        bar.update(image.size - bar.n)
