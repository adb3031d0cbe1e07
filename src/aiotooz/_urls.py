"""Backend URLs: parse them once, and show them without their secrets."""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

__all__ = ["check_url", "redact_url", "scheme_of"]


def scheme_of(url: str) -> str:
    """The URL's scheme, such as ``redis`` or ``file``."""
    return url.partition("://")[0]


#: A URL query parameter whose name contains one of these words holds a secret (or key
#: material) and is never shown: ``password``, ``sentinel_password``, ``keyfile_password``,
#: ``ssl_key_password``, ``ssl_key``, ``token``, ``client_secret`` …
_SECRET_WORDS: Final = re.compile(r"pass|pwd|secret|token|key|credential|auth", re.IGNORECASE)
_REDACTED: Final = "***"


def redact_url(url: str) -> str:
    """Return ``url`` with every secret replaced by ``***``, safe to log or show.

    The password in the netloc and the value of every query parameter whose name says
    password, secret, token or key (see ``_SECRET_WORDS``) are replaced.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is not None:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:{_REDACTED}@{hostinfo}")
    if parts.query:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(_SECRET_WORDS.search(name) for name, _ in query):
            shown = [
                (name, _REDACTED if _SECRET_WORDS.search(name) else value) for name, value in query
            ]
            parts = parts._replace(query=urllib.parse.urlencode(shown, safe="*/:,"))
    return urllib.parse.urlunsplit(parts)


def check_url(url: str) -> urllib.parse.SplitResult:
    """Parse ``url`` the way the drivers will, or raise ``ValueError`` saying what is wrong.

    The message never echoes the URL, which may hold a password.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ValueError(
            "must be a URL '<scheme>://...', such as 'file:///var/lock/app' or 'redis://host:6379'"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        # ZooKeeper, etcd and Redis Cluster URLs list several servers: 'zookeeper://a:2181,b:2181'.
        # Parsing each one's port is what raises for 'host:abc'.
        for server in parts.netloc.rpartition("@")[2].split(","):
            urllib.parse.urlsplit(f"//{server}").port  # noqa: B018
    except ValueError as exc:
        raise ValueError(f"is not a parsable URL ({exc}); check its brackets and port") from None
    return parts
