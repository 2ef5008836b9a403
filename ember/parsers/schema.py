"""Recovering argument types from a tool's JSON schema (for the XML-style formats, where
every value arrives as text)."""

from __future__ import annotations

import ast
import json
import math
from typing import Any


def prop_schema(params: dict | None, key: str) -> dict | None:
    """The schema of property ``key`` in a tool's ``parameters`` (None if not declared)."""
    if not isinstance(params, dict):
        return None
    props = params.get("properties")
    if not isinstance(props, dict) or key not in props:
        return None
    sch = props[key]
    return sch if isinstance(sch, dict) else {}


def resolve_ref(schema: Any, root: dict | None, depth: int = 0) -> Any:
    """Follow a local ``$ref`` (``#/$defs/X``, ``#/definitions/X``) inside ``root``."""
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and root and depth < 16:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            break
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            break
        schema, depth = node, depth + 1
    return schema


def schema_types(schema: Any, root: dict | None = None, depth: int = 0) -> set[str]:
    """Every JSON type a schema allows: ``type`` (string or list), the types of ``enum`` /
    ``const`` values, and the members of anyOf / oneOf / allOf (``$ref`` followed)."""
    schema = resolve_ref(schema, root)
    if not isinstance(schema, dict) or depth > 16:
        return set()
    types: set[str] = set()
    t = schema.get("type")
    if isinstance(t, str):
        types.add(t.lower())
    elif isinstance(t, list):
        types.update(x.lower() for x in t if isinstance(x, str))
    values = list(schema.get("enum") or []) if isinstance(schema.get("enum"), list) else []
    if "const" in schema:
        values.append(schema["const"])
    for v in values:
        types.add(json_type(v))
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                types |= schema_types(sub, root, depth + 1)
    return types


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "unknown"


def jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def literal(value: str) -> Any:
    """``ast.literal_eval`` that raises ValueError for anything it cannot turn into JSON."""
    try:
        v = ast.literal_eval(value)
    except Exception as e:  # SyntaxError, ValueError, MemoryError, RecursionError ...
        raise ValueError(str(e)) from None
    if isinstance(v, tuple):
        v = list(v)
    if not jsonable(v):
        raise ValueError("not JSON-serialisable")
    return v


def loads_or_literal(value: str) -> Any:
    """json.loads, then ast.literal_eval, then the raw string."""
    try:
        v = json.loads(value)
        if jsonable(v):
            return v
    except ValueError:
        pass
    try:
        return literal(value)
    except ValueError:
        return value


def finite_float(value: str) -> float:
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(value)
    return f


def primary_type(schema: dict | None) -> str:
    """A single lower-case type name, as Qwen3-Coder's parser reads it (no type: string);
    for a type list / anyOf the first non-null member."""
    if not isinstance(schema, dict):
        return "string"
    t = schema.get("type")
    if isinstance(t, str):
        return t.strip().lower()
    if isinstance(t, list):
        for x in t:
            if isinstance(x, str) and x.lower() != "null":
                return x.strip().lower()
        return "null"
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                pt = primary_type(sub)
                if pt != "null":
                    return pt
    if "enum" in schema:
        return "enum"
    return "string"
