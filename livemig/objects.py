"""QEMU's ``-object`` syntax, shared by every kind of object livemig creates (TLS
credentials and authorisation in ``migration/tls.py``, guest RAM backends in
``vmm/membackend.py``): ``TYPE,key=value,...`` parsed as QEMU's keyval does, and
property values as QEMU spells them."""

from __future__ import annotations

from typing import Any

from livemig.errors import ConfigError


def object_flag(name: str, value: Any) -> bool:
    """A boolean property given as JSON (QMP) or as on/off text (--object)."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("on", "yes", "true"):
        return True
    if text in ("off", "no", "false"):
        return False
    raise ConfigError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_object(spec: str) -> tuple[str, dict[str, Any]]:
    """``--object TYPE,key=value,...`` (QEMU's syntax; ',,' is a literal comma).  Dotted
    keys build nested values as QEMU's keyval does: ``rules.0.match=...`` is the
    ``match`` of the first element of the array ``rules``."""
    parts = [p.replace("\0", ",") for p in spec.replace(",,", "\0").split(",")]
    props: dict[str, Any] = {}
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        if not eq:
            raise ConfigError(f"--object {spec!r}: expected key=value, not {p!r}")
        *path, last = key.split(".")
        node = props
        for name in path:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--object {spec!r}: {key!r} is both a value and a group")
        if last in node:
            raise ConfigError(f"--object {spec!r}: {key!r} given twice")
        node[last] = value
    return parts[0], {k: _arrays(k, v) for k, v in props.items()}


def _arrays(key: str, value: Any) -> Any:
    """Groups whose keys are 0, 1, ... n-1 become arrays (keyval's rule)."""
    if not isinstance(value, dict):
        return value
    items = {k: _arrays(f"{key}.{k}", v) for k, v in value.items()}
    if all(k.isdigit() for k in items):
        if sorted(int(k) for k in items) != list(range(len(items))):
            raise ConfigError(f"Parameter '{key}': array indexes must be 0, 1, 2, ...")
        return [items[str(i)] for i in range(len(items))]
    return items
