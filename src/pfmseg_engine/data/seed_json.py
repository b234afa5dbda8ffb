"""The seed framework's dataset description: one JSON file listing images and masks per split.

Format::

    {"num_classes": 3, "class_names": ["tumor", "stroma", "bg"],       # class_names optional
     "class_colors": [[255, 0, 0], [0, 255, 0], [0, 0, 255]],          # optional, for RGB masks
     "data": {"train": [{"image_path": "...", "mask_path": "...", "group": "patient-7"}],  # group optional
              "val": [...], "test": [{"image_path": "...", "mask_path": null}]}}

Relative paths resolve against the JSON file's own folder, so a dataset folder can be moved or
shared as a whole. Entries whose mask is null or missing are allowed (test-time prediction) and
simply carry ``mask_path=None``; training and validation refuse them with a clear error.

``group`` (optional, an extension of the seed format) names the slide or patient an image was cut
from. Tiles of one slide are not independent samples, so confidence intervals resample groups as
units (:mod:`pfmseg_engine.training.statistics`); without it a TCGA barcode in the file name gives the
patient (:func:`tcga_patient`).

**Splits must not share images.** An image in two splits (the same file, or two files with identical
bytes) makes validation and test scores measure memorised images, and nothing in the scores shows
it, so loading refuses such a file. Comparing contents stays cheap on large datasets: only files
of equal size in different splits are hashed, in chunks.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..classes import default_class_names
from ..errors import DataError, closest

SPLITS = ("train", "val", "test")

#: A TCGA barcode's patient part (project-TSS-participant), e.g. ``TCGA-18-5592`` of ``TCGA-18-5592-01Z-00-DX1``.
TCGA_PATIENT = re.compile(r"(?<![A-Za-z0-9])TCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4}(?![A-Za-z0-9])", re.IGNORECASE)

_HASH_CHUNK = 1 << 20
_MAX_LISTED = 5


@dataclass(frozen=True)
class Sample:
    """One image and its (optional) mask, both as absolute paths, and the slide/patient ``group`` if given."""

    image_path: Path
    mask_path: Path | None
    group: str | None = None

    @property
    def name(self) -> str:
        return self.image_path.stem


def tcga_patient(name: str) -> str | None:
    """The TCGA patient (``TCGA-TSS-PPPP``, upper case) a file name's barcode belongs to, or None.

    Tiles and slides of one TCGA patient share this prefix whatever their sample, portion and slide
    suffixes, so it is the unit that keeps correlated images together when resampling.
    """
    match = TCGA_PATIENT.search(Path(str(name)).name)
    return match.group(0).upper() if match else None


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


def _group(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: 'group' must be a slide or patient name (a string), got {value!r}.")
    return str(value)


def load_seed_json(path: str | Path, check_files: bool = True) -> SeedDataset:
    """Parse a seed dataset JSON, resolving relative paths against the JSON file's folder.

    Refuses a file whose splits share an image (see the module docstring): by resolved path always,
    by content too when ``check_files``.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"Dataset JSON '{path}' does not exist (dataset.json_file).", fix_with=("dataset.json_file",))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"Dataset JSON '{path}' is not valid JSON: {exc}.") from exc
    if not isinstance(raw, dict) or "data" not in raw or "num_classes" not in raw:
        raise DataError(f"Dataset JSON '{path}' needs top-level 'num_classes' and 'data' keys (seed format).")
    num_classes = raw["num_classes"]
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise DataError(f"Dataset JSON '{path}': num_classes must be a positive integer, got {num_classes!r}.")
    names = raw.get("class_names") or list(default_class_names(num_classes))
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
            samples.append(Sample(image, mask, _group(item.get("group"), where)))
        splits[split] = tuple(samples)
    check_disjoint_splits(path, splits, by_content=check_files)
    return SeedDataset(
        path=path,
        num_classes=num_classes,
        class_names=tuple(str(n) for n in names),
        splits=splits,
        class_colors=cast("tuple[tuple[int, int, int], ...]", tuple(tuple(int(v) for v in c) for c in colours))
        if colours else None,
    )


# --- splits share no image ---------------------------------------------------------------------------------
def check_disjoint_splits(path: Path, splits: dict[str, tuple[Sample, ...]], by_content: bool = True) -> None:
    """Raise a :class:`DataError` naming every image found in more than one split (see the module docstring).

    Two entries are the same image when their paths resolve to the same file or, with ``by_content``,
    when their files hold identical bytes (SHA-256). Sizes are compared first, so only files of equal
    size listed in different splits are read.
    """
    where: dict[Path, list[str]] = defaultdict(list)
    for split, samples in splits.items():
        for sample in samples:
            file = sample.image_path.resolve()
            if split not in where[file]:
                where[file].append(split)
    problems = [f"'{_shown(file, path.parent)}' is listed in {' and '.join(names)}"
                for file, names in where.items() if len(names) > 1]
    if by_content:
        problems += _same_content(where, path.parent)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(
            f"Dataset JSON '{path}' has images in more than one split: {listed}{more}. Validation and test "
            "scores would then include images the model trained on or was selected on; keep each image (and its "
            "copies) in one split only by removing it from the others."
        )


def _same_content(where: dict[Path, list[str]], base: Path) -> list[str]:
    """Descriptions of files in different splits with identical bytes (only equal sizes are hashed)."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for file in where:
        try:
            by_size[file.stat().st_size].append(file)
        except OSError:
            continue  # a missing file is reported where it is read
    problems = []
    for files in by_size.values():
        if len({split for file in files for split in where[file]}) < 2:
            continue
        by_hash: dict[str, list[Path]] = defaultdict(list)
        for file in files:
            by_hash[_sha256(file)].append(file)
        for digest, same in by_hash.items():
            if len(same) > 1 and len({split for file in same for split in where[file]}) > 1:
                copies = " and ".join(f"'{_shown(f, base)}' ({', '.join(where[f])})" for f in same)
                problems.append(f"{copies} have identical content (sha256 {digest[:12]})")
    return problems


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _shown(file: Path, base: Path) -> str:
    """``file`` relative to the dataset folder when inside it (as the JSON writes it), else absolute."""
    try:
        return str(file.relative_to(base.resolve()))
    except ValueError:
        return str(file)
