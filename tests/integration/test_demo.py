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

"""The README's main job runs end to end and reports verified boots."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("origin", ["glance", "embedded"])
def test_demo_runs(origin):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nova_torrent_images.cmd.main",
            "demo",
            "--hosts",
            "2",
            "--size",
            "8",
            "--origin",
            origin,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("compute-")]
    assert len(rows) == 2 and all(line.rstrip().endswith("yes") for line in rows)
    assert "origin egress" in result.stdout
    # Captured output is not a terminal: plain milestone lines, no cursor escapes.
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\r" not in stream
    assert "compute-1: started" in result.stdout
    assert any(line.strip().startswith("compute-2: done in") for line in result.stdout.splitlines())
