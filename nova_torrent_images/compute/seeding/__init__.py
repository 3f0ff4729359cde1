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

"""Local seeds and the policy that ends them, one module per job.

* :mod:`.resume` -- libtorrent resume data per base copy (what seeding again needs);
* :mod:`.seeds` -- :class:`SeedManager`: which base copies this process seeds;
* :mod:`.eviction` -- expiry, maximum age, quota and free-space floor (LRU eviction);
* :mod:`.queue` -- the per-host download queue;
* :mod:`.status` -- the status file other processes (``status``) read;
* :mod:`.maintenance` -- the periodic thread of a long-running process.
"""
