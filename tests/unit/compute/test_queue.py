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


"""The per-host download queue."""

import threading
import time

from nova_torrent_images.compute.queue import DownloadQueue


def test_download_queue_is_fifo_and_bounded(caplog):
    queue = DownloadQueue(limit=1)
    order, running, peak = [], [0], [0]
    lock = threading.Lock()
    gate = threading.Event()

    def job(n):
        with queue.slot(f"img-{n}"):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                order.append(n)
            gate.wait(5)
            with lock:
                running[0] -= 1

    threads = []
    for n in range(4):
        t = threading.Thread(target=job, args=(n,))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # arrival order 0, 1, 2, 3
    gate.set()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3] and peak[0] == 1
    assert any("waiting for a download slot" in r.getMessage() for r in caplog.records)
