"""The frozen-feature cache: backbone features of the fixed crop set, computed once, memory-mapped on disk.

With a frozen backbone, training only changes the head (and a CNN adapter, which reads the image, not
the backbone); the backbone's features of a given input never change. When the training inputs come
from a fixed set (:class:`~.data.CropSetDataset`: fixed windows, exact D4 symmetries only), the
features of every (window, op) pair are computed once and then read from disk in every epoch, by every
head and every seed. Comparing N backbones then costs about N forward passes over the crop set plus
cheap head training.

**Key.** A cache directory is keyed by everything that decides the features: backbone name and
architecture settings (``tiny``), the weights file's *content* (SHA-256, memoised by path, size,
modification/change time and inode so it is hashed once), the timm version, the position table's grid
and resampling kernel (:mod:`~pfmseg_engine.backbones.positions`), the input normalisation and the crop
size; inside it, one folder per image keyed by the image's identity (seed datasets:
resolved path, size, modification time; annotations: what the caller passes, e.g. slide path and
resolution) and the crop grid. One file per (op, tapped block) holds the (windows, C, h, w) features
as a ``numpy`` memmap (``float32`` by default, which is exact; ``float16`` halves the disk), with a
small "done" flag file per op and block, replaced atomically after each batch: an interrupted fill
resumes, and a half-written row is never read. Changing the weights file (even at the same path)
changes the key, so stale features are never served. A feature file's disk space is reserved when it is
created, before any feature is computed: a full disk is then a one-line
:class:`~pfmseg_engine.errors.StorageError`, never a memory-mapped write the kernel answers with ``SIGBUS``.

**Exactness.** :func:`cached_forward` runs exactly the part of
:meth:`~pfmseg_engine.model.SegmentationModel.forward` after the backbone: the encoder's final norm on
the last grid where the model keeps it (``cup`` head), the CNN adapter on the normalised image, the
head. Strategies whose backbone trains (``full``, ``lora``, ``dora``), the Transformer adapter (it
reads the class and register tokens too) and the from-scratch ``unet`` are never cached
(:func:`cache_refusal` says why).

Validation and scoring always run the live model at native resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, StorageError, WeightsError
from .data import CropSetDataset, crop_positions, source_identity

log = logging.getLogger("pfmseg_engine.compare")

CACHE_FORMAT = 2  # 2: the key holds the position grid and kernel
DTYPES = ("float32", "float16")


# --- weights identity ----------------------------------------------------------------------------------------
def file_sha256(path: str | Path, memo: Path | None = None) -> str:
    """SHA-256 of a file, memoised in ``memo`` (JSON) by resolved path, size, mtime, ctime and inode."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    signature = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
    table: dict[str, Any] = {}
    if memo is not None and memo.is_file():
        try:
            table = json.loads(memo.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            table = {}
    entry = table.get(str(path))
    if entry and entry.get("stat") == signature:
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    if memo is not None:
        table[str(path)] = {"stat": signature, "sha256": value}
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
        os.replace(tmp, memo)
    return value


def weights_identity(weights: str | None, spec: Any, memo: Path | None = None) -> str:
    """What the features depend on of ``weights``: a content hash, ``random-init`` or an unresolved hub id.

    A hub model is hashed from the local hub cache (no network); before its first download it is named
    by its repository.
    """
    if not weights:
        return "random-init"  # the random init is seeded per backbone name (and tiny)
    if weights.startswith("hf-hub:"):
        repo = weights[len("hf-hub:"):] or spec.hf_hub_id
        try:
            from huggingface_hub import try_to_load_from_cache

            for name in spec.hf_filenames:
                found = try_to_load_from_cache(repo, name)
                if isinstance(found, str):
                    return "sha256:" + file_sha256(found, memo)
        except Exception:  # no hub client, unreadable cache: fall back to the id
            pass
        return f"hf-hub:{repo}"
    if not Path(weights).expanduser().is_file():
        raise WeightsError(f"Weights file '{weights}' does not exist. Give the path to the downloaded checkpoint "
                           "(safetensors, .bin, .pth) or an 'hf-hub:<repo>' id.")
    return "sha256:" + file_sha256(weights, memo)


# --- which models can use it ----------------------------------------------------------------------------------
def backbone_identity(backbone: Any, config: Any, weights_memo: Path | None = None) -> dict[str, Any]:
    """What makes a backbone's features what they are, for the keys of stores of its features: the
    architecture, the weights file's content, timm's version, the position table's grid and the kernel
    resampling it, and the input normalisation."""
    import timm

    spec = backbone.spec
    return {
        "backbone": spec.name,
        "architecture": spec.build_kwargs(config.tiny),
        "tiny": bool(config.tiny),
        "weights": weights_identity(config.weights, spec, weights_memo),
        "timm": str(timm.__version__),
        "positions": {"grid": list(backbone.position_grid),
                      "antialias": getattr(backbone.vit, "position_antialias", "timm")},
        "mean": list(spec.mean),
        "std": list(spec.std),
    }


def cache_refusal(model: Any) -> str | None:
    """Why ``model``'s backbone features cannot be cached (None: they can)."""
    spec = model.spec
    if spec.from_scratch:
        return f"{spec.name} is trained from scratch (every weight trains)"
    encoder = model.encoder
    if getattr(encoder, "transformer_adapter", None) is not None:
        return "the Transformer adapter reads the backbone's whole token sequence"
    if any(p.requires_grad for p in encoder.backbone.parameters()):
        return f"strategy '{model.config.tuning.strategy}' trains backbone weights"
    return None


def cached_forward(model: Any, batch: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """``model(images)`` with the backbone's grids taken from ``batch["features"]`` (the trainer's hook).

    The same computation as ``SegmentationModel.forward`` after the backbone; tests check the two agree.
    """
    encoder, backbone = model.encoder, model.encoder.backbone
    height, width = images.shape[-2:]
    x = backbone.pad_to_patch_multiple((images - model.mean) / model.std)
    dtype = model.mean.dtype
    grids = [g.to(images.device, dtype=dtype, non_blocking=True) for g in batch["features"]]
    if backbone.keeps_final_norm:  # per-token LayerNorm of the last block, as Encoder.forward applies it
        grids[-1] = backbone.vit.norm(grids[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    skips = encoder.cnn_adapter(x) if encoder.cnn_adapter is not None else []
    logits = model.head(grids, skips, out_size=tuple(x.shape[-2:]))
    return logits[..., :height, :width]


# --- the cache ------------------------------------------------------------------------------------------------
def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _save_flags(path: Path, flags: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        np.save(handle, flags)
    os.replace(tmp, path)


def _create_reserved(data_path: Path, flag_path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new zero ``.npy`` file at ``data_path`` with its disk space allocated, opened as a writable memmap.

    ``open_memmap`` makes a sparse file whose blocks are taken when a page is first written, and on a full
    disk that write ends the process with ``SIGBUS``; here the space is reserved before anything is mapped
    (:func:`~pfmseg_engine.storage.reserve`), so a full disk is an ``OSError`` now. The file is built
    under a temporary name, and the old done-flags are removed first: a failed or interrupted creation never
    leaves a feature file that looks complete.
    """
    from ..storage import reserve

    flag_path.unlink(missing_ok=True)
    tmp = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    try:
        with tmp.open("wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            handle.flush()
            offset = handle.tell()
            reserve(handle.fileno(), offset, int(np.prod(shape)) * dtype.itemsize)
        os.replace(tmp, data_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(data_path, mmap_mode="r+")


class FeatureCache:
    """Memory-mapped backbone features of one frozen backbone (see the module docstring).

    ``root`` may be shared by many comparisons and backbones; this object covers ``model``'s backbone
    and weights at ``crop`` pixels. :meth:`fill` computes what is missing for a
    :class:`~.data.CropSetDataset`, :meth:`store` returns what the dataset reads its features from.
    """

    def __init__(self, root: str | Path, model: Any, *, crop: int, dtype: str = "float32"):
        refusal = cache_refusal(model)
        if refusal:
            raise ConfigError(f"Backbone features of this model cannot be cached: {refusal}.")
        if dtype not in DTYPES:
            raise ConfigError(f"Feature cache dtype '{dtype}' is not one of {', '.join(DTYPES)}.")

        self.root = Path(root).expanduser()
        backbone = model.encoder.backbone
        spec, config = backbone.spec, model.config
        self.model = model
        self.crop, self.dtype = int(crop), dtype
        self.blocks = tuple(int(b) for b in backbone.feature_indices)
        self.key = {
            "format": CACHE_FORMAT,
            **backbone_identity(backbone, config, self.root / "weights_sha256.json"),
            "crop": self.crop,
            "dtype": dtype,
        }
        self.directory = self.root / f"{spec.name}{'-tiny' if config.tiny else ''}-{_digest(self.key)[:16]}"

    def __repr__(self) -> str:
        return f"FeatureCache({self.directory})"

    # --- layout -----------------------------------------------------------------------------------
    def image_dir(self, dataset: CropSetDataset, image: int) -> Path:
        source = dataset.source
        loaded, _ = source.load(image)
        grid = {"identity": source_identity(source, image), "shape": list(loaded.shape[:2]), "crop": dataset.crop,
                "stride": dataset.stride}
        return self.directory / _digest(grid)[:20]

    def _rows(self, dataset: CropSetDataset, image: int) -> tuple[dict[tuple[int, int], int], int]:
        loaded, _ = dataset.source.load(image)
        ys = crop_positions(loaded.shape[0], dataset.crop, dataset.stride)
        xs = crop_positions(loaded.shape[1], dataset.crop, dataset.stride)
        return {(y, x): i * len(xs) + j for i, y in enumerate(ys) for j, x in enumerate(xs)}, len(ys) * len(xs)

    def _grid_shape(self) -> tuple[int, int, int]:
        backbone = self.model.encoder.backbone
        side = -(-self.crop // backbone.patch_size)
        return backbone.embed_dim, side, side

    def _open(self, folder: Path, op: int, block: int, rows: int) -> tuple[np.memmap, np.ndarray, Path]:
        data_path = folder / f"op{op}_block{block}.npy"
        flag_path = folder / f"op{op}_block{block}.done.npy"
        shape = (rows, *self._grid_shape())
        array = flags = None
        if data_path.is_file() and flag_path.is_file():
            try:
                array = np.load(data_path, mmap_mode="r+")
                flags = np.load(flag_path)
                if array.shape != shape or flags.shape != (rows,) or array.dtype != np.dtype(self.dtype):
                    array = flags = None
            except (OSError, ValueError):
                array = flags = None
        if array is None or flags is None:
            from ..storage import writing

            with writing(data_path, "the feature cache"):
                folder.mkdir(parents=True, exist_ok=True)
                array = _create_reserved(data_path, flag_path, np.dtype(self.dtype), shape)
                flags = np.zeros(rows, dtype=bool)
                _save_flags(flag_path, flags)
        return array, flags, flag_path

    # --- filling ----------------------------------------------------------------------------------
    def missing_windows(self, dataset: CropSetDataset) -> int:
        """How many (window, op) features of ``dataset`` a fill would compute, read without creating files.

        What decides whether filling pays (``feature_cache`` ``auto``): a half-filled cache costs only
        what is missing.
        """
        missing = 0
        for image, box_indices in sorted(dataset.images_boxes.items()):
            folder = self.image_dir(dataset, image)
            rows, total_rows = self._rows(dataset, image)
            for op in dataset.ops:
                done = np.ones(total_rows, dtype=bool)
                for block in self.blocks:
                    try:
                        flags = np.load(folder / f"op{op}_block{block}.done.npy")
                    except (OSError, ValueError):
                        flags = None
                    if flags is None or flags.shape != (total_rows,):
                        done[:] = False
                        break
                    done &= flags
                missing += sum(1 for b in box_indices if not done[rows[(dataset.boxes[b].y, dataset.boxes[b].x)]])
        return missing

    def fill(self, dataset: CropSetDataset, *, device: Any = "cpu", batch_size: int = 8,
             progress: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None
             ) -> int:
        """Compute the features of every (window, op) of ``dataset`` not cached yet; returns how many.

        ``progress(done, total)`` reports windows computed; ``should_stop()`` ends early (what is
        written stays valid).
        """
        filling = self.iter_fill(dataset, device=device, batch_size=batch_size, should_stop=should_stop)
        while True:
            try:
                done, total = next(filling)
            except StopIteration as finished:
                return finished.value
            if progress is not None:
                progress(done, total)

    def iter_fill(self, dataset: CropSetDataset, *, device: Any = "cpu", batch_size: int = 8,
                  should_stop: Callable[[], bool] | None = None) -> Generator[tuple[int, int], None, int]:
        """:meth:`fill` as a generator of (done, total) after every batch; returns the number computed."""
        from ..storage import writing

        model = self.model
        backbone = model.encoder.backbone
        device = torch.device(device)
        mean, std = model.mean.to(device), model.std.to(device)
        was_training = backbone.training
        backbone.eval()
        key_file = self.directory / "key.json"
        with writing(self.directory, "the feature cache"):
            self.directory.mkdir(parents=True, exist_ok=True)
            if not key_file.is_file():
                key_file.write_text(json.dumps(self.key, indent=1, default=str), encoding="utf-8")
        work: list[tuple[Path, int, list[tuple[int, int]], int]] = []  # (folder, op, [(box index, row)], rows)
        for image, box_indices in sorted(dataset.images_boxes.items()):
            folder = self.image_dir(dataset, image)
            rows, total_rows = self._rows(dataset, image)
            for op in dataset.ops:
                missing = []
                flags_per_block = [self._open(folder, op, block, total_rows)[1] for block in self.blocks]
                for box_index in box_indices:
                    box = dataset.boxes[box_index]
                    row = rows[(box.y, box.x)]
                    if not all(flags[row] for flags in flags_per_block):
                        missing.append((box_index, row))
                if missing:
                    work.append((folder, op, missing, total_rows))
        total = sum(len(m) for _, _, m, _ in work)
        done = 0
        started = time.perf_counter()
        try:
            with writing(self.directory, "the feature cache"), torch.inference_mode():
                for folder, op, missing, total_rows in work:
                    opened = [self._open(folder, op, block, total_rows) for block in self.blocks]
                    for start in range(0, len(missing), batch_size):
                        if should_stop is not None and should_stop():
                            return done
                        part = missing[start:start + batch_size]
                        x = torch.stack([dataset.window(box_index, op)[0] for box_index, _ in part]).to(device)
                        grids = backbone.features((x - mean) / std)
                        for (array, flags, flag_path), grid in zip(opened, grids, strict=True):
                            values = grid.float().cpu().numpy().astype(self.dtype, copy=False)
                            for (_, row), value in zip(part, values, strict=True):
                                array[row] = value
                            array.flush()
                            for _, row in part:
                                flags[row] = True
                            _save_flags(flag_path, flags)
                        done += len(part)
                        yield done, total
        finally:
            backbone.train(was_training)
        if total:
            log.info("Feature cache %s: computed %d window(s) in %.1f s.", self.directory.name, total,
                     time.perf_counter() - started)
        return done

    def store(self, dataset: CropSetDataset) -> FeatureStore:
        """What ``dataset.attach_features`` needs: every window's (op, block) features, read on demand."""
        locations: list[tuple[Path, int]] = []
        rows_of: dict[int, tuple[Path, dict[tuple[int, int], int], int]] = {}
        for image in sorted(dataset.images_boxes):
            rows, total = self._rows(dataset, image)
            rows_of[image] = (self.image_dir(dataset, image), rows, total)
        for box in dataset.boxes:
            folder, rows, _ = rows_of[box.image]
            locations.append((folder, rows[(box.y, box.x)]))
        return FeatureStore(locations, self.blocks)


class FeatureStore:
    """Reads cached features: ``read(box index, op)`` -> one (C, h, w) float32 tensor per tapped block.

    Memmaps are opened lazily in whichever process reads (data-loader workers included) and are not
    pickled; a window whose features are missing is an error naming the cache.
    """

    def __init__(self, locations: Sequence[tuple[Path, int]], blocks: Sequence[int]):
        self.locations = list(locations)
        self.blocks = tuple(blocks)
        self._open: dict[tuple[Path, int, int], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"locations": self.locations, "blocks": self.blocks, "_open": {}}

    def _array(self, folder: Path, op: int, block: int) -> np.ndarray:
        key = (folder, op, block)
        array = self._open.get(key)
        if array is None:
            path = folder / f"op{op}_block{block}.npy"
            try:
                array = self._open[key] = np.load(path, mmap_mode="r")
            except OSError as exc:
                raise StorageError(f"Cached features '{path}' cannot be read ({exc}); delete the feature cache "
                                   "folder and run again.") from exc
        return array

    def read(self, box_index: int, op: int) -> list[torch.Tensor]:
        folder, row = self.locations[box_index]
        return [torch.from_numpy(np.array(self._array(folder, op, block)[row], dtype=np.float32))
                for block in self.blocks]


def live_features(model: Any, dataset: CropSetDataset, box_index: int, op: int) -> list[torch.Tensor]:
    """The backbone's features of one window computed now (what the cache must equal)."""
    image, _ = dataset.window(box_index, op)
    with torch.inference_mode():
        x = (image[None] - model.mean.cpu()) / model.std.cpu()
        return [g[0] for g in model.encoder.backbone.features(x)]


__all__ = [
    "DTYPES",
    "FeatureCache",
    "FeatureStore",
    "backbone_identity",
    "cache_refusal",
    "cached_forward",
    "file_sha256",
    "live_features",
    "weights_identity",
]
