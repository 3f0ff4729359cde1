"""Run every benchmark and rewrite bench/RESULTS.md (``make bench``).

Targets (issue 7): origin egress at most 1.2x the image for 16 hosts; fleet time at most
1/6 of plain HTTP; single host at least 0.8 of plain HTTP; cache hit under 100 ms at
64 MiB and 1 GiB; peak RSS growth under 150 MiB at 2 GiB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cache_hit  # noqa: E402
import fleet  # noqa: E402
import memory  # noqa: E402
import single  # noqa: E402
from common import machine_description  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="fleet image MiB")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, to check the scripts (numbers not comparable)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    machine = machine_description()
    if args.quick:
        f = fleet.run(4, 32)
        s = single.run(64, repeat=1)
        c = cache_hit.run((16, 64))
        m = memory.run((64,))
    else:
        f = fleet.run(args.hosts, args.size)
        s = single.run(512)
        c = cache_hit.run((64, 1024))
        m = memory.run((256, 2048))
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine}. Every ratio compares torrent and plain HTTP measured in the "
        f"same run. Whole run: {time.monotonic() - started:.0f} s. Regenerate with "
        "`make bench`.",
        "",
        "| benchmark | measured | target | |",
        "|---|---|---|---|",
    ]
    egress_ok = f["torrent_origin_ratio"] <= 1.2
    speed_ok = f["speedup"] >= 6
    lines.append(
        f"| fleet, {f['hosts']} hosts, {f['size_mib']} MiB, caps {f['cap_mib']} MiB/s: origin "
        f"egress / image | torrent {f['torrent_origin_ratio']:.2f}x, HTTP "
        f"{f['http_origin_ratio']:.2f}x | torrent <= 1.2x | {verdict(egress_ok)} |"
    )
    lines.append(
        f"| fleet: time until the last host holds verified bytes | torrent "
        f"{f['torrent_seconds']:.1f} s, HTTP {f['http_seconds']:.1f} s "
        f"({f['speedup']:.1f}x faster); p50/p99 torrent {f['torrent_p50']:.1f}/"
        f"{f['torrent_p99']:.1f} s, HTTP {f['http_p50']:.1f}/{f['http_p99']:.1f} s "
        f"| torrent <= 1/6 of HTTP | {verdict(speed_ok)} |"
    )
    nss = f["torrent_no_super_seeding"]
    lines.append(
        f"| fleet, origin super-seeding off (``origin_super_seeding = false``) | torrent "
        f"{nss['seconds']:.1f} s ({f['speedup_no_super_seeding']:.1f}x faster than HTTP), "
        f"origin egress {nss['origin_ratio']:.2f}x | trade-off, see notes | - |"
    )
    lines.append(
        f"| single host, no caps, {s['size_mib']} MiB | torrent {s['torrent_mib_s']:.0f} MiB/s, "
        f"HTTP {s['http_mib_s']:.0f} MiB/s: {s['ratio']:.2f} of HTTP | >= 0.8 | "
        f"{verdict(s['ratio'] >= 0.8)} |"
    )
    for entry in c["sizes"]:
        lines.append(
            f"| cache hit (second boot, clone), {entry['size_mib']} MiB | median "
            f"{entry['hit_median_ms']:.0f} ms, max {entry['hit_max_ms']:.0f} ms | < 100 ms | "
            f"{verdict(entry['hit_max_ms'] < 100)} |"
        )
    for entry in m["sizes"]:
        t, h = entry["torrent"], entry["http"]
        lines.append(
            f"| peak RSS growth, fetching {entry['size_mib']} MiB | torrent "
            f"{t['growth_mib']:.0f} MiB, HTTP {h['growth_mib']:.0f} MiB (baseline "
            f"{t['baseline_mib']:.0f} MiB) | < 150 MiB | "
            f"{verdict(t['growth_mib'] < 150)} |"
        )
    lines += [
        "",
        "Fleet tracker: "
        + ("Debian opentracker" if f.get("tracker") else "none (peer hints and peer exchange)")
        + ".",
    ]
    notes = os.path.join(os.path.dirname(RESULTS), "NOTES.md")
    if os.path.exists(notes):
        with open(notes) as fh:
            lines += ["", fh.read().strip()]
    text = "\n".join(lines) + "\n"
    if args.quick:
        print(text)
        return 0
    with open(RESULTS, "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
