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

"""Run every benchmark; write bench/results.json, bench/RESULTS.md and the plots
(``make bench``).

Targets (ratios measured in one run):

* fleet, 16 hosts, 256 MiB, origin and host caps 32 MiB/s: the last host done within
  1.25x the floor (image size / cap), origin egress at most 1.05x the image;
* scale curve, 4 to 32 hosts, 64 MiB, caps 16 MiB/s: time / floor <= 1.5 and egress
  <= 1.1 at every N;
* demo (4 hosts, 64 MiB): torrent's last host in at most half of plain HTTP's time;
* single host, no caps: at least 0.9 of plain HTTP's speed with the default settings, 1.0
  with ``trust_torrent_root = true``; CPU per GiB at most 1.5x plain HTTP's with the
  defaults, 1.1x with the trusted root;
* a peer client measured in the same run (aria2c, v1 torrent, same origin and caps):
  alone and as a 16-host fleet, CPU per GiB beside the time;
* the neighbour effect: a guest's CPU and disk writes next to image work, as fractions of
  the guest alone, with the defaults and with QoS off;
* nothing else regresses: a cache hit under 100 ms, peak RSS growth under 150 MiB at 2 GiB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cache_hit  # noqa: E402
import fleet  # noqa: E402
import hub_lateness  # noqa: E402
import memory  # noqa: E402
import neighbour  # noqa: E402
import single  # noqa: E402
import zones  # noqa: E402
from common import machine_description  # noqa: E402

try:  # the snapshot benchmark (differential uploads), where present
    import snapshots  # noqa: E402
except ImportError:
    snapshots = None

HERE = os.path.dirname(os.path.abspath(__file__))
FLEET_PNG = "fleet_hosts_over_time.png"
# The 16-host fleet also runs with trust_torrent_root (no whole-image re-read): what the
# hosts' verification costs. The scale curve keeps to fleet.VARIANTS.
FLEET_VARIANTS = (*fleet.VARIANTS, ("trusted", "filesystem", "trust_torrent_root=true"))
SCALE_PNG = "scale_curve.png"

TARGETS = {
    "fleet_time_over_floor": 1.25,
    "fleet_origin_egress": 1.05,
    "scale_time_over_floor": 1.5,
    "scale_origin_egress": 1.1,
    "demo_torrent_over_http": 0.5,
    "single_ratio_default": 0.9,
    "single_ratio_trusted_root": 1.0,
    "single_cpu_over_http_default": 1.5,
    "single_cpu_over_http_trusted_root": 1.1,
    "cache_hit_ms": 100,
    "rss_growth_mib": 150,
}
LABELS = {
    "torrent": "torrent, filesystem store (seeds once committed)",
    "file": "torrent, fetch_to_file (no seeding once done)",
    "trusted": "torrent, filesystem store, trust_torrent_root = true",
    "http": "plain HTTP (mode = none)",
    "aria2": "peer client: aria2c, v1 torrent",
}
# Rows where the machine is busier than this also give the CPU floor (total CPU work /
# cores): the shortest time this machine allows, whatever the design.
BUSY = 0.8


def verdict(ok: bool, value: float | None = None, target: float | None = None) -> str:
    """met, or missed and by how much (value against target, as a percentage)."""
    if ok:
        return "met"
    if value is None or not target:
        return "**missed**"
    return f"**missed** by {abs(value / target - 1):.0%} ({value:.2f} against {target:g})"


def machine_bound(t: dict, floor: float) -> str:
    """For a run busier than BUSY: how near it came to this machine's CPU floor, and how
    far that floor alone is above the link's, so a reader tells the machine's limit from
    the design's."""
    cpu_floor = t.get("cpu_floor", 0.0)
    if t.get("machine_busy", 0.0) <= BUSY or not cpu_floor:
        return ""
    return (
        f"; bound by this machine: {t['seconds'] / cpu_floor:.2f}x its CPU floor, "
        f"which alone is {cpu_floor / floor:.2f}x the link floor"
    )


def run_demo(hosts: int, size_mib: int) -> dict:
    """The demo as ``make demo`` runs it; its table is kept for RESULTS.md."""
    from nova_torrent_images.demo import orchestrator

    figures: dict = {}
    out = io.StringIO()
    with redirect_stdout(out):
        code = orchestrator.run(hosts=hosts, size_mib=size_mib, results=figures)
    text = out.getvalue()
    header = text.find("\nhost ")
    table = text[header + 1 :] if header >= 0 else text
    print(table)
    figures["exit_code"] = code
    figures["table"] = table.strip()
    return figures


# -- plots --------------------------------------------------------------------------------
def _completed(times: list[float]) -> tuple[list[float], list[int]]:
    xs, ys = [0.0], [0]
    for i, t in enumerate(sorted(times), 1):
        xs += [t, t]
        ys += [i - 1, i]
    return xs, ys


def plot_fleet(f: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = [k for k in ("torrent", "file", "trusted", "http") if k in f]
    colors = {
        "torrent": "tab:blue",
        "file": "tab:green",
        "trusted": "tab:purple",
        "http": "tab:red",
    }
    zoom = 1.15 * max(f[k]["seconds"] for k in keys if k != "http")
    for ax, limit, title in (
        (axes[0], None, "whole run"),
        (axes[1], zoom, "torrent runs, zoomed"),
    ):
        for key in keys:
            xs, ys = _completed(f[key]["done_times"])
            xs.append(limit or xs[-1] * 1.02)
            ys.append(ys[-1])
            ax.plot(xs, ys, color=colors[key], label=f"{LABELS[key]}: {f[key]['seconds']:.1f} s")
        ax.axvline(
            f["floor"], color="grey", ls="--", label=f"floor (size / cap) {f['floor']:.0f} s"
        )
        ax.axvline(
            f["floor"] * TARGETS["fleet_time_over_floor"],
            color="grey",
            ls=":",
            label="target: 1.25 x floor",
        )
        if limit:
            ax.set_xlim(0, limit)
        ax.set_ylim(0, f["hosts"] + 0.5)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("seconds since all hosts were told to go")
        ax.set_ylabel("hosts holding the verified image")
        ax.set_title(f"{f['hosts']} hosts, {f['size_mib']} MiB, caps {f['cap_mib']} MiB/s: {title}")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    hosts = [r["hosts"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [  # key, figure prefix, colour, marker, label offset
        ("torrent", "", "tab:blue", "o", (5, 6)),
        ("file", "file_", "tab:green", "s", (5, -12)),
        ("http", "http_", "tab:red", "^", (5, 4)),
    ]
    for ax, what, target, ylabel in (
        (axes[0], "time_over_floor", TARGETS["scale_time_over_floor"], "last host done / floor"),
        (axes[1], "origin_egress", TARGETS["scale_origin_egress"], "origin egress / image size"),
    ):
        for key, prefix, color, marker, offset in series:
            values = [r.get(prefix + what) for r in rows]
            if any(v is None for v in values):
                continue
            ax.plot(hosts, values, color=color, marker=marker, label=LABELS[key])
            for x, v in zip(hosts, values, strict=True):
                ax.annotate(
                    f"{v:.2f}", (x, v), textcoords="offset points", xytext=offset, fontsize=7
                )
        ax.axhline(target, color="grey", ls=":", label=f"target <= {target}")
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        top = max(max(r.get(p + what) or 0 for r in rows) for _, p, *_ in series)
        ax.set_yticks([v for v in (1, 1.5, 2, 3, 4, 6, 8, 16, 32, 64) if v <= top * 1.3])
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(hosts)
        ax.set_xticklabels([str(h) for h in hosts])
        ax.set_xlabel("compute hosts")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    r0 = rows[0]
    axes[0].set_title(f"scale curve: {r0['size_mib']} MiB, caps {r0['cap_mib']} MiB/s: time")
    axes[1].set_title("scale curve: origin egress")
    for ax in axes:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the report ---------------------------------------------------------------------------
def _phases_text(t: dict) -> str:
    ph = t.get("phases_median") or {}
    slow = t.get("slowest_host") or {}

    def at(d: dict, key: str) -> str:
        return f"{d[key]:.1f}" if key in d else "-"

    return (
        f"median host: first progress {at(ph, 'first_progress')} s, stripes dry "
        f"{at(ph, 'stripes_dry')} s, all pieces {at(ph, 'transfer_end')} s, verified "
        f"{at(ph, 'done')} s; slowest host: all pieces {at(slow, 'transfer_end')} s, done "
        f"{at(slow, 'done')} s, {slow.get('reissues', 0)} re-issue requests; the machine's "
        f"CPUs {t.get('machine_busy', 0):.0%} busy from the go to the last host done"
    )


def _spread(d: dict | None, fmt: str = "{:.2f}") -> str:
    """``median (min-max)`` of repeated figures, or the one figure."""
    if not d:
        return "-"
    if d.get("n", 1) == 1 or d["min"] == d["max"]:
        return fmt.format(d["median"])
    return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}-{fmt.format(d['max'])})"


def _repeats(t: dict, key: str, unit: str = "x", *, bold: bool = True) -> str:
    """A fleet figure: the reported run's, and its range over the repeats when there are."""
    main = f"{t[key]:.2f}{unit}"
    main = f"**{main}**" if bold else main
    rep = (t.get("repeats") or {}).get(key)
    if rep and rep["min"] != rep["max"]:
        return f"{main} ({rep['min']:.2f}-{rep['max']:.2f}{unit} over {rep['n']} runs)"
    if rep:
        return f"{main} ({rep['n']} runs)"
    return main


def _busy_note(t: dict) -> str:
    """The CPU floor of a run the machine was too busy for (BUSY)."""
    if t.get("machine_busy", 0.0) <= BUSY:
        return ""
    return (
        f"; machine {t['machine_busy']:.0%} busy, CPU floor {t['cpu_floor']:.1f} s "
        f"({t['cpu_seconds']:.0f} CPU-s / {os.cpu_count()} cores)"
    )


def origin_loss_rows(o: dict | None) -> list[str]:
    """The fleet whose only origin node dies half way, beside the same fleet intact."""
    if not o:
        return []
    if "error" in o:
        return [f"| fleet, its only origin killed half way | failed: {o['error']} | | |"]
    intact, killed = o["intact"], o["killed"]
    at = killed.get("origin_killed_after_s")
    return [
        f"| fleet, {o['hosts']} hosts x {o['size_mib']} MiB, caps {o['cap_mib']} MiB/s, its "
        f"only origin node killed once it sent half the image{f' ({at:.1f} s in)' if at else ''}"
        f": last host / floor, Glance bytes / image | killed **{killed['time_over_floor']:.2f}x"
        f"**, Glance **{killed['glance_over_image']:.2f}** image; intact "
        f"{intact['time_over_floor']:.2f}x, Glance {intact['glance_over_image']:.2f} | Glance "
        f"<= 1.5 image | {verdict(killed['glance_over_image'] <= 1.5)} |"
    ]


def aria2_target_rows(f: dict, sha512_gib_s: float | None) -> list[str]:
    """The fleet beside aria2c in the same run: CPU per GiB (defaults <= aria2's, trusted
    root <= 0.8x) and time (<= aria2's at 1.00x egress), with where our floor is."""
    a, t, tr = f.get("aria2") or {}, f.get("torrent") or {}, f.get("trusted") or {}
    if "host_cpu_s_per_gib" not in a or "host_cpu_s_per_gib" not in t:
        return []
    theirs = a["host_cpu_s_per_gib"]
    # Hosts verify the whole image against Glance's SHA-512, which aria2c does not: at
    # this machine's single-thread SHA-512 rate that alone is 1 / rate CPU-s per GiB.
    sha = f"; SHA-512 alone costs {1 / sha512_gib_s:.2f} here" if sha512_gib_s else ""
    out = [
        f"| same fleet: hosts' CPU per GiB / aria2c's, defaults | {t['host_cpu_s_per_gib']:.2f}"
        f" / {theirs:.2f} = **{t['host_cpu_s_per_gib'] / theirs:.2f}x**{sha} | <= 1.0 | "
        f"{verdict(t['host_cpu_s_per_gib'] <= theirs, t['host_cpu_s_per_gib'] / theirs, 1.0)} |"
    ]
    if "host_cpu_s_per_gib" in tr:
        ratio = tr["host_cpu_s_per_gib"] / theirs
        out.append(
            f"| same fleet: hosts' CPU per GiB / aria2c's, trust_torrent_root | "
            f"{tr['host_cpu_s_per_gib']:.2f} / {theirs:.2f} = **{ratio:.2f}x** | <= 0.8 | "
            f"{verdict(ratio <= 0.8, ratio, 0.8)} |"
        )
    ratio = t["seconds"] / a["seconds"]
    out.append(
        f"| same fleet: last host / aria2c's last host, at egress {t['origin_egress']:.2f}x "
        f"(aria2c {a['origin_egress']:.2f}x) | {t['seconds']:.1f} s / {a['seconds']:.1f} s = "
        f"**{ratio:.2f}** | <= 1.0 at 1.00x egress | "
        f"{verdict(ratio <= 1.0 and t['origin_egress'] <= 1.05, ratio, 1.0)} |"
    )
    return out


def kernel_links_table(r: dict) -> list[str]:
    """The scale rows again with kernel-shaped links (bench/netns.py), beside the product's
    own limiter on loopback (the scale rows of the same or the last full run)."""
    k = r.get("scale_kernel_links")
    if not k:
        return []
    if isinstance(k, dict):
        return ["", f"Kernel-shaped links: not measured ({k.get('error') or k.get('skipped')})."]
    own = {row["hosts"]: row for row in r.get("scale") or []}
    lines = [
        "",
        "### The scale rows with kernel-shaped links (`--kernel-links`)",
        "",
        "Each host in a network namespace of its own, joined to a bridge by a veth pair "
        "that `tc` token buckets shape at the cap both ways, the hosts' own limiter off; "
        "beside the same rows with the product's limiter on loopback. The origin's uplink "
        "is its own limiter in both.",
        "",
        "| hosts | kernel links: last host / floor, CPU-s/GiB, machine busy | product "
        "limiter: last host / floor, CPU-s/GiB | HTTP, kernel links: last host / floor |",
        "|---|---|---|---|",
    ]
    for row in k:
        if "error" in row:
            lines.append(f"| {row['hosts']} | failed: {row['error']} | | |")
            continue
        mine = own.get(row["hosts"], {})
        product = (
            f"{mine['time_over_floor']:.2f}x, {mine['host_cpu_s_per_gib']:.2f}"
            if "time_over_floor" in mine
            else "-"
        )
        lines.append(
            f"| {row['hosts']} | {row['time_over_floor']:.2f}x, "
            f"{row['host_cpu_s_per_gib']:.2f}, {row['machine_busy']:.0%} | {product} | "
            f"{row.get('http_time_over_floor', float('nan')):.2f}x |"
        )
    return lines


def zones_rows(z: dict | None) -> list[str]:
    """3 zones x 4 hosts, each zone with its own origin, beside the same hosts as one zone."""
    if not z:
        return []
    if "error" in z or "skipped" in z:
        return [f"| zones | not measured: {z.get('error') or z.get('skipped')} | | |"]
    zoned, one = z["zoned"], z["one_zone"]
    glance = zoned["glance_publish_over_image"] + zoned["glance_over_image"]
    met = zoned["cross_zone_over_image"] <= 1.1 * (z["zones"] - 1) and glance <= 1.1 * z["zones"]
    return [
        f"| {z['zones']} zones x {z['hosts_per_zone']} hosts x {z['size_mib']} MiB, caps "
        f"{z['cap_mib']} MiB/s, an origin node and a tracker per zone: last host / floor, "
        "cross-zone bytes / image, Glance bytes / image | zones "
        f"**{zoned['time_over_floor']:.2f}x**, cross-zone **{zoned['cross_zone_over_image']:.2f}"
        f"**, Glance {zoned['glance_publish_over_image']:.2f} (the origins' publishes) + "
        f"{zoned['glance_over_image']:.2f} (hosts), origins' egress "
        f"{zoned['origin_egress']:.2f}x; the same {z['zones'] * z['hosts_per_zone']} hosts as "
        f"one zone {one['time_over_floor']:.2f}x, egress {one['origin_egress']:.2f}x | "
        f"cross-zone <= {1.1 * (z['zones'] - 1):.1f}, Glance <= {1.1 * z['zones']:.1f} | "
        f"{verdict(met)} |"
    ]


def hub_lateness_rows(h: dict | None) -> list[str]:
    """How late a 10 ms ticker of the download's own process wakes: idle, then busy."""
    if not h:
        return []
    if "error" in h:
        return [f"| nova-compute's hub during a download | failed: {h['error']} | | |"]

    def ms(s: dict) -> str:
        return f"{s['p50']:.1f} / {s['p99']:.1f} / {s['max']:.0f}"

    rows = []
    for mode in ("eventlet", "native"):
        for key, what in (("lone", "a lone host"), ("fleet", f"{h['fleet_hosts']}-host fleet")):
            c = h.get(mode, {}).get(key)
            if not c:
                continue
            d = c["download"]
            ok = d["p99"] < 20 and d["max"] < 200
            rows.append(
                f"| {h['size_mib']} MiB download, {what}, under {mode}: the process's 10 ms "
                f"ticker late by p50 / p99 / max ms | during the download **{ms(d)}** "
                f"({c['seconds']:.1f} s); idle {ms(c['idle'])} | p99 < 20, max < 200 | "
                f"{verdict(ok)} |"
            )
    return rows


def cpu_table(r: dict) -> list[str]:
    """CPU per GiB delivered on the compute side, every case of the run."""
    f, rows, s = r["fleet"], r["scale"], r["single"]
    per = s.get("cpu_s_per_gib", {})
    lines = [
        "### CPU per GiB delivered (compute hosts, user + system)",
        "",
        "CPU-seconds per GiB that reached the compute hosts: their processes' user + "
        "system time (every thread, libtorrent's included) from the go to the last host "
        "done, over hosts x image size. Single host: median (min-max) over the rounds; "
        "fleets: the reported run, min-max over repeats where there are.",
        "",
        f"| case | {LABELS['torrent'].split(' (')[0]} | trust_torrent_root | fetch_to_file "
        f"| plain HTTP | {LABELS['aria2']} |",
        "|---|---|---|---|---|---|",
        f"| single host, {s['size_mib']} MiB, no caps | {_spread(per.get('default'))} | "
        f"{_spread(per.get('trusted'))} | (same as torrent) | {_spread(per.get('http'))} | "
        f"{_spread(per.get('aria2'))} |",
    ]

    def fleet_cell(key: str) -> str:
        t = f.get(key)
        if not t or "host_cpu_s_per_gib" not in t:
            return "-"
        return _repeats(t, "host_cpu_s_per_gib", "", bold=False)

    lines.append(
        f"| fleet, {f['hosts']} hosts x {f['size_mib']} MiB, caps {f['cap_mib']} MiB/s | "
        f"{fleet_cell('torrent')} | {fleet_cell('trusted')} | {fleet_cell('file')} | "
        f"{fleet_cell('http')} | {fleet_cell('aria2')} |"
    )

    def figure(row: dict, key: str) -> str:
        return f"{row[key]:.2f}" if isinstance(row.get(key), (int, float)) else "-"

    for row in rows:
        lines.append(
            f"| scale, {row['hosts']} hosts x {row['size_mib']} MiB, caps {row['cap_mib']} "
            f"MiB/s | {figure(row, 'host_cpu_s_per_gib')} | - | "
            f"{figure(row, 'file_host_cpu_s_per_gib')} | "
            f"{figure(row, 'http_host_cpu_s_per_gib')} | - |"
        )
    keys = ("torrent", "trusted", "file", "http", "aria2")
    split = [
        (key, f[key]["thread_cpu_s_per_gib"])
        for key in keys
        if f.get(key, {}).get("thread_cpu_s_per_gib")
    ]
    if split:
        names = list(dict.fromkeys(name for _, by in split for name in by))
        lines += [
            "",
            f"Where the {f['hosts']}-host fleet's CPU went, CPU-s per GiB by thread, from "
            "/proc/<pid>/task for every host process (native: libtorrent's own threads, with "
            "the kernel's work for them; read-behind: the whole-image hash while the download "
            "runs; MainThread: the pipeline, and the rest of that hash after the download; "
            "aria2c: main is its one event loop, the others its resolver and helper threads):",
            "",
            "| thread | " + " | ".join(LABELS[key].split(" (")[0] for key, _ in split) + " |",
            "|---|" + "---|" * len(split),
        ]
        for name in names:
            lines.append(
                f"| {name} | "
                + " | ".join(f"{by[name]:.2f}" if name in by else "-" for _, by in split)
                + " |"
            )
        lines.append(
            "| all (host_cpu_s_per_gib) | "
            + " | ".join(f"{f[key]['host_cpu_s_per_gib']:.2f}" for key, _ in split)
            + " |"
        )
    io = [(key, f[key]["io"]) for key in keys if f.get(key, {}).get("io")]
    if io:
        lines += [
            "",
            "File I/O of the same fleet per image byte delivered (/proc/<pid>/io: read and "
            "write calls on files, page-cache hits included; sockets are not in them): the "
            "bytes read are the hash read-back, the uploads and the whole-image check. "
            "aria2c sends with writev(2), which these counters see (libtorrent's sendmsg is "
            "not in them), so its bytes written include its uploads, about (hosts - 1) / "
            "hosts. Context switches: every thread's, voluntary and involuntary (/proc/<pid>/"
            "task/*/status; aria2c's from its start). Rows measured before these counters "
            "existed show none.",
            "",
            "| per image byte | " + " | ".join(LABELS[key].split(" (")[0] for key, _ in io) + " |",
            "|---|" + "---|" * len(io),
        ]
        for field, label in (
            ("file_read_per_image_byte", "bytes read"),
            ("file_written_per_image_byte", "bytes written"),
            ("read_calls_per_mib", "read calls per MiB"),
            ("write_calls_per_mib", "write calls per MiB"),
            ("context_switches_per_mib", "context switches per MiB"),
        ):
            lines.append(
                f"| {label} | " + " | ".join(f"{by.get(field, '-')}" for _, by in io) + " |"
            )
    ratio = s.get("cpu_over_http", {})
    if ratio:
        lines += [
            "",
            "Single host against plain HTTP, CPU per GiB (median of each round's ratio): "
            + ", ".join(
                f"{name} {ratio[name]:.2f}x"
                for name in ("default", "trusted", "aria2")
                if name in ratio
            )
            + ".",
        ]
    return lines


def build_report(r: dict) -> str:
    f, rows, d, s = r["fleet"], r["scale"], r["demo"], r["single"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {r['machine']}. Every ratio compares figures measured in the same run. "
        f"Whole run: {r['runtime_seconds']:.0f} s. Regenerate with `make bench`; the figures "
        "are in [results.json](results.json).",
        "",
        "The fleets are one process per compute host (`bench/fleet_host.py`, its own "
        "127.0.0.x, libtorrent session and downlink cap), all started on one `go`, each "
        "fetching through `nova_torrent_images.compute.pipeline`; the origin process runs the "
        "capped Glance-like `HTTPOrigin` and the origin node (publisher, seeder, stripe "
        "server). floor = image size / cap. Origin egress = what the origin node sent "
        "(BitTorrent and stripes) + what Glance served, over the image size. Two torrent "
        f"variants: *{LABELS['torrent']}* (the headline figures: the pipeline into a store, "
        "as the XenAPI handlers and the libvirt hook run it) and "
        f"*{LABELS['file']}*, as `nova-torrent-images fetch --output` runs it; the "
        f"{f['hosts']}-host fleet also runs *{LABELS['trusted']}*. The peer client is "
        "Debian's aria2c, one process per host on its own 127.0.0.x with the same downlink "
        "cap, fetching the same bytes as a v1 torrent from an origin node of the same kind "
        "and the same capped origin (`bench/peer_client.py`). Links are shaped by the "
        "hosts' own limits (libtorrent's, aria2's, a token bucket for plain HTTP), not by "
        "the kernel. Where the machine is more than "
        f"{BUSY:.0%} busy a row also gives the CPU floor (total CPU work / cores).",
        "",
        "| benchmark | measured | target | |",
        "|---|---|---|---|",
    ]
    t, h = f["torrent"], f["http"]
    target_t = TARGETS["fleet_time_over_floor"]
    fleet_name = f"fleet, {f['hosts']} hosts, {f['size_mib']} MiB, caps {f['cap_mib']} MiB/s"
    lines.append(
        f"| {fleet_name}: last host done / floor ({f['floor']:.0f} s), {LABELS['torrent']} | "
        f"torrent {t['seconds']:.1f} s = {_repeats(t, 'time_over_floor')} (p50 "
        f"{t['p50']:.1f} s{_busy_note(t)}); HTTP {h['seconds']:.1f} s = "
        f"{h['time_over_floor']:.2f}x | <= 1.25x | "
        f"{verdict(t['time_over_floor'] <= target_t, t['time_over_floor'], target_t)}"
        f"{machine_bound(t, f['floor'])} |"
    )
    lines.append(
        f"| {fleet_name}: origin egress / image, {LABELS['torrent']} | torrent "
        f"{_repeats(t, 'origin_egress')}; HTTP {h['origin_egress']:.2f}x | <= 1.05x | "
        f"{verdict(t['origin_egress'] <= TARGETS['fleet_origin_egress'])} |"
    )
    for key in ("file", "trusted"):
        v = f.get(key)
        if not v:
            continue
        target_t, target_e = TARGETS["fleet_time_over_floor"], TARGETS["fleet_origin_egress"]
        ok_t = v["time_over_floor"] <= target_t
        ok_e = v["origin_egress"] <= target_e
        lines.append(
            f"| same fleet, {LABELS[key]}: time / floor, egress / image | "
            f"{v['seconds']:.1f} s = {_repeats(v, 'time_over_floor')} (p50 "
            f"{v['p50']:.1f} s{_busy_note(v)}), **{v['origin_egress']:.2f}x** | "
            f"<= 1.25x, <= 1.05x | time {verdict(ok_t, v['time_over_floor'], target_t)}"
            f"{machine_bound(v, f['floor'])}; egress "
            f"{verdict(ok_e, v['origin_egress'], target_e)} |"
        )
    a = f.get("aria2") or {}
    if "seconds" in a:
        lines.append(
            f"| same fleet, {LABELS['aria2']}: time / floor, egress / image | "
            f"{a['seconds']:.1f} s = {_repeats(a, 'time_over_floor')} (p50 "
            f"{a['p50']:.1f} s), {_repeats(a, 'origin_egress')} | measured beside | |"
        )
    elif a:
        lines.append(f"| same fleet, {LABELS['aria2']} | not run: {a.get('skipped')} | | |")
    lines += aria2_target_rows(f, r.get("sha512_gib_s"))
    for row in rows:
        ok_t = row["time_over_floor"] <= TARGETS["scale_time_over_floor"]
        ok_e = row["origin_egress"] <= TARGETS["scale_origin_egress"]
        seed = (
            f"; fetch_to_file {row['file_time_over_floor']:.2f}x, {row['file_origin_egress']:.2f}x"
            if "file_time_over_floor" in row
            else ""
        )
        load = {
            "seconds": row["seconds"],
            "machine_busy": row.get("machine_busy", 0.0),
            "cpu_floor": row.get("cpu_floor", 0.0),
            "cpu_seconds": row.get("cpu_floor", 0.0) * (os.cpu_count() or 1),
        }
        busy = _busy_note(load)
        lines.append(
            f"| scale, {row['hosts']} hosts, {row['size_mib']} MiB, caps {row['cap_mib']} MiB/s "
            f"(floor {row['floor']:.0f} s): time / floor, egress / image | torrent "
            f"**{row['time_over_floor']:.2f}x**, **{row['origin_egress']:.2f}x** "
            f"({row['seconds']:.1f} s{busy}){seed}; HTTP {row['http_time_over_floor']:.2f}x, "
            f"{row['http_origin_egress']:.2f}x | <= 1.5x, <= 1.1x | time "
            f"{verdict(ok_t, row['time_over_floor'], TARGETS['scale_time_over_floor'])}"
            f"{machine_bound(load, row['floor'])}; egress "
            f"{verdict(ok_e, row['origin_egress'], TARGETS['scale_origin_egress'])} |"
        )
    if "torrent_over_http" in d:
        lines.append(
            f"| demo, {d['hosts']} hosts, {d['size_mib']} MiB, uplink {d['cap_mib']} MiB/s: "
            f"torrent's last host / plain HTTP's | torrent {d['torrent_last_seconds']:.1f} s, "
            f"HTTP {d['http_last_seconds']:.1f} s: **{d['torrent_over_http']:.2f}** "
            f"(origin egress {d['origin_egress']:.2f}x) | <= 0.5 | "
            f"{verdict(d['torrent_over_http'] <= TARGETS['demo_torrent_over_http'])} |"
        )
    else:
        lines.append("| demo | failed, see its table below | <= 0.5 | **missed** |")
    lines += origin_loss_rows(r.get("origin_loss"))
    lines += hub_lateness_rows(r.get("hub_lateness"))
    lines += zones_rows(r.get("zones"))
    mib, sec = s["mib_s"], s.get("seconds_spread", {})
    lines.append(
        f"| single host, no caps, {s['size_mib']} MiB, default settings: speed / plain HTTP's "
        f"| torrent {mib['default']:.0f} MiB/s, HTTP {mib['http']:.0f} MiB/s (best of "
        f"{s['rounds']}): **{s['ratio_default']:.2f}** (medians {s['ratio_default_median']:.2f});"
        f" seconds torrent {_spread(sec.get('default'))}, HTTP {_spread(sec.get('http'))} | "
        f">= 0.9 | {verdict(s['ratio_default'] >= TARGETS['single_ratio_default'])} |"
    )
    lines.append(
        f"| single host, `trust_torrent_root = true` (v2 torrent): speed / plain HTTP's | "
        f"torrent {mib['trusted']:.0f} MiB/s: **{s['ratio_trusted_root']:.2f}** (medians "
        f"{s['ratio_trusted_root_median']:.2f}); seconds {_spread(sec.get('trusted'))} | "
        f">= 1.0 | "
        f"{verdict(s['ratio_trusted_root'] >= TARGETS['single_ratio_trusted_root'])} |"
    )
    ratio = s.get("cpu_over_http") or {}
    per = s.get("cpu_s_per_gib") or {}
    if ratio:
        for name, target_key, label in (
            ("default", "single_cpu_over_http_default", "default settings"),
            ("trusted", "single_cpu_over_http_trusted_root", "`trust_torrent_root = true`"),
        ):
            target = TARGETS[target_key]
            lines.append(
                f"| single host, {label}: CPU per GiB / plain HTTP's | torrent "
                f"{_spread(per.get(name))} CPU-s/GiB, HTTP {_spread(per.get('http'))}: "
                f"**{ratio[name]:.2f}x** | <= {target}x | {verdict(ratio[name] <= target)} |"
            )
    if "aria2" in mib:
        lines.append(
            f"| single host, {LABELS['aria2']} (its start-up included): speed, CPU | "
            f"{mib['aria2']:.0f} MiB/s (best), seconds {_spread(sec.get('aria2'))}; "
            f"{_spread(per.get('aria2'))} CPU-s/GiB = {ratio.get('aria2', 0):.2f}x HTTP's | "
            "measured beside | |"
        )
    for entry in r["cache_hit"]["sizes"]:
        lines.append(
            f"| cache hit (second boot, clone), {entry['size_mib']} MiB | median "
            f"{entry['hit_median_ms']:.0f} ms, max {entry['hit_max_ms']:.0f} ms | < 100 ms | "
            f"{verdict(entry['hit_max_ms'] < TARGETS['cache_hit_ms'])} |"
        )
    for entry in r["memory"]["sizes"]:
        tm, hm = entry["torrent"], entry["http"]
        lines.append(
            f"| peak RSS growth, fetching {entry['size_mib']} MiB | torrent "
            f"{tm['growth_mib']:.0f} MiB, HTTP {hm['growth_mib']:.0f} MiB (baseline "
            f"{tm['baseline_mib']:.0f} MiB) | < 150 MiB | "
            f"{verdict(tm['growth_mib'] < TARGETS['rss_growth_mib'])} |"
        )
    if r.get("snapshots") is not None and snapshots is not None:
        lines.append(snapshots.row(r["snapshots"]))
    elif "snapshots_error" in r:
        lines.append(
            f"| snapshot benchmark | failed: {r['snapshots_error']} | < 10% | **missed** |"
        )
    n = r.get("neighbour")
    if n and "summary" in n:
        sm = n["summary"]
        ok = sm["default"]["cpu_vs_alone"] >= 0.8 and sm["default"]["write_vs_alone"] >= 0.8
        lines.append(
            f"| neighbour: a guest (fsync'ed writes, a CPU loop per core) next to "
            f"{n['size_mib']} MiB downloads, {n['rounds']} rounds of {n['window_s']:.0f} s: "
            f"guest CPU, disk writes / alone | defaults **{sm['default']['cpu_vs_alone']:.0%}**,"
            f" **{sm['default']['write_vs_alone']:.0%}** (image "
            f"{sm['default']['download_mib_s']} MiB/s); QoS off "
            f"{sm['qos-off']['cpu_vs_alone']:.0%}, {sm['qos-off']['write_vs_alone']:.0%} "
            f"(image {sm['qos-off']['download_mib_s']} MiB/s) | >= 80% with the defaults | "
            f"{verdict(ok)} |"
        )
    elif n:
        lines.append(f"| neighbour | failed: {n.get('error')} | >= 80% | **missed** |")
    lines += ["", *cpu_table(r)]
    lines += kernel_links_table(r)
    lines += [
        "",
        f"![hosts completed over time, {f['hosts']}-host fleet]({FLEET_PNG})",
        "",
        f"[Hosts completed over time]({FLEET_PNG}) in the {f['hosts']}-host run, and "
        f"[the scale curve]({SCALE_PNG}):",
        "",
        f"![scale curve]({SCALE_PNG})",
        "",
        "## Where the time went (this run)",
        "",
        f"- {f['hosts']}-host fleet, {LABELS['torrent']}: {_phases_text(t)}.",
    ]
    for key in ("file", "trusted"):
        if key in f:
            lines.append(f"- {f['hosts']}-host fleet, {LABELS[key]}: {_phases_text(f[key])}.")
    for row in rows:
        tt = {
            "phases_median": row.get("phases_median"),
            "slowest_host": row.get("slowest_host"),
            "machine_busy": row.get("machine_busy", 0.0),
        }
        lines.append(f"- scale, {row['hosts']} hosts, {LABELS['torrent']}: {_phases_text(tt)}.")
    lines += [
        "",
        "Fleet tracker: "
        + ("Debian opentracker" if f.get("tracker") else "none (peer hints and the stripes' peers)")
        + ".",
        "",
        "### The demo's table (same run)",
        "",
        "```",
        d.get("table", "(no table)"),
        "```",
    ]
    notes = os.path.join(HERE, "NOTES.md")
    if os.path.exists(notes):
        with open(notes) as fh:
            lines += ["", fh.read().strip()]
    return "\n".join(lines) + "\n"


def headline(r: dict) -> dict:
    f, s = r["fleet"], r["single"]
    out = {
        "fleet_time_over_floor": f["torrent"]["time_over_floor"],
        "fleet_origin_egress": f["torrent"]["origin_egress"],
        "scale": r["scale"],
        "single_ratio_default": s["ratio_default"],
        "single_ratio_trusted_root": s["ratio_trusted_root"],
    }
    if "file" in f:
        out["fleet_fetch_to_file_time_over_floor"] = f["file"]["time_over_floor"]
        out["fleet_fetch_to_file_origin_egress"] = f["file"]["origin_egress"]
    if "trusted" in f:
        out["fleet_trusted_root_time_over_floor"] = f["trusted"]["time_over_floor"]
        out["fleet_trusted_root_origin_egress"] = f["trusted"]["origin_egress"]
    out["fleet_http_time_over_floor"] = f["http"]["time_over_floor"]
    out["fleet_http_origin_egress"] = f["http"]["origin_egress"]
    if "torrent_over_http" in r["demo"]:
        out["demo_torrent_over_http"] = r["demo"]["torrent_over_http"]
    per = s.get("cpu_s_per_gib") or {}
    out["cpu_s_per_gib"] = {
        "torrent": per.get("default", {}).get("median"),
        "torrent_trusted_root": per.get("trusted", {}).get("median"),
        "http": per.get("http", {}).get("median"),
        "aria2": per.get("aria2", {}).get("median"),
    }
    out["single_cpu_over_http"] = s.get("cpu_over_http")
    hub = r.get("hub_lateness") or {}
    if "eventlet" in hub:
        out["hub_lateness_ms"] = {
            mode: {key: {"idle": c["idle"], "download": c["download"]} for key, c in cases.items()}
            for mode, cases in hub.items()
            if mode in ("eventlet", "native")
        }
    zoned = (r.get("zones") or {}).get("zoned")
    if zoned:
        out["zones"] = {
            key: zoned[key]
            for key in (
                "time_over_floor",
                "cross_zone_over_image",
                "glance_publish_over_image",
                "glance_over_image",
                "origin_egress",
            )
        }
        out["zones"]["one_zone_time_over_floor"] = r["zones"]["one_zone"]["time_over_floor"]
    loss = r.get("origin_loss") or {}
    if "killed" in loss:
        out["origin_loss"] = {
            key: {
                "time_over_floor": loss[key]["time_over_floor"],
                "glance_over_image": loss[key]["glance_over_image"],
            }
            for key in ("intact", "killed")
        }
    out["fleet_cpu_s_per_gib"] = {
        key: f[key].get("host_cpu_s_per_gib")
        for key in ("torrent", "trusted", "file", "http", "aria2")
        if isinstance(f.get(key), dict) and "host_cpu_s_per_gib" in f[key]
    }
    a = f.get("aria2") or {}
    if "seconds" in a:
        out["fleet_peer_aria2"] = {
            "time_over_floor": a["time_over_floor"],
            "origin_egress": a["origin_egress"],
            "repeats": a.get("repeats"),
        }
    n = r.get("neighbour") or {}
    if "summary" in n:
        out["neighbour_guest_cpu"] = {
            "default": n["summary"]["default"]["cpu_vs_alone"],
            "qos_off": n["summary"]["qos-off"]["cpu_vs_alone"],
        }
        out["neighbour_guest_disk"] = {
            "default": n["summary"]["default"]["write_vs_alone"],
            "qos_off": n["summary"]["qos-off"]["write_vs_alone"],
        }
    out["cache_hit_max_ms"] = max(e["hit_max_ms"] for e in r["cache_hit"]["sizes"])
    out["rss_growth_mib"] = {
        str(e["size_mib"]): round(e["torrent"]["growth_mib"], 1) for e in r["memory"]["sizes"]
    }
    out["targets"] = TARGETS
    return out


def _snapshots(r: dict, size_mib: int) -> None:
    """The snapshot benchmark, when present; its failure is reported, not fatal."""
    if snapshots is None:
        return
    try:
        r["snapshots"] = snapshots.run(size_mib)
    except Exception as exc:  # noqa: BLE001  shown in RESULTS.md instead
        r["snapshots_error"] = f"{type(exc).__name__}: {exc}"


def _origin_loss() -> dict:
    """The 16-host fleet with its only origin killed half way; failure is reported."""
    try:
        return fleet.origin_loss(16, 256, 32)
    except Exception as exc:  # noqa: BLE001  shown in RESULTS.md instead
        return {"error": f"{type(exc).__name__}: {exc}"}


def _hub_lateness() -> dict:
    """nova-compute's hub while it downloads (bench/hub_lateness.py); failure is reported."""
    try:
        return hub_lateness.run(512, 4)
    except Exception as exc:  # noqa: BLE001  shown in RESULTS.md instead
        return {"error": f"{type(exc).__name__}: {exc}"}


def _scale_kernel_links(counts: tuple[int, ...], size_mib: int, cap_mib: int):
    """The scale rows with kernel-shaped links (bench/netns.py); why not, when they cannot."""
    import netns

    why = netns.available()
    if why is not None:
        return {"skipped": why}
    rows: list[dict] = []
    with netns.KernelLinks(cap_mib * 1024 * 1024) as links:
        for n in counts:  # one row at a time: a failed row keeps the others
            try:
                rows += fleet.scale_curve((n,), size_mib, cap_mib, links=links)
            except Exception as exc:  # noqa: BLE001  shown in RESULTS.md instead
                print(f"bench: kernel links, {n} hosts: {exc!r}", flush=True)
                rows.append({"hosts": n, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def sha512_rate() -> float:
    """This machine's single-thread SHA-512 rate, GiB/s (hashlib, 256 MiB, best of 3)."""
    import hashlib

    data = os.urandom(64 * 1024 * 1024)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        h = hashlib.sha512()
        for _ in range(4):
            h.update(data)
        best = min(best, time.perf_counter() - start)
    return round(0.25 / best, 3)


def _zones() -> dict:
    """3 zones x 4 hosts beside 12 hosts as one zone (bench/zones.py); failure is reported."""
    try:
        return zones.zones_row(3, 4, 64, 16)
    except Exception as exc:  # noqa: BLE001  shown in RESULTS.md instead
        return {"error": f"{type(exc).__name__}: {exc}"}


def _headline_fleet() -> dict:
    """The 16-host fleet, its headline rows three times each (min, median and max show
    the noise), with aria2c's fleet beside it."""
    return fleet.run(
        16,
        256,
        32,
        variants=FLEET_VARIANTS,
        repeats={"torrent": 3, "trusted": 3},
        peer_client=3,
    )


def _neighbour(r: dict, size_mib: int, *, seconds: float, rounds: int) -> None:
    """A short neighbour run (bench/neighbour.py has the long one); failure is reported."""
    try:
        r["neighbour"] = neighbour.run(size_mib, seconds=seconds, rounds=rounds)
    except Exception as exc:  # noqa: BLE001  shown in RESULTS.md instead
        r["neighbour"] = {"error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, to check the scripts (numbers not comparable); writes into a "
        "temporary directory, not bench/",
    )
    parser.add_argument(
        "--only",
        choices=[
            "fleet",
            "origin-loss",
            "hub-lateness",
            "zones",
            "aria2",
            "kernel-links",
            "neighbour",
        ],
        help="measure this row alone and merge it into bench/results.json, then rewrite "
        "RESULTS.md (the other rows keep their figures from the last full run)",
    )
    parser.add_argument(
        "--kernel-links",
        action="store_true",
        help="also run the scale rows with each host in a network namespace whose veth "
        "pair tc shapes at the cap (bench/netns.py; needs root and iproute2), beside the "
        "product's own limiter",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md and the plots from bench/results.json (after editing "
        "NOTES.md), without measuring again",
    )
    args = parser.parse_args()
    if args.report_only:
        with open(os.path.join(HERE, "results.json")) as fh:
            r = json.load(fh)["details"]
        write(r, HERE)
        return 0
    if args.only:
        with open(os.path.join(HERE, "results.json")) as fh:
            r = json.load(fh)["details"]
        if args.only == "origin-loss":
            r["origin_loss"] = _origin_loss()
            r["hub_lateness"] = _hub_lateness()
        elif args.only == "zones":
            r["zones"] = _zones()
        elif args.only == "fleet":
            r["fleet"] = _headline_fleet()
        elif args.only == "neighbour":
            _neighbour(r, 128, seconds=6, rounds=2)
        elif args.only == "kernel-links":
            r["scale_kernel_links"] = _scale_kernel_links((4, 8, 16), 64, 16)
        elif args.only == "aria2":
            # The fleet row's aria2c fleets again (their CPU by thread, their file I/O),
            # from an origin and tracker of their own; the product's fleet figures stay.
            f = r["fleet"]
            again = fleet.run(
                f["hosts"], f["size_mib"], f["cap_mib"], http=False, variants=(), peer_client=3
            )
            f["aria2"] = again["aria2"]
        else:
            r["hub_lateness"] = _hub_lateness()
        write(r, HERE)
        return 0
    started = time.monotonic()
    r: dict = {"machine": machine_description(), "sha512_gib_s": sha512_rate()}
    tracker = fleet._start_tracker(tempfile.mkdtemp(prefix="nti-bench-tracker-"))
    try:
        if args.quick:
            out_dir = tempfile.mkdtemp(prefix="nti-bench-quick-")
            r["fleet"] = fleet.run(
                4, 32, 16, variants=FLEET_VARIANTS, repeats={"torrent": 2}, peer_client=1
            )
            r["scale"] = fleet.scale_curve((2, 4), 16, 16)
            if args.kernel_links:
                r["scale_kernel_links"] = _scale_kernel_links((2, 4), 16, 16)
            r["demo"] = run_demo(2, 8)
            r["single"] = single.run(64, rounds=1, tracker=tracker)
            r["cache_hit"] = cache_hit.run((16, 64))
            r["memory"] = memory.run((64,))
            _snapshots(r, 64)
            _neighbour(r, 32, seconds=3, rounds=1)
        else:
            out_dir = HERE
            r["fleet"] = _headline_fleet()
            print(json.dumps({k: v for k, v in r["fleet"].items() if k != "torrent"}, indent=1))
            r["scale"] = fleet.scale_curve((4, 8, 16, 32), 64, 16)
            if args.kernel_links:
                r["scale_kernel_links"] = _scale_kernel_links((4, 8, 16), 64, 16)
            r["demo"] = run_demo(4, 64)
            r["single"] = single.run(512, rounds=3, tracker=tracker)
            print(json.dumps(r["single"], indent=1))
            r["cache_hit"] = cache_hit.run((64, 1024))
            r["memory"] = memory.run((256, 2048))
            _snapshots(r, 256)
            _neighbour(r, 128, seconds=6, rounds=2)
            r["origin_loss"] = _origin_loss()
            r["hub_lateness"] = _hub_lateness()
            r["zones"] = _zones()
    finally:
        if tracker is not None:
            tracker.stop()
    r["runtime_seconds"] = time.monotonic() - started
    write(r, out_dir)
    return 0


def write(r: dict, out_dir: str) -> None:
    """results.json, the plots and RESULTS.md into ``out_dir`` (the figures first: a
    report that fails must not lose a run)."""
    results = {**headline(r), "details": r}
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
        fh.write("\n")
    plot_fleet(r["fleet"], os.path.join(out_dir, FLEET_PNG))
    plot_scale(r["scale"], os.path.join(out_dir, SCALE_PNG))
    text = build_report(r)
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(f"written to {out_dir}")


if __name__ == "__main__":
    sys.exit(main())
