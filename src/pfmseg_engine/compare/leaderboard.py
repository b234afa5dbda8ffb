"""The leaderboard: one row per backbone x strategy, ranked by mIoU, with hierarchical bootstrap intervals.

**Point estimates.** Every run (one seed) scores the same evaluation images and keeps one confusion
matrix per image. A row's metrics come from the sum of its seeds' matrices over all images
(pixel-pooled, as ``evaluate`` does).

**Intervals.** The 95 % confidence intervals come from the hierarchical bootstrap of
:mod:`pfmseg_engine.training.statistics`: seeds are resampled with replacement, then, within each drawn
seed, the groups of images (the dataset's ``group`` per image, else the TCGA patient of its name, else
the image alone) with replacement, and the metric is computed from the resample's pooled matrix. The
intervals therefore hold both seed-to-seed variation and the variation of the evaluation set, with
correlated tiles of one slide or patient moving together. ``ci_resampling`` (and the markdown's first
line) says which levels were resampled and how many units each had; ``*_seed_sd`` still gives the plain
spread between seeds.

**Versus the best row.** Every other row is compared with the top row by a paired bootstrap over the
same resampled seed slots and groups: ``mIoU_gap_to_best_ci_*`` is the 95 % percentile interval of the
mIoU gap, ``mIoU_gap_p`` its two-sided bootstrap p-value for a gap of 0, and ``mIoU_gap_p_holm`` that
p-value after Holm's step-down adjustment over all the rows compared with the best. ``vs_best`` is
``below`` when the adjusted p-value is under 0.05, ``tied`` otherwise, so a leaderboard of many rows does
not call training noise a difference.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import csvsafe
from ..metrics import metrics_from_confusion
from ..training.statistics import hierarchical_intervals, holm, paired_gap_test, resolve_groups

#: Metrics with a column (and CI columns) each, in display order.
METRICS: tuple[str, ...] = ("mIoU", "Mean_Dice", "Pixel_Accuracy")
LABELS = {"mIoU": "mIoU", "Mean_Dice": "mean Dice", "Pixel_Accuracy": "pixel accuracy"}

#: Family-wise error rate of the ``vs_best`` verdicts (on Holm-adjusted p-values).
ALPHA = 0.05


@dataclass
class LeaderboardRow:
    """One backbone x strategy; ``status`` is ok, partial (some seeds failed), failed or pending."""

    pfm: str
    strategy: str
    status: str
    head: str = ""
    rank: int | None = None
    seeds: list[int] = field(default_factory=list)
    n_images: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    seed_sd: dict[str, float] = field(default_factory=dict)
    class_dice: dict[str, float] = field(default_factory=dict)
    class_dice_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    gap_to_best: tuple[float, float] | None = None
    gap_p: float | None = None
    gap_p_holm: float | None = None
    vs_best: str = ""
    ci_resampling: str = ""
    trainable_params: int | None = None
    train_seconds: float | None = None
    windows_per_second: float | None = None
    feature_cache: str = ""
    cache_seconds: float | None = None
    checkpoint: str = ""
    error: str = ""
    note: str = ""  # why a row scores 0, or why some of its runs did not run
    random_weights: bool = False
    source: str = ""  # the checkpoint file's name for a checkpoint scored as it is; empty for trained rows

    @property
    def name(self) -> str:
        """The row's unique name: the checkpoint file's for a checkpoint row, else ``<pfm>__<strategy>``."""
        return self.source or f"{self.pfm}__{self.strategy}"

    @property
    def label(self) -> str:
        return f"{self.source} ({self.pfm} / {self.strategy})" if self.source else f"{self.pfm} / {self.strategy}"

    @property
    def backbone_cell(self) -> str:
        """The markdown backbone cell: a checkpoint row also names its file."""
        return f"`{self.pfm}` (checkpoint `{self.source}`)" if self.source else f"`{self.pfm}`"

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "partial") and bool(self.metrics)


@dataclass
class Leaderboard:
    """Ranked rows (best mIoU first; rows without results last) plus what they were scored on."""

    rows: list[LeaderboardRow]
    class_names: tuple[str, ...]
    eval_split: str
    n_bootstrap: int
    notes: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)

    @property
    def resampling(self) -> str:
        """What the intervals resample, e.g. ``seeds (n=3) > patients (n=4) of 4 images`` (rows may differ in seeds)."""
        described = list(dict.fromkeys(row.ci_resampling for row in self.rows if row.ok and row.ci_resampling))
        return "; ".join(described)

    @property
    def winner(self) -> LeaderboardRow | None:
        return next((row for row in self.rows if row.ok), None)

    @property
    def failed(self) -> list[LeaderboardRow]:
        return [row for row in self.rows if row.status in ("failed", "partial")]

    # --- files ------------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        cols = ["rank", "name", "pfm", "strategy", "head", "status", "seeds", "eval_split", "n_images", "ci_resampling"]
        for metric in METRICS:
            cols += [metric, f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_seed_sd"]
        cols += ["mIoU_gap_to_best_ci_low", "mIoU_gap_to_best_ci_high", "mIoU_gap_p", "mIoU_gap_p_holm", "vs_best"]
        for name in self.class_names:
            key = _column_name(name)
            cols += [f"Dice_{key}", f"Dice_{key}_ci_low", f"Dice_{key}_ci_high"]
        cols += ["trainable_params", "train_seconds", "cache_seconds", "inference_windows_per_s", "feature_cache",
                 "checkpoint", "error", "note"]
        return cols

    def records(self) -> list[dict[str, Any]]:
        out = []
        for row in self.rows:
            record: dict[str, Any] = {
                "rank": row.rank, "name": row.name, "pfm": row.pfm, "strategy": row.strategy, "head": row.head,
                "status": row.status,
                "seeds": " ".join(str(s) for s in row.seeds), "eval_split": self.eval_split,
                "n_images": row.n_images, "ci_resampling": row.ci_resampling,
            }
            for metric in METRICS:
                low, high = row.intervals.get(metric, (math.nan, math.nan))
                record.update({metric: row.metrics.get(metric), f"{metric}_ci_low": low, f"{metric}_ci_high": high,
                               f"{metric}_seed_sd": row.seed_sd.get(metric)})
            gap = row.gap_to_best or (None, None)
            record.update({"mIoU_gap_to_best_ci_low": gap[0], "mIoU_gap_to_best_ci_high": gap[1],
                           "mIoU_gap_p": row.gap_p, "mIoU_gap_p_holm": row.gap_p_holm, "vs_best": row.vs_best})
            for name in self.class_names:
                key = _column_name(name)
                low, high = row.class_dice_intervals.get(name, (math.nan, math.nan))
                record.update({f"Dice_{key}": row.class_dice.get(name), f"Dice_{key}_ci_low": low,
                               f"Dice_{key}_ci_high": high})
            record.update({"trainable_params": row.trainable_params, "train_seconds": row.train_seconds,
                           "cache_seconds": row.cache_seconds, "inference_windows_per_s": row.windows_per_second,
                           "feature_cache": row.feature_cache, "checkpoint": row.checkpoint, "error": row.error,
                           "note": row.note})
            out.append(record)
        return out

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csvsafe.DictWriter(buffer, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        for record in self.records():
            writer.writerow({k: _csv_value(v) for k, v in record.items()})
        return buffer.getvalue()

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            data = asdict(row)
            data["intervals"] = {k: list(v) for k, v in row.intervals.items()}
            data["class_dice_intervals"] = {k: list(v) for k, v in row.class_dice_intervals.items()}
            rows.append(data)
        winner = self.winner
        return {"eval_split": self.eval_split, "class_names": list(self.class_names), "n_bootstrap": self.n_bootstrap,
                "ci_resampling": self.resampling, "vs_best_alpha": ALPHA, "p_value_adjustment": "holm",
                "notes": self.notes, "winner": None if winner is None else {
                    "name": winner.name, "pfm": winner.pfm, "strategy": winner.strategy,
                    "checkpoint": winner.checkpoint},
                "next_steps": self.next_steps, "rows": rows}

    def to_markdown(self) -> str:
        seeds = sorted({len(r.seeds) for r in self.rows if r.ok and r.seeds})  # checkpoint rows have none
        n_images = max((r.n_images for r in self.rows), default=0)
        lines = [
            "# Leaderboard",
            "",
            f"CI: bootstrap over {self.resampling or 'seeds > images'}",
            "",
            f"Scored on **{self.eval_split}** ({n_images} images); "
            f"{self._seeds_per_row(seeds)}; metrics pooled over images and seeds; "
            f"[95 % CI] from {self.n_bootstrap} hierarchical bootstrap resamples (seeds, then the groups of images "
            "within each drawn seed). `p (Holm)`: paired bootstrap p-value of the mIoU gap to the top row, "
            f"Holm-adjusted over the rows compared; `vs best` is `below` when it is under {ALPHA:g}, else `tied`.",
            "",
            "| rank | backbone | strategy | mIoU [95 % CI] | mean Dice [95 % CI] | pixel accuracy [95 % CI] "
            "| p (Holm) | vs best | trainable params | train s | cache s | windows/s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.rows:
            if not row.ok:
                continue
            cells = [str(row.rank), row.backbone_cell, row.strategy]
            cells += [_with_ci(row.metrics.get(m), row.intervals.get(m)) for m in METRICS]
            cells += [_p_value(row.gap_p_holm), row.vs_best or "", _count(row.trainable_params),
                      _number(row.train_seconds, 1), _number(row.cache_seconds, 1),
                      _number(row.windows_per_second, 1)]
            lines.append("| " + " | ".join(cells) + " |")
        if any(row.ok for row in self.rows):
            lines += ["", "Per-class Dice [95 % CI]:", "",
                      "| backbone | strategy | " + " | ".join(self.class_names) + " |",
                      "| --- | --- | " + " | ".join("---" for _ in self.class_names) + " |"]
            for row in self.rows:
                if row.ok:
                    cells = [_with_ci(row.class_dice.get(n), row.class_dice_intervals.get(n)) for n in self.class_names]
                    lines.append(f"| {row.backbone_cell} | {row.strategy} | " + " | ".join(cells) + " |")
        problems = [row for row in self.rows if row.error]
        if problems:
            lines += ["", "Failed:", ""]
            lines += [f"- {row.backbone_cell} / {row.strategy} ({row.status}): {row.error}" for row in problems]
        pending = [row for row in self.rows if row.status == "pending"]
        if pending:
            lines += ["", "Not run yet: " + ", ".join(f"`{r.pfm}` / {r.strategy}" for r in pending) + "."]
        noted = [row for row in self.rows if row.note]
        if noted:
            lines += ["", "Notes:", ""] + [f"- {row.backbone_cell} / {row.strategy}: {row.note}" for row in noted]
        if self.notes:
            lines += ["", *[f"- {note}" for note in self.notes]]
        if self.next_steps:
            lines += ["", "Next steps with the winner:", "", "```bash", *self.next_steps, "```"]
        return "\n".join(lines) + "\n"

    def _seeds_per_row(self, seeds: list[int]) -> str:
        """``2 seed(s) per row``; checkpoint rows, scored once as they are, are said apart."""
        checkpoints = any(row.ok and row.source for row in self.rows)
        if not seeds:
            return "each checkpoint scored once" if checkpoints else "no seeds"
        return f"{'/'.join(map(str, seeds))} seed(s) per {'trained ' if checkpoints else ''}row" + (
            ", each checkpoint scored once" if checkpoints else "")

    def table(self) -> str:
        """A plain-text ranking for the terminal."""
        lines = [f"CI: bootstrap over {self.resampling or 'seeds > images'}",
                 f"{'rank':>4}  {'backbone / strategy':<34} {'mIoU [95% CI]':<26} {'mean Dice':>9}  {'p (Holm)':>8}  "
                 f"{'vs best':<8} status"]
        for row in self.rows:
            score = _with_ci(row.metrics.get("mIoU"), row.intervals.get("mIoU")) if row.ok else "-"
            dice = _number(row.metrics.get("Mean_Dice"), 4) if row.ok else "-"
            status = row.status + (f": {row.error}" if row.error else "") + (f" ({row.note})" if row.note else "")
            lines.append(f"{row.rank or '-':>4}  {row.label:<34} {score:<26} {dice:>9}  {_p_value(row.gap_p_holm):>8}  "
                         f"{row.vs_best:<8} {status}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """``leaderboard.png``: per metric, each row's pooled value with its 95 % CI as an error bar."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = [row for row in self.rows if row.ok]
        if not rows:
            return self._plot_without_results(path)
        height = 1.2 + 0.35 * max(1, len(rows))
        figure = Figure(figsize=(4.2 * len(METRICS), height), dpi=110, layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(METRICS), sharey=True, squeeze=False)[0]
        positions = np.arange(len(rows))[::-1]
        colours = ["#2ca02c" if row.rank == 1 else "#1f77b4" for row in rows]
        for axis, metric in zip(axes, METRICS, strict=True):
            values = np.array([row.metrics.get(metric, math.nan) for row in rows], dtype=float)
            lows = np.array([row.intervals.get(metric, (math.nan, math.nan))[0] for row in rows], dtype=float)
            highs = np.array([row.intervals.get(metric, (math.nan, math.nan))[1] for row in rows], dtype=float)
            errors = np.vstack([np.clip(values - lows, 0, None), np.clip(highs - values, 0, None)])
            axis.barh(positions, values, xerr=np.nan_to_num(errors), color=colours, capsize=3, height=0.6)
            axis.set_title(LABELS[metric])
            axis.set_xlim(0, 1)
            axis.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(positions, [row.label for row in rows])
        figure.suptitle(f"Scored on {self.eval_split}: pooled over images and seeds; 95 % CI: bootstrap over "
                        f"{self.resampling or 'seeds > images'}")
        return _save_figure(figure, path)

    def _plot_without_results(self, path: str | Path) -> Path:
        """The figure when no row has scores (every run failed, or none finished): each row's status and
        error, so the picture replaces any earlier ranking instead of leaving a stale one beside the tables."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        failed = all(row.status == "failed" for row in self.rows) and bool(self.rows)
        title = "Every row failed: no scores" if failed else "No row has scores yet"
        lines = [f"{row.label}: {row.status}" + (f": {_shorten(row.error, 110)}" if row.error else "")
                 for row in self.rows] or ["(no rows)"]
        figure = Figure(figsize=(4.2 * len(METRICS), 1.2 + 0.3 * len(lines)), dpi=110, layout="constrained")
        FigureCanvasAgg(figure)
        axis = figure.subplots()
        axis.set_axis_off()
        axis.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8,
                  transform=axis.transAxes, parse_math=False)  # paths and messages may hold '$'
        figure.suptitle(f"{title} (scored on {self.eval_split}); see leaderboard.md for the errors")
        return _save_figure(figure, path)

    def write(self, directory: str | Path, plot: bool = True) -> dict[str, Path]:
        """``leaderboard.csv``, ``leaderboard.md``, ``leaderboard.json`` (and ``leaderboard.png``) in ``directory``."""
        from ..training.history import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"csv": directory / "leaderboard.csv", "md": directory / "leaderboard.md",
                 "json": directory / "leaderboard.json"}
        atomic_write_text(paths["csv"], self.to_csv())
        atomic_write_text(paths["md"], self.to_markdown())
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=1, default=_json_default))
        if plot:
            paths["png"] = self.plot(directory / "leaderboard.png")
        return paths


# --- building ---------------------------------------------------------------------------------------------------
def seed_stack(runs: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """The runs' per-image confusion matrices as one (seeds, images, C, C) stack, and the image names.

    Runs normally scored the same images in the same order. Runs that scored other images (which only
    happens when the data changed between runs) are aligned on the union of their images, with zero
    matrices where a run did not score an image: the pooled sums, and so the point estimate, are those
    of the concatenated matrices.
    """
    names = list(runs[0]["image_names"])
    stacks = [np.asarray(r["confusions"], dtype=np.float64) for r in runs]
    if all(list(r["image_names"]) == names for r in runs):
        return np.stack(stacks), names
    keys = [_occurrences(r["image_names"]) for r in runs]
    union = list(dict.fromkeys(key for run_keys in keys for key in run_keys))
    position = {key: i for i, key in enumerate(union)}
    out = np.zeros((len(runs), len(union), *stacks[0].shape[1:]))
    for s, (run_keys, matrices) in enumerate(zip(keys, stacks, strict=True)):
        out[s, [position[key] for key in run_keys]] = matrices
    return out, [name for name, _ in union]


def _occurrences(names: list[str]) -> list[tuple[str, int]]:
    """(name, how many times it appeared before): keys that stay distinct when two images share a name."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        out.append((name, seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
    return out


def build_row(pfm: str, strategy: str, runs: list[dict[str, Any]], class_names: tuple[str, ...], *,
              n_bootstrap: int, error: str = "", expected_seeds: int = 0, groups: Mapping[str, str] | None = None,
              group_unit: str = "groups", scored_on: str = "the scoring images", note: str = "",
              source: str = "") -> LeaderboardRow:
    """A row from the ``result.json`` payloads of its finished seeds (see the module docstring).

    ``groups`` maps image names to their slide or patient (``group_unit`` says which); images without
    one are grouped by the TCGA patient in their name, else stand alone. ``note`` says why some runs did
    not run. ``source`` names a checkpoint scored as it is: its single run has no seed (``seed`` None), so
    its intervals resample the images only. A row whose predictions never meet its scoring images' classes
    gets a note saying so (:func:`zero_score_reason`), since its scores of 0 say nothing else.
    """
    ok = [r for r in runs if r.get("status") == "ok"]
    status = "ok" if ok and not error else ("partial" if ok else ("failed" if error else "pending"))
    if ok and expected_seeds and len(ok) < expected_seeds and not error:
        status = "partial"
    row = LeaderboardRow(pfm=pfm, strategy=strategy, status=status, error=error, note=note, source=source)
    if not ok:
        return row
    stack, names = seed_stack(ok)
    grouping = resolve_groups(names, groups, group_unit)
    point = metrics_from_confusion(stack.sum((0, 1)))
    intervals = hierarchical_intervals(stack, grouping, n_bootstrap, seed=0)
    row.head = ok[0].get("head", "")
    row.seeds = [int(r["seed"]) for r in ok if r.get("seed") is not None]
    row.n_images = len(ok[0]["image_names"])
    row.ci_resampling = grouping.describe(len(row.seeds)) if row.seeds else grouping.describe()
    row.metrics = {m: point[m] for m in METRICS}
    row.intervals = {m: intervals[m] for m in METRICS}
    for metric in METRICS:
        values = [float(r["metrics"][metric]) for r in ok if r["metrics"].get(metric) is not None]
        values = [v for v in values if not math.isnan(v)]
        row.seed_sd[metric] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    for i, name in enumerate(class_names):
        row.class_dice[name] = point.get(f"Dice_Class_{i}", math.nan)
        row.class_dice_intervals[name] = intervals.get(f"Dice_Class_{i}", (math.nan, math.nan))
    reason = zero_score_reason(stack.sum((0, 1)), class_names, scored_on)
    if reason:
        row.note = "; ".join(n for n in (reason, note) if n)
    row.trainable_params = int(ok[0]["trainable_params"])
    row.train_seconds = float(np.mean([r["train_seconds"] for r in ok]))
    row.cache_seconds = float(np.mean([float(r.get("cache_seconds") or 0.0) for r in ok]))
    speeds = [r["windows_per_second"] for r in ok if r.get("windows_per_second")]
    row.windows_per_second = float(np.mean(speeds)) if speeds else None
    row.feature_cache = ok[0].get("feature_cache", "")
    row.random_weights = any(r.get("random_weights") for r in ok)
    best_seed = max(ok, key=lambda r: _sortable(r["metrics"].get("mIoU")))
    row.checkpoint = str(best_seed.get("checkpoint", ""))
    row._stack = stack  # type: ignore[attr-defined]  # kept for the paired comparison with the best row
    row._names = names  # type: ignore[attr-defined]
    row._grouping = grouping  # type: ignore[attr-defined]
    return row


def zero_score_reason(confusion: np.ndarray, class_names: tuple[str, ...] | list[str], scored_on: str) -> str:
    """Why a pooled confusion matrix (rows: truth, columns: prediction) scores no overlap at all, e.g.
    ``predicted only 'Stroma'; held-out annotations contain no 'Stroma'``; empty when some pixel is right."""
    confusion = np.asarray(confusion)
    if not confusion.size or np.trace(confusion) > 0:
        return ""

    def name(index: int) -> str:
        return f"'{class_names[index]}'" if index < len(class_names) else f"class {index}"

    predicted = [name(int(i)) for i in np.flatnonzero(confusion.sum(0))]
    if not predicted:
        return f"predicted nothing on {scored_on}"
    present = [name(int(i)) for i in np.flatnonzero(confusion.sum(1))]
    return (f"predicted only {', '.join(predicted)}; {scored_on} contain no {' or '.join(predicted)}"
            + (f" (they hold {', '.join(present)})" if present else ""))


def rank_rows(rows: list[LeaderboardRow], n_bootstrap: int) -> list[LeaderboardRow]:
    """Sort by pooled mIoU (rows without results last, in their given order), number the ranks and
    compare every row with the best one (paired hierarchical bootstrap of the mIoU gap, Holm-adjusted)."""
    scored = sorted((r for r in rows if r.ok), key=lambda r: -_sortable(r.metrics.get("mIoU")))
    rest = [r for r in rows if not r.ok]
    for rank, row in enumerate(scored, 1):
        row.rank = rank
    if scored:
        best = scored[0]
        best.vs_best = "best"
        compared = []
        for row in scored[1:]:
            if getattr(row, "_names", None) != getattr(best, "_names", None):
                row.vs_best = "n/a"  # scored on other images: no paired comparison
                continue
            test = paired_gap_test(best._stack, row._stack, best._grouping,  # type: ignore[attr-defined]
                                   n_bootstrap, seed=0, metric="mIoU")
            row.gap_to_best, row.gap_p = (test.low, test.high), test.p_value
            compared.append(row)
        for row, adjusted in zip(compared, holm([r.gap_p if r.gap_p is not None else math.nan for r in compared]),
                                 strict=True):
            row.gap_p_holm = adjusted
            row.vs_best = "n/a" if math.isnan(adjusted) else ("below" if adjusted < ALPHA else "tied")
    return scored + rest


# --- formatting -------------------------------------------------------------------------------------------------
def _save_figure(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)
    return path


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _sortable(value: Any) -> float:
    return -math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _column_name(name: str) -> str:
    return re.sub(r"\W+", "_", str(name)).strip("_") or "class"


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p_value(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"


def _with_ci(value: float | None, interval: tuple[float, float] | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if not interval or any(math.isnan(v) for v in interval):
        return f"{value:.4f}"
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
