"""``nova-torrent-images demo``: see :mod:`nova_torrent_images.demo`."""

from __future__ import annotations

from nova_torrent_images.demo.orchestrator import run

__all__ = ["run"]
