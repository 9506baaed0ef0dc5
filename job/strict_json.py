"""Strict JSON (RFC 8259) for every file and log line sdft writes: no `NaN`, no `Infinity`.

Python's `json.dumps` writes non-finite floats as the bare words `NaN` / `Infinity`, which other
parsers (JavaScript's `JSON.parse`, `jq`, Go, Rust's serde_json) reject. Here they become `null`.
"""

import json
import math


def finite_or_none(value):
    """`value` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def dumps(data, **kwargs) -> str:
    """`json.dumps` that writes non-finite numbers as `null` (raises ValueError if one slips through)."""
    return json.dumps(finite_or_none(data), allow_nan=False, **kwargs)
