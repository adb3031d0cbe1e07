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
    "able_backends",
    "check_url_for_driver",
    "driver_class",
    "known_schemes",
]

#: scheme -> (module in this package, class). Aliases (``kazoo``, ``etcd3+https``) too.
_REGISTRY: dict[str, tuple[str, str]] = {
    "file": ("file", "FileDriver"),
    "ipc": ("ipc", "IpcDriver"),
    "redis": ("redis", "RedisDriver"),
    "memcached": ("memcached", "MemcachedDriver"),
    "zookeeper": ("zookeeper", "ZooKeeperDriver"),
    "kazoo": ("zookeeper", "ZooKeeperDriver"),
    "etcd3+http": ("etcd", "EtcdDriver"),
    "etcd3+https": ("etcd", "EtcdDriver"),
    "postgresql": ("postgresql", "PostgreSQLDriver"),
    "mysql": ("mysql", "MySQLDriver"),
}


def driver_class(scheme: str) -> type[Driver]:
    """The driver for backend URLs of ``scheme`` (the base driver if none is known)."""
    entry = _REGISTRY.get(scheme)
    if entry is None:
        return Driver
    module, name = entry
    driver: type[Driver] = getattr(importlib.import_module(f".{module}", __name__), name)
    return driver


def able_backends(capability: Capability) -> str:
    """The schemes whose drivers have ``capability``, for an error saying where it works."""
    # Aliases left out; driver modules import their client libraries lazily.
    aliases = ("kazoo", "etcd3+https")
    able = [
        scheme
        for scheme in _REGISTRY
        if scheme not in aliases and capability in driver_class(scheme).capabilities
    ]
    return ", ".join(able) or "no backend"


def check_url_for_driver(parts: urllib.parse.SplitResult) -> None:
    """Refuse a parsed URL its driver cannot work with (``ValueError``)."""
    driver = driver_class(parts.scheme)
    driver.check_url(parts)
    driver.check_query(parts)


def known_schemes() -> list[str]:
    """The backend URL schemes tooz has drivers for in this environment."""
    return sorted(ep.name for ep in importlib.metadata.entry_points(group="tooz.backends"))
