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

"""The origin side, on Glance API nodes: publish images as torrents and seed them.

* :mod:`.publisher` -- ``Publisher``: publish, unpublish, list, periodic check;
* :mod:`.registry` -- the on-disk ``Registry`` of published images;
* :mod:`.magnet_fit` -- a magnet that fits Glance's 255-character property limit;
* :mod:`.seeder` -- ``OriginSeeder``, the long-running first seed of every published image;
* :mod:`.dispenser` -- which host gets which piece: each piece once per zone;
* :mod:`.stripe_server` -- the HTTP endpoint of the dispenser, the .torrent and ranges;
* :mod:`.stripe_guard` -- its connection limits (per address, in all, deadlines);
* :mod:`.tracker` -- opentracker whitelist writing and reload;
* :mod:`.promotion` -- publish images that are requested often;
* :mod:`.activation` -- publish images Glance activates, unpublish those it deletes;
* :mod:`.metrics` -- the origin's Prometheus endpoint.

The origin never imports the compute role (tests/unit/test_layout.py).

Their ``[torrent_images]`` options are in :mod:`nova_torrent_images.conf.origin`, outside
this package, so registering the options loads no origin code. Nothing is imported here
either: importing one of these modules loads only what that module needs.
"""
