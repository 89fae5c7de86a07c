"""A TCP proxy for network faults between a client and a real server.

Connections stay open through every fault, as they do when a network drops packets rather
than refusing them: nothing tells either side, only answers stop coming.

- :meth:`TcpProxy.cut_answers`: the next answers from the server are not passed on, and the
  client's connection is closed instead (the server did the work; the client never hears).
- :meth:`TcpProxy.partition` / :meth:`TcpProxy.heal`: while partitioned, whatever either side
  sends is dropped; after the heal, new data flows again (what was dropped stays lost).
"""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.dropped_answers = 0
        self.dropped_bytes = 0
        self._cuts = 0
        self._partitioned = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_answers(self, answers: int) -> None:
        with self._lock:
            self._cuts = answers

    def partition(self) -> None:
        self._partitioned.set()

    def heal(self) -> None:
        self._partitioned.clear()

    def close(self) -> None:
        self.listener.close()

    def _take_cut(self) -> bool:
        with self._lock:
            if self._cuts <= 0:
                return False
            self._cuts -= 1
            self.dropped_answers += 1
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if self._partitioned.is_set():
                    with self._lock:
                        self.dropped_bytes += len(data)
                    continue
                if answers and self._take_cut():
                    break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
