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

"""Progress: milestone lines in a log, a bar on a terminal."""

import io

from nova_torrent_images.compute.progress import HostProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_plain_line_per_milestone():
    log = io.StringIO()
    display = HostProgress("host-1", 100, stream=log)
    for done in (0, 10, 20, 50, 60, 100, 100):
        display.update(done, peers=3)
    display.finish("torrent")
    lines = log.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == "host-1: started, 0 MiB"
    assert lines[1] == "host-1: receiving, 3 peers"
    assert lines[2].startswith("host-1: 50% after ") and lines[2].endswith(" s, 3 peers")
    assert lines[3].startswith("host-1: done in ") and lines[3].endswith(" s (torrent)")
    assert "\x1b" not in log.getvalue() and "\r" not in log.getvalue()


def test_a_terminal_gets_a_bar():
    terminal = Terminal()
    display = HostProgress("host-1", 100, stream=terminal)
    display.update(50, peers=2)
    display.finish("torrent")
    assert "\r" in terminal.getvalue() and "100/100" in terminal.getvalue()
    assert "started" not in terminal.getvalue()
