"""Reading JSON that someone else wrote (manifests, plans.json, dataset.json): bounded and exact.

``json.loads`` accepts a file of any size, lets the last of two equal keys win silently (``"weight": 1, "weight":
5`` reads as 5) and raises RecursionError on deep nesting. :func:`read_json_file` refuses, before parsing, a file
larger than its cap or nested deeper than :data:`MAX_DEPTH`, and refuses duplicate keys while parsing; every refusal
is a ModelError naming the file and the fix.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError

#: A model-set manifest: a few members with options (a 100-member manifest is about 50 KB).
MANIFEST_MAX_BYTES = 1 << 20
#: plans.json / dataset.json of a model folder (real ones are 5-200 KB).
MODEL_JSON_MAX_BYTES = 16 << 20
#: Nesting depth of objects and lists (real manifests and plans nest 4-8 levels).
MAX_DEPTH = 32

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


class DuplicateKey(ValueError):
    """An object names one key twice."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def nesting_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text, outside strings (computed without parsing)."""
    outside = _STRING.sub('""', text).encode("utf-8", "surrogatepass")
    steps = np.frombuffer(outside, dtype=np.uint8)
    change = np.zeros(steps.shape, dtype=np.int32)
    change[(steps == ord("[")) | (steps == ord("{"))] = 1
    change[(steps == ord("]")) | (steps == ord("}"))] = -1
    return int(np.cumsum(change).max(initial=0))


def parse_json(raw: bytes, source: Path | str, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` (the bytes of ``source``, a ``what`` such as "model-set manifest") within the caps."""
    if len(raw) > max_bytes:
        raise ModelError(f"{source}: larger than {max_bytes} bytes, the most a {what} may be; check that this is the "
                         f"right file (a {what} is a small JSON text file).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{source}: not UTF-8 text ({exc}); a {what} is a JSON text file.") from exc
    depth = nesting_depth(text)
    if depth > max_depth:
        raise ModelError(f"{source}: nested {depth} levels deep, more than the {max_depth} a {what} may have; check "
                         "that this is the right file.")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except DuplicateKey as exc:
        raise ModelError(f"{source}: the key {str(exc)!r} appears twice in one object; which one counts would be "
                         f"a guess, so the {what} is refused. Keep one of them.") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{source}: is not valid JSON ({exc}).") from exc


def read_json_file(path: Path, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> tuple[Any, bytes]:
    """``(parsed JSON, raw bytes)`` of ``path``, reading at most ``max_bytes`` + 1 bytes (see :func:`parse_json`).

    Raises ModelError: the file is missing, not a regular file, unreadable, too large, too deep, has duplicate keys
    or is not JSON.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise ModelError(f"{path}: {'not a regular file' if path.exists() else 'not found'}; give the {what} "
                             "file itself.")
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the {what} ({exc.strerror or exc}).") from exc
    return parse_json(raw, path, what, max_bytes, max_depth), raw
