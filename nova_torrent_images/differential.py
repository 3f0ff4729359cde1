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

"""Differential snapshots: a qcow2 overlay against the parent image's raw bytes.

The delta of a disk D against its parent image P is a qcow2 image whose backing file is P
(format raw) and which holds only the clusters where D differs from P. It is made with
qemu-img alone (doc/source/snapshots.rst, "The delta format")::

    qemu-img create -f qcow2 -b D -F raw delta          # an empty overlay of D
    qemu-img rebase -f qcow2 -b P -F raw delta          # safe rebase: copies D != P
    qemu-img rebase -u -f qcow2 -b "" delta             # no backing file in the header

(``qemu-img convert -B P`` would write every cluster of a raw source.) The header names no
backing file because Glance (since the 2024 format-inspector fixes) refuses a qcow2 upload
that has one ("Image failed safety checks"); the parent is named by the image record's
``nti_parent_image`` instead, with ``nti_whole_size`` and ``nti_whole_hash`` (sha512 of the
whole raw image). A restore sets the backing file to the local base copy of P
(``qemu-img rebase -u -b P -F raw``), converts to raw into a store slot, and verifies the
whole hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterable, Iterator
from typing import Any

from oslo_log import log as logging

from nova_torrent_images import exception, verify
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.image import ImageInfo
from nova_torrent_images.sources import FetchResult, ProgressCallback
from nova_torrent_images.stores.base import BaseCopy, BaseCopyStore, Slot

LOG = logging.getLogger(__name__)

PARENT = "nti_parent_image"
WHOLE_SIZE = "nti_whole_size"
WHOLE_HASH = "nti_whole_hash"
WHOLE_ALGO = "sha512"
MAX_DEPTH = 32  # a longer chain is a loop or a mistake
WORTH = 0.5  # a delta this large (of the whole image) is uploaded as the whole image
QEMU_IMG = "qemu-img"


def parent_id(image: ImageInfo) -> str | None:
    """The parent image of a differential image, None for a whole one."""
    value = image.properties.get(PARENT)
    return str(value) if value else None


def chain_label(chain: Iterable[str]) -> str:
    """``P <- S1 <- S2`` from the ids child first."""
    return " <- ".join(reversed(list(chain)))


def whole_view(delta: ImageInfo, chain: str | None = None) -> ImageInfo:
    """The image as its base copy holds it: the whole raw image, its size and hash.

    The swarm never serves a delta (its torrent would be of the delta bytes): the
    whole view is not torrentable.
    """
    props = delta.properties
    label = chain or delta.id
    try:
        size = int(props[WHOLE_SIZE])
        digest = str(props[WHOLE_HASH]).lower()
    except (KeyError, ValueError) as exc:
        raise exception.DeltaChainError(
            image_id=delta.id,
            chain=label,
            reason=f"its properties {WHOLE_SIZE} and {WHOLE_HASH} are missing or invalid",
        ) from exc
    if size <= 0 or len(digest) != 128 or any(c not in "0123456789abcdef" for c in digest):
        raise exception.DeltaChainError(
            image_id=delta.id, chain=label, reason=f"invalid {WHOLE_SIZE} or {WHOLE_HASH}"
        )
    return dataclasses.replace(
        delta,
        size=size,
        hash_algo=WHOLE_ALGO,
        hash_value=digest,
        disk_format="raw",
        is_torrentable=False,
        magnet=None,
        magnet_uri=None,
        torrent_error=None,
        bound_hash=None,
        bound_hash_error=None,
    )


def qemu_img(*args: str, what: str) -> str:
    """Run qemu-img; a failure raises ``StoreError`` with its message."""
    try:
        proc = subprocess.run(
            [QEMU_IMG, *args], capture_output=True, text=True, check=False, timeout=3600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise exception.StoreError(reason=f"qemu-img could not {what}: {exc}") from exc
    if proc.returncode != 0:
        raise exception.StoreError(
            reason=f"qemu-img could not {what}: {proc.stderr.strip() or proc.returncode}"
        )
    return proc.stdout


def hash_prefix(path: str, size: int) -> str:
    """sha512 of the first ``size`` bytes of ``path`` (a disk may be larger)."""
    hasher = hashlib.new(WHOLE_ALGO)
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 4 << 20))
            if not chunk:
                raise exception.StoreError(reason=f"{path} ended before byte {size}")
            hasher.update(chunk)
            left -= len(chunk)
    return hasher.hexdigest()


def make_delta(parent_path: str, parent_image_id: str, disk_path: str, out_path: str) -> int:
    """Write the qcow2 delta of ``disk_path`` against ``parent_path``; return its size."""
    qemu_img("create", "-q", "-f", "qcow2", "-b", disk_path, "-F", "raw", out_path, what="create")
    qemu_img(
        "rebase", "-q", "-f", "qcow2", "-b", parent_path, "-F", "raw", out_path,
        what=f"compute the delta against image {parent_image_id}",
    )  # fmt: skip
    # Glance refuses qcow2 data with a backing file; the record names the parent.
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", "", out_path, what="drop the backing")
    return os.path.getsize(out_path)


def reconstruct(delta_path: str, parent_path: str, out_path: str, *, in_place: bool) -> int:
    """Write the whole raw image of ``delta_path`` over ``parent_path``; its virtual size."""
    qemu_img(
        "rebase", "-q", "-u", "-f", "qcow2", "-b", parent_path, "-F", "raw", delta_path,
        what="point the delta at the local parent",
    )  # fmt: skip
    info = json.loads(qemu_img("info", "--output=json", "-f", "qcow2", delta_path, what="read"))
    args = ["convert", "-q", "-f", "qcow2", "-O", "raw"]
    if in_place:
        args.append("-n")  # a device or a file that exists: written as it is
    qemu_img(*args, delta_path, out_path, what="rebuild the whole image")
    return int(info["virtual-size"])


def commit_into(delta_path: str, clone_path: str) -> int:
    """Write the delta's clusters into ``clone_path`` (a copy of the parent); virtual size."""
    qemu_img(
        "rebase", "-q", "-u", "-f", "qcow2", "-b", clone_path, "-F", "raw", delta_path,
        what="point the delta at the parent's clone",
    )  # fmt: skip
    info = json.loads(qemu_img("info", "--output=json", "-f", "qcow2", delta_path, what="read"))
    qemu_img("commit", "-q", "-f", "qcow2", delta_path, what="write the delta into the clone")
    return int(info["virtual-size"])


def convert(src: str, src_format: str, dst: str, dst_format: str) -> None:
    """Write the image ``src`` (``src_format``) into the new file ``dst`` as ``dst_format``.

    The libvirt integration's two conversions: a qcow2 snapshot into the raw disk a delta
    is made from, and a rebuilt raw image into the qcow2 Nova expects of a differential
    image (its Glance record says qcow2, and Nova checks the bytes against it).
    """
    qemu_img(
        "convert", "-q", "-f", src_format, "-O", dst_format, src, dst,
        what=f"convert {src} ({src_format}) to {dst_format}",
    )  # fmt: skip


@contextlib.contextmanager
def scratch_file(directory: str, name: str) -> Iterator[str]:
    """A path in ``directory`` removed afterwards, whatever happens."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.{os.getpid()}-{time.monotonic_ns()}.qcow2")
    try:
        yield path
    finally:
        verify.discard(path)


class DeltaSource:
    """A differential image: its delta from Glance, rebuilt over the parent's base copy."""

    name = "delta"

    def __init__(
        self,
        glance: GlanceClient,
        store: BaseCopyStore,
        delta: ImageInfo,
        parent: BaseCopy,
        *,
        scratch_dir: str,
        chain: str,
        verify_hash: bool = True,
        in_parent_clone: bool = False,
    ) -> None:
        """``in_parent_clone``: the slot is a copy-on-write clone of ``parent`` already,
        so only the delta's clusters are written into it (``qemu-img commit``)."""
        self.glance, self.store, self.delta, self.parent = glance, store, delta, parent
        self.scratch_dir, self.chain, self.verify_hash = scratch_dir, chain, verify_hash
        self.in_parent_clone = in_parent_clone

    def fetch_into(
        self, image: ImageInfo, slot: Slot, progress: ProgressCallback | None = None
    ) -> FetchResult:
        """Rebuild ``image`` (the whole view) into ``slot``, verified; typed errors only."""
        start = time.monotonic()
        try:
            with scratch_file(self.scratch_dir, self.delta.id) as tmp:
                got = self.glance.download(self.delta, tmp, verify_hash=self.verify_hash)
                if self.in_parent_clone:
                    size = commit_into(tmp, slot.path)
                else:
                    with self.store.seed_path(self.parent) as parent_path:
                        size = reconstruct(tmp, parent_path, slot.path, in_place=slot.preallocated)
            # qcow2 sizes are whole 512-byte sectors; the image may end inside one.
            if not 0 <= size - image.size < 512:
                raise exception.StoreError(
                    reason=f"the delta is of a {size}-byte image, not {WHOLE_SIZE}={image.size}"
                )
            if size != image.size and not slot.preallocated:
                os.truncate(slot.path, image.size)
            verify.verify_file(image, slot.path, exact_size=not slot.preallocated)
        except exception.DeltaChainError:
            raise
        except (exception.IntegrityError, exception.StoreError) as exc:
            raise exception.DeltaChainError(
                image_id=self.delta.id, chain=self.chain, reason=f"the delta is corrupt: {exc}"
            ) from exc
        LOG.info(
            "Image %s: rebuilt from a %d KiB delta over the base copy of image %s (chain "
            "%s), verified",
            self.delta.id,
            got >> 10,
            self.parent.image_id,
            self.chain,
        )
        return FetchResult(
            image_id=image.id,
            destination=slot.path,
            source=self.name,
            seconds=time.monotonic() - start,
            bytes_from_glance=got,
        )


def upload_delta(
    store: BaseCopyStore,
    glance: GlanceClient,
    image_id: str,
    ref: str,
    parent: BaseCopy,
    scratch_dir: str,
) -> tuple[int, str, int, str] | None:
    """Upload disk ``ref`` as a delta against ``parent``.

    Returns (whole size, whole sha512, delta size, delta sha512), or None, with nothing
    sent to Glance, when no delta could be made or it would not be worth a chain (at
    least ``WORTH`` of the whole image): the caller uploads the whole image then.
    """
    with store.attached(ref, "RO") as disk, store.seed_path(parent) as parent_path:
        with open(disk, "rb") as f:
            size = f.seek(0, os.SEEK_END)
        whole = hash_prefix(disk, size)
        with scratch_file(scratch_dir, image_id) as tmp:
            try:
                delta_size = make_delta(parent_path, parent.image_id, disk, tmp)
            except exception.StoreError as exc:
                LOG.warning(
                    "Image %s: no delta against image %s (%s); uploaded whole",
                    image_id,
                    parent.image_id,
                    exc,
                )
                return None
            if delta_size >= WORTH * size:
                LOG.info(
                    "Image %s: the delta against image %s is %d%% of the image; uploaded whole",
                    image_id,
                    parent.image_id,
                    100 * delta_size // size,
                )
                return None
            glance.set_properties(
                image_id,
                disk_format="qcow2",
                **{PARENT: parent.image_id, WHOLE_SIZE: str(size), WHOLE_HASH: whole},
            )
            hasher = hashlib.new(WHOLE_ALGO)
            with open(tmp, "rb") as f:
                glance.upload(image_id, _Hashing(f, hasher), delta_size)
    LOG.info(
        "Image %s: uploaded as a %d KiB delta of image %s (whole image %d MiB)",
        image_id,
        delta_size >> 10,
        parent.image_id,
        size >> 20,
    )
    return size, whole, delta_size, hasher.hexdigest()


class _Hashing:
    def __init__(self, f: Any, hasher: Any) -> None:
        self._f, self._hasher = f, hasher

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._hasher.update(data)
        return data
