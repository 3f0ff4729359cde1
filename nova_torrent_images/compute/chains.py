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
"""Restores of differential images (doc/source/snapshots.rst): the parents first, then the delta.

A differential image's base copy is the whole image, rebuilt from its delta over the base
copy of its parent, recursively for chains. The parent is made sure of like any image, and
the delta rebuilt inside the parent's ``use`` (under the parent's lock), so that the parent
cannot be evicted meanwhile. Every failure is a :class:`DeltaChainError` naming the chain.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nova_torrent_images import exception
from nova_torrent_images.compute.delivery import Delivery
from nova_torrent_images.compute.snapshots import differential
from nova_torrent_images.compute.sources.base import ProgressCallback
from nova_torrent_images.compute.sources.delta import DeltaSource
from nova_torrent_images.compute.stores.base import BaseCopy, CommitInfo
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.glance.image import ImageInfo

if TYPE_CHECKING:
    from nova_torrent_images.compute.pipeline import ImagePipeline


class _RebuildFailed(Exception):
    """Carries a failure of the rebuild out through the parent's ``use`` (its cause)."""


class _Chain:
    """One restore: the ids known so far (the image asked for first), shared by the recursion."""

    def __init__(
        self,
        pipeline: ImagePipeline,
        glance: GlanceClient | None,
        use_torrent: bool,
        progress: ProgressCallback | None,
        project_id: str | None,
    ) -> None:
        self.pipeline, self.glance, self.use_torrent = pipeline, glance, use_torrent
        self.progress, self.project_id = progress, project_id
        self.ids: list[str] = []

    def failed(self, reason: str) -> exception.DeltaChainError:
        return exception.DeltaChainError(
            image_id=self.ids[0], chain=differential.chain_label(self.ids), reason=reason
        )

    def ensure(self, delta: ImageInfo, use: Callable[[BaseCopy], Any] | None) -> Delivery:
        pipeline = self.pipeline
        if not self.ids:
            self.ids.append(delta.id)
        parent_id = delta.parent_id
        looped = parent_id in self.ids
        self.ids.append(parent_id)
        label = differential.chain_label(self.ids)
        whole = differential.whole_view(delta, label)
        if looped or len(self.ids) > differential.MAX_DEPTH:
            raise self.failed(f"image {parent_id} is its own ancestor, or the chain is too deep")
        with pipeline.locks.hold(whole.id):
            delivery = pipeline.reuse_base(whole, self.project_id, use)
        if delivery is not None:
            return delivery
        if self.glance is None:
            raise exception.NotTorrentable(
                image_id=delta.id, reason="a differential image is rebuilt with Glance only"
            )
        try:
            parent = self.glance.image_info(parent_id)
        except exception.ImageNotFound as exc:
            raise self.failed(f"its parent image {parent_id} is not in Glance") from exc

        def rebuild(parent_base: BaseCopy) -> Delivery:
            try:
                return self._rebuild(delta, whole, label, parent_base, use)
            except Exception as exc:
                raise _RebuildFailed() from exc

        try:
            if parent.parent_id:
                outer = self.ensure(parent, rebuild)
            else:
                outer = pipeline.ensure_base(
                    parent, self.glance, use_torrent=self.use_torrent,
                    progress=self.progress, use=rebuild, project_id=self.project_id,
                )  # fmt: skip
        except _RebuildFailed as wrapped:
            raise wrapped.__cause__  # noqa: B904  the rebuild's own failure
        except exception.DeltaChainError:
            raise
        except exception.TorrentImagesError as exc:
            raise self.failed(
                f"no verified base copy of its parent image {parent_id}: {exc}"
            ) from exc
        finally:
            pipeline._export_metrics()
        return outer.used

    def _rebuild(
        self,
        delta: ImageInfo,
        whole: ImageInfo,
        label: str,
        parent_base: BaseCopy,
        use: Callable[[BaseCopy], Any] | None,
    ) -> Delivery:
        pipeline = self.pipeline
        with pipeline.locks.hold(whole.id):
            delivery = pipeline.reuse_base(whole, self.project_id, use)
            if delivery is not None:
                return delivery
            commit = CommitInfo(whole, projects=(self.project_id,) if self.project_id else ())
            clone_slots = pipeline.store.capabilities.clone_slots
            source = DeltaSource(
                self.glance,
                pipeline.store,
                delta,
                parent_base,
                scratch_dir=os.path.join(pipeline.state_dir, "deltas"),
                chain=differential.chain_label(self.ids),  # the whole chain known by now
                verify_hash=pipeline.verify_hash,
                in_parent_clone=clone_slots,
            )
            from_base = parent_base if clone_slots else None
            with pipeline.queue.slot(whole.id), pipeline.reservation(whole.size) as token:
                base, fetched = pipeline.fetch(commit, source, self.progress, token, from_base)
            pipeline.fetches[whole.id] = fetched
            return Delivery(base, True, fetched, used=use(base) if use else None)


def ensure_chain(
    pipeline: ImagePipeline,
    delta: ImageInfo,
    glance: GlanceClient | None,
    use_torrent: bool,
    *,
    progress: ProgressCallback | None,
    use: Callable[[BaseCopy], Any] | None,
    project_id: str | None,
) -> Delivery:
    """The verified whole image of the differential image ``delta``, then ``use(base)``."""
    return _Chain(pipeline, glance, use_torrent, progress, project_id).ensure(delta, use)
