"""Lock names: build them from format strings, map any ``str`` to a backend-safe key.

The mapping is the contract between aiotooz processes and plain tooz processes on the
same backend, so it must stay stable across releases:

* a *plain* key (``prefix + name`` of 1 to 64 characters from ``[A-Za-z0-9._-]``, not
  starting with ``.``, and not reserved by the backend) is used unchanged, exactly as a
  plain tooz user would pass it to ``get_lock()``;
* any other name becomes ``prefix + stem + "~" + digest``: ``stem`` is a readable
  part of the name (at most 24 characters, unsafe characters replaced by ``_``) and
  ``digest`` is 32 hex digits of the SHA-256 of the name's UTF-8 encoding.

A plain key never contains ``~`` and a mapped key contains exactly one, so the two
families never meet; two mapped keys are equal only if their 128-bit digests are. The
result is at most ``len(prefix) + 57`` ASCII characters with no ``/``, so no name can
leave the file backend's directory, and it fits MySQL's 64-character limit for
prefixes of up to 7 characters (longer prefixes are checked by that backend).

A semaphore's slot ``i`` is locked on ``prefix + stem + "~" + digest + "~" + str(i)``
(:func:`slot_key`; ``stem`` at most 16 characters, ``digest`` that of the semaphore's
name): it contains two ``~``, so no lock name ever maps to it, and it is at most
``len(prefix) + 54`` characters for the slots of limits up to 1,000 (MySQL's limit of
64 then fits prefixes of up to 10 characters).

A read-write lock's holders lock keys of the family ``prefix + stem + "~" + digest +
"~rw"`` (:func:`rw_key`): its writers ``... + "~w"``, each reader ``... + "~r" +
str(serial)`` (a key of its own, so that the readers of one process do not queue behind
each other). Three ``~`` and a final part that is not a number: neither a lock name nor a
slot maps to one. A driver that has read-write locks reads the family and the role back
with :func:`split_rw_key`.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import string
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ._exceptions import ConfigurationError, LockNameError

__all__ = [
    "MAX_NAME_LENGTH",
    "backend_key",
    "call_namer",
    "check_name",
    "check_prefix",
    "format_fields",
    "format_name",
    "rw_key",
    "slot_key",
    "split_rw_key",
]

MAX_PLAIN_LENGTH = 64
#: The longest lock name accepted, in characters. Names are logged and put in errors,
#: and a template such as ``{id:>200000000}`` must not be able to build 200 MB of one.
MAX_NAME_LENGTH = 1024
_SPEC_NUMBER = re.compile(r"\d+")
#: The attribute parts of a format field, as str.format reads them: ``.name`` up to the
#: next ``.`` or ``[``, outside ``[index]`` parts (``a.b[c.d].e`` -> ``b``, ``e``).
_ATTRIBUTE = re.compile(r"\[[^\]]*\]|\.([^.\[]*)")
_PLAIN = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_PLAIN_LENGTH - 1}}}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_STEM_LENGTH = 24
_SLOT_STEM_LENGTH = 16
_DIGEST_HEX = 32


def check_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is usable in every backend key, else raise."""
    if not isinstance(prefix, str) or (prefix and not _PLAIN.fullmatch(prefix)):
        raise ConfigurationError(
            f"prefix must be a str of at most {MAX_PLAIN_LENGTH} characters from "
            f"[A-Za-z0-9._-], not starting with '.' (got {prefix!r})"
        )
    return prefix


def backend_key(prefix: str, name: str, reserved: Collection[str] = ()) -> str:
    """Map a lock name to the ASCII key handed to tooz (see the module docstring)."""
    key = prefix + name
    if _PLAIN.fullmatch(key) and key not in reserved:
        return key
    stem = _UNSAFE.sub("_", name[:_STEM_LENGTH]).lstrip(".")
    return f"{prefix}{stem}~{_digest(name)}"


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_HEX]


def slot_key(prefix: str, name: str, index: int) -> str:
    """The key of slot ``index`` of the semaphore ``name`` (see the module docstring)."""
    stem = _UNSAFE.sub("_", name[:_SLOT_STEM_LENGTH]).lstrip(".")
    return f"{prefix}{stem}~{_digest(name)}~{index}"


def rw_key(prefix: str, name: str, write: bool, serial: int = 0) -> str:
    """The key a writer (or reader ``serial``) of read-write lock ``name`` locks."""
    stem = _UNSAFE.sub("_", name[:_SLOT_STEM_LENGTH]).lstrip(".")
    role = "w" if write else f"r{serial}"
    return f"{prefix}{stem}~{_digest(name)}~rw~{role}"


def split_rw_key(key: str) -> tuple[str, bool] | None:
    """The family key of a :func:`rw_key`, and whether it is a writer's; else ``None``."""
    family, tilde, role = key.rpartition("~")
    if not tilde or not family.endswith("~rw") or family.count("~") != 2:
        return None
    if role == "w":
        return family, True
    if role[:1] == "r" and role[1:].isdigit():
        return family, False
    return None


def check_name(name: object) -> str:
    """Return ``name`` if it is a non-empty ``str``, else raise :class:`LockNameError`."""
    if not isinstance(name, str):
        raise LockNameError(f"a lock name must be a str, not {type(name).__name__}: {name!r}")
    if not name:
        raise LockNameError("a lock name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise LockNameError(
            f"a lock name must be at most {MAX_NAME_LENGTH} characters, not {len(name)} "
            f"(starting {name[:40]!r})"
        )
    return name


def _check_field(template: str, field: str) -> None:
    """Refuse a field that reaches a ``_``-prefixed attribute (``{x.__class__}``).

    A template may be built from user text; such a field could read a module's globals
    (``{x.__init__.__globals__[SECRET]}``) into a name that is then logged.
    """
    for attribute in _ATTRIBUTE.findall(field):
        if attribute.startswith("_"):
            raise LockNameError(
                f"lock name {template!r} uses the field {{{field}}}, which reads the private "
                f"attribute {attribute!r}; only public attributes may be used in lock names"
            )


class _NameFormatter(string.Formatter):
    """``str.format_map`` with the checks a lock name needs (see ``format_name``)."""

    def __init__(self, template: str) -> None:
        self.template = template

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        _check_field(self.template, field_name)
        return super().get_field(field_name, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> str:
        for number in _SPEC_NUMBER.findall(format_spec):
            if int(number) > MAX_NAME_LENGTH:
                raise LockNameError(
                    f"lock name {self.template!r} uses the format spec {format_spec!r}, "
                    f"whose width or precision exceeds the {MAX_NAME_LENGTH}-character "
                    "limit of lock names"
                )
        return str(super().format_field(value, format_spec))


def format_fields(template: str) -> set[str]:
    """The top-level field names a format string uses (``{shr.id}`` -> ``shr``)."""
    fields = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise LockNameError(f"lock name {template!r} is not a valid format string: {exc}") from None
    for _, field, _, _ in parsed:
        if field is None:
            continue
        _check_field(template, field)
        head = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not head or head.isdigit():
            raise LockNameError(
                f"lock name {template!r} uses a positional field {{{field}}}; "
                "name the field instead, e.g. {share_id}"
            )
        fields.add(head)
    return fields


def format_name(template: object, data: Mapping[str, Any] | None, *, where: str = "") -> str:
    """Build a lock name from ``template`` and ``data`` (``str.format_map`` rules).

    Args:
        template: the name, possibly with ``{field}`` placeholders.
        data: the values for those fields.
        where: what supplied ``data`` (e.g. "the arguments of resize()"), for errors.
    """
    template = check_name(template)
    source = where or "the lock data"
    try:
        name = _NameFormatter(template).vformat(template, (), data or {})
    except LockNameError:
        raise
    except KeyError as exc:
        raise LockNameError(
            f"lock name {template!r} uses the field {exc.args[0]!r}, which is not in {source}"
        ) from None
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise LockNameError(
            f"cannot build lock name {template!r} from {source}: {type(exc).__name__}: {exc}"
        ) from exc
    return check_name(name)


def call_namer(template: str, func: Callable[..., Any]) -> Callable[..., str]:
    """The name ``template`` gives each call of ``func`` (for decorators such as ``@synchronized``).

    The fields of ``template`` are ``func``'s parameters, bound by name with defaults
    applied (and names passed through ``**kwargs``), and ``f_name``, the function's name.
    The returned callable takes the call's ``*args, **kwargs``.

    Raises:
        LockNameError: ``template`` is not a valid name or uses a field that is not a
            parameter of ``func``.
    """
    check_name(template)
    fields = format_fields(template)
    signature = inspect.signature(func)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = fields - set(signature.parameters) - {"f_name"}
    if unknown and not accepts_any:
        raise LockNameError(
            f"lock name {template!r} uses {', '.join(sorted(unknown))}, which "
            f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} "
            f"of {func.__qualname__}{signature}"
        )
    where = f"the arguments of {func.__qualname__}()"

    def name_for(*args: Any, **kwargs: Any) -> str:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        for param in signature.parameters.values():
            # Names passed through **kwargs are addressable as fields too.
            if param.kind is param.VAR_KEYWORD:
                values = {**values.pop(param.name), **values}
        values["f_name"] = func.__name__
        return format_name(template, values, where=where)

    return name_for
