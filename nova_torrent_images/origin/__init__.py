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

* :mod:`.publish` -- ``Publisher`` (publish, unpublish, list, periodic check) and the
  on-disk ``Registry`` of published images;
* :mod:`.seeder` -- ``OriginSeeder``, the long-running first seed of every published image;
* :mod:`.tracker` -- opentracker whitelist writing and reload;
* :mod:`.promotion` -- publish images that are requested often.

Their ``[torrent_images]`` options are in :mod:`nova_torrent_images.conf.origin`, outside
this package, so registering the options loads no origin code. Nothing is imported here
either: importing one of these modules loads only what that module needs.
"""
