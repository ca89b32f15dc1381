"""The one reader of the JSON files stages hand each other (metrics, reports, profiles):
one error, :class:`ArtifactError`, naming the path, what the file is and how to make it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import ArtifactError


def read_json(path: Path, what: str, fix: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; ``what`` names it and ``fix`` says how to (re)make it."""
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: {what} missing{hint}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: {what} is not valid JSON ({err}){hint}") from err
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data
