"""Operator verbs on a compute host: ``status``, ``evict``, ``prune``, ``fetch``.

They work on the store named by ``[torrent_images] store`` from their own process. Seeding
happens in nova-compute's process; it publishes its live numbers (bytes up and down, peers)
in ``<state_dir>/status.json``, which ``status`` merges in when that process is alive.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

from oslo_config import cfg

from nova_torrent_images import exception
from nova_torrent_images.cmd.progress import download_bar
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.local import LocalImages
from nova_torrent_images.seeding import SeedManager
from nova_torrent_images.stores.base import BaseCopyStore

MiB = 1024 * 1024


def open_store(conf: cfg.ConfigOpts) -> BaseCopyStore:
    """The store ``[torrent_images] store`` names, or a ConfigError saying what to set."""
    opts = conf.torrent_images
    if opts.store == "filesystem":
        from nova_torrent_images.stores.filesystem import FilesystemStore

        return FilesystemStore.from_conf(conf)
    if opts.store == "xenapi":
        import XenAPI

        from nova_torrent_images.stores.xenapi import XenAPIStore

        if not opts.xenapi_connection_url:
            raise exception.ConfigError(
                option="xenapi_connection_url", reason="the xenapi store needs it"
            )
        session = XenAPI.Session(opts.xenapi_connection_url)
        session.login_with_password(
            opts.xenapi_connection_username,
            opts.xenapi_connection_password or "",
            "1.0",
            "nova-torrent-images",
        )
        return XenAPIStore.from_conf(session, conf)
    raise exception.ConfigError(
        option="store", reason="not set; set it to filesystem or xenapi in the config file"
    )


def _live_status(conf: cfg.ConfigOpts) -> dict[str, dict[str, Any]]:
    path = os.path.join(conf.torrent_images.state_dir, "status.json")
    try:
        with open(path) as f:
            status = json.load(f)
        os.kill(int(status["pid"]), 0)  # only a live process's numbers are current
    except (OSError, ValueError, KeyError):
        return {}
    return {entry["image_id"]: entry for entry in status.get("images", [])}


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def cmd_status(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    store = open_store(conf)
    live = _live_status(conf)
    rows = []
    for base in sorted(store.list(), key=lambda b: b.last_used, reverse=True):
        entry = live.get(base.image_id, {})
        rows.append(
            {
                "image_id": base.image_id,
                "size": base.size,
                "info_hash": base.info_hash,
                "seeding": bool(entry.get("seeding", False)),
                "bytes_up": entry.get("bytes_up", 0),
                "bytes_down": entry.get("bytes_down", 0),
                "peers": entry.get("peers", 0),
                "in_use": base.in_use,
                "created_at": base.created_at,
                "last_used": base.last_used,
                "ref": base.ref,
            }
        )
    capacity = store.capacity()
    if args.format == "json":
        json.dump(
            {
                "store": store.name,
                "total": capacity.total,
                "free": capacity.free,
                "ours": capacity.ours,
                "base_copies": rows,
            },
            sys.stdout,
            indent=1,
        )
        print()
        return 0
    print(
        f"{store.name}: {capacity.ours / MiB:.0f} MiB in base copies, "
        f"{capacity.free / MiB:.0f} MiB free of {capacity.total / MiB:.0f} MiB"
    )
    header = (
        f"{'image':<36} {'MiB':>7} {'seeding':>7} {'up MiB':>8} {'down MiB':>8} "
        f"{'peers':>5} {'in use':>6}  last used"
    )
    print(header)
    for r in rows:
        print(
            f"{r['image_id']:<36} {r['size'] / MiB:>7.0f} {'yes' if r['seeding'] else 'no':>7} "
            f"{r['bytes_up'] / MiB:>8.1f} {r['bytes_down'] / MiB:>8.1f} {r['peers']:>5} "
            f"{'yes' if r['in_use'] else 'no':>6}  {_when(r['last_used'])}"
        )
    if not rows:
        print("(no base copies)")
    return 0


def cmd_evict(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    store = open_store(conf)
    SeedManager(conf, store, engine=None).evict(args.image_id)
    print(f"evicted the base copy of image {args.image_id} from {store.name}")
    return 0


def cmd_prune(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    store = open_store(conf)
    actions = SeedManager(conf, store, engine=None).prune(dry_run=args.dry_run)
    verb = "would" if args.dry_run else "did"
    for action in actions:
        print(f"{verb} {action.action} {action.image_id}: {action.reason}")
    if not actions:
        print("nothing to prune")
    return 0


def cmd_prefetch(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    store = open_store(conf)
    glance = GlanceClient.from_conf(conf)
    image = glance.image_info(args.image_id)
    # This process ends after the download: nova-compute's process adopts the base copy
    # and seeds it (at its next maintenance run or restart).
    local = LocalImages(conf, store, seeding=False)
    with download_bar(image, args.quiet) as progress:
        base, downloaded = local.ensure_base(image, glance, progress=progress)
    print(
        f"{image.id}: {'downloaded' if downloaded else 'already present'}, verified, "
        f"base copy {base.ref} in {store.name}"
    )
    return 0
