"""Several etcd endpoints for one etcd3gw client: move to the next when one fails.

etcd3gw talks to one member (``host``, ``port``): when that member died or was cut off,
every call failed until it came back, although the cluster still had quorum, and every
lock on the coordinator's lease was lost with the lease. Here the client is given the
URL's endpoints in order; a call that cannot reach its member (refused, reset, or no
answer within the client's timeout) is sent again to the next, and the client stays on
whichever member answered. Every member of an etcd cluster serves the whole keyspace
and the same leases, so a lease kept alive through another member is the same lease.

A call retried after a timeout may have been applied by the member that did not answer:
the driver's calls are written to be safe to repeat (see ``EtcdDriver.try_acquire``;
a release asks :func:`sent_again_after_a_timeout` whether a key it found without its
token may have been deleted by its own first send).
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

__all__ = ["endpoints_of", "fail_over_between", "sent_again_after_a_timeout"]


def endpoints_of(parts: urllib.parse.SplitResult) -> list[tuple[str, int]]:
    """The ``(host, port)`` of each endpoint an ``etcd3+http(s)://`` URL lists, in order.

    Raises:
        ValueError: an empty entry, a host without a name, the same endpoint twice, or
            a path (the URL names members, nothing under them).
    """
    endpoints = []
    for entry in parts.netloc.rpartition("@")[2].split(","):
        endpoint = urllib.parse.urlsplit(f"//{entry}")
        if not entry or not endpoint.hostname:
            raise ValueError(
                f"an {parts.scheme}:// URL lists its endpoints as host:port, separated by "
                f"commas and nothing else, such as {parts.scheme}://h1:2379,h2:2379,h3:2379"
            )
        address = (endpoint.hostname, endpoint.port or 2379)
        if address in endpoints:
            raise ValueError(
                f"the {parts.scheme}:// URL lists the endpoint {address[0]}:{address[1]} twice"
            )
        endpoints.append(address)
    if parts.path not in ("", "/"):
        raise ValueError(
            f"an {parts.scheme}:// URL has no path: it lists etcd endpoints "
            f"({parts.scheme}://h1:2379,h2:2379)"
        )
    return endpoints


def fail_over_between(client: Any, endpoints: list[tuple[str, int]]) -> None:
    """Have the etcd3gw ``client`` move along ``endpoints`` when its member fails.

    Its class is swapped for a subclass made here (etcd3gw's client reads ``host`` and
    ``port`` in two steps; the subclass reads one endpoint, set in one step, so that a
    thread never builds a URL from two members). Nothing changes for one endpoint.
    """
    if len(endpoints) < 2:
        return
    from etcd3gw import exceptions

    unreachable = (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError)
    base = type(client)

    class FailoverClient(base):  # type: ignore[valid-type, misc]
        """etcd3gw's client, on the first of its endpoints that answers."""

        endpoints: list[tuple[str, int]]
        endpoint: tuple[str, int]
        endpoint_guard: threading.Lock
        #: Per thread: its last call was sent again after a member timed out on it.
        resent: threading.local

        @property
        def base_url(self) -> str:
            host, port = self.endpoint
            shown = f"[{host}]" if ":" in host else host
            return f"{self.protocol}://{shown}:{port}"

        @property
        def api_path(self) -> str:
            if self._api_path is None:  # found by asking a member: any that answers
                self._on_any(lambda _: base.api_path.fget(self))
            return str(self._api_path)

        def post(self, url: str, *args: Any, json: Any = None, **kwargs: Any) -> Any:
            # The URL was built on the endpoint of its time: each attempt sends its path
            # to the endpoint of the moment.
            path = url.split("/", 3)[3]
            return self._on_any(
                lambda at: base.post(self, f"{at}/{path}", *args, json=json, **kwargs)
            )

        def _on_any(self, call: Callable[[str], Any]) -> Any:
            """``call(base_url)`` on this endpoint, then on the others until one answers.

            Twice round at most: while a new leader is elected (after the old one died)
            the other members answer nothing that needs the leader, a lease keepalive
            among them, for an election timeout or so.
            """
            last = 2 * len(self.endpoints) - 1
            self.resent.after_timeout = False
            for attempt in range(last + 1):
                tried = self.base_url
                try:
                    return call(tried)
                except unreachable as exc:
                    if attempt == last:
                        raise
                    if isinstance(exc, exceptions.ConnectionTimeoutError):
                        self.resent.after_timeout = True
                    self._next_after(tried)
            raise AssertionError("unreachable")

        def _next_after(self, failed: str) -> None:
            """Move to the endpoint after ``failed``, unless another thread moved already."""
            with self.endpoint_guard:
                if self.base_url == failed:
                    at = self.endpoints.index(self.endpoint)
                    self.endpoint = self.endpoints[(at + 1) % len(self.endpoints)]

    client.endpoints = list(endpoints)
    client.endpoint = endpoints[0]
    client.endpoint_guard = threading.Lock()
    client.resent = threading.local()
    client.__class__ = FailoverClient


def sent_again_after_a_timeout(client: Any) -> bool:
    """Whether this thread's last call through ``client`` was sent again after a timeout.

    The member that timed out may have applied it all the same.
    """
    resent = getattr(client, "resent", None)
    return bool(getattr(resent, "after_timeout", False))
