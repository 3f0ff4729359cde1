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

"""The option groups: ``[torrent_images]`` and ``[torrent_images_glance]``.

Every topic module of this package registers its options in the one ``[torrent_images]``
group through :func:`register`; the keystoneauth options of the Glance client are in
``[torrent_images_glance]`` (:mod:`.glance`).
"""

from __future__ import annotations

from oslo_config import cfg

GROUP = "torrent_images"
GLANCE_GROUP = "torrent_images_glance"


def torrent_images_group() -> cfg.OptGroup:
    """A new ``[torrent_images]`` group, with the title and help of the sample file."""
    # A new OptGroup per ConfigOpts: register_group() copies the group shallowly, so a
    # shared instance would share its option table, and set_override() on one ConfigOpts
    # would leak into every other one.
    return cfg.OptGroup(
        GROUP,
        title="Peer-to-peer delivery of Glance images",
        help="Settings of nova-torrent-images on compute hosts and on the Glance-side seeder.",
    )


def register(conf: cfg.ConfigOpts, opts: list[cfg.Opt]) -> None:
    """Register ``opts`` in ``[torrent_images]`` of ``conf`` (idempotent)."""
    conf.register_group(torrent_images_group())
    conf.register_opts(opts, group=GROUP)
