"""Confidence intervals and tests that respect how segmentation results are correlated.

A score pooled over several training seeds and many images varies for two reasons: another seed gives
another model, and another evaluation set gives other images. Tiles cut from one slide (or one
patient) share staining, scanner and tissue, so they are not independent draws either. Resampling
images alone therefore hides seed-to-seed variation and treats correlated tiles as independent, which
makes intervals too narrow and "tied"/"below" verdicts overconfident.

**Hierarchical bootstrap.** Every interval here comes from a two-level bootstrap over the per-seed,
per-image confusion matrices ``stack[s, i]``:

1. draw as many seeds as there are, with replacement;
2. for each drawn seed, draw as many groups (slides, patients, or the images themselves when no group
   is known) as there are, with replacement, taking every image of a drawn group with it;
3. sum the matrices of the drawn (seed, group) pairs and compute the metric from that sum, exactly as
   the point estimate pools every seed and image.

The 2.5 and 97.5 percentiles of the replicates give the 95 % interval; replicates where a metric is
undefined (NaN) are left out. With a single seed the first level is the identity and the method is
the ordinary (group) bootstrap. All draws come from ``numpy.random.default_rng`` seeded by ``seed``,
so results are reproducible, and two stacks with the same numbers of seeds and groups see the same
draws, which is what makes :func:`paired_gap_test` paired.

**Groups.** :func:`resolve_groups` gives each image its unit: the dataset's ``group`` for it when
given, else the TCGA patient in its name (``TCGA-18-5592-01Z-00-DX1`` -> ``TCGA-18-5592``), else the
image alone.

**Paired gaps and multiple rows.** :func:`paired_gap_test` applies the same resamples to two stacks
and returns the percentile interval of the metric gap and its two-sided bootstrap p-value for a gap
of 0, ``p = min(1, 2 min(#(gap <= 0) + 1, #(gap >= 0) + 1) / (B + 1))`` (the +1 keeps a finite
number of resamples from claiming p = 0). Comparing several rows with one best row makes several
tests, so :func:`holm` adjusts their p-values (Holm's step-down method, which controls the
family-wise error rate without assuming independence).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..data.seed_json import tcga_patient
from ..metrics import PER_CLASS, SUMMARY, compute_metrics

#: Elements (replicates x seeds x groups) of one block of resampling weights, to bound memory.
_BLOCK = 1 << 22


@dataclass(frozen=True)
class Grouping:
    """Which resampling unit each image belongs to.

    ``ids[i]`` is image ``i``'s unit (0 .. ``n_units`` - 1), ``labels[u]`` names unit ``u`` and ``unit``
    says what the units are (``images``, ``patients``, ``slides``, ``groups`` ...), for reports; ``note``
    qualifies it where needed.
    """

    ids: np.ndarray
    labels: tuple[str, ...]
    unit: str
    note: str = ""

    @property
    def n_units(self) -> int:
        return len(self.labels)

    @property
    def n_images(self) -> int:
        return len(self.ids)

    def describe(self, n_seeds: int | None = None) -> str:
        """``seeds (n=3) > patients (n=12)``: the resampling levels, outermost first."""
        units = f"{self.unit} (n={self.n_units})"
        if self.unit != "images":
            units += f" of {self.n_images} images"
        if self.note:
            units += f" ({self.note})"
        return units if n_seeds is None else f"seeds (n={n_seeds}) > {units}"

    @classmethod
    def per_image(cls, n_images: int) -> Grouping:
        """Every image its own unit (the plain image bootstrap)."""
        return cls(np.arange(n_images), tuple(f"image {i}" for i in range(n_images)), "images")


def resolve_groups(names: Sequence[str], explicit: Mapping[str, str] | Sequence[str | None] | None = None,
                   explicit_unit: str = "groups") -> Grouping:
    """The resampling unit of every image (see the module docstring).

    ``explicit`` gives groups per image name (a mapping) or per position (a sequence, None where unknown);
    ``explicit_unit`` says what those groups are (``slides``, ``patients``, ...). The grouping's ``unit``
    is ``explicit_unit`` when every image has an explicit group, ``patients`` when every image's comes from
    a TCGA barcode, ``images`` when no image is grouped and ``groups`` for a mixture.

    When every image falls in one group, resampling that single group would give intervals of zero
    width, as if the score were certain; the images are then resampled instead and the grouping's
    ``note`` says that the intervals only hold the variation within that one slide or patient.
    """
    names = [str(n) for n in names]
    if explicit is None:
        given: list[str | None] = [None] * len(names)
    elif isinstance(explicit, Mapping):
        given = [explicit.get(n) for n in names]
    else:
        given = list(explicit)
        if len(given) != len(names):
            raise ValueError(f"{len(given)} groups for {len(names)} images.")
    labels: list[str] = []
    kinds: set[str] = set()
    for name, group in zip(names, given, strict=True):
        if group is not None and str(group) != "":
            labels.append(f"group:{group}")
            kinds.add("explicit")
        elif (patient := tcga_patient(name)) is not None:
            labels.append(f"patient:{patient}")
            kinds.add("patient")
        else:
            labels.append(f"image:{name}:{len(labels)}")
            kinds.add("image")
    unit = {frozenset({"explicit"}): explicit_unit, frozenset({"patient"}): "patients",
            frozenset({"image"}): "images"}.get(frozenset(kinds), "groups")
    if not names:
        unit = "images"
    order = list(dict.fromkeys(labels))
    if len(order) == 1 and len(names) > 1:
        single = unit[:-1] if unit.endswith("s") else unit
        return replace(Grouping.per_image(len(names)), note=f"all of one {single}: within-{single} variation only")
    index = {label: i for i, label in enumerate(order)}
    return Grouping(np.array([index[label] for label in labels], dtype=np.int64),
                    tuple(label.split(":", 1)[1] for label in order), unit)


def group_sums(stack: np.ndarray, grouping: Grouping) -> np.ndarray:
    """(S, G, C, C): each seed's matrices summed over the images of each group."""
    stack = np.asarray(stack, dtype=np.float64)
    out = np.zeros((stack.shape[0], grouping.n_units, *stack.shape[2:]))
    np.add.at(out, (slice(None), grouping.ids), stack)  # type: ignore[arg-type]  # numpy takes tuple indices; its stubs do not
    return out


def _weights(n_seeds: int, n_units: int, n_bootstrap: int, seed: int, slots: int) -> Iterator[np.ndarray]:
    """Blocks of resampling weights ``w[b, s, g]``: how often (seed s, group g) is in replicate b.

    Replicate b draws ``n_seeds`` seed slots; slot k picks seed ``floor(u[b, k] * n_seeds)`` and its own
    multinomial group counts. Draws are made for ``slots`` >= ``n_seeds`` slots and the first ``n_seeds``
    are used, so stacks with different seed counts still share their group draws slot by slot.
    """
    per_replicate = max(1, slots * n_units)
    block = max(1, _BLOCK // per_replicate)
    uniform = np.full(n_units, 1.0 / n_units)
    for number, start in enumerate(range(0, n_bootstrap, block)):
        size = min(block, n_bootstrap - start)
        rng = np.random.default_rng([seed, number])
        picks = np.minimum((rng.random((size, slots)) * n_seeds).astype(np.int64), n_seeds - 1)[:, :n_seeds]
        counts = rng.multinomial(n_units, uniform, size=(size, slots))[:, :n_seeds].astype(np.float64)
        weights = np.zeros((size, n_seeds, n_units))
        for s in range(n_seeds):
            weights[:, s] = np.einsum("bk,bkg->bg", (picks == s).astype(np.float64), counts)
        yield weights


def replicate_metrics(stack: np.ndarray, grouping: Grouping | None = None, n_bootstrap: int = 1000, seed: int = 0,
                      slots: int | None = None) -> dict[str, np.ndarray]:
    """Every metric of :func:`~pfmseg_engine.metrics.compute_metrics` on ``n_bootstrap`` replicates.

    ``stack`` is (S seeds, N images, C, C) (a single (N, C, C) stack is one seed). Returns arrays with a
    leading replicate axis (see the module docstring for the resampling).
    """
    stack = np.asarray(stack, dtype=np.float64)
    if stack.ndim == 3:
        stack = stack[None]
    if stack.ndim != 4 or stack.shape[0] == 0 or stack.shape[1] == 0:
        raise ValueError("The bootstrap needs a (seeds, images, C, C) stack with at least one seed and image.")
    grouping = grouping or Grouping.per_image(stack.shape[1])
    if grouping.n_images != stack.shape[1]:
        raise ValueError(f"The grouping covers {grouping.n_images} images but the stack has {stack.shape[1]}.")
    sums = group_sums(stack, grouping)
    slots = max(stack.shape[0], slots or 0)
    parts = [compute_metrics(np.einsum("bsg,sgij->bij", w, sums))
             for w in _weights(stack.shape[0], grouping.n_units, int(n_bootstrap), int(seed), slots)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    low, high = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    return (float(np.percentile(values, low)), float(np.percentile(values, high)))


def hierarchical_intervals(stack: np.ndarray, grouping: Grouping | None = None, n_bootstrap: int = 1000,
                           confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every metric of the hierarchical bootstrap.

    Keys match :func:`~pfmseg_engine.metrics.metrics_from_confusion`, so a report can put each
    value beside its interval.
    """
    arrays = replicate_metrics(stack, grouping, n_bootstrap, seed)
    out = {name: _percentiles(arrays[name], confidence) for name in SUMMARY}
    for name in PER_CLASS:
        for i in range(arrays[name].shape[-1]):
            out[f"{name}_Class_{i}"] = _percentiles(arrays[name][:, i], confidence)
    return out


@dataclass(frozen=True)
class GapTest:
    """``metric(a) - metric(b)``: percentile interval over paired replicates and two-sided p-value for 0."""

    low: float
    high: float
    p_value: float


def bootstrap_p_value(gaps: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a zero gap (see the module docstring); NaN replicates are left out."""
    gaps = np.asarray(gaps, dtype=np.float64)
    gaps = gaps[~np.isnan(gaps)]
    if gaps.size == 0:
        return float("nan")
    below, above = int((gaps <= 0).sum()), int((gaps >= 0).sum())
    return float(min(1.0, 2.0 * (min(below, above) + 1) / (gaps.size + 1)))


def paired_gap_test(a: np.ndarray, b: np.ndarray, grouping: Grouping | None = None, n_bootstrap: int = 1000,
                    seed: int = 0, metric: str = "mIoU", confidence: float = 0.95) -> GapTest:
    """The gap ``metric(a) - metric(b)`` of two (seeds, images, C, C) stacks over the same images.

    Both stacks are resampled with the same seed slots and group draws, so what the two have in common
    (hard images, a difficult patient) cancels out of the gap.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = (a[None] if a.ndim == 3 else a), (b[None] if b.ndim == 3 else b)
    slots = max(a.shape[0], b.shape[0])
    gap = (replicate_metrics(a, grouping, n_bootstrap, seed, slots)[metric]
           - replicate_metrics(b, grouping, n_bootstrap, seed, slots)[metric])
    low, high = _percentiles(gap, confidence)
    return GapTest(low, high, bootstrap_p_value(gap))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the given order; NaN stays NaN and does not count as a test.

    Sorted ascending, the j-th of m p-values (j from 1) becomes ``max_{i <= j} min(1, (m - i + 1) p_(i))``.
    """
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(values.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(values))
    m = len(valid)
    running = 0.0
    for rank, index in enumerate(valid[np.argsort(values[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * float(values[index])))
        adjusted[index] = running
    return adjusted.tolist()
