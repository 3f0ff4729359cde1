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


"""Operator verbs on a compute host: ``status``, ``evict``, ``prune``, ``fetch``.

They work on the store named by ``[torrent_images] store`` from their own process (``fetch
--output FILE`` on the output-file store). Seeding happens in nova-compute's process; it
publishes its live numbers (bytes up and down, peers) in ``<state_dir>/status.json``, which
``status`` merges in when that process is alive.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys

from oslo_config import cfg
from oslo_utils import units

from nova_torrent_images import exception
from nova_torrent_images.compute import stores
from nova_torrent_images.compute.pipeline import ImagePipeline, fetch_to_file
from nova_torrent_images.compute.progress import download_bar
from nova_torrent_images.compute.seeding import status as status_file
from nova_torrent_images.compute.seeding.eviction import usage_counter
from nova_torrent_images.compute.snapshots.uploads import UploadQueue
from nova_torrent_images.compute.stores.base import BaseCopyStore
from nova_torrent_images.glance.client import GlanceClient


def open_store(conf: cfg.ConfigOpts) -> BaseCopyStore:
    """The store ``[torrent_images] store`` names, or a ConfigError saying what to set."""
    return stores.open_store(conf)


def _policy(conf: cfg.ConfigOpts, store: BaseCopyStore) -> ImagePipeline:
    # A pipeline without seeds: this process applies policy, nova-compute's seeds.
    return ImagePipeline(conf, store, seeding=False)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def cmd_status(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    store = open_store(conf)
    live = status_file.read_live(conf.torrent_images.state_dir)
    counter = usage_counter(conf)
    uses = counter.counts() if counter is not None else {}
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
                # Boots and downloads within eviction_usage_window: who is evicted last.
                "weight": uses.get(base.image_id, 0),
                "created_at": base.created_at,
                "last_used": base.last_used,
                "ref": base.ref,
                "source": base.source,
            }
        )
    capacity = store.capacity()
    queued = [dataclasses.asdict(e) for e in UploadQueue(conf.torrent_images.state_dir).list()]
    if args.format == "json":
        json.dump(
            {
                "store": store.name,
                "total": capacity.total,
                "free": capacity.free,
                "ours": capacity.ours,
                "base_copies": rows,
                "queued_uploads": queued,
            },
            sys.stdout,
            indent=1,
        )
        print()
        return 0
    print(
        f"{store.name}: {capacity.ours / units.Mi:.0f} MiB in base copies, "
        f"{capacity.free / units.Mi:.0f} MiB free of {capacity.total / units.Mi:.0f} MiB"
    )
    header = (
        f"{'image':<36} {'MiB':>7} {'seeding':>7} {'up MiB':>8} {'down MiB':>8} "
        f"{'peers':>5} {'in use':>6} {'weight':>6} {'from':<10}  last used"
    )
    print(header)
    for r in rows:
        print(
            f"{r['image_id']:<36} {r['size'] / units.Mi:>7.0f} "
            f"{'yes' if r['seeding'] else 'no':>7} "
            f"{r['bytes_up'] / units.Mi:>8.1f} {r['bytes_down'] / units.Mi:>8.1f} {r['peers']:>5} "
            f"{'yes' if r['in_use'] else 'no':>6} {r['weight']:>6} {r['source'] or '-':<10}  "
            f"{_when(r['last_used'])}"
        )
    if not rows:
        print("(no base copies)")
    if queued:
        print(f"{len(queued)} snapshot upload(s) queued until Glance takes them:")
        _print_uploads(queued)
    return 0


def _print_uploads(entries: list[dict]) -> None:
    print(f"{'image':<36} {'attempts':>8}  {'next attempt':<19}  kept copy / last error")
    for e in entries:
        print(
            f"{e['image_id']:<36} {e['attempts']:>8}  {_when(e['next_attempt']):<19}  "
            f"{e['ref']}\n{'':<67}{e['last_error']}"
        )


def cmd_export(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    """The whole raw image into a new file, a differential image's chain rebuilt."""
    import os
    import shutil
    import tempfile

    from nova_torrent_images.compute.stores.filesystem import FilesystemStore

    if os.path.lexists(args.output):
        raise exception.StoreError(reason=f"{args.output} exists; export writes a new file")
    glance = GlanceClient.from_conf(conf)
    image = glance.image_info(args.image_id)
    if not image.parent_id:
        args.quiet = True
        return cmd_fetch(args, conf)
    # The chain is rebuilt in a scratch filesystem store (parents included), verified
    # against nti_whole_hash, then moved to the output; nothing stays behind.
    state_dir = conf.torrent_images.state_dir
    os.makedirs(state_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=state_dir, prefix="export-") as scratch:
        pipeline = ImagePipeline(conf, FilesystemStore(scratch), seeding=False)
        base = pipeline.ensure_base(image, glance).base
        tmp = f"{args.output}.part-{os.getpid()}"
        try:
            shutil.copyfile(base.ref, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, args.output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    print(
        f"{image.id}: the whole image of chain "
        f"{' <- '.join(pipeline.fetches)}, {base.size >> 20} MiB, "
        f"verified ({base.hash_algo}) -> {args.output}"
    )
    return 0


def cmd_uploads(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    """List the snapshot uploads queued while Glance was down, or cancel one."""
    queue = UploadQueue(conf.torrent_images.state_dir)
    if args.action == "cancel":
        if not args.image_id:
            raise exception.ConfigError(option="uploads", reason="cancel needs an IMAGE_ID")
        store = open_store(conf)
        entry = queue.cancel(store, args.image_id)
        print(f"cancelled the queued upload of image {entry.image_id}; {entry.ref} deleted")
        return 0
    entries = [dataclasses.asdict(e) for e in queue.list()]
    if args.format == "json":
        json.dump(entries, sys.stdout, indent=1)
        print()
    elif entries:
        _print_uploads(entries)
    else:
        print("(no queued uploads)")
    return 0


def cmd_evict(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    store = open_store(conf)
    _policy(conf, store).eviction.evict(args.image_id)
    print(f"evicted the base copy of image {args.image_id} from {store.name}")
    return 0


def cmd_prune(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    store = open_store(conf)
    actions = _policy(conf, store).eviction.prune(dry_run=args.dry_run)
    verb = "would" if args.dry_run else "did"
    for action in actions:
        print(f"{verb} {action.action} {action.image_id}: {action.reason}")
    if not actions:
        print("nothing to prune")
    return 0


def cmd_fetch(args: argparse.Namespace, conf: cfg.ConfigOpts) -> int:
    """Prefetch into the local store, or with ``--output`` into a new file: one pipeline."""
    glance = GlanceClient.from_conf(conf)
    image = glance.image_info(args.image_id)
    if args.output is not None:
        with download_bar(image, args.quiet) as progress:
            result = fetch_to_file(image, args.output, conf=conf, glance=glance, progress=progress)
        if getattr(args, "format", "text") == "json":
            answer = {
                k: v for k, v in dataclasses.asdict(result).items() if k not in ("resume_data",)
            }
            json.dump(answer, sys.stdout, indent=1, default=str)
            print()
            return 0
        print(
            f"{image.id}: {result.source}, {result.seconds:.1f}s, "
            f"{result.bytes_from_peers >> 20} MiB from peers, "
            f"{result.bytes_from_origin >> 20} MiB from origin seeders, "
            f"{result.bytes_from_glance >> 20} MiB from Glance, verified -> {args.output}"
        )
        return 0
    # This process ends after the download: nova-compute's process adopts the base copy
    # (its resume data is saved here) and seeds it at its next maintenance run or restart.
    store = open_store(conf)
    pipeline = ImagePipeline(conf, store, seeding=False)
    store.remove_stale_slots(try_lock=pipeline.locks.try_hold)
    with download_bar(image, args.quiet) as progress:
        delivery = pipeline.ensure_base(image, glance, progress=progress)
    print(
        f"{image.id}: {'downloaded' if delivery.downloaded else 'already present'}, verified, "
        f"base copy {delivery.base.ref} in {store.name}"
    )
    return 0
