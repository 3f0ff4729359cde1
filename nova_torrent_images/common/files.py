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
"""Sizes of files and block devices, the same way for both."""

from __future__ import annotations

import os


def data_size(path: str) -> int:
    """The size of the file or block device ``path`` (``st_size`` of a device is 0)."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)
