"""The seed framework's dataset description: one JSON file listing images and masks per split.

Format::

    {"num_classes": 3, "class_names": ["tumor", "stroma", "bg"],       # class_names optional
     "class_colors": [[255, 0, 0], [0, 255, 0], [0, 0, 255]],          # optional, for RGB masks
     "data": {"train": [{"image_path": "...", "mask_path": "..."}],
              "val": [...], "test": [{"image_path": "...", "mask_path": null}]}}

Relative paths resolve against the JSON file's own folder, so a dataset folder can be moved or
shared as a whole. Entries whose mask is null or missing are allowed (test-time prediction) and
simply carry ``mask_path=None``; training and validation refuse them with a clear error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, closest

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image and its (optional) mask, both as absolute paths."""

    image_path: Path
    mask_path: Path | None

    @property
    def name(self) -> str:
        return self.image_path.stem


@dataclass(frozen=True)
class SeedDataset:
    """A parsed dataset JSON: classes and the samples of every split present."""

    path: Path
    num_classes: int
    class_names: tuple[str, ...]
    splits: dict[str, tuple[Sample, ...]] = field(default_factory=dict)
    class_colors: tuple[tuple[int, int, int], ...] | None = None

    def split(self, name: str, require_masks: bool = False) -> tuple[Sample, ...]:
        """Samples of split ``name``; with ``require_masks`` every sample must have a mask."""
        if name not in self.splits or not self.splits[name]:
            present = [s for s, items in self.splits.items() if items]
            raise DataError(
                f"Dataset '{self.path}' has no samples in split '{name}'.{closest(name, present)} "
                f"Splits present: {', '.join(present) or 'none'}."
            )
        samples = self.splits[name]
        if require_masks:
            missing = [s.image_path.name for s in samples if s.mask_path is None]
            if missing:
                raise DataError(
                    f"Split '{name}' of '{self.path}' has {len(missing)} images without mask_path "
                    f"(first: {', '.join(missing[:3])}); training and validation need a mask for every image."
                )
        return samples


def _resolve(base: Path, value: Any, what: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: '{what}' must be a non-empty path string, got {value!r}.")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_seed_json(path: str | Path, check_files: bool = True) -> SeedDataset:
    """Parse a seed dataset JSON, resolving relative paths against the JSON file's folder."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"Dataset JSON '{path}' does not exist (dataset.json_file / --input_json).")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"Dataset JSON '{path}' is not valid JSON: {exc}.") from exc
    if not isinstance(raw, dict) or "data" not in raw or "num_classes" not in raw:
        raise DataError(f"Dataset JSON '{path}' needs top-level 'num_classes' and 'data' keys (seed format).")
    num_classes = raw["num_classes"]
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise DataError(f"Dataset JSON '{path}': num_classes must be a positive integer, got {num_classes!r}.")
    names = raw.get("class_names") or [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(
            f"Dataset JSON '{path}' lists {len(names)} class_names for num_classes={num_classes}; "
            "give one name per class or leave class_names out."
        )
    colours = raw.get("class_colors")
    data = raw["data"]
    if not isinstance(data, dict):
        raise DataError(f"Dataset JSON '{path}': 'data' must map split names to lists of samples.")
    unknown = [k for k in data if k not in SPLITS]
    if unknown:
        raise DataError(
            f"Dataset JSON '{path}' has unknown split '{unknown[0]}'.{closest(unknown[0], SPLITS)} "
            f"Splits are: {', '.join(SPLITS)}."
        )
    base = path.parent
    splits: dict[str, tuple[Sample, ...]] = {}
    for split, items in data.items():
        samples = []
        for i, item in enumerate(items or []):
            where = f"Dataset JSON '{path}', data.{split}[{i}]"
            if not isinstance(item, dict):
                raise DataError(f"{where} must be an object with image_path and mask_path.")
            image = _resolve(base, item.get("image_path"), "image_path", where)
            mask_value = item.get("mask_path")
            mask = None if mask_value in (None, "") else _resolve(base, mask_value, "mask_path", where)
            if check_files:
                for label, file in (("image_path", image), ("mask_path", mask)):
                    if file is not None and not file.is_file():
                        raise DataError(f"{where}: {label} '{file}' does not exist.")
            samples.append(Sample(image, mask))
        splits[split] = tuple(samples)
    return SeedDataset(
        path=path,
        num_classes=num_classes,
        class_names=tuple(str(n) for n in names),
        splits=splits,
        class_colors=tuple(tuple(int(v) for v in c) for c in colours) if colours else None,
    )
