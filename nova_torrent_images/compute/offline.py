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
"""Boots while Glance is unreachable: who may boot which kept base copy, and for how long.

The record Glance sent with an image is kept with its base copy (the store's metadata).
While Glance answers, it is the authority: every online boot that finds the base copy
makes what is kept the record Glance just returned (:func:`refresh_record`), status,
visibility, owner and all. While Glance does not answer, only that kept record can stand
in, never widening who may boot the image (:func:`offline_image`):

* a record whose status is not ``active`` (deactivated, deleted) boots for nobody;
* a ``public`` or ``community`` image boots for any project;
* any other image boots for its owner and the projects the base copy remembers: projects
  Glance showed the image to on this host, under the visibility and owner it has now
  (:func:`refreshed_projects`).

A refresh that fails (the sidecar cannot be written, XAPI refuses) must not leave the
older, maybe wider, record in charge: it is noted, in this process and in
``<state_dir>/offline-records/``, and until a later refresh succeeds an offline boot needs
both the kept record and the one Glance last returned to allow it (the stricter of old and
new), and is refused if the note cannot be read.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.parse
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from nova_torrent_images import exception
from nova_torrent_images.common import utils
from nova_torrent_images.compute.stores.base import BaseCopy, BaseCopyStore, cached_record
from nova_torrent_images.glance.image import ImageInfo, parse_image

LOG = logging.getLogger(__name__)

#: Visibilities Glance shows to every project.
PUBLIC = ("public", "community")
NOTES = "offline-records"  # under state_dir: refreshes that failed

# Refreshes that failed in this process, by (store name, image id): they hold even when
# the note could not be written to state_dir either.
_failed: dict[tuple[str, str], dict[str, Any]] = {}
_failed_lock = threading.Lock()


def refreshed_projects(
    base: BaseCopy, record: dict[str, Any], project_id: str | None
) -> tuple[str, ...]:
    """The projects ``base`` remembers once Glance returned ``record`` to ``project_id``.

    ``base.projects`` are projects Glance showed the image to. They keep meaning that only
    while the image is ``public`` or ``community`` (anyone may boot it then anyway), or
    while its visibility and owner are those they were remembered under. Once either
    changed and the image is not public (made private or shared, or given to another
    owner), a project remembered before may have seen it only because it was public, or
    as a member under the old owner: all are forgotten, and each is remembered again at
    its next online boot, when Glance shows it the image. The owner of ``record`` may boot
    it without being remembered; ``project_id`` (Glance just showed it the image) is
    remembered. Glance's image record holds no member list (members are another API the
    boot does not read): a member keeps offline access through its own online boots only.
    """
    old = base.record
    same_terms = bool(old) and _terms(old) == _terms(record)
    shown_to_all = record.get("visibility") in PUBLIC or record.get("is_public") is True
    kept = base.projects if shown_to_all or same_terms else ()
    return tuple(dict.fromkeys(p for p in (*kept, project_id) if p))


def _terms(record: dict[str, Any]) -> tuple[Any, ...]:
    # What decides whom Glance shows the image to. Nova's translation of the record (the
    # libvirt integration reads it) has is_public in place of the visibility.
    return record.get("visibility"), record.get("is_public"), record.get("owner")


def refresh_record(
    store: BaseCopyStore,
    state_dir: str,
    base: BaseCopy,
    image: ImageInfo,
    project_id: str | None,
) -> None:
    """Keep the record Glance just returned (``image``, shown to ``project_id``) with
    ``base``, for boots while Glance is down. Call under the image's lock.

    A failure does not fail the boot (Glance's answer allows it), and is never silent: it
    is logged and noted, and offline boots then need both records (module docstring).
    """
    if not store.capabilities.keeps_base_copies or image.offline:
        return
    record = cached_record(image)
    projects = refreshed_projects(base, record, project_id)
    if record == base.record and projects == base.projects:
        _forget_failure(store, state_dir, base.image_id)  # what is kept is Glance's
        return
    before = {k: base.record.get(k) for k in ("status", "visibility", "owner")}
    try:
        store.refresh_record(base, record, projects)
    except Exception as exc:  # noqa: BLE001  noted below; the online boot goes on
        LOG.error(
            "Image %s: cannot keep the Glance record just read with base copy %s in %s "
            "(%s); until it is, boots while Glance is down need both the old and the new "
            "record to allow them",
            base.image_id,
            base.ref,
            store.name,
            exc,
        )
        _note_failure(store, state_dir, base, record, projects, exc)
        return
    _forget_failure(store, state_dir, base.image_id)
    after = {k: record.get(k) for k in before}
    if after != before:
        LOG.info(
            "Image %s: Glance's record changed (%s); base copy %s keeps the new one, "
            "offline boots now for %s",
            base.image_id,
            ", ".join(f"{k} {before[k]} -> {after[k]}" for k in before if before[k] != after[k]),
            base.ref,
            "any project"
            if record.get("visibility") in PUBLIC
            else ", ".join(dict.fromkeys(p for p in (record.get("owner"), *projects) if p))
            or "no project",
        )


def offline_image(
    store: BaseCopyStore,
    conf: cfg.ConfigOpts,
    image_id: str,
    project_id: str | None,
    glance_error: Exception,
    max_age: float,
) -> ImageInfo:
    """The image as Glance last showed it, for a boot while Glance is unreachable.

    Only a verified base copy on this host can stand in, within ``offline_boot_max_age``
    (``max_age``) of its verification, while its record says ``active``, and only for a
    project Glance showed the image to (its owner, a project remembered with the base
    copy, anyone for a public or community image): a cached record never widens who may
    boot an image. After a failed refresh both the kept record and the one Glance last
    returned must allow the boot. Raises
    :class:`~nova_torrent_images.exception.OfflineBootRefused` otherwise.
    """

    def refuse(reason: str) -> exception.OfflineBootRefused:
        return exception.OfflineBootRefused(
            image_id=image_id, reason=reason, glance_error=glance_error
        )

    if not max_age:
        raise refuse("boots without Glance are disabled")
    base = store.lookup(image_id) if store.capabilities.keeps_base_copies else None
    if base is None or not base.record:
        raise refuse(f"this host has no verified base copy of it in {store.name}")
    age = time.time() - base.created_at
    if age > max_age:
        raise refuse(
            f"its base copy was verified {age:.0f}s ago, more than offline_boot_max_age={max_age}s"
        )
    state_dir = conf.torrent_images.state_dir
    try:
        failed = _failed_refresh(store, state_dir, base)
    except (OSError, ValueError, TypeError) as exc:
        LOG.warning("Image %s: unreadable note of a failed record refresh: %s", image_id, exc)
        raise refuse(
            f"the record kept with its base copy could not be refreshed from Glance, and "
            f"the note of that in {_note_path(state_dir, store.name, image_id)} is "
            f"unreadable ({exc})"
        ) from exc
    terms = [(base.record, base.projects)]
    if failed is not None:
        # The kept record is older than Glance's last answer: both must allow the boot.
        terms.append((failed["record"], tuple(failed["projects"])))
    for record, projects in terms:
        reason = _refusal(record, projects, project_id)
        if reason is not None:
            if failed is not None:
                reason += (
                    " (the record kept with its base copy could not be refreshed from "
                    "Glance: the old and the new record must both allow the boot)"
                )
            raise refuse(reason)
    record = terms[-1][0]  # Glance's latest answer; the bytes match it (checked then)
    opts = conf.torrent_images
    image = parse_image(
        record,
        torrentable_property=opts.torrentable_property,
        magnet_property=opts.magnet_property,
    )
    image.offline = True
    LOG.warning(
        "Image %s: Glance is unreachable (%s); booting the base copy %s verified %.0fs "
        "ago, with the Glance record kept with it",
        image_id,
        glance_error,
        base.ref,
        age,
    )
    return image


def _refusal(
    record: dict[str, Any], projects: tuple[str, ...], project_id: str | None
) -> str | None:
    """Why ``record`` and ``projects`` do not let ``project_id`` boot; None if they do."""
    status = record.get("status")
    if status not in (None, "active"):
        # Glance withdrew it (deactivated, deleted) when it last answered here.
        return f"Glance last said it is {status}"
    if record.get("visibility") in PUBLIC:
        return None
    if project_id and project_id in (record.get("owner"), *projects):
        return None
    return (
        f"Glance never showed it to project {project_id} on this host, and it is "
        f"{record.get('visibility') or 'not public'}"
    )


# -- refreshes that failed ----------------------------------------------------------------
def _note_path(state_dir: str, store_name: str, image_id: str) -> str:
    store = hashlib.sha256(store_name.encode()).hexdigest()[:16]  # a host may have several
    name = f"{store}-{urllib.parse.quote(image_id, safe='')}.json"
    return os.path.join(state_dir, NOTES, name)


def _note_failure(
    store: BaseCopyStore,
    state_dir: str,
    base: BaseCopy,
    record: dict[str, Any],
    projects: tuple[str, ...],
    error: Exception,
) -> None:
    note = {
        "store": store.name,
        "image_id": base.image_id,
        # The base copy it is about: one committed later keeps a record of its own.
        "base": base.ref,
        "created": base.created_at,
        "record": record,
        "projects": list(projects),
        "error": str(error),
        "noted_at": time.time(),
    }
    with _failed_lock:
        _failed[(store.name, base.image_id)] = note
    path = _note_path(state_dir, store.name, base.image_id)
    try:
        utils.atomic_write(path, json.dumps(note, indent=1, sort_keys=True))
    except OSError as exc:
        LOG.error(
            "Image %s: cannot note the failed record refresh in %s either (%s); this "
            "process holds offline boots of it to both records, but after a restart the "
            "record kept with base copy %s in %s applies until the next online boot",
            base.image_id,
            path,
            exc,
            base.ref,
            store.name,
        )


def _forget_failure(store: BaseCopyStore, state_dir: str, image_id: str) -> None:
    with _failed_lock:
        _failed.pop((store.name, image_id), None)
    path = _note_path(state_dir, store.name, image_id)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:  # the note stays: offline boots stay held to both records
        LOG.warning("Image %s: cannot remove %s: %s", image_id, path, exc)
        return
    LOG.info("Image %s: the record kept with its base copy is Glance's again", image_id)


def _failed_refresh(store: BaseCopyStore, state_dir: str, base: BaseCopy) -> dict[str, Any] | None:
    """The failed refresh noted for ``base``, if any; raises when the note is unreadable."""
    with _failed_lock:
        note = _failed.get((store.name, base.image_id))
    if note is None:
        try:
            with open(_note_path(state_dir, store.name, base.image_id)) as f:
                note = json.load(f)
        except FileNotFoundError:
            return None
        if not (
            isinstance(note, dict)
            and isinstance(note.get("record"), dict)
            and isinstance(note.get("projects"), list)
            and all(isinstance(p, str) for p in note["projects"])
        ):
            raise ValueError("not a note of a failed record refresh")
    if (note.get("base"), note.get("created")) != (base.ref, base.created_at):
        return None  # about a base copy since replaced; the new one's record is fresh
    return note
