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
