"""``nova-torrent-images demo``: a local swarm of simulated compute hosts.

It starts a real glance-api on 127.0.0.1, publishes a generated raw image as a torrent
seeded by an origin host, and lets N compute hosts (each its own 127.0.0.x address and
libtorrent session) fetch it at once through the library's verified fetch. The closing
table shows where each host's bytes came from and how much the origin sent compared with
a plain HTTP fleet.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading

from tqdm import tqdm

from nova_torrent_images import exception
from nova_torrent_images.fetch import FetchResult, fetch
from nova_torrent_images.glance import GlanceClient
from nova_torrent_images.swarm.torrent import make_torrent
from nova_torrent_images.testing.swarm import SimulatedHost

MiB = 1024 * 1024
ORIGIN_UPLOAD_KIB = 32 * 1024  # 32 MiB/s, about a 250 Mbit/s origin uplink


def _write_image(path: str, size: int) -> None:
    # Random data: nothing compresses or deduplicates along the way.
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def _sha512(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()


def run(hosts: int = 4, size_mib: int = 64, workdir: str | None = None) -> int:
    try:
        from nova_torrent_images.testing.glance_server import GlanceServer
    except ImportError as exc:
        raise exception.TorrentImagesError(
            f"the demo needs glance-api (pip install 'nova-torrent-images[glance]'): {exc}"
        ) from exc
    if hosts < 1 or size_mib < 1:
        raise exception.TorrentImagesError("--hosts and --size must be at least 1")
    own_dir = workdir is None
    root = workdir or tempfile.mkdtemp(prefix="nti-demo-")
    os.makedirs(root, exist_ok=True)
    # The bars are the demo's output; library INFO lines would tear them apart.
    logging.getLogger("nova_torrent_images").setLevel(logging.WARNING)
    size = size_mib * MiB
    started: list[SimulatedHost] = []
    try:
        print(f"Demo in {root}: {hosts} compute hosts, one {size_mib} MiB raw image")
        image_path = os.path.join(root, "image.raw")
        _write_image(image_path, size)
        with GlanceServer(workdir=os.path.join(root, "glance")) as server:
            print(f"glance-api running at {server.url}")
            record = server.create_image(image_path, name="demo-image")
            glance = GlanceClient.for_endpoint(server.url)

            # The origin link is what a fleet saturates; cap it like a real uplink.
            origin = SimulatedHost("origin", upload_rate_limit=ORIGIN_UPLOAD_KIB)
            started.append(origin)
            torrent = make_torrent(image_path, name=record["id"])
            origin.seed(torrent.data, image_path)
            magnet = torrent.magnet(peers=[origin.endpoint])
            glance.set_properties(record["id"], is_torrentable="true", torrent_magnet=magnet)
            print(
                f"published image {record['id']} ({torrent.num_pieces} pieces), origin "
                f"seeder at {origin.address}\n{magnet}\n"
            )

            computes = [SimulatedHost(f"compute-{i + 1}") for i in range(hosts)]
            started.extend(computes)
            results = _fetch_all(computes, glance, record["id"], root, size)
            origin_upload = origin.uploaded_bytes()

        _print_table(computes, results, record["os_hash_value"], size, origin_upload)
        ok = all(r.get("verified") for r in results)
        return 0 if ok else 1
    finally:
        for host in started:
            host.stop()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _fetch_all(computes, glance, image_id, root, size) -> list[dict]:
    results: list[dict] = [{} for _ in computes]
    bars = [
        tqdm(total=size, unit="B", unit_scale=True, desc=h.name, position=i, leave=True)
        for i, h in enumerate(computes)
    ]

    def boot(index: int, host: SimulatedHost) -> None:
        bar = bars[index]
        dest = os.path.join(root, host.name, image_id)
        os.makedirs(os.path.dirname(dest), exist_ok=True)

        def progress(done: int, total: int, rate: int, peers: int) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(peers=peers, refresh=False)

        try:
            image = glance.image_info(image_id)
            result: FetchResult = fetch(
                image, dest, conf=host.conf, glance=glance, engine=host.engine, progress=progress
            )
            bar.update(size - bar.n)
            results[index] = {"result": result, "path": dest}
        except exception.TorrentImagesError as exc:
            results[index] = {"error": str(exc)}

    threads = [threading.Thread(target=boot, args=(i, h)) for i, h in enumerate(computes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for bar in bars:
        bar.close()
    return results


def _print_table(computes, results, expected_hash, size, origin_upload) -> None:
    print()
    header = (
        f"{'host':<12} {'address':<12} {'via':<8} {'seconds':>8} {'peers MiB':>10} "
        f"{'origin MiB':>11} {'Glance MiB':>11}  verified"
    )
    print(header)
    print("-" * len(header))
    glance_bytes = 0
    for host, entry in zip(computes, results, strict=True):
        if "error" in entry:
            print(f"{host.name:<12} {host.address:<12} FAILED: {entry['error']}")
            continue
        r: FetchResult = entry["result"]
        entry["verified"] = _sha512(entry["path"]) == expected_hash
        glance_bytes += r.bytes_from_glance
        print(
            f"{host.name:<12} {host.address:<12} {r.source:<8} {r.seconds:>8.1f} "
            f"{r.bytes_from_peers / MiB:>10.1f} {r.bytes_from_origin / MiB:>11.1f} "
            f"{r.bytes_from_glance / MiB:>11.1f}  {'yes' if entry['verified'] else 'NO'}"
        )
    egress = origin_upload + glance_bytes
    fleet = size * len(computes)
    print(
        f"\norigin egress: {egress / MiB:.1f} MiB (seeder {origin_upload / MiB:.1f} + Glance "
        f"HTTP {glance_bytes / MiB:.1f}) = {egress / size:.2f}x the image; a plain HTTP "
        f"fleet would send {fleet / MiB:.0f} MiB ({len(computes)}.00x)"
    )
