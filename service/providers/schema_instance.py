"""An instance of a JSON Schema, for the simulated model's JSON answers.

Not a general generator: it covers what response schemas use (objects, arrays, scalars with
their bounds, enum and const, local `$ref`s, anyOf / oneOf / allOf, common string formats), so
that client teams can test their parsing against answers that validate. A schema it cannot
satisfy (a `pattern`, say) still gets JSON of the right shape.
"""

from __future__ import annotations

import math
from typing import Any

_MAX_DEPTH = 32
_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}
_TYPE_ORDER = ("object", "array", "string", "integer", "number", "boolean", "null")


def instance_of(schema: dict[str, Any], text: str = "sample") -> Any:
    """A value that validates against `schema`; strings are made from `text`."""
    return _Generator(schema, text or "sample").value(schema, 0)


class _Generator:
    def __init__(self, root: dict[str, Any], text: str) -> None:
        self.root = root
        self.text = text

    def _resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for token in ref[1:].lstrip("/").split("/") if ref != "#" else ():
            token = token.replace("~1", "/").replace("~0", "~")
            node = node.get(token, {}) if isinstance(node, dict) else {}
        return node

    def value(self, schema: Any, depth: int) -> Any:
        if schema is True or not isinstance(schema, dict):
            return None if schema is not True else {}
        if depth > _MAX_DEPTH:
            return None
        if "$ref" in schema and isinstance(schema["$ref"], str):
            merged = {**self._resolve(schema["$ref"]), **{k: v for k, v in schema.items() if k != "$ref"}}
            return self.value(merged, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        if isinstance(schema.get("allOf"), list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for sub in schema["allOf"]:
                if isinstance(sub, dict):
                    merged = _merge(merged, self._deref(sub))
            return self.value(merged, depth + 1)
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                rest = {k: v for k, v in schema.items() if k != key}
                return self.value(_merge(rest, self._deref(options[0])), depth + 1)
        kind = self._type(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer")
        if kind == "boolean":
            return True
        return None

    def _deref(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref)
            return {**(target if isinstance(target, dict) else {}), **{k: v for k, v in schema.items() if k != "$ref"}}
        return schema

    def _type(self, schema: dict[str, Any]) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in _TYPE_ORDER if k in kind]
            non_null = [k for k in kinds if k != "null"]
            return (non_null or kinds or ["null"])[0]
        if isinstance(kind, str):
            return kind
        if "properties" in schema or "required" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return "object"

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        # A schema arrives as a google.protobuf.Struct, whose map keeps no order: the answer's keys go
        # in `required`'s order (a list keeps it), then by name, so the same request gives the
        # same bytes every time.
        required = [n for n in schema.get("required") or () if isinstance(n, str) and n in properties]
        names = required + sorted(n for n in properties if n not in required)
        out = {name: self.value(properties[name], depth + 1) for name in names}
        for name in schema.get("required") or ():
            if isinstance(name, str) and name not in out:
                extra = schema.get("additionalProperties")
                out[name] = self.value(extra if isinstance(extra, dict) else {"type": "string"}, depth + 1)
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        out = [self.value(sub, depth + 1) for sub in prefix] if isinstance(prefix, list) else []
        items = schema.get("items")
        low = schema.get("minItems")
        count = max(low if isinstance(low, int) else 0, 1 if isinstance(items, dict) else 0)
        high = schema.get("maxItems")
        if isinstance(high, int):
            count = min(count, high)
        while len(out) < count and isinstance(items, dict):
            value = self.value(items, depth + 1)
            if schema.get("uniqueItems") and value in out:
                break
            out.append(value)
        return out

    def _string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        value = _FORMATS.get(fmt, self.text) if isinstance(fmt, str) else self.text
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(high, int) and len(value) > high:
            value = value[:high]
        if isinstance(low, int) and len(value) < low:
            value += "x" * (low - len(value))
        return value


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {**a, **b}
    if isinstance(a.get("properties"), dict) and isinstance(b.get("properties"), dict):
        out["properties"] = {**a["properties"], **b["properties"]}
    if isinstance(a.get("required"), list) and isinstance(b.get("required"), list):
        out["required"] = list(dict.fromkeys([*a["required"], *b["required"]]))
    return out


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    low: float | None = None
    high: float | None = None
    step = 1.0 if integer else 0.5
    if isinstance(schema.get("minimum"), int | float):
        low = schema["minimum"]
    if isinstance(schema.get("exclusiveMinimum"), int | float):
        low = max(low if low is not None else -math.inf, schema["exclusiveMinimum"] + step)
    if isinstance(schema.get("maximum"), int | float):
        high = schema["maximum"]
    if isinstance(schema.get("exclusiveMaximum"), int | float):
        high = min(high if high is not None else math.inf, schema["exclusiveMaximum"] - step)
    value = 1.0
    if low is not None and value < low:
        value = low
    if high is not None and value > high:
        value = high
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and multiple > 0:
        value = math.ceil(value / multiple) * multiple
        if high is not None and value > high:
            value -= multiple
    if integer:
        return math.ceil(value) if low is not None and math.ceil(value) >= low else int(value)
    return value
