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

"""Kernel-shaped links for the scale rows: a network namespace per host, all on this machine.

The headline rows cap each host's downlink with the product's own limiter
(``download_rate_limit``) on loopback. With ``--kernel-links`` the scale rows run each host
in a network namespace of its own, joined to a bridge in this namespace by a veth pair,
both directions of the pair shaped by a ``tc`` token bucket at the cap, and the hosts'
own limiter off: what the product's limiter costs (time, CPU) shows beside links the
kernel shapes, as a real NIC would. The origin and the Glance stand-in listen on the
bridge's address; every host reaches them and each other through its veth.

Needs root (``ip netns``, ``tc``: Debian's iproute2). Everything made is removed on exit.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

PREFIX = "ntib"  # names of the bridge, the namespaces and the veth ends
SUBNET = ipaddress.ip_network("10.213.0.0/16")


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root (ip netns and tc need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} (Debian's iproute2) is not installed"
    return None


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _shape(device: str, rate_bytes: int, *, netns: str | None = None) -> None:
    """A token bucket at ``rate_bytes`` per second on ``device``'s egress."""
    # Burst: 4 ms at the rate, at least 64 KiB (tbf needs one timer tick's worth); the
    # queue holds 50 ms, as a switch port's buffer would.
    burst = max(64 * 1024, rate_bytes // 250)
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    _run(
        *prefix, "tc", "qdisc", "replace", "dev", device, "root", "tbf",
        "rate", f"{rate_bytes * 8}bit", "burst", str(burst), "latency", "50ms",
    )  # fmt: skip


class KernelLinks:
    """A bridge here and ``hosts`` namespaces, each with a shaped veth pair to it."""

    def __init__(self, rate_bytes: int) -> None:
        self.rate_bytes = rate_bytes
        self.bridge = f"{PREFIX}-br"
        self.address = str(SUBNET[1])  # the origin's and Glance's, on the bridge
        self._hosts: list[str] = []

    def __enter__(self) -> KernelLinks:
        self.close()  # what a run killed half way left behind
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.address}/{SUBNET.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, n: int) -> tuple[str, str]:
        """Host ``n``'s namespace and address, made on first use: each fleet's host ``n``
        (the HTTP baseline's, then each torrent run's) runs in the same one."""
        ns, outside = f"{PREFIX}-h{n}", f"{PREFIX}-v{n}"
        address = str(SUBNET[10 + n])
        if ns in self._hosts:
            return ns, address
        _run("ip", "netns", "add", ns)
        self._hosts.append(ns)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", outside, "master", self.bridge, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/16", "dev", "eth0")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        _shape(outside, self.rate_bytes)  # towards the host: its downlink
        _shape("eth0", self.rate_bytes, netns=ns)  # from the host: its uplink
        return ns, address

    @staticmethod
    def command(ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def close(self) -> None:
        """Remove every namespace and link of ours (deleting a namespace drops its veth)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for line in listed.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{PREFIX}-h"):
                subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        self._hosts.clear()
