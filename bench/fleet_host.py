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

"""One compute host of the fleet benchmark, in a process of its own.

Started by ``bench/fleet.py``. It builds its configuration with ``make_conf`` for its own
127.0.0.x address (``listen_interfaces``, ``download_rate_limit`` = the host's downlink
cap, a state directory of its own), starts a ``SwarmEngine`` (torrent mode), prints
``{"event": "ready"}`` and waits for ``go`` on stdin, so that every host starts at once.
Then it fetches the image through the one pipeline,
``nova_torrent_images.compute.pipeline.fetch_to_file``, and prints one JSON line: when it was done
(``time.time()``), the source, the bytes from peers, the origin and the stripes, and its
progress timeline. It stays up (its engine too) until ``stop``: a host leaving early would
take its connections away from the others.

``--mode none`` is the plain HTTP baseline: the same pipeline with ``mode = none``, the
host's downlink capped by a token bucket on the Glance stream (like ``common.http_download``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time

from common import context_switches, read_io

from nova_torrent_images.common.utils import RateLimiter
from nova_torrent_images.compute.pipeline import ImagePipeline, fetch_to_file
from nova_torrent_images.compute.stores import open_store
from nova_torrent_images.glance.client import GlanceClient
from nova_torrent_images.testing.swarm import make_conf

TIMELINE_STEP = 0.25  # seconds between two progress samples kept
DEBUG = bool(os.environ.get("NTI_BENCH_DEBUG"))  # DEBUG log, connection alerts, pieces


class CappedGlance(GlanceClient):
    """A Glance client whose image data comes through the host's downlink cap."""

    def __init__(self, client, conf, rate: int) -> None:
        super().__init__(client, conf)
        self._bucket = RateLimiter(rate)

    def iter_data(self, image_id: str):
        for chunk in super().iter_data(image_id):
            self._bucket.take(len(chunk))
            yield chunk


IMAGE_SUFFIX = re.compile(r"-[0-9a-f]{8}-[0-9a-f-]*$")


class ThreadCPU:
    """CPU seconds (user + system) of this process's threads, by name, sampled.

    Linux keeps each thread's times in /proc/self/task; a sampler thread reads them every
    :data:`SAMPLE` seconds and keeps the last figure of threads that ended since. Python
    threads are named by their ``threading`` name (digits and image ids dropped), the
    others (libtorrent's network, disk and hashing threads) ``native``.
    """

    SAMPLE = 0.5

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._last: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="bench-sampler", daemon=True).start()

    def _sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            seconds = (int(fields[11]) + int(fields[12])) / self._tick
            name = names.get(int(tid)) or "native"
            name = IMAGE_SUFFIX.sub("", name)  # read-behind-<image id>: one name per job
            name = name.rstrip("0123456789-_ ()") or name
            with self._lock:
                self._last[int(tid)] = (name, seconds)

    def _run(self) -> None:
        while not self._stop.wait(self.SAMPLE):
            self._sample()

    def totals(self) -> dict[str, float]:
        self._sample()
        out: dict[str, float] = {}
        with self._lock:
            for name, seconds in self._last.values():
                out[name] = out.get(name, 0.0) + seconds
        return out


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Events(logging.Handler):
    """Times of the swarm's notable log lines (stripes, re-issues, metadata)."""

    WORDS = ("stripes", "re-issued", "metadata received", "went quiet", "failed", "stalled")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(word in message for word in self.WORDS) and len(self.seen) < 50:
            self.seen.append((time.time(), message[:200]))


def _instrument_stripes(marks: list, pieces: list) -> None:
    """Record when this host's stripe batches were asked for and fetched (no behaviour
    change: the stripe client's methods are wrapped, results passed through)."""
    try:
        from nova_torrent_images.swarm import stripe_client as stripes
    except ImportError:
        return
    client = getattr(stripes, "StripeClient", None)
    if client is None:
        return
    for name in ("next_batch", "fetch_pieces"):
        original = getattr(client, name, None)
        if original is None:
            continue

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            result = _original(self, *args, **kwargs)
            if _name == "fetch_pieces":
                marks.append((time.time(), "range", sum(len(piece) for piece in result)))
            elif result is None:
                marks.append((time.time(), "dry", 0))
            else:
                want = kwargs.get("want") if "want" in kwargs else (args[0] if args else None)
                kind = "reissue" if want is not None else "batch"
                marks.append((time.time(), kind, len(result[1])))
                if DEBUG:
                    pieces.append((time.time(), kind, list(result[1]), list(want or [])[:64]))
            return result

        setattr(client, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--glance", required=True, help="Glance endpoint (noauth)")
    parser.add_argument("--image-id", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--cap-kib", type=int, default=0, help="downlink, KiB/s (0: none)")
    parser.add_argument("--mode", choices=["torrent", "none"], default="torrent")
    parser.add_argument("--trust-torrent-root", action="store_true")
    parser.add_argument(
        "--store",
        choices=["file", "filesystem"],
        default="file",
        help="file: fetch_to_file (no seeding after the fetch); filesystem: the libvirt "
        "hosts' store, whose pipeline seeds the base copy once it is committed",
    )
    parser.add_argument("--log", help="log file (INFO)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="another [torrent_images] override (experiments), e.g. disk_io=pread",
    )
    args = parser.parse_args(argv)

    events = Events()
    logging.basicConfig(
        filename=args.log or os.devnull,
        level=logging.DEBUG if DEBUG else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("nova_torrent_images").addHandler(events)
    marks: list = []
    pieces: list = []
    _instrument_stripes(marks, pieces)
    if DEBUG:
        # Diagnostics only: let connection alerts through to the DEBUG log.
        import libtorrent as lt

        from nova_torrent_images.swarm import engine as engine_module

        engine_module._NOISE = engine_module._NOISE - {
            lt.peer_connect_alert,
            lt.peer_disconnected_alert,
            lt.incoming_connection_alert,
        }

    settings = {
        "mode": "none" if args.mode == "none" else "some",
        "state_dir": args.state_dir,
        "listen_interfaces": [f"{args.address}:0"],
        "download_rate_limit": args.cap_kib,
        "stall_timeout": 120,
        "trust_torrent_root": args.trust_torrent_root,
        "image_cache_dir": os.path.dirname(os.path.abspath(args.dest)),
    }
    settings.update(item.split("=", 1) for item in args.set)
    conf = make_conf(**settings)
    engine = None
    if args.mode == "torrent":
        from nova_torrent_images.swarm.engine import SwarmEngine

        engine = SwarmEngine(conf, listen_interfaces=[f"{args.address}:0"]).start()
        if DEBUG:
            import libtorrent as lt

            from nova_torrent_images.swarm.engine import ALERT_MASK

            mask = ALERT_MASK | lt.alert_category.connect
            engine.session.apply_settings({"alert_mask": int(mask)})
        glance = GlanceClient.for_endpoint(args.glance, conf)
    else:
        plain = GlanceClient.for_endpoint(args.glance, conf)
        glance = CappedGlance(plain.client, conf, args.cap_kib * 1024)
    emit("ready", address=args.address, port=engine.listen_port if engine else None)

    timeline: list[tuple[float, int, int, int]] = []
    last = [0.0]

    def progress(done: int, total: int, rate: int, peers: int) -> None:
        now = time.time()
        complete = done >= total and (not timeline or timeline[-1][1] < total)
        if now - last[0] >= TIMELINE_STEP or complete:
            last[0] = now
            timeline.append((round(now, 3), done, rate, peers))

    lines = iter(sys.stdin.readline, "")
    for line in lines:
        if line.strip() == "go":
            break
        if line.strip() == "stop" or not line:
            return 0
    started = time.time()
    sampler = ThreadCPU()
    cpu_at_go, threads_at_go = os.times(), sampler.totals()
    io_at_go = {**read_io(), "ctxsw": context_switches()}
    pipeline = None
    try:
        image = glance.image_info(args.image_id)
        if args.store == "file":
            result = fetch_to_file(
                image, args.dest, conf=conf, glance=glance, engine=engine, progress=progress
            )
        else:
            pipeline = ImagePipeline(conf, open_store(conf, "filesystem"), engine=engine)
            result = pipeline.ensure_base(image, glance, progress=progress).fetch
    except Exception as exc:  # noqa: BLE001  reported to the orchestrator
        logging.getLogger(__name__).exception("fetch failed")
        emit("done", error=f"{type(exc).__name__}: {exc}", started=started, done=time.time())
    else:
        done = time.time()
        cpu = os.times()
        now = {**read_io(), "ctxsw": context_switches()}
        io = {key: value - io_at_go.get(key, 0) for key, value in now.items()}
        threads = {
            name: round(t - threads_at_go.get(name, 0.0), 3)
            for name, t in sampler.totals().items()
            if t - threads_at_go.get(name, 0.0) >= 0.005
        }
        swarm = result.swarm
        emit(
            "done",
            started=started,
            done=done,
            source=result.source,
            seconds=result.seconds,
            bytes_from_peers=result.bytes_from_peers,
            bytes_from_origin=result.bytes_from_origin,
            bytes_from_glance=result.bytes_from_glance,
            bytes_from_stripes=getattr(swarm, "bytes_from_stripes", 0) if swarm else 0,
            swarm_seconds=getattr(swarm, "seconds", None) if swarm else None,
            hash_failures=getattr(swarm, "hash_failures", 0) if swarm else 0,
            per_peer=getattr(swarm, "per_peer", {}) if swarm else {},
            per_stripe_server=getattr(swarm, "per_stripe_server", {}) if swarm else {},
            stripes_zone=getattr(swarm, "stripes_zone", None) if swarm else None,
            fallback_reason=result.fallback_reason,
            timeline=timeline,
            stripes=[(round(t, 3), kind, n) for t, kind, n in marks[:400]],
            log=events.seen,
            # The host's own CPU from its go to its done (user + system, every thread).
            cpu_user=round(cpu.user - cpu_at_go.user, 3),
            cpu_system=round(cpu.system - cpu_at_go.system, 3),
            thread_cpu=threads,
            io=io,
            **({"pieces": pieces} if DEBUG else {}),
        )
    # Keep the session (and its connections) up until every host is done.
    for line in lines:
        if line.strip() == "stop":
            break
    if pipeline is not None:
        pipeline.shutdown()
    if engine is not None:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
