"""The driver layer: one module per tooz backend, behind the interface in ``_base``.

This registry is the one place that knows backends by their scheme. A scheme without a
module here (a tooz driver added later, say) gets the base :class:`Driver`: plain tooz
calls, so it works as far as tooz goes.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import urllib.parse

from ._base import Capability, Driver, HolderRecord, ReleaseSignal

__all__ = [
    "Capability",
    "Driver",
    "HolderRecord",
    "ReleaseSignal",
    "check_url_for_driver",
    "driver_class",
    "known_schemes",
    "schemes_with",
]

#: scheme -> (module in this package, class). Aliases (``kazoo``, ``etcd3+https``) too.
_REGISTRY: dict[str, tuple[str, str]] = {
    "file": ("file", "FileDriver"),
    "ipc": ("ipc", "IpcDriver"),
    "redis": ("redis", "RedisDriver"),
    "redis+cluster": ("redis_cluster", "RedisClusterDriver"),
    "memcached": ("memcached", "MemcachedDriver"),
    "zookeeper": ("zookeeper", "ZooKeeperDriver"),
    "kazoo": ("zookeeper", "ZooKeeperDriver"),
    "etcd3+http": ("etcd", "EtcdDriver"),
    "etcd3+https": ("etcd", "EtcdDriver"),
    "postgresql": ("postgresql", "PostgreSQLDriver"),
    "mysql": ("mysql", "MySQLDriver"),
}

#: Schemes of drivers that are their own clients, with no tooz driver behind them.
_OWN_SCHEMES = frozenset({"redis+cluster"})


def driver_class(scheme: str) -> type[Driver]:
    """The driver for backend URLs of ``scheme`` (the base driver if none is known)."""
    entry = _REGISTRY.get(scheme)
    if entry is None:
        return Driver
    module, name = entry
    driver: type[Driver] = getattr(importlib.import_module(f".{module}", __name__), name)
    return driver


def check_url_for_driver(parts: urllib.parse.SplitResult) -> None:
    """Refuse a parsed URL its driver cannot work with (``ValueError``)."""
    driver = driver_class(parts.scheme)
    driver.check_url(parts)
    driver.check_query(parts)


def known_schemes() -> list[str]:
    """The backend URL schemes of tooz's drivers in this environment, and aiotooz's own."""
    tooz_schemes = {ep.name for ep in importlib.metadata.entry_points(group="tooz.backends")}
    return sorted(tooz_schemes | _OWN_SCHEMES)


def schemes_with(capability: Capability) -> list[str]:
    """The schemes whose drivers declare ``capability`` (aliases too), for error messages."""
    found = []
    for scheme in _REGISTRY:
        try:
            driver = driver_class(scheme)
        except ImportError:  # pragma: no cover - a driver module needs its client
            continue
        if capability in driver.capabilities:
            found.append(scheme)
    return found
