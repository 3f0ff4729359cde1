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

"""Origin verbs, run on Glance API nodes: ``publish``, ``unpublish``, ``published``, ``seed``.

They share the registry of ``[torrent_images] origin_state_dir``: ``publish`` and
``unpublish`` change it (and Glance, and the tracker whitelist), ``seed`` follows it.
Errors reach :func:`nova_torrent_images.cmd.main.main`, which prints one line and exits
non-zero.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING, Any

from oslo_config import cfg
from oslo_utils import units

from nova_torrent_images import conf as nti_conf

if TYPE_CHECKING:
    from nova_torrent_images.origin.registry import PublishedImage


def _conf(args: argparse.Namespace) -> cfg.ConfigOpts:
    return nti_conf.load_config_files(args.config_file)


def _publisher(conf: cfg.ConfigOpts) -> Any:
    from nova_torrent_images.origin.publisher import Publisher

    return Publisher.from_conf(conf)


def cmd_publish(args: argparse.Namespace) -> int:
    result = _publisher(_conf(args)).publish(args.image_id)
    if args.format == "json":
        print(json.dumps(result.__dict__, indent=2, sort_keys=True))
        return 0
    what = {
        "published": f"published ({result.size // units.Mi} MiB read from Glance once)",
        "updated": "already published; Glance properties set again",
        "unchanged": "already published and unchanged; nothing to do",
    }[result.status]
    print(f"{result.image_id}: {what}")
    print(f"  torrent_magnet: {result.magnet}")
    if result.dropped_from_magnet:
        print("  left out to fit 255 characters: " + ", ".join(result.dropped_from_magnet))
    return 0


def cmd_unpublish(args: argparse.Namespace) -> int:
    result = _publisher(_conf(args)).unpublish(args.image_id)
    if result.was_published:
        glance = "; Glance properties removed" if result.glance_updated else ""
        print(f"{result.image_id}: unpublished{glance}")
    elif result.glance_updated:
        print(f"{result.image_id}: was not published here; removed its magnet from Glance")
    else:
        print(f"{result.image_id}: was not published; nothing to do")
    return 0


def describe(entry: PublishedImage) -> dict[str, Any]:
    """A JSON-friendly view of a registry entry for ``published --format json``."""
    return {
        "image_id": entry.image_id,
        "name": entry.name,
        "size": entry.size,
        "info_hash_v1": entry.info_hash_v1,
        "info_hash_v2": entry.info_hash_v2,
        "pieces": entry.num_pieces,
        "piece_length": entry.piece_length,
        "published_at": entry.published_at,
        "data": entry.data_path if entry.has_data() else None,
        "magnet": entry.magnet,
    }


def cmd_published(args: argparse.Namespace) -> int:
    from nova_torrent_images.origin.registry import Registry

    opts = _conf(args).torrent_images
    entries = Registry(opts.origin_state_dir, opts.origin_data_dir).list()
    if args.format == "json":
        print(json.dumps([describe(e) for e in entries], indent=2, sort_keys=True))
        return 0
    if not entries:
        print(f"No image is published (registry {opts.origin_state_dir}).")
        return 0
    header = (
        f"{'image id':<36}  {'MiB':>7}  {'pieces':>6}  {'v2 info-hash':<16}  "
        f"{'published':<20}  data"
    )
    print(header)
    print("-" * len(header))
    for e in entries:
        print(
            f"{e.image_id:<36}  {e.size / units.Mi:>7.0f}  {e.num_pieces:>6}  "
            f"{(e.info_hash_v2 or e.info_hash_v1 or '')[:16]:<16}  {e.published_at:<20}  "
            f"{'ok' if e.has_data() else 'MISSING'}"
        )
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from nova_torrent_images.glance.client import GlanceClient
    from nova_torrent_images.origin.seeder import OriginSeeder

    conf = _conf(args)
    seeder = OriginSeeder(conf, glance=GlanceClient.from_conf(conf))

    def request_stop(signum: int, frame: object) -> None:
        # Only set a flag here; the loop in the main thread winds down on its next tick.
        seeder.request_stop()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        seeder.start()
        host, port = seeder.endpoint
        print(
            f"Origin seeder running on {host}:{port}; SIGTERM or Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        seeder.run()
    finally:
        seeder.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register the origin verbs on the ``nova-torrent-images`` parser."""
    p = sub.add_parser(
        "publish",
        help="(Glance node) publish an image as a torrent: read it from Glance once, keep "
        "the torrent and data for the seeder, whitelist it, set torrent_magnet and "
        "is_torrentable=true",
    )
    p.add_argument("image_id")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "unpublish",
        help="(Glance node) stop publishing an image: remove its Glance properties, "
        "registry entry and whitelist entry",
    )
    p.add_argument("image_id")
    p.set_defaults(func=cmd_unpublish)

    p = sub.add_parser("published", help="(Glance node) list the published images")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_published)

    p = sub.add_parser(
        "seed",
        help="(Glance node) run the origin seeder: seed every published image until SIGTERM",
    )
    p.set_defaults(func=cmd_seed)
