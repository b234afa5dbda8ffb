"""Reduced width: the store keeps wide backbones' tokens as their leading principal components.

A ViT-H token has 1536 channels; at 0.5 µm/px and patch 14 one tapped block of one mm² of tissue is
about 63 MB in float16, so a resection slide would need tens of GB. With ``width`` r the store keeps
``z = A (x - mu)`` per token instead (``A``: the r leading principal directions of the block's tokens,
``mu``: their mean; fitted once per backbone, weights, block and window on the first windows stored,
then shared by every slide), which cuts the store by C / r.

The live head then reads r channels. Every head that starts with a 1x1 projection of each grid
(``fast``, ``multilevel``, ``light``) composes exactly with that linear map: ``P z + b = (P A) x +
(b - P A mu)``. :func:`fold_head` writes the trained reduced head into the model's full-width head that
way, so the saved checkpoint is an ordinary one that reads the backbone's own features (``infer`` and
``evaluate`` need no basis) and computes what the live head computed.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, StorageError

if TYPE_CHECKING:
    from ..model import SegmentationModel

#: Heads whose first operation on each grid is a 1x1 convolution (``project``), so a basis folds into them.
FOLDABLE_HEADS = ("fast", "multilevel", "light")


class FeatureBasis:
    """Per consumed block: ``components`` (r, C) float32 with orthonormal rows and ``mean`` (C,)."""

    def __init__(self, components: Sequence[torch.Tensor], means: Sequence[torch.Tensor]):
        self.components = [c.float().contiguous() for c in components]
        self.means = [m.float().contiguous() for m in means]
        self._digest: str | None = None

    @property
    def width(self) -> int:
        return int(self.components[0].shape[0])

    @classmethod
    def fit(cls, grids: Sequence[torch.Tensor], width: int) -> FeatureBasis:
        """The ``width`` leading principal directions of each (N, C, h, w) grid's tokens."""
        components, means = [], []
        for grid in grids:
            tokens = grid.detach().double().permute(0, 2, 3, 1).reshape(-1, grid.shape[1]).cpu()
            if tokens.shape[0] < 2:
                raise ConfigError("Fitting a reduced width needs at least two tokens; store more windows first.")
            mean = tokens.mean(0)
            centred = tokens - mean
            values, vectors = torch.linalg.eigh(centred.T @ centred)
            order = values.argsort(descending=True)[:width]
            components.append(vectors[:, order].T.float())
            means.append(mean.float())
        return cls(components, means)

    def project(self, grids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(N, C, h, w) grids -> (N, r, h, w): ``A (x - mu)`` per token."""
        out = []
        for grid, a, mu in zip(grids, self.components, self.means, strict=True):
            a, mu = a.to(grid.device), mu.to(grid.device)
            out.append(torch.einsum("rc,nchw->nrhw", a, grid.float() - mu[None, :, None, None]))
        return out

    # --- on disk ------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays = {f"components_{i}": c.numpy() for i, c in enumerate(self.components)}
        arrays.update({f"mean_{i}": m.numpy() for i, m in enumerate(self.means)})
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub takes the names as one dict poorly
        return buffer.getvalue()

    def digest(self) -> str:
        """SHA-256 of the saved form (computed once: stores check it on every read of their flags)."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.to_bytes()).hexdigest()
        return self._digest

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file, then rename)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FeatureBasis:
        try:
            with np.load(path) as data:
                count = sum(1 for name in data.files if name.startswith("components_"))
                return cls([torch.from_numpy(data[f"components_{i}"]) for i in range(count)],
                           [torch.from_numpy(data[f"mean_{i}"]) for i in range(count)])
        except (OSError, ValueError, KeyError) as exc:
            raise StorageError(f"The feature basis '{path}' cannot be read ({exc}); delete that feature store "
                               "folder and fill it again.") from exc


# --- heads on reduced features ---------------------------------------------------------------------------
def _projections(head: nn.Module) -> list[nn.Conv2d]:
    project = getattr(head, "project", None)
    convs = list(project) if isinstance(project, nn.ModuleList) else [project]
    if not convs or not all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) for c in convs):
        raise ConfigError(f"Head {type(head).__name__} does not start with a 1x1 projection; a reduced width "
                          f"needs one of the heads {', '.join(FOLDABLE_HEADS)} (or the store's full width).")
    return [c for c in convs if isinstance(c, nn.Conv2d)]


def reduced_head(model: SegmentationModel, basis: FeatureBasis) -> nn.Module:
    """A head reading ``basis.width`` channels, started from ``model``'s head (its projections seen
    through the basis, so a loaded live head goes on from where it was)."""
    from ..heads import build_head
    from ..model import head_options

    config = model.config
    full = model.head
    levels = len(_projections(full))
    head = build_head(config.head, [basis.width] * levels, [], config.num_classes,
                      patch_size=model.patch_size, **head_options(config))
    head.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("project")}, strict=False)
    with torch.no_grad():
        for small, large, a, mu in zip(_projections(head), _projections(full), basis.components, basis.means,
                                       strict=True):
            weight = large.weight[:, :, 0, 0]
            small.weight.copy_((weight @ a.T)[:, :, None, None])
            if small.bias is not None and large.bias is not None:
                small.bias.copy_(large.bias + weight @ mu)
    return head.to(next(full.parameters()).device)


def fold_head(head: nn.Module, model: SegmentationModel, basis: FeatureBasis) -> None:
    """Write reduced ``head`` into ``model``'s full-width head: ``(P A) x + (b - P A mu)`` per projection."""
    full = model.head
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("project")}
    full.load_state_dict(state, strict=False)
    with torch.no_grad():
        for small, large, a, mu in zip(_projections(head), _projections(full), basis.components, basis.means,
                                       strict=True):
            a, mu = a.to(small.weight.device), mu.to(small.weight.device)
            weight = small.weight[:, :, 0, 0] @ a
            large.weight.copy_(weight[:, :, None, None])
            if large.bias is not None:
                bias = small.bias if small.bias is not None else torch.zeros_like(large.bias)
                large.bias.copy_(bias - weight @ mu)


def check_foldable(head_name: str) -> None:
    if head_name not in FOLDABLE_HEADS:
        raise ConfigError(f"A reduced feature width needs a head starting with a 1x1 projection "
                          f"({', '.join(FOLDABLE_HEADS)}); '{head_name}' is not one. Store the full width "
                          "(width=None) or choose one of those heads.")


__all__ = ["FOLDABLE_HEADS", "FeatureBasis", "check_foldable", "fold_head", "reduced_head"]
