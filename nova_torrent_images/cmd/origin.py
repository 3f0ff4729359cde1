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

"""Origin verbs, run on Glance API nodes: ``publish``, ``unpublish``, ``published``, ``seed``,
and ``origin-status`` (anywhere inside ``allowed_peer_cidrs`` of the origin nodes).

They share the registry of ``[torrent_images] origin_state_dir``: ``publish`` and
``unpublish`` change it (and Glance, and the tracker whitelist), ``seed`` follows it.
Errors reach :func:`nova_torrent_images.cmd.main.main`, which prints one line and exits
non-zero.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING, Any

from oslo_config import cfg
from oslo_utils import units

from nova_torrent_images import conf as nti_conf

if TYPE_CHECKING:
    from nova_torrent_images.origin.registry import PublishedImage


def _conf(args: argparse.Namespace) -> cfg.ConfigOpts:
    return nti_conf.load_config_files(args.config_file)


def _publisher(conf: cfg.ConfigOpts) -> Any:
    from nova_torrent_images.origin.publisher import Publisher

    return Publisher.from_conf(conf)


def cmd_publish(args: argparse.Namespace) -> int:
    result = _publisher(_conf(args)).publish(args.image_id)
    if args.format == "json":
        print(json.dumps(result.__dict__, indent=2, sort_keys=True))
        return 0
    what = {
        "published": f"published ({result.size // units.Mi} MiB read from Glance once)",
        "updated": "already published; Glance properties set again",
        "unchanged": "already published and unchanged; nothing to do",
    }[result.status]
    print(f"{result.image_id}: {what}")
    print(f"  torrent_magnet: {result.magnet}")
    if result.dropped_from_magnet:
        print("  left out to fit 255 characters: " + ", ".join(result.dropped_from_magnet))
    return 0


def cmd_unpublish(args: argparse.Namespace) -> int:
    result = _publisher(_conf(args)).unpublish(args.image_id)
    if result.was_published:
        glance = "; Glance properties removed" if result.glance_updated else ""
        print(f"{result.image_id}: unpublished{glance}")
    elif result.glance_updated:
        print(f"{result.image_id}: was not published here; removed its magnet from Glance")
    else:
        print(f"{result.image_id}: was not published; nothing to do")
    return 0


def describe(entry: PublishedImage) -> dict[str, Any]:
    """A JSON-friendly view of a registry entry for ``published --format json``."""
    return {
        "image_id": entry.image_id,
        "name": entry.name,
        "size": entry.size,
        "info_hash_v1": entry.info_hash_v1,
        "info_hash_v2": entry.info_hash_v2,
        "pieces": entry.num_pieces,
        "piece_length": entry.piece_length,
        "published_at": entry.published_at,
        "data": entry.data_path if entry.has_data() else None,
        "magnet": entry.magnet,
    }


def cmd_published(args: argparse.Namespace) -> int:
    from nova_torrent_images.origin.registry import Registry

    opts = _conf(args).torrent_images
    entries = Registry(opts.origin_state_dir, opts.origin_data_dir).list()
    if args.format == "json":
        print(json.dumps([describe(e) for e in entries], indent=2, sort_keys=True))
        return 0
    if not entries:
        print(f"No image is published (registry {opts.origin_state_dir}).")
        return 0
    header = (
        f"{'image id':<36}  {'MiB':>7}  {'pieces':>6}  {'v2 info-hash':<16}  "
        f"{'published':<20}  data"
    )
    print(header)
    print("-" * len(header))
    for e in entries:
        print(
            f"{e.image_id:<36}  {e.size / units.Mi:>7.0f}  {e.num_pieces:>6}  "
            f"{(e.info_hash_v2 or e.info_hash_v1 or '')[:16]:<16}  {e.published_at:<20}  "
            f"{'ok' if e.has_data() else 'MISSING'}"
        )
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from nova_torrent_images.glance.client import GlanceClient
    from nova_torrent_images.origin.seeder import OriginSeeder

    conf = _conf(args)
    seeder = OriginSeeder(conf, glance=GlanceClient.from_conf(conf))

    def request_stop(signum: int, frame: object) -> None:
        # Only set a flag here; the loop in the main thread winds down on its next tick.
        seeder.request_stop()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        seeder.start()
        host, port = seeder.endpoint
        print(
            f"Origin seeder running on {host}:{port}; SIGTERM or Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        seeder.run()
    finally:
        seeder.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


STATUS_TIMEOUT = 5.0  # seconds per node, default of origin-status --timeout
STATUS_MAX_ANSWER = 64 * 1024  # bytes of one node's status answer


def _ask_node(url: str, info_hash: str, timeout: float) -> dict[str, Any]:
    """One node's ``GET /v1/torrents/<info_hash>/status``; OSError or ValueError if not."""
    import urllib.error
    import urllib.request

    # Never through an HTTP proxy of the environment: the URL is the node's own address.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/torrents/{info_hash}/status",
        headers={"Accept": "application/json"},
    )
    try:
        with opener.open(request, timeout=timeout) as answer:
            body = answer.read(STATUS_MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        why = ""
        try:
            why = str(json.loads(exc.read(STATUS_MAX_ANSWER)).get("error", ""))
        except (OSError, ValueError, AttributeError):
            pass  # an answer without our JSON error: the status line says enough
        exc.close()
        raise ValueError(f"HTTP {exc.code}{': ' + why if why else ''}") from None
    if len(body) > STATUS_MAX_ANSWER:
        raise ValueError(f"an answer of more than {STATUS_MAX_ANSWER} bytes")
    status = json.loads(body)
    if not isinstance(status, dict):
        raise ValueError("the answer is not a JSON object")
    return status


def origin_status(
    conf: cfg.ConfigOpts,
    image_id: str,
    *,
    glance: Any = None,
    timeout: float = STATUS_TIMEOUT,
) -> dict[str, Any]:
    """Ask every origin node the image advertises how much of it it holds and serves.

    The nodes are the stripe URLs of every zone's property and of the zone-neutral
    stripes property (zone None), :func:`~nova_torrent_images.glance.zones.image_routes`.
    Nodes without a stripe server (BitTorrent only) cannot be asked and are not listed.
    Raises :class:`OriginStatusError` when the image names no torrent or no node.
    """
    from nova_torrent_images import exception
    from nova_torrent_images.glance import zones
    from nova_torrent_images.glance.client import GlanceClient
    from nova_torrent_images.glance.magnet import MagnetError, parse_magnet

    opts = conf.torrent_images
    if glance is None:
        glance = GlanceClient.from_conf(conf)
    record = dict(glance.get_image(image_id))
    uri = record.get(opts.magnet_property)
    if not uri:
        raise exception.OriginStatusError(
            image_id=image_id,
            reason=f"it has no {opts.magnet_property} property: it is not published",
        )
    try:
        magnet = parse_magnet(uri)
    except MagnetError as exc:
        raise exception.InvalidMagnet(
            image_id=image_id, prop=opts.magnet_property, reason=str(exc)
        ) from exc
    info_hash = magnet.info_hash_v2 or magnet.info_hash_v1
    routes = zones.image_routes(record, opts.stripes_property)
    nodes: list[dict[str, Any]] = []
    order = ([None] if None in routes.by_zone else []) + list(routes.zones())
    for zone in order:
        for url in routes.by_zone[zone].stripes:
            node: dict[str, Any] = {"zone": zone, "url": url, "reachable": False, "error": None}
            try:
                answer = _ask_node(url, str(info_hash), timeout)
            except (OSError, ValueError) as exc:
                node["error"] = str(getattr(exc, "reason", None) or exc)
                nodes.append(node)
                continue
            node["reachable"] = True
            node["node_zone"] = answer.get("zone")
            for key in ("complete", "size", "served", "hosts", "mode", "peers", "uploaded"):
                if key in answer:
                    node[key] = answer[key]
            if answer.get("image_id") != image_id:
                node["reachable"] = False
                node["error"] = f"it answers for image {str(answer.get('image_id'))[:64]}"
            elif zone is not None and answer.get("zone") != zone:
                node["error"] = (
                    f"advertised in zone {zone}, the node says its origin_zone is "
                    f"{answer.get('zone')}"
                )
            nodes.append(node)
    return {
        "image_id": image_id,
        "name": record.get("name"),
        "info_hash": str(info_hash),
        "nodes": nodes,
        "unusable_properties": dict(routes.unusable),
    }


def _percent(value: Any) -> str:
    return f"{100.0 * value:.1f}%" if isinstance(value, int | float) else "-"


def _mib(value: Any) -> str:
    return f"{value / units.Mi:.1f}" if isinstance(value, int | float) else "-"


def cmd_origin_status(args: argparse.Namespace) -> int:
    from nova_torrent_images import exception

    conf = _conf(args)
    report = origin_status(conf, args.image_id, timeout=args.timeout)
    nodes = report["nodes"]
    if not nodes:
        why = "no origin node of the image advertises a stripe server"
        if report["unusable_properties"]:
            why += (
                " that could be read ("
                + "; ".join(f"{k}: {v}" for k, v in sorted(report["unusable_properties"].items()))
                + ")"
            )
        raise exception.OriginStatusError(image_id=args.image_id, reason=why)
    answered = all(n["reachable"] for n in nodes)
    if args.format == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0 if answered else 1
    print(
        f"Image {report['image_id']} ({report['name'] or 'no name'}), info-hash "
        f"{report['info_hash'][:16]}: {len(nodes)} origin nodes"
    )
    header = f"{'zone':<16}  {'URL':<32}  {'complete':>8}  {'served MiB':>10}  {'hosts':>5}  state"
    print(header)
    print("-" * len(header))
    for n in nodes:
        if not n["reachable"]:
            state = f"unreachable: {n['error']}"
        else:
            state = f"ok; {n['error']}" if n["error"] else "ok"
        print(
            f"{n['zone'] or '-':<16}  {n['url']:<32}  {_percent(n.get('complete')):>8}  "
            f"{_mib(n.get('served')):>10}  {n.get('hosts', '-'):>5}  {state}"
        )
    for prop, why in sorted(report["unusable_properties"].items()):
        print(f"property {prop} not usable: {why}")
    return 0 if answered else 1


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register the origin verbs on the ``nova-torrent-images`` parser."""
    p = sub.add_parser(
        "publish",
        help="(Glance node) publish an image as a torrent: read it from Glance once, keep "
        "the torrent and data for the seeder, whitelist it, set torrent_magnet and "
        "is_torrentable=true",
    )
    p.add_argument("image_id")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "unpublish",
        help="(Glance node) stop publishing an image: remove its Glance properties, "
        "registry entry and whitelist entry",
    )
    p.add_argument("image_id")
    p.set_defaults(func=cmd_unpublish)

    p = sub.add_parser("published", help="(Glance node) list the published images")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_published)

    p = sub.add_parser(
        "seed",
        help="(Glance node) run the origin seeder: seed every published image until SIGTERM",
    )
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser(
        "origin-status",
        help="which origin nodes (by zone) serve an image and how complete they are: asks "
        "every stripe server the image advertises (GET /v1/torrents/<info-hash>/status; "
        "this host must be inside their allowed_peer_cidrs). Exit status 0 when every "
        "node answered, 1 otherwise",
        description="Reads the image from Glance and asks every origin node its "
        "properties advertise (torrent_stripes and torrent_zone_<zone>) how much of the "
        "image it holds, how many bytes of stripes it served and how many hosts fetch "
        "from it lately. Nodes without a stripe server are not listed. Exit status: 0 "
        "when every node answered, 1 when one did not (or the image names no node).",
    )
    p.add_argument("image_id")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument(
        "--timeout",
        type=float,
        default=STATUS_TIMEOUT,
        help=f"seconds to wait for each node (default {STATUS_TIMEOUT:.0f})",
    )
    p.set_defaults(func=cmd_origin_status)
