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
