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
"""What making sure of a base copy did: the result of the pipeline and of chain restores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nova_torrent_images.compute.sources.base import FetchResult
from nova_torrent_images.compute.stores.base import BaseCopy


@dataclass
class Delivery:
    """What :meth:`~nova_torrent_images.compute.pipeline.ImagePipeline.ensure_base` did."""

    base: BaseCopy
    downloaded: bool  # False: the base copy was already there
    fetch: FetchResult | None = None  # how it was downloaded
    used: Any = None  # what the caller's ``use`` returned (a clone's reference, ...)
