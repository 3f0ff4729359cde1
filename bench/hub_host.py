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

"""One compute host of the responsiveness benchmark: a download inside a busy process.

Started by ``bench/hub_lateness.py`` as ``hub_host.py MODE ...``. With ``eventlet`` the
process is monkey-patched first, as nova-compute is under eventlet, and a green thread
wakes every 10 ms, as nova-compute's RPC handling and service heartbeat share the hub;
with ``native`` (Nova's newer mode) the ticker is a native thread. Each wake-up records
how late it came. The ticker runs alone for a while (idle), then during a download of the
image through ``fetch_to_file``, and prints one JSON line: lateness p50/p99/max in ms for
both phases.
"""

import sys

MODE = sys.argv[1]
if MODE == "eventlet":
    import eventlet

    eventlet.monkey_patch()

# isort: split

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

TICK = 0.010  # seconds


class Ticker:
    """Wakes every TICK; keeps how late each wake-up was (ms)."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self.recording = False
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            due = time.monotonic() + TICK
            time.sleep(TICK)  # green under eventlet (patched), native otherwise
            if self.recording:
                self.late.append(max(0.0, (time.monotonic() - due) * 1000))

    def phase(self, seconds: float | None = None, during=None) -> dict:
        self.late = []
        self.recording = True
        started = time.monotonic()
        if during is not None:
            during()
        else:
            time.sleep(seconds)
        self.recording = False
        return summary(self.late, time.monotonic() - started)


def summary(late: list[float], seconds: float) -> dict:
    if not late:
        return {"p50": None, "p99": None, "max": None, "ticks": 0, "seconds": seconds}
    ordered = sorted(late)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)  # noqa: E731
    return {
        "p50": pick(0.5),
        "p99": pick(0.99),
        "max": round(ordered[-1], 2),
        "ticks": len(late),
        "seconds": round(seconds, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("--glance", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() to start at")
    args = parser.parse_args()

    if os.environ.get("NTI_BENCH_DEBUG"):
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from nova_torrent_images.compute.pipeline import fetch_to_file
    from nova_torrent_images.glance.client import GlanceClient
    from nova_torrent_images.testing.swarm import SimulatedHost

    ticker = Ticker()
    if MODE == "eventlet":
        if os.environ.get("NTI_HUB_BLOCKING"):  # print where the hub is held > 50 ms
            from eventlet import debug as eventlet_debug

            eventlet_debug.hub_blocking_detection(True, 0.05)
        eventlet.spawn(ticker.run)
    else:
        threading.Thread(target=ticker.run, daemon=True).start()
    host = SimulatedHost("hub", address=args.address)
    try:
        glance = GlanceClient.for_endpoint(args.glance, host.conf)
        image = glance.image_info(args.image)
        idle = ticker.phase(args.idle)
        wait = args.start_at - time.time()
        if wait > 0:
            time.sleep(wait)
        result = {}

        def download() -> None:
            result["fetch"] = fetch_to_file(
                image, args.out, conf=host.conf, glance=glance, engine=host.engine
            )

        busy = ticker.phase(during=download)
        fetched = result["fetch"]
        print(
            json.dumps(
                {
                    "mode": MODE,
                    "idle": idle,
                    "download": busy,
                    "source": fetched.source,
                    "seconds": round(fetched.seconds, 2),
                    "from_peers": fetched.bytes_from_peers,
                    "from_origin": fetched.bytes_from_origin,
                }
            ),
            flush=True,
        )
        # Stay in the swarm a little: hosts of a fleet hand over pieces before leaving.
        time.sleep(2)
    finally:
        ticker.stop = True
        host.stop()
        if os.path.exists(args.out):
            os.unlink(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
