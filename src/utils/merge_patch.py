"""JSON Merge Patch (RFC 7396): how a fleet change names the settings to
change without carrying a station's whole config (and its secrets)."""

from __future__ import annotations

from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """`target` with `patch` applied as RFC 7396 says: an object merges key by
    key, null removes a key, anything else (arrays included) replaces. Neither
    argument is modified."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
