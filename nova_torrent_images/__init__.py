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


"""nova-torrent-images: Glance images delivered to compute hosts peer to peer.

The packages are the roles (doc/source/architecture.rst): ``common``, ``glance``, ``swarm``,
``compute``, ``origin``, ``virt``, ``cmd``; ``conf`` holds the options and ``exception`` every
typed error.
"""

from nova_torrent_images.common import aliases as _aliases

_aliases.install()  # the former module paths setup.cfg, Nova or operators may name
