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

"""The ``nova-torrent-images`` command: operator verbs and the demo."""

from __future__ import annotations

import argparse
import logging
import sys

from nova_torrent_images import conf as nti_conf
from nova_torrent_images import exception
from nova_torrent_images.cmd import origin

LOG = logging.getLogger(__name__)


def _local_verb(name: str):
    def run(args: argparse.Namespace) -> int:
        from nova_torrent_images.cmd import local

        return getattr(local, name)(args, nti_conf.load_config_files(args.config_file))

    return run


def cmd_demo(args: argparse.Namespace) -> int:
    from nova_torrent_images.cmd import demo

    return demo.run(
        hosts=args.hosts, size_mib=args.size, workdir=args.workdir, origin_kind=args.origin
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nova-torrent-images",
        description="Peer-to-peer delivery of Glance images to compute hosts.",
    )
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        help="configuration file with a [torrent_images] section "
        "(repeatable; default: the usual oslo.config locations)",
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "fetch",
        help="prefetch an image into the local store (or, with --output, into a new file), "
        "by torrent when policy allows, verified against Glance",
    )
    p.add_argument("image_id")
    p.add_argument("--output", "-o", help="write the image to this new file instead")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="with --output: json prints where the bytes came from (per peer and per "
        "origin stripe server)",
    )
    p.set_defaults(func=_local_verb("cmd_fetch"))

    p = sub.add_parser(
        "status",
        help="base copies of the local store: size, seeding, bytes up and down, peers, last use",
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_local_verb("cmd_status"))

    p = sub.add_parser(
        "export",
        help="write the whole raw image of IMAGE_ID to a new file; a differential "
        "snapshot's chain is rebuilt and verified (for consumers that do not know chains)",
    )
    p.add_argument("image_id")
    p.add_argument("--output", "-o", required=True, help="the new file")
    p.set_defaults(func=_local_verb("cmd_export"))

    p = sub.add_parser(
        "uploads",
        help="snapshot uploads queued while Glance was down: list them, or cancel one "
        "('uploads cancel IMAGE_ID' deletes its kept copy; the Glance record stays)",
    )
    p.add_argument("action", nargs="?", choices=["list", "cancel"], default="list")
    p.add_argument("image_id", nargs="?")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_local_verb("cmd_uploads"))

    p = sub.add_parser("evict", help="stop seeding and delete the base copy of an image")
    p.add_argument("image_id")
    p.set_defaults(func=_local_verb("cmd_evict"))

    p = sub.add_parser("prune", help="apply expiry, maximum age, quota and free-space floor now")
    p.add_argument("--dry-run", action="store_true", help="only say what would be done")
    p.set_defaults(func=_local_verb("cmd_prune"))

    p = sub.add_parser(
        "demo", help="run a local swarm of simulated compute hosts (no outside services)"
    )
    p.add_argument("--hosts", type=int, default=4, help="simulated compute hosts (default 4)")
    p.add_argument("--size", type=int, default=64, help="image size in MiB (default 64)")
    p.add_argument("--workdir", help="keep the demo's files here instead of a temp dir")
    p.add_argument(
        "--origin",
        choices=["auto", "glance", "embedded"],
        default="auto",
        help="image origin: glance-api when installed (auto), or the embedded "
        "Glance-like HTTP origin",
    )
    p.set_defaults(func=cmd_demo)

    origin.add_subcommands(sub)  # publish, unpublish, published, seed (Glance nodes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return args.func(args)
    except exception.TorrentImagesError as exc:
        LOG.debug("Command failed", exc_info=True)
        print(f"nova-torrent-images: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
