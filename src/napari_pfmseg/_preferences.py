"""What the plugin remembers between napari sessions: the output folder and each slide's µm/px.

A small JSON file in the user's config folder (``platformdirs``; ``PFMSEG_CONFIG_DIR`` overrides it,
and with only ``PFMSEG_CACHE_DIR`` set, as the test suite does, it lives under that cache), written
atomically. Read on every use, so two open viewers see each other's choices. A missing or damaged file
is an empty one: preferences are a convenience, never a reason to fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FILE_NAME = "napari-pfmseg.json"


def config_dir() -> Path:
    if os.environ.get("PFMSEG_CONFIG_DIR"):
        return Path(os.environ["PFMSEG_CONFIG_DIR"]).expanduser()
    if os.environ.get("PFMSEG_CACHE_DIR"):
        return Path(os.environ["PFMSEG_CACHE_DIR"]).expanduser() / "config"
    from platformdirs import user_config_dir

    return Path(user_config_dir("pfmseg", appauthor=False))


def _path() -> Path:
    return config_dir() / FILE_NAME


def load() -> dict[str, Any]:
    try:
        data = json.loads(_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(data: dict[str, Any]) -> None:
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice holds for this session only
        pass


def output_folder() -> Path | None:
    """The output folder the user chose, if any."""
    value = load().get("output_folder")
    return Path(value) if isinstance(value, str) and value else None


def set_output_folder(folder: str | Path | None) -> None:
    data = load()
    if folder:
        data["output_folder"] = str(Path(folder).expanduser().resolve())
    else:
        data.pop("output_folder", None)
    _save(data)


def _file_key(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def slide_mpp(path: str | Path) -> float | None:
    """The µm/px the user entered for the slide file at ``path`` (None: never entered)."""
    value = load().get("slide_mpp", {}).get(_file_key(path))
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def set_slide_mpp(path: str | Path, mpp: float) -> None:
    data = load()
    table = data.get("slide_mpp")
    if not isinstance(table, dict):
        table = {}
    table[_file_key(path)] = float(mpp)
    data["slide_mpp"] = table
    _save(data)
