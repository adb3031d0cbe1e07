"""A TCP proxy on loopback that delays every chunk: a real but slow path to a server."""

from __future__ import annotations

import random
import socket
import threading
import time
from types import TracebackType


class DelayProxy:
    """Forward 127.0.0.1:<port> to ``target``, sleeping ``delay`` seconds per chunk.

    Each chunk is held ``delay`` seconds plus up to ``jitter`` more, at random, in each
    direction (chunks keep their order); ``set_delay()`` changes both for the chunks
    that come next. ``freeze()`` holds every chunk back (a hung server, as its clients
    see it) until ``thaw()``; other clients that talk to the server directly are
    unaffected.
    """

    def __init__(self, host: str, port: int, delay: float, jitter: float = 0.0) -> None:
        self._target = (host, port)
        self._delay = delay
        self._jitter = jitter
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._answering = threading.Event()
        self._answering.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            if self._closed:  # closed while this pair connected: close() missed it
                client.close()
                server.close()
                return
            for src, dst, gates in (
                (client, server, (self._flowing,)),
                (server, client, (self._flowing, self._answering)),
            ):
                threading.Thread(target=self._pump, args=(src, dst, gates), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, gates: tuple[threading.Event, ...]
    ) -> None:
        try:
            while data := src.recv(65536):
                pause = self._delay + random.uniform(0.0, self._jitter)
                if pause > 0:
                    time.sleep(pause)
                for gate in gates:
                    gate.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Both ways end together; closed here too, not left to the garbage collector
            # (a ResourceWarning charged to whichever test runs then).
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def set_delay(self, delay: float, jitter: float = 0.0) -> None:
        self._delay, self._jitter = delay, jitter

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def withhold_answers(self) -> None:
        self._answering.clear()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self._answering.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
