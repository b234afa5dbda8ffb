"""The geometry of whole-slide prediction: output chunks, the global window grid, and ownership.

Windows form one global grid over the image (exactly the grid :func:`predict_image` would use), so
the result does not depend on the chunk size. Each window is *owned* by the chunk containing its
start and computed exactly once, by that chunk. A window reaches at most into the right, lower and
lower-right neighbour chunks (chunks are at least a window wide); the owner hands those parts of its
accumulated logits on as *spills* (see :mod:`.spills`). So overlapping windows are never computed
twice, and every chunk can be finished as soon as its left, upper and upper-left neighbours are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .window import window_starts

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open, output pixels)

#: Directions a chunk receives spills from, as (dy, dx) offsets of the sender, in summation order.
INCOMING = (("left", 0, -1), ("top", -1, 0), ("topleft", -1, -1))


@dataclass
class ChunkPlan:
    """What one chunk does: which windows it owns (after tissue filtering) and what it receives."""

    index: tuple[int, int]
    box: Box
    windows: list[tuple[int, int]] = field(default_factory=list)
    senders: list[str] = field(default_factory=list)

    @property
    def computes(self) -> bool:
        return bool(self.windows)

    @property
    def active(self) -> bool:
        """Whether anything is written for this chunk (else it stays empty: no tissue near it)."""
        return bool(self.windows or self.senders)


@dataclass(frozen=True)
class WindowGrid:
    """Global window grid and output chunking of an (H, W) image."""

    shape: tuple[int, int]
    window: int
    stride: int
    chunk: int

    def __post_init__(self) -> None:
        if self.chunk < self.window:
            raise ValueError(f"chunk ({self.chunk}) must be at least the window ({self.window}).")

    @property
    def starts(self) -> tuple[list[int], list[int]]:
        return (window_starts(self.shape[0], self.window, self.stride),
                window_starts(self.shape[1], self.window, self.stride))

    @property
    def n_chunks(self) -> tuple[int, int]:
        return (-(-self.shape[0] // self.chunk), -(-self.shape[1] // self.chunk))

    def chunk_box(self, cy: int, cx: int) -> Box:
        c, (h, w) = self.chunk, self.shape
        return cy * c, min((cy + 1) * c, h), cx * c, min((cx + 1) * c, w)

    def footprint(self, y: int, x: int) -> Box:
        """Pixels a window starting at (y, x) covers (clipped: images smaller than a window are padded)."""
        return y, min(y + self.window, self.shape[0]), x, min(x + self.window, self.shape[1])

    def plan(self, keep: Callable[[Box], bool] | None = None) -> dict[tuple[int, int], ChunkPlan]:
        """Every chunk's owned windows (those ``keep`` accepts) and the neighbours that spill into it."""
        ys, xs = self.starts
        ny, nx = self.n_chunks
        plans = {(cy, cx): ChunkPlan((cy, cx), self.chunk_box(cy, cx))
                 for cy in range(ny) for cx in range(nx)}
        for y in ys:
            for x in xs:
                box = self.footprint(y, x)
                if keep is None or keep(box):
                    plans[(y // self.chunk, x // self.chunk)].windows.append((y, x))
        for (cy, cx), plan in plans.items():
            for direction, dy, dx in INCOMING:
                sender = plans.get((cy + dy, cx + dx))
                if sender is not None and self._reaches(sender, (cy, cx)):
                    plan.senders.append(direction)
        return plans

    def _reaches(self, sender: ChunkPlan, target: tuple[int, int]) -> bool:
        """Whether any window of ``sender`` covers pixels of chunk ``target``."""
        ty0, ty1, tx0, tx1 = self.chunk_box(*target)
        for y, x in sender.windows:
            y0, y1, x0, x1 = self.footprint(y, x)
            if y0 < ty1 and y1 > ty0 and x0 < tx1 and x1 > tx0:
                return True
        return False

    def accumulator_box(self, plan: ChunkPlan) -> Box:
        """The chunk plus whatever its owned windows reach beyond it (right/bottom only)."""
        y0, y1, x0, x1 = plan.box
        for y, x in plan.windows:
            _, wy1, _, wx1 = self.footprint(y, x)
            y1, x1 = max(y1, wy1), max(x1, wx1)
        return y0, y1, x0, x1

    def read_box(self, plan: ChunkPlan) -> Box:
        """Bounding box of the owned windows' footprints: the only pixels this chunk reads."""
        boxes = [self.footprint(y, x) for y, x in plan.windows]
        return (min(b[0] for b in boxes), max(b[1] for b in boxes),
                min(b[2] for b in boxes), max(b[3] for b in boxes))


def raster_order(plans: dict[tuple[int, int], ChunkPlan]) -> Iterator[ChunkPlan]:
    """Active chunks row by row: every chunk comes after the neighbours that spill into it."""
    for index in sorted(plans):
        if plans[index].active:
            yield plans[index]
