"""Reading the fields of a JSON request body, each checked for its type and range: a wrong one is a 400
naming the field, never a traceback."""

from __future__ import annotations

import math
from typing import Any

from dsv4cli.serve.errors import invalid

_MISSING = object()


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def require_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{where} must be an object, got {_type_name(value)}", where)
    return value


class Fields:
    """Typed access to one JSON object's fields; `where` prefixes parameter names ("messages[2]")."""

    def __init__(self, data: Any, where: str = ""):
        self.data = require_object(data, where or "the request body")
        self.where = where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, required: bool) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING and required:
            raise invalid(f"'{self.name(key)}' is required", self.name(key))
        return value

    def _wrong(self, key: str, expected: str, value: Any):
        return invalid(f"'{self.name(key)}' must be {expected}, got {_type_name(value)}", self.name(key))

    def _typed(self, key: str, default: Any, required: bool, nullable: bool, kind: type | tuple[type, ...],
               expected: str) -> Any:
        """The field when it has type `kind`; `default` when it is absent (or null, if `nullable`)."""
        value = self._get(key, required)
        if value is _MISSING or (value is None and nullable):
            return default
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self._wrong(key, expected, value)
        return value

    def string(self, key: str, default: Any = None, *, required: bool = False, nullable: bool = True) -> Any:
        return self._typed(key, default, required, nullable, str, "a string")

    def boolean(self, key: str, default: Any = None) -> Any:
        return self._typed(key, default, False, True, bool, "a boolean")

    def integer(self, key: str, default: Any = None, *, minimum: int | None = None, maximum: int | None = None,
                required: bool = False) -> Any:
        value = self._get(key, required)
        if value is _MISSING or (value is None and not required):
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer", value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = (f"at least {minimum}" if maximum is None else f"at most {maximum}" if minimum is None
                      else f"between {minimum} and {maximum}")
            raise invalid(f"'{self.name(key)}' must be {bounds}, got {value}", self.name(key))
        return value

    def number(self, key: str, default: Any = None, *, minimum: float | None = None,
               maximum: float | None = None) -> Any:
        value = self._get(key, False)
        if value is _MISSING or value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self._wrong(key, "a finite number", value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise invalid(f"'{self.name(key)}' must be between {minimum} and {maximum}, got {value}", self.name(key))
        return float(value)

    def array(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        return self._typed(key, default, required, not required, list, "an array")

    def object(self, key: str, default: Any = None) -> Any:
        return self._typed(key, default, False, True, dict, "an object")

    def any(self, key: str, default: Any = None) -> Any:
        value = self._get(key, False)
        return default if value is _MISSING else value

    def stop_list(self, key: str) -> tuple[str, ...]:
        """A stop field: one string or an array of up to 4 non-empty strings."""
        from dsv4cli.chat.stops import MAX_STOPS

        value = self._get(key, False)
        if value is _MISSING or value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise invalid(f"'{self.name(key)}' must be a non-empty string or an array of them", self.name(key))
        if len(stops) > MAX_STOPS:
            raise invalid(f"'{self.name(key)}' holds {len(stops)} stop sequences; at most {MAX_STOPS}",
                          self.name(key))
        return tuple(stops)
