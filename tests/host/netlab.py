"""A test network of hosts: network namespaces on one bridge, built with pyroute2.

    with TestNetwork(["ks", "srv", "cli"]) as net:
        net.addr("ks")                 # 10.203.0.1
        net.argv("cli", ["python", ...])   # run a program on that host
        net.set_link("ks", up=False)   # a partition: the host's cable pulled

Each host is a namespace `<prefix>-<name>` with `lo` and `eth0` (one end of a veth pair);
the other ends sit on bridge `br0` in a namespace of their own (`<prefix>-sw`), so
nothing is added to the machine's own network. The private addresses exist only inside
these namespaces. Every namespace is removed on exit, whatever happened.
"""

from __future__ import annotations

import os
import subprocess

from pyroute2 import NetNS, netns

SUBNET = "10.203.0"


class TestNetwork:
    __test__ = False  # not a pytest test class

    def __init__(self, hosts: list[str], prefix: str | None = None):
        self.prefix = prefix or f"edhost{os.getpid()}"
        self.hosts = list(hosts)
        self.switch = f"{self.prefix}-sw"
        self.created: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def addr(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def _port(self, host: str) -> str:
        return f"p{self.hosts.index(host)}"  # the switch side of the host's cable

    def start(self) -> TestNetwork:
        try:
            for name in [self.switch] + [self.ns(h) for h in self.hosts]:
                netns.create(name)
                self.created.append(name)
            with NetNS(self.switch) as sw:
                sw.link("add", ifname="br0", kind="bridge")
                br = sw.link_lookup(ifname="br0")[0]
                sw.link("set", index=br, state="up")
                for h in self.hosts:
                    sw.link("add", ifname=self._port(h), kind="veth",
                            peer={"ifname": "eth0", "net_ns_fd": self.ns(h)})
                    port = sw.link_lookup(ifname=self._port(h))[0]
                    sw.link("set", index=port, master=br, state="up")
            for h in self.hosts:
                with NetNS(self.ns(h)) as ipr:
                    eth = ipr.link_lookup(ifname="eth0")[0]
                    ipr.addr("add", index=eth, address=self.addr(h), prefixlen=24)
                    ipr.link("set", index=eth, state="up")
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        except BaseException:
            self.close()
            raise
        return self

    def set_link(self, host: str, *, up: bool) -> None:
        """Plug or pull the host's cable (its port on the switch)."""
        with NetNS(self.switch) as sw:
            sw.link("set", index=sw.link_lookup(ifname=self._port(host))[0],
                    state="up" if up else "down")

    def argv(self, host: str, argv: list) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *map(str, argv)]

    def run(self, host: str, argv: list, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True, **kw)

    def close(self) -> None:
        for name in reversed(self.created):
            try:
                netns.remove(name)  # its links go with it; the veth peers follow
            except OSError:
                pass
        self.created = []

    def __enter__(self) -> TestNetwork:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
