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

A delta is untrusted data (whoever owns the snapshot uploaded it). Since the 2024 QCOW2
advisories (CVE-2024-32498) Nova, Glance and Cinder check such data with oslo.utils' format
inspector before ``qemu-img`` opens it, and so does :func:`check_delta`: it must be qcow2 and
nothing else, pass the inspector's safety checks (no backing file, no external data file, no
unknown incompatible features), and describe the image its record names
(``nti_whole_size``); qemu-img's own ``info`` must agree. Every ``qemu-img`` runs with an
explicit ``-f`` and under process limits (CPU time, address space), as Nova runs it.
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

from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_utils import units
from oslo_utils.imageutils import format_inspector

from nova_torrent_images import exception
from nova_torrent_images.common import files, hashing
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore
from nova_torrent_images.glance import verify
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import (
    PARENT_PROPERTY,
    WHOLE_HASH_PROPERTY,
    WHOLE_SIZE_PROPERTY,
    ImageInfo,
)

LOG = logging.getLogger(__name__)

WHOLE_ALGO = "sha512"
MAX_DEPTH = 32  # a longer chain is a loop or a mistake
WORTH = 0.5  # a delta this large (of the whole image) is uploaded as the whole image
QEMU_IMG = "qemu-img"


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
        size = int(props[WHOLE_SIZE_PROPERTY])
        digest = str(props[WHOLE_HASH_PROPERTY]).lower()
    except (KeyError, ValueError) as exc:
        raise exception.DeltaChainError(
            image_id=delta.id,
            chain=label,
            reason=f"its properties {WHOLE_SIZE_PROPERTY} and {WHOLE_HASH_PROPERTY} are missing "
            "or invalid",
        ) from exc
    if size <= 0 or len(digest) != 128 or any(c not in "0123456789abcdef" for c in digest):
        raise exception.DeltaChainError(
            image_id=delta.id,
            chain=label,
            reason=f"invalid {WHOLE_SIZE_PROPERTY} or {WHOLE_HASH_PROPERTY}",
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


# Process limits of qemu-img's header work (info, create, rebase -u), as Nova's for
# `qemu-img info` ([libvirt] images_address_space_limit=1 GiB, images_cpu_time_limit=30 s):
# a crafted header cannot make it allocate or spin for long.
QEMU_IMG_ADDRESS_SPACE = 1 * units.Gi
QEMU_IMG_CPU_TIME = 30  # seconds
# The copies (convert, commit, rebase without -u) get a CPU limit by size but no address
# space limit, as Nova's convert: their thread pool (up to 64 workers, each with a stack and
# a malloc arena) reserves more than 1 GiB of address space, and `qemu-img commit` of a
# 64 MiB delta aborts here under 1 GiB ("qemu_thread_create: Resource temporarily
# unavailable"). An untrusted delta reaches a copy only after the format inspector and a
# limited `info` have passed it. 3.3 s of CPU per GiB measured here (a 1 GiB image with a
# 50 MiB delta, nearly all of it system time); three times that, and the base above.
QEMU_IMG_CPU_PER_GIB = 10
QEMU_IMG_TIMEOUT = 3600  # seconds of wall clock for any one run


def copy_cpu_time(size: int) -> int:
    """The CPU time limit of a qemu-img that copies an image of ``size`` bytes."""
    return QEMU_IMG_CPU_TIME + QEMU_IMG_CPU_PER_GIB * -(-size // units.Gi)


def qemu_img(*args: str, what: str, copy_size: int | None = None) -> str:
    """Run qemu-img under process limits; a failure raises ``StoreError`` with its message.

    Header work runs under the CPU and address space limits above; a copy of ``copy_size``
    bytes under a CPU limit by its size only. Every call names the format of what it opens
    (``-f``): qemu-img's probing is how a raw image passes for another format.
    """
    if "-f" not in args:
        raise ValueError(f"qemu-img {args[0]} without -f: the format is always given")
    if copy_size is None:
        cpu_time, address_space = QEMU_IMG_CPU_TIME, QEMU_IMG_ADDRESS_SPACE
    else:
        cpu_time, address_space = copy_cpu_time(copy_size), None
    limits = processutils.ProcessLimits(cpu_time=cpu_time, address_space=address_space)
    started: list[subprocess.Popen] = []
    try:
        out, _ = processutils.execute(
            "env", "LC_ALL=C", "LANG=C", QEMU_IMG, *args,
            prlimit=limits, timeout=QEMU_IMG_TIMEOUT, on_execute=started.append,
        )  # fmt: skip
    except processutils.ProcessExecutionError as exc:
        if exc.exit_code in (-9, -24):  # SIGKILL, SIGXCPU: a limit was reached
            space = f"{address_space >> 20} MiB" if address_space else "unlimited"
            reason = f"its process limits stopped it (CPU {cpu_time} s, address space {space})"
        else:
            reason = (exc.stderr or "").strip() or f"exit code {exc.exit_code}"
        raise exception.StoreError(reason=f"qemu-img could not {what}: {reason}") from exc
    except subprocess.TimeoutExpired as exc:
        for proc in started:
            proc.kill()
            proc.wait()
        raise exception.StoreError(
            reason=f"qemu-img could not {what}: no answer in {QEMU_IMG_TIMEOUT} s"
        ) from exc
    except OSError as exc:
        raise exception.StoreError(reason=f"qemu-img could not {what}: {exc}") from exc
    return out


def check_delta(path: str, *, image_id: str, whole_size: int | None = None) -> int:
    """Check the untrusted delta ``path`` before any qemu-img opens it; its virtual size.

    As Nova checks an image before ``qemu-img`` (``do_image_deep_inspection``, then
    ``qemu_img_info``): the format inspector must find qcow2 and only qcow2, its safety
    checks must pass (no backing file, which also rules out ``json:`` specs; no external
    data file; no unknown incompatible feature), and the virtual size must be that of
    ``whole_size`` (the record's ``nti_whole_size``, rounded up to a sector); then
    ``qemu-img info`` (under limits) must agree. Raises :class:`UnsafeImage`, naming the
    check that failed.
    """

    def refuse(check: str, reason: str) -> exception.UnsafeImage:
        LOG.error("Image %s: its delta failed the format check %s: %s", image_id, check, reason)
        return exception.UnsafeImage(image_id=image_id, check=check, reason=reason)

    try:
        found = format_inspector.detect_file_format(path)
    except format_inspector.ImageFormatError as exc:
        raise refuse("format", str(exc)) from exc
    except OSError as exc:
        raise exception.StoreError(
            reason=f"cannot read the delta of image {image_id}: {exc}"
        ) from exc
    if found is None or str(found) != "qcow2":
        raise refuse("format", f"the data is {found or 'of no known format'}, not qcow2")
    try:
        found.safety_check()
    except format_inspector.SafetyCheckFailed as exc:
        checks = ", ".join(sorted(exc.failures))
        raise refuse(checks, "; ".join(str(v) for v in exc.failures.values())) from exc
    except format_inspector.ImageFormatError as exc:
        raise refuse("format", str(exc)) from exc
    size = found.virtual_size
    if whole_size is not None and not 0 <= size - whole_size < 512:
        raise refuse(
            "virtual_size",
            f"it is of a {size}-byte image, the record says {WHOLE_SIZE_PROPERTY}={whole_size}",
        )
    # qemu's own reading of the header must agree (Nova checks qemu-img info as well).
    info = json.loads(
        qemu_img("info", "--output=json", "-f", "qcow2", path, what=f"read image {image_id}")
    )
    data = (info.get("format-specific") or {}).get("data") or {}
    if info.get("format") != "qcow2":
        raise refuse("qemu-img info", f"qemu-img reads it as {info.get('format')}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise refuse("qemu-img info", f"backing file {info.get('backing-filename')!r}")
    if data.get("data-file") or data.get("data-file-raw"):
        raise refuse("qemu-img info", f"external data file {data.get('data-file')!r}")
    if int(info.get("virtual-size", -1)) != size:
        raise refuse("qemu-img info", f"virtual size {info.get('virtual-size')}, not {size}")
    return size


def make_delta(parent_path: str, parent_image_id: str, disk_path: str, out_path: str) -> int:
    """Write the qcow2 delta of ``disk_path`` against ``parent_path``; return its size."""
    qemu_img("create", "-q", "-f", "qcow2", "-b", disk_path, "-F", "raw", out_path, what="create")
    qemu_img(
        "rebase", "-q", "-f", "qcow2", "-b", parent_path, "-F", "raw", out_path,
        what=f"compute the delta against image {parent_image_id}",
        copy_size=files.data_size(disk_path),
    )  # fmt: skip
    # Glance refuses qcow2 data with a backing file; the record names the parent.
    qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-b", "", out_path, what="drop the backing")
    return os.path.getsize(out_path)


def reconstruct(
    delta_path: str,
    parent_path: str,
    out_path: str,
    *,
    in_place: bool,
    image_id: str = "unknown",
    whole_size: int | None = None,
) -> int:
    """Write the whole raw image of ``delta_path`` over ``parent_path``; its virtual size.

    The delta is checked first (:func:`check_delta`, for image ``image_id`` of
    ``whole_size`` bytes): nothing opens it before.
    """
    size = check_delta(delta_path, image_id=image_id, whole_size=whole_size)
    qemu_img(
        "rebase", "-q", "-u", "-f", "qcow2", "-b", parent_path, "-F", "raw", delta_path,
        what="point the delta at the local parent",
    )  # fmt: skip
    args = ["convert", "-q", "-f", "qcow2", "-O", "raw"]
    if in_place:
        args.append("-n")  # a device or a file that exists: written as it is
    qemu_img(*args, delta_path, out_path, what="rebuild the whole image", copy_size=size)
    return size


def commit_into(
    delta_path: str, clone_path: str, *, image_id: str = "unknown", whole_size: int | None = None
) -> int:
    """Write the delta's clusters into ``clone_path`` (a copy of the parent); virtual size.

    The delta is checked first, as by :func:`reconstruct`.
    """
    size = check_delta(delta_path, image_id=image_id, whole_size=whole_size)
    qemu_img(
        "rebase", "-q", "-u", "-f", "qcow2", "-b", clone_path, "-F", "raw", delta_path,
        what="point the delta at the parent's clone",
    )  # fmt: skip
    qemu_img(
        "commit", "-q", "-f", "qcow2", delta_path,
        what="write the delta into the clone", copy_size=size,
    )  # fmt: skip
    return size


def convert(src: str, src_format: str, dst: str, dst_format: str) -> None:
    """Write the image ``src`` (``src_format``) into the new file ``dst`` as ``dst_format``.

    The libvirt integration's two conversions: a qcow2 snapshot into the raw disk a delta
    is made from, and a rebuilt raw image into the qcow2 Nova expects of a differential
    image (its Glance record says qcow2, and Nova checks the bytes against it).
    """
    qemu_img(
        "convert", "-q", "-f", src_format, "-O", dst_format, src, dst,
        what=f"convert {src} ({src_format}) to {dst_format}",
        copy_size=files.data_size(src),
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
        size = files.data_size(disk)
        hasher = hashlib.new(WHOLE_ALGO)
        if hashing.hash_prefix(disk, hasher, size) != size:
            raise exception.StoreError(reason=f"{disk} ended before byte {size}")
        whole = hasher.hexdigest()
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
                **{
                    PARENT_PROPERTY: parent.image_id,
                    WHOLE_SIZE_PROPERTY: str(size),
                    WHOLE_HASH_PROPERTY: whole,
                },
            )
            hasher = hashlib.new(WHOLE_ALGO)
            with open(tmp, "rb") as f:
                glance.upload(image_id, hashing.HashingReader(f, hasher), delta_size)
    LOG.info(
        "Image %s: uploaded as a %d KiB delta of image %s (whole image %d MiB)",
        image_id,
        delta_size >> 10,
        parent.image_id,
        size >> 20,
    )
    return size, whole, delta_size, hasher.hexdigest()
