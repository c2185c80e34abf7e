"""A TCP relay whose link can be made slow, partitioned or down while it runs.

Put between the NBD server and the key service (the server's --keyservice-url points at
the relay), it turns a healthy link into the faults the platform must survive:

- PASS: bytes relayed both ways;
- SLOW: every chunk from the client waits `delay` seconds before it is relayed;
- PARTITIONED: nothing is relayed and nothing is answered, connections stay open (a
  network partition: the client can only time out);
- DOWN: connections are reset, new ones refused at once (a crashed service).
"""

from __future__ import annotations

import enum
import select
import socket
import struct
import threading


class Link(enum.Enum):
    PASS = "pass"
    SLOW = "slow"
    PARTITIONED = "partitioned"
    DOWN = "down"


class FaultyLink:
    def __init__(self, target: tuple[str, int], *, delay: float = 1.0):
        self.target = target
        self.delay = delay
        self.state = Link.PASS
        self.relayed = 0          # client chunks relayed
        self.delayed = 0          # ... of which delayed (SLOW)
        self.refused = 0
        self._changed = threading.Event()
        self._closing = False
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.address = self._lsock.getsockname()
        self.url = f"http://{self.address[0]}:{self.address[1]}"
        threading.Thread(target=self._accept, daemon=True, name="faulty-link").start()

    def set(self, state: Link) -> None:
        self.state = state
        self._changed.set()

    def close(self) -> None:
        self._closing = True
        self._lsock.close()
        self._changed.set()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            if self.state is Link.DOWN:
                self.refused += 1
                self._reset(client)
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            self._reset(client)
            return
        peers = {client: upstream, upstream: client}
        try:
            while not self._closing:
                state = self.state
                if state is Link.DOWN:
                    return
                if state is Link.PARTITIONED:  # hold everything; wake up on a change
                    self._changed.wait(0.1)
                    self._changed.clear()
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        if self.state is Link.SLOW:
                            self.delayed += 1
                            self._changed.wait(self.delay)  # the fault itself, not a sync
                        self.relayed += 1
                    peers[s].sendall(data)
        except OSError:
            return
        finally:
            for s in (client, upstream):
                try:
                    self._reset(s)
                except OSError:
                    pass
