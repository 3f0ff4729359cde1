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

"""Fleet delivery: N compute hosts (one process each) fetch one image, by torrent and by
plain HTTP, through one origin uplink cap.

This process is the Glance node: an ``HTTPOrigin`` (a Glance-like origin whose upload is
capped: the plain HTTP baseline, and the Glance the origin node publishes from) and the
product's origin node (``start_origin_node``: publisher, origin seeder and stripe server on
one 127.0.0.x address, uplink capped). Every compute host is a ``bench/fleet_host.py``
process on its own 127.0.0.x with its own libtorrent session and downlink cap; all start
on one ``go`` and each fetches through ``nova_torrent_images.compute.pipeline.fetch_to_file``.

The floor is image size / cap: no host can be done sooner (its downlink), and the origin
must send every byte at least once (its uplink). Origin egress is what the origin node sent
(BitTorrent and stripes) plus what the HTTP origin served, during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MiB, median, percentile, spread, write_image  # noqa: E402

from nova_torrent_images.testing.http_origin import HTTPOrigin  # noqa: E402
from nova_torrent_images.testing.origin_node import start_origin_node  # noqa: E402
from nova_torrent_images.testing.swarm import next_loopback_address  # noqa: E402

HOST_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fleet_host.py")
READY_TIMEOUT = 120.0
RUN_TIMEOUT = 900.0
# The torrent variants measured, as (result key, store). The first is the headline: hosts
# whose pipeline seeds the committed base copy (the filesystem store of libvirt hosts; the
# XenAPI handlers do the same); then ``fetch_to_file`` (the output-file store of a
# prefetch: no seeding once done).
VARIANTS = (("torrent", "filesystem"), ("file", "file"))


# -- host processes ----------------------------------------------------------------------
@dataclass
class HostProcess:
    name: str
    address: str
    process: subprocess.Popen
    events: queue.Queue = field(default_factory=queue.Queue)

    def send(self, line: str) -> None:
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def read_events(self) -> None:
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue
        self.events.put({"event": "exit"})

    def wait_for(self, kind: str, deadline: float) -> dict:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"fleet host {self.name}: no {kind!r} in time")
            try:
                event = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if event["event"] == kind:
                return event
            if event["event"] == "exit":
                raise RuntimeError(f"fleet host {self.name} exited (see its log)")


def _spawn(
    name: str,
    root: str,
    glance_url: str,
    image_id: str,
    cap_kib: int,
    mode: str,
    trust: bool,
    store: str = "file",
    overrides: tuple[str, ...] = (),
    address: str | None = None,
    netns: str | None = None,
) -> HostProcess:
    address = address or next_loopback_address()
    workdir = os.path.join(root, name)
    os.makedirs(workdir, exist_ok=True)
    args = [
        sys.executable,
        HOST_SCRIPT,
        "--name",
        name,
        "--address",
        address,
        "--glance",
        glance_url,
        "--image-id",
        image_id,
        "--dest",
        os.path.join(workdir, "image"),
        "--state-dir",
        os.path.join(workdir, "state"),
        "--cap-kib",
        str(cap_kib),
        "--mode",
        mode,
        "--log",
        os.path.join(workdir, "host.log"),
        "--store",
        store,
    ]
    for item in overrides:
        args += ["--set", item]
    if trust:
        args.append("--trust-torrent-root")
    if netns is not None:  # bench/netns.py: the host's own namespace and shaped link
        args = ["ip", "netns", "exec", netns, *args]
    with open(os.path.join(workdir, "stderr.log"), "w") as stderr:
        process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    host = HostProcess(name, address, process)
    threading.Thread(target=host.read_events, daemon=True).start()
    return host


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User + system CPU so far of this process (the origin side) and of ``pids``."""
    own = os.times()
    hosts = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            hosts += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return own.user + own.system, hosts


def _machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    steal = values[7] if len(values) > 7 else 0
    total = sum(values[:8])
    return total - idle - steal, steal, total


def _stop(hosts: list[HostProcess]) -> None:
    for h in hosts:
        h.send("stop")
    for h in hosts:
        try:
            h.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            h.process.kill()
            h.process.wait()


def run_hosts(
    n: int,
    root: str,
    glance_url: str,
    image_id: str,
    *,
    cap_kib: int,
    mode: str,
    egress,
    trust: bool = False,
    prefix: str = "host",
    store: str = "file",
    overrides: tuple[str, ...] = (),
    placement: list[tuple[str, tuple[str, ...]]] | None = None,
    links=None,
) -> dict:
    """Start ``n`` host processes, let them all go at once; times relative to the go.

    ``placement``: each host's address and further overrides (its zone), in order.
    ``links`` (bench/netns.py): each host in a namespace of its own whose veth the kernel
    shapes at the cap; the hosts' own limiter is then off."""
    if links is not None:
        spots = [links.host(i) for i in range(n)]
        placement = [(address, ()) for _, address in spots]
        cap_kib = 0
    hosts = [
        _spawn(
            f"{prefix}-{i}", root, glance_url, image_id, cap_kib, mode, trust, store,
            overrides + (placement[i][1] if placement else ()),
            address=placement[i][0] if placement else None,
            netns=spots[i][0] if links is not None else None,
        )
        for i in range(n)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        for h in hosts:
            h.wait_for("ready", deadline)
        pids = [h.process.pid for h in hosts]
        egress_before, cpu_before = egress(), _cpu_seconds(pids)
        ticks_before = _machine_ticks()
        t0 = time.time()
        for h in hosts:
            h.send("go")
        deadline = time.monotonic() + RUN_TIMEOUT
        results = [h.wait_for("done", deadline) for h in hosts]
        sent, cpu = egress() - egress_before, _cpu_seconds(pids)
        cpu = tuple(after - before for after, before in zip(cpu, cpu_before, strict=True))
        ticks = [
            after - before for after, before in zip(_machine_ticks(), ticks_before, strict=True)
        ]
    finally:
        _stop(hosts)
    errors = [
        f"{h.name}: {r['error']}" for h, r in zip(hosts, results, strict=True) if "error" in r
    ]
    if errors:
        raise RuntimeError("fleet hosts failed: " + "; ".join(errors))
    per_host = []
    for h, r in zip(hosts, results, strict=True):
        r = dict(r)
        r.pop("event", None)
        r["name"], r["address"] = h.name, h.address
        r["seconds_since_go"] = r["done"] - t0
        per_host.append(r)
    out = {
        "t0": t0,
        "per_host": per_host,
        "egress_bytes": sent,
        "cpu_seconds": cpu[0] + cpu[1],
        # The compute hosts' processes alone, from the go to the last host done.
        "host_cpu_seconds": cpu[1],
        # Share of the machine's CPU time that was busy (and stolen by the hypervisor)
        # from the go to the last host done: near 1, the run was CPU bound.
        "machine_busy": ticks[0] / ticks[2] if ticks[2] else 0.0,
        "machine_steal": ticks[1] / ticks[2] if ticks[2] else 0.0,
    }
    with open(os.path.join(root, f"raw-{prefix}.json"), "w") as f:
        json.dump(out, f)
    return out


def phases(host: dict, t0: float, size: int) -> dict:
    """Where one torrent host's time went: start-up, stripe phase, transfer, verify."""
    timeline = host.get("timeline") or []
    marks = host.get("stripes") or []
    out = {"done": host["done"] - t0}
    if timeline:
        out["first_progress"] = timeline[0][0] - t0
        full = next((t for t, done, *_ in timeline if done >= size), None)
        if full is not None:
            out["transfer_end"] = full - t0
            out["after_transfer"] = host["done"] - full
        half = next((t for t, done, *_ in timeline if done >= size / 2), None)
        if half is not None:
            out["half"] = half - t0
    ranges = [t for t, kind, _ in marks if kind == "range"]
    if ranges:
        out["last_stripe"] = ranges[-1] - t0
    dry = [t for t, kind, _ in marks if kind == "dry"]
    if dry:
        out["stripes_dry"] = dry[0] - t0
    out["reissues"] = sum(1 for _, kind, _ in marks if kind == "reissue")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def _summary(run: dict, size: int, floor: float, *, detail: bool) -> dict:
    t0 = run["t0"]
    times = sorted(h["seconds_since_go"] for h in run["per_host"])
    seconds = times[-1]
    out = {
        "seconds": round(seconds, 3),
        "time_over_floor": round(seconds / floor, 3),
        "origin_egress": round(run["egress_bytes"] / size, 3),
        "p50": round(median(times), 3),
        "p99": round(percentile(times, 99), 3),
        "done_times": [round(t, 3) for t in times],
        "sources": sorted({h.get("source", "?") for h in run["per_host"]}),
        # CPU of every host and of the origin process from the go to the last host done;
        # spread over this machine's cores it is the shortest time the work allows here.
        "cpu_seconds": round(run["cpu_seconds"], 1),
        "cpu_floor": round(run["cpu_seconds"] / (os.cpu_count() or 1), 2),
        "cpu_busy": round(run["cpu_seconds"] / (os.cpu_count() or 1) / seconds, 2),
        # What each delivered GiB cost the compute hosts (user + system).
        "host_cpu_s_per_gib": round(
            run.get("host_cpu_seconds", 0.0) / (len(run["per_host"]) * size / 2**30), 3
        ),
        "machine_busy": round(run.get("machine_busy", 0.0), 2),
        "machine_steal": round(run.get("machine_steal", 0.0), 2),
    }
    # Where the hosts' CPU went, by thread (libtorrent's own threads are "native"), each
    # host from its go to its done: the split behind host_cpu_s_per_gib.
    by_thread: dict[str, float] = {}
    for h in run["per_host"]:
        for name, seconds_used in (h.get("thread_cpu") or {}).items():
            by_thread[name] = by_thread.get(name, 0.0) + seconds_used
    if by_thread:
        gib = len(run["per_host"]) * size / 2**30
        out["thread_cpu_s_per_gib"] = {
            name: round(used / gib, 2)
            for name, used in sorted(by_thread.items(), key=lambda item: -item[1])
        }
    io = [h["io"] for h in run["per_host"] if h.get("io")]
    if io:
        # /proc/<pid>/io: rchar and wchar count read()/pread() and write()/pwrite() bytes,
        # page-cache hits included; socket traffic (recvmsg/sendmsg, recv_into) is not in
        # them, so they are the file I/O: libtorrent's writes, its hash read-back and its
        # uploads, the whole-image check's reads.
        image_bytes = len(io) * size
        out["io"] = {
            "file_read_per_image_byte": round(sum(i.get("rchar", 0) for i in io) / image_bytes, 2),
            "file_written_per_image_byte": round(
                sum(i.get("wchar", 0) for i in io) / image_bytes, 2
            ),
            "write_calls_per_mib": round(sum(i.get("syscw", 0) for i in io) / (image_bytes / MiB)),
            "read_calls_per_mib": round(sum(i.get("syscr", 0) for i in io) / (image_bytes / MiB)),
            # Every thread's sleeps and wakes (and preemptions): a wake costs more CPU on a
            # small VM than the work it wakes for, when the work is a few blocks.
            "context_switches_per_mib": round(
                sum(i.get("ctxsw", 0) for i in io) / (image_bytes / MiB), 1
            ),
        }
    if any(h.get("source") == "torrent" for h in run["per_host"]):
        hosts = run["per_host"]
        out["bytes_from_stripes"] = sum(h.get("bytes_from_stripes", 0) for h in hosts)
        out["bytes_from_peers"] = sum(h.get("bytes_from_peers", 0) for h in hosts)
        out["bytes_from_origin"] = sum(h.get("bytes_from_origin", 0) for h in hosts)
        out["bytes_from_glance"] = sum(h.get("bytes_from_glance", 0) for h in hosts)
        out["hash_failures"] = sum(h.get("hash_failures", 0) for h in hosts)
        ph = [phases(h, t0, size) for h in hosts]
        out["phases_median"] = {
            key: round(median([p[key] for p in ph if key in p]), 3)
            for key in ("first_progress", "half", "stripes_dry", "last_stripe", "transfer_end",
                        "after_transfer", "done")
            if any(key in p for p in ph)
        }  # fmt: skip
        slowest = max(range(len(hosts)), key=lambda i: hosts[i]["done"])
        out["slowest_host"] = {"name": hosts[slowest]["name"], **ph[slowest]}
        out["reissues"] = sum(p["reissues"] for p in ph)
        if detail:
            out["per_host"] = [
                {
                    "name": h["name"],
                    "from_stripes_mib": round(h.get("bytes_from_stripes", 0) / MiB, 1),
                    "from_peers_mib": round(h.get("bytes_from_peers", 0) / MiB, 1),
                    **p,
                }
                for h, p in zip(hosts, ph, strict=True)
            ]
    return out


# -- one fleet ----------------------------------------------------------------------------
def _start_tracker(root: str, host: str = "127.0.0.1"):
    """Debian's opentracker on ``host``, or None when it is not installed."""
    from nova_torrent_images.testing.opentracker import Opentracker, find_binary

    if find_binary() is None:
        return None
    return Opentracker(workdir=os.path.join(root, "tracker"), host=host).start()


def run(
    hosts: int = 16,
    size_mib: int = 256,
    cap_mib: int = 32,
    *,
    workdir: str | None = None,
    tracker: bool = True,
    http: bool = True,
    detail: bool = True,
    variants: tuple[tuple[str, ...], ...] = VARIANTS,
    repeats: dict[str, int] | None = None,
    peer_client: int = 0,
    links=None,
) -> dict:
    """One fleet of ``hosts``: plain HTTP first, then torrent, from one capped origin.

    ``links`` (bench/netns.py ``KernelLinks``): every host in a namespace of its own, its
    links shaped by the kernel at the cap instead of by the hosts' own limiter.

    ``variants`` are (result key, compute store, option=value...) tuples, each a torrent
    run of its own with a fresh origin node: ``file`` is ``fetch_to_file`` (no seeding
    after the fetch), ``filesystem`` the libvirt hosts' store (the base copy is seeded once
    committed); the options are ``[torrent_images]`` overrides of the hosts. ``repeats``
    runs some variants several times (key -> runs): the run of median time is reported,
    with min/median/max of every figure. ``peer_client`` runs that many fleets of aria2c
    hosts (``aria2``, see peer_client.py) from the same origin after the torrent runs.
    """
    root = workdir or tempfile.mkdtemp(prefix="nti-bench-fleet-")
    os.makedirs(root, exist_ok=True)
    size, cap = size_mib * MiB, cap_mib * MiB
    floor = size / cap
    image_path = os.path.join(root, "image.raw")
    write_image(image_path, size)
    keep_image = bool(peer_client)  # published again as a v1 torrent for aria2c
    out: dict = {"hosts": hosts, "size_mib": size_mib, "cap_mib": cap_mib, "floor": floor}
    tracker_node = None
    try:
        host = links.address if links is not None else "127.0.0.1"
        with HTTPOrigin(os.path.join(root, "origin"), host, upload_rate=cap) as origin:
            record = origin.create_image(image_path, name="bench-fleet")
            if not keep_image:
                os.unlink(image_path)
            image_id = record["id"]
            if http:
                run_http = run_hosts(
                    hosts,
                    root,
                    origin.url,
                    image_id,
                    cap_kib=cap_mib * 1024,
                    mode="none",
                    egress=lambda: origin.bytes_served,
                    prefix="http",
                    links=links,
                )
                out["http"] = _summary(run_http, size, floor, detail=False)
                _clean(root, "http", hosts)
            tracker_node = _start_tracker(root, host) if tracker else None
            for key, store, *overrides in variants:
                runs = [
                    _torrent_fleet(
                        origin,
                        image_id,
                        root,
                        hosts,
                        cap_mib,
                        tracker_node,
                        key,
                        store,
                        detail,
                        tuple(overrides),
                        links=links,
                    )
                    for _ in range((repeats or {}).get(key, 1))
                ]
                out[key] = _repeated(runs)
            if peer_client:
                out["aria2"] = _peer_fleets(
                    origin, image_path, root, hosts, cap_mib, tracker_node, peer_client
                )
                os.unlink(image_path)
        out["tracker"] = tracker_node is not None
        if http:
            for key, *_ in variants:
                out[key]["speedup"] = round(out["http"]["seconds"] / out[key]["seconds"], 2)
        return out
    finally:
        if tracker_node is not None:
            tracker_node.stop()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _torrent_fleet(
    origin,
    image_id,
    root,
    hosts,
    cap_mib,
    tracker_node,
    key,
    store,
    detail,
    overrides=(),
    kill_origin_at: float | None = None,
    links=None,
) -> dict:
    """Publish with a fresh origin node (a fresh dispenser), then one torrent fleet.

    ``kill_origin_at``: the origin node stops at once (its listening sockets and
    connections closed, as a killed process's) once it has sent that share of the image.
    """
    size = origin.images[image_id]["size"]
    cap = cap_mib * MiB
    node = start_origin_node(
        origin.url,
        os.path.join(root, f"origin-state-{key}"),
        upload_kib=cap_mib * 1024,
        tracker=tracker_node,
        stripes=True,
        address=links.address if links is not None else None,
    )
    try:
        # Publishing reads the image from Glance once; not part of the run, so the
        # uplink cap is lifted meanwhile.
        origin.limiter.rate = 0
        node.publish(image_id)
        origin.limiter.rate = cap
        if tracker_node is not None:
            tracker_node.wait_allowed(node.publisher.published()[0].tracker_hashes[0], timeout=5)
        killed: dict = {}
        if kill_origin_at is not None:
            threading.Thread(
                target=_kill_when, args=(node, kill_origin_at * size, killed), daemon=True
            ).start()
        glance_before = origin.bytes_served
        run_bt = run_hosts(
            hosts,
            root,
            origin.url,
            image_id,
            cap_kib=cap_mib * 1024,
            mode="torrent",
            egress=lambda: node.seeder.uploaded_bytes() + origin.bytes_served,
            prefix=key,
            store=store,
            overrides=overrides,
            links=links,
        )
        glance_bytes = origin.bytes_served - glance_before
        stripes = node.seeder.stripes
        stripe_bytes = stripes.bytes_served if stripes else 0
    finally:
        killed["stop"] = True
        if not killed.get("at"):
            node.stop()
        node.publisher.unpublish(image_id)
    _clean(root, key, hosts)
    summary = _summary(run_bt, size, size / cap, detail=detail)
    summary["store"] = store
    summary["overrides"] = list(overrides)
    summary["stripe_server_bytes"] = stripe_bytes
    summary["glance_bytes"] = glance_bytes
    summary["glance_over_image"] = round(glance_bytes / size, 3)
    if killed.get("at"):
        summary["origin_killed_after_s"] = round(killed["at"] - run_bt["t0"], 2)
    return summary


def _kill_when(node, sent: float, killed: dict) -> None:
    """Stop the origin node once it has uploaded ``sent`` bytes (or the run ended)."""
    while not killed.get("stop"):
        if node.seeder.uploaded_bytes() >= sent:
            killed["at"] = time.time()
            node.stop()
            return
        time.sleep(0.05)


def origin_loss(hosts: int = 16, size_mib: int = 256, cap_mib: int = 32) -> dict:
    """The fleet with its only origin node killed half way, beside the same fleet intact.

    Last host / floor and Glance bytes / image for both; the killed run's hosts finish
    from what they hold and fill in the rest from Glance (swarm/glance_fill.py).
    """
    root = tempfile.mkdtemp(prefix="nti-bench-origin-loss-")
    size, cap = size_mib * MiB, cap_mib * MiB
    image_path = os.path.join(root, "image.raw")
    write_image(image_path, size)
    tracker_node = _start_tracker(root)
    out: dict = {"hosts": hosts, "size_mib": size_mib, "cap_mib": cap_mib, "floor": size / cap}
    try:
        with HTTPOrigin(os.path.join(root, "origin"), upload_rate=cap) as origin:
            image_id = origin.create_image(image_path, name="bench-origin-loss")["id"]
            os.unlink(image_path)
            for key, kill in (("intact", None), ("killed", 0.5)):
                out[key] = _torrent_fleet(
                    origin, image_id, root, hosts, cap_mib, tracker_node, key, "file", False,
                    kill_origin_at=kill,
                )  # fmt: skip
        return out
    finally:
        if tracker_node is not None:
            tracker_node.stop()
        shutil.rmtree(root, ignore_errors=True)


REPEATED = ("seconds", "time_over_floor", "origin_egress", "host_cpu_s_per_gib", "machine_busy")


def _repeated(runs: list[dict]) -> dict:
    """The run of median time, with min/median/max of the figures over every run."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        out["repeats"] = {k: spread([r[k] for r in runs]) for k in REPEATED if k in runs[0]}
    return out


def _peer_fleets(origin, image_path, root, hosts, cap_mib, tracker_node, runs) -> dict:
    """``runs`` fleets of aria2c hosts fetching the image as a v1 torrent (peer_client.py)."""
    import peer_client

    why = peer_client.ensure_aria2c()
    if why is None and tracker_node is None:
        why = "no tracker to introduce aria2c hosts to each other"
    if why is not None:
        print(f"bench: no aria2 fleet: {why}", flush=True)
        return {"skipped": why}
    results, errors = [], []
    for i in range(runs):
        try:
            results.append(_peer_fleet(origin, image_path, root, hosts, cap_mib, tracker_node, i))
        except Exception as exc:  # noqa: BLE001  a peer client's failure is reported, not fatal
            errors.append(repr(exc))
            print(f"bench: aria2 fleet run {i} failed: {exc!r}", flush=True)
    if not results:
        return {"skipped": f"every aria2 fleet run failed: {'; '.join(errors)}"}
    return {**_repeated(results), "client": "aria2c 1.36, v1 torrent, no stripes"}


def _peer_fleet(origin, image_path, root, hosts, cap_mib, tracker_node, i) -> dict:
    """One fleet of aria2c hosts from a v1 origin node of its own."""
    import peer_client

    size = origin.images[next(iter(origin.images))]["size"]
    floor = size / (cap_mib * MiB)
    workdir = os.path.join(root, f"aria2-run-{i}")
    v1 = peer_client.V1Origin(
        origin, image_path, workdir, cap_kib=cap_mib * 1024, tracker=tracker_node
    )
    try:
        got = peer_client.run_fleet(
            hosts, v1, workdir, tracker_url=tracker_node.announce_url, cap_kib=cap_mib * 1024
        )
    finally:
        v1.stop()
        v1.node.publisher.unpublish(v1.record["id"])
    result = {
        "seconds": got["seconds"],
        "time_over_floor": round(got["seconds"] / floor, 3),
        "origin_egress": round(got["egress_bytes"] / size, 3),
        "host_cpu_s_per_gib": got["cpu_s_per_gib"],
        "done_times": got["done_times"],
        "p50": round(median(got["done_times"]), 3),
        "thread_cpu_s_per_gib": got["thread_cpu_s_per_gib"],
        "io": got["io"],
    }
    print(
        f"aria2 fleet {hosts} hosts: {got['seconds']:.1f} s = {result['time_over_floor']:.2f}x "
        f"floor, egress {result['origin_egress']:.2f}x, {got['cpu_s_per_gib']:.2f} CPU-s/GiB",
        flush=True,
    )
    return result


def _clean(root: str, prefix: str, n: int) -> None:
    """Drop the fetched images (keep the logs): a 32-host run is 2 GiB of copies."""
    for i in range(n):
        workdir = os.path.join(root, f"{prefix}-{i}")
        for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
            if name == "image" or name.endswith(".base"):
                os.unlink(os.path.join(workdir, name))


def scale_curve(
    counts: tuple[int, ...] = (4, 8, 16, 32),
    size_mib: int = 64,
    cap_mib: int = 16,
    *,
    workdir: str | None = None,
    tracker: bool = True,
    variants: tuple[tuple[str, ...], ...] = VARIANTS,
    http: bool = True,
    links=None,
) -> list[dict]:
    """One fleet per host count (each with its own origin and HTTP baseline).

    A row's unprefixed figures are the first variant's; the others' are prefixed with
    their key (``file_time_over_floor``, ...).
    """
    rows = []
    for n in counts:
        sub = os.path.join(workdir, f"scale-{n}") if workdir else None
        result = run(
            n,
            size_mib,
            cap_mib,
            workdir=sub,
            tracker=tracker,
            detail=False,
            variants=variants,
            http=http,
            links=links,
        )
        row = {"hosts": n, "size_mib": size_mib, "cap_mib": cap_mib, "floor": result["floor"]}
        h = result.get("http", {"seconds": float("nan")})
        if http:
            row.update(
                http_host_cpu_s_per_gib=h["host_cpu_s_per_gib"],
                http_time_over_floor=h["time_over_floor"],
                http_origin_egress=h["origin_egress"],
                http_seconds=h["seconds"],
                http_done_times=h["done_times"],
            )
        for i, (key, *_) in enumerate(variants):
            t = result[key]
            prefix = "" if i == 0 else f"{key}_"
            row.update(
                {
                    f"{prefix}time_over_floor": t["time_over_floor"],
                    f"{prefix}origin_egress": t["origin_egress"],
                    f"{prefix}seconds": t["seconds"],
                    f"{prefix}p50": t["p50"],
                    f"{prefix}done_times": t["done_times"],
                    f"{prefix}cpu_floor": t["cpu_floor"],
                    f"{prefix}host_cpu_s_per_gib": t["host_cpu_s_per_gib"],
                    f"{prefix}machine_busy": t["machine_busy"],
                    f"{prefix}phases_median": t.get("phases_median"),
                    f"{prefix}slowest_host": t.get("slowest_host"),
                    f"{prefix}reissues": t.get("reissues"),
                }
            )
            print(
                f"scale {n:>2} hosts, {key}: {t['seconds']:.1f} s = "
                f"{t['time_over_floor']:.2f}x floor, egress {t['origin_egress']:.2f}x, "
                f"machine busy {t['machine_busy']:.0%}; HTTP {h['seconds']:.1f} s",
                flush=True,
            )
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="MiB")
    parser.add_argument("--cap", type=int, default=32, help="MiB/s, origin and each host")
    parser.add_argument("--no-tracker", action="store_true")
    parser.add_argument("--no-http", action="store_true", help="torrent only")
    parser.add_argument("--scale", help="host counts of a scale curve, e.g. 4,8,16,32")
    parser.add_argument("--workdir", help="keep host logs here")
    parser.add_argument(
        "--variants",
        default=",".join(f"{k}:{v}" for k, v in VARIANTS),
        help="torrent runs as key:store[:option=value...] (store file or filesystem), "
        "comma separated",
    )
    args = parser.parse_args()
    if args.scale:
        counts = tuple(int(n) for n in args.scale.split(","))
        result = scale_curve(
            counts,
            args.size,
            args.cap,
            workdir=args.workdir,
            tracker=not args.no_tracker,
            variants=tuple(tuple(v.split(":")) for v in args.variants.split(",")),
            http=not args.no_http,
        )
    else:
        result = run(
            args.hosts,
            args.size,
            args.cap,
            workdir=args.workdir,
            tracker=not args.no_tracker,
            http=not args.no_http,
            variants=tuple(tuple(v.split(":")) for v in args.variants.split(",")),
        )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
