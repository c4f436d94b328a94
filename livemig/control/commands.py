"""The QMP command table: names, declared arguments, handlers, and error mapping.

Theory of operation
-------------------
A :class:`CommandTable` maps a command name to a :class:`Command`: a handler taking
the ``arguments`` object as a dict and returning any JSON-able value (``None`` means
QEMU's empty ``{}``), plus an optional argument declaration.  When arguments are
declared, :meth:`CommandTable.dispatch` checks them *before* the handler runs, in
QEMU's order (each declared parameter in turn: present? right JSON type? then any
leftover name is unexpected) and with QEMU's wording, so handlers only see well-formed
input and clients get the error texts they already know.

Every failure leaves ``dispatch`` as a :class:`~livemig.errors.QmpError` carrying a
QEMU error class and description: a handler's own ``QmpError`` passes through, any
other :class:`~livemig.errors.LivemigError` becomes a ``GenericError`` with its
message, and an unexpected exception (a bug) is logged with its traceback and becomes
a ``GenericError`` too -- the client gets an answer and the session goes on.

The table holds no per-session state, so one table can serve many sessions and
servers; register commands before serving (registration is not synchronised).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from livemig.errors import ConfigError, LivemigError, QmpError

_log = logging.getLogger("livemig.qmp")

JsonType: TypeAlias = Literal["str", "int", "number", "bool", "object", "array", "any"]
Handler: TypeAlias = Callable[[dict[str, Any]], Any]

# The names QEMU's input visitor uses in "Invalid parameter type" errors.
_TYPE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "str": "string",
        "int": "integer",
        "number": "number",
        "bool": "boolean",
        "object": "object",
        "array": "array",
        "any": "any",
    }
)


def _has_type(kind: JsonType, value: Any) -> bool:
    # bool is an int subclass in Python but a distinct type in JSON.
    match kind:
        case "str":
            return isinstance(value, str)
        case "int":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
        case "bool":
            return isinstance(value, bool)
        case "object":
            return isinstance(value, dict)
        case "array":
            return isinstance(value, list)
    return True


@dataclass(frozen=True)
class Param:
    """One declared argument of a command."""

    name: str
    type: JsonType = "any"
    optional: bool = False


@dataclass(frozen=True)
class Command:
    """A registered command; ``params`` of ``None`` means "arguments not checked"."""

    name: str
    handler: Handler
    params: tuple[Param, ...] | None = None

    def check_arguments(self, args: Mapping[str, Any]) -> None:
        """Raise :class:`QmpError` (GenericError) if ``args`` break the declaration."""
        if self.params is None:
            return
        for param in self.params:
            if param.name not in args:
                if not param.optional:
                    raise QmpError(f"Parameter '{param.name}' is missing")
            elif not _has_type(param.type, args[param.name]):
                expected = _TYPE_NAMES[param.type]
                raise QmpError(f"Invalid parameter type for '{param.name}', expected: {expected}")
        declared = {param.name for param in self.params}
        for name in args:
            if name not in declared:
                raise QmpError(f"Parameter '{name}' is unexpected")


def command_not_found(name: str) -> QmpError:
    """QEMU's error for a command name it does not know."""
    return QmpError(f"The command {name} has not been found", "CommandNotFound")


class CommandTable:
    """Registered QMP commands, dispatched by name (see module doc)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def register(self, name: str, handler: Handler, params: Iterable[Param] | None = None) -> None:
        """Add command ``name``; ``params`` declares its arguments (None: unchecked)."""
        if name in self._commands:
            raise ConfigError(f"QMP command '{name}' is already registered.")
        declared = None if params is None else tuple(params)
        self._commands[name] = Command(name, handler, declared)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def names(self) -> list[str]:
        """The registered command names, sorted."""
        return sorted(self._commands)

    def dispatch(self, name: str, args: dict[str, Any]) -> Any:
        """Run command ``name``; return its JSON-able result or raise :class:`QmpError`."""
        command = self._commands.get(name)
        if command is None:
            raise command_not_found(name)
        command.check_arguments(args)
        try:
            result = command.handler(args)
        except QmpError:
            raise
        except LivemigError as exc:
            raise QmpError(str(exc)) from exc
        except Exception as exc:
            # A bug in a handler: keep the traceback for us, give the client a reply.
            _log.exception("QMP command %r failed unexpectedly", name)
            raise QmpError(f"Command '{name}' failed: {type(exc).__name__}: {exc}") from exc
        return {} if result is None else result
