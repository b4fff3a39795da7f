"""Reading the JSON files mixbuild consumes (config.json, generation_config.json, manifests):
one JSON object per file, or one clear error of the caller's kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixbuild.errors import MixbuildError

_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
          "object": dict, "array": list}


def json_type(value: Any) -> str:
    """The JSON name of a value's type: string, integer, number, boolean, object, array, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for name, kind in _TYPES.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


def read_json_object(path: Path, error: type[MixbuildError], what: str,
                     hint: str | None = None) -> dict[str, Any]:
    """The JSON object in `path`; `error` (what failed: `what` is corrupt) when the file is not
    UTF-8, not JSON or not an object."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{path}: corrupt {what}: not valid JSON", found=str(exc)[:200],
                    hint=hint) from exc
    if not isinstance(data, dict):
        raise error(f"{path}: corrupt {what}: not a JSON object", expected="a JSON object",
                    found=f"a JSON {json_type(data)}", hint=hint)
    return data
