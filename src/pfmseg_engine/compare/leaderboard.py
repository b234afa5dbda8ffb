"""The leaderboard: one row per backbone x strategy, ranked by mIoU, with bootstrap confidence intervals.

**How seeds and images are pooled.** Every run (one seed) scores the same evaluation images and keeps
one confusion matrix per image. For a row, the matrices of its seeds are summed image by image, so
each image contributes one matrix holding all seeds' predictions of it. The row's metrics come from the
sum over all images (pixel-pooled, as ``evaluate`` does); the 95 % confidence intervals come from the
image-level bootstrap of :func:`pfmseg_engine.training.metrics.bootstrap_intervals` (the one behind
``evaluate``'s intervals) applied to those per-image matrices: images are resampled with replacement,
and each resample keeps all seeds of an image together. The intervals therefore describe how much the
score depends on which images happen to be in the evaluation set; ``*_seed_sd`` gives the spread
between seeds. ``vs_best`` compares each row with the top row by a paired bootstrap over the same
images (same resamples for both rows): ``tied`` when the 95 % interval of their mIoU gap includes 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..training.metrics import bootstrap_intervals, compute_metrics, metrics_from_confusion

#: Metrics with a column (and CI columns) each, in display order.
METRICS: tuple[str, ...] = ("mIoU", "Mean_Dice", "Pixel_Accuracy")
LABELS = {"mIoU": "mIoU", "Mean_Dice": "mean Dice", "Pixel_Accuracy": "pixel accuracy"}


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
    vs_best: str = ""
    trainable_params: int | None = None
    train_seconds: float | None = None
    windows_per_second: float | None = None
    feature_cache: str = ""
    checkpoint: str = ""
    error: str = ""
    random_weights: bool = False

    @property
    def label(self) -> str:
        return f"{self.pfm} / {self.strategy}"

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
    def winner(self) -> LeaderboardRow | None:
        return next((row for row in self.rows if row.ok), None)

    @property
    def failed(self) -> list[LeaderboardRow]:
        return [row for row in self.rows if row.status in ("failed", "partial")]

    # --- files ------------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        cols = ["rank", "pfm", "strategy", "head", "status", "seeds", "eval_split", "n_images"]
        for metric in METRICS:
            cols += [metric, f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_seed_sd"]
        cols += ["mIoU_gap_to_best_ci_low", "mIoU_gap_to_best_ci_high", "vs_best"]
        for name in self.class_names:
            key = _column_name(name)
            cols += [f"Dice_{key}", f"Dice_{key}_ci_low", f"Dice_{key}_ci_high"]
        cols += ["trainable_params", "train_seconds", "inference_windows_per_s", "feature_cache", "checkpoint",
                 "error"]
        return cols

    def records(self) -> list[dict[str, Any]]:
        out = []
        for row in self.rows:
            record: dict[str, Any] = {
                "rank": row.rank, "pfm": row.pfm, "strategy": row.strategy, "head": row.head, "status": row.status,
                "seeds": " ".join(str(s) for s in row.seeds), "eval_split": self.eval_split,
                "n_images": row.n_images,
            }
            for metric in METRICS:
                low, high = row.intervals.get(metric, (math.nan, math.nan))
                record.update({metric: row.metrics.get(metric), f"{metric}_ci_low": low, f"{metric}_ci_high": high,
                               f"{metric}_seed_sd": row.seed_sd.get(metric)})
            gap = row.gap_to_best or (None, None)
            record.update({"mIoU_gap_to_best_ci_low": gap[0], "mIoU_gap_to_best_ci_high": gap[1],
                           "vs_best": row.vs_best})
            for name in self.class_names:
                key = _column_name(name)
                low, high = row.class_dice_intervals.get(name, (math.nan, math.nan))
                record.update({f"Dice_{key}": row.class_dice.get(name), f"Dice_{key}_ci_low": low,
                               f"Dice_{key}_ci_high": high})
            record.update({"trainable_params": row.trainable_params, "train_seconds": row.train_seconds,
                           "inference_windows_per_s": row.windows_per_second, "feature_cache": row.feature_cache,
                           "checkpoint": row.checkpoint, "error": row.error})
            out.append(record)
        return out

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns(), lineterminator="\n")
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
                "notes": self.notes, "winner": None if winner is None else {
                    "pfm": winner.pfm, "strategy": winner.strategy, "checkpoint": winner.checkpoint},
                "next_steps": self.next_steps, "rows": rows}

    def to_markdown(self) -> str:
        seeds = sorted({len(r.seeds) for r in self.rows if r.ok})
        n_images = max((r.n_images for r in self.rows), default=0)
        lines = [
            "# Leaderboard",
            "",
            f"Scored on **{self.eval_split}** ({n_images} images); "
            f"{'/'.join(map(str, seeds)) or 'no'} seed(s) per row; metrics pooled over images and seeds; "
            f"[95 % CI] from {self.n_bootstrap} bootstrap resamples of the images (seeds of an image kept together). "
            "`vs best`: paired bootstrap of the mIoU gap to the top row (`tied`: its 95 % CI includes 0).",
            "",
            "| rank | backbone | strategy | mIoU [95 % CI] | mean Dice [95 % CI] | pixel accuracy [95 % CI] | vs best "
            "| trainable params | train s | windows/s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.rows:
            if not row.ok:
                continue
            cells = [str(row.rank), f"`{row.pfm}`", row.strategy]
            cells += [_with_ci(row.metrics.get(m), row.intervals.get(m)) for m in METRICS]
            cells += [row.vs_best or "", _count(row.trainable_params), _number(row.train_seconds, 1),
                      _number(row.windows_per_second, 1)]
            lines.append("| " + " | ".join(cells) + " |")
        if any(row.ok for row in self.rows):
            lines += ["", "Per-class Dice [95 % CI]:", "",
                      "| backbone | strategy | " + " | ".join(self.class_names) + " |",
                      "| --- | --- | " + " | ".join("---" for _ in self.class_names) + " |"]
            for row in self.rows:
                if row.ok:
                    cells = [_with_ci(row.class_dice.get(n), row.class_dice_intervals.get(n)) for n in self.class_names]
                    lines.append(f"| `{row.pfm}` | {row.strategy} | " + " | ".join(cells) + " |")
        problems = [row for row in self.rows if row.error]
        if problems:
            lines += ["", "Failed:", ""]
            lines += [f"- `{row.pfm}` / {row.strategy} ({row.status}): {row.error}" for row in problems]
        pending = [row for row in self.rows if row.status == "pending"]
        if pending:
            lines += ["", "Not run yet: " + ", ".join(f"`{r.pfm}` / {r.strategy}" for r in pending) + "."]
        if self.notes:
            lines += ["", *[f"- {note}" for note in self.notes]]
        if self.next_steps:
            lines += ["", "Next steps with the winner:", "", "```bash", *self.next_steps, "```"]
        return "\n".join(lines) + "\n"

    def table(self) -> str:
        """A plain-text ranking for the terminal."""
        lines = [f"{'rank':>4}  {'backbone / strategy':<34} {'mIoU [95% CI]':<26} {'mean Dice':>9}  {'vs best':<8} "
                 "status"]
        for row in self.rows:
            score = _with_ci(row.metrics.get("mIoU"), row.intervals.get("mIoU")) if row.ok else "-"
            dice = _number(row.metrics.get("Mean_Dice"), 4) if row.ok else "-"
            status = row.status + (f": {row.error}" if row.error else "")
            lines.append(f"{row.rank or '-':>4}  {row.label:<34} {score:<26} {dice:>9}  {row.vs_best:<8} {status}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """``leaderboard.png``: per metric, each row's pooled value with its 95 % CI as an error bar."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = [row for row in self.rows if row.ok]
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
        axes[0].set_yticks(positions, [row.label for row in rows] or [""])
        if not rows:
            axes[0].set_yticks([])
        figure.suptitle(f"Scored on {self.eval_split}: mean over images and seeds, 95 % bootstrap CI")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.png")
        figure.savefig(tmp)
        tmp.replace(path)
        return path

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
def pooled_matrices(runs: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """Per-image confusion matrices summed over seeds (N, C, C), and the image names.

    Runs that scored other images (which only happens when the data changed between runs) are
    concatenated instead of summed.
    """
    names = runs[0]["image_names"]
    stacks = [np.asarray(r["confusions"], dtype=np.float64) for r in runs]
    if all(r["image_names"] == names for r in runs):
        return np.sum(stacks, axis=0), list(names)
    return np.concatenate(stacks), [n for r in runs for n in r["image_names"]]


def paired_gap(best: np.ndarray, other: np.ndarray, n_bootstrap: int, seed: int = 0,
               metric: str = "mIoU") -> tuple[float, float]:
    """95 % bootstrap CI of ``metric(best) - metric(other)`` resampling the same images for both."""
    n = len(best)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_bootstrap, n))
    np.add.at(counts, (np.arange(n_bootstrap)[:, None], rng.integers(0, n, size=(n_bootstrap, n))), 1.0)
    a = compute_metrics(np.einsum("bn,nij->bij", counts, best))[metric]
    b = compute_metrics(np.einsum("bn,nij->bij", counts, other))[metric]
    gap = (a - b)[~np.isnan(a - b)]
    if gap.size == 0:
        return (math.nan, math.nan)
    return float(np.percentile(gap, 2.5)), float(np.percentile(gap, 97.5))


def build_row(pfm: str, strategy: str, runs: list[dict[str, Any]], class_names: tuple[str, ...], *,
              n_bootstrap: int, error: str = "", expected_seeds: int = 0) -> LeaderboardRow:
    """A row from the ``result.json`` payloads of its finished seeds (see the module docstring)."""
    ok = [r for r in runs if r.get("status") == "ok"]
    status = "ok" if ok and not error else ("partial" if ok else ("failed" if error else "pending"))
    if ok and expected_seeds and len(ok) < expected_seeds and not error:
        status = "partial"
    row = LeaderboardRow(pfm=pfm, strategy=strategy, status=status, error=error)
    if not ok:
        return row
    stack, names = pooled_matrices(ok)
    point = metrics_from_confusion(stack.sum(0))
    intervals = bootstrap_intervals(stack, n_bootstrap, seed=0)
    row.head = ok[0].get("head", "")
    row.seeds = [int(r["seed"]) for r in ok]
    row.n_images = len(ok[0]["image_names"])
    row.metrics = {m: point[m] for m in METRICS}
    row.intervals = {m: intervals[m] for m in METRICS}
    for metric in METRICS:
        values = [float(r["metrics"][metric]) for r in ok if r["metrics"].get(metric) is not None]
        values = [v for v in values if not math.isnan(v)]
        row.seed_sd[metric] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    for i, name in enumerate(class_names):
        row.class_dice[name] = point.get(f"Dice_Class_{i}", math.nan)
        row.class_dice_intervals[name] = intervals.get(f"Dice_Class_{i}", (math.nan, math.nan))
    row.trainable_params = int(ok[0]["trainable_params"])
    row.train_seconds = float(np.mean([r["train_seconds"] for r in ok]))
    speeds = [r["windows_per_second"] for r in ok if r.get("windows_per_second")]
    row.windows_per_second = float(np.mean(speeds)) if speeds else None
    row.feature_cache = ok[0].get("feature_cache", "")
    row.random_weights = any(r.get("random_weights") for r in ok)
    best_seed = max(ok, key=lambda r: _sortable(r["metrics"].get("mIoU")))
    row.checkpoint = str(best_seed.get("checkpoint", ""))
    row._stack = stack  # type: ignore[attr-defined]  # kept for the paired comparison with the best row
    row._names = names  # type: ignore[attr-defined]
    return row


def rank_rows(rows: list[LeaderboardRow], n_bootstrap: int) -> list[LeaderboardRow]:
    """Sort by pooled mIoU (rows without results last, in their given order), number the ranks and
    compare every row with the best one (paired bootstrap of the mIoU gap)."""
    scored = sorted((r for r in rows if r.ok), key=lambda r: -_sortable(r.metrics.get("mIoU")))
    rest = [r for r in rows if not r.ok]
    for rank, row in enumerate(scored, 1):
        row.rank = rank
    if scored:
        best = scored[0]
        best.vs_best = "best"
        for row in scored[1:]:
            same = getattr(row, "_names", None) == getattr(best, "_names", None)
            if not same:
                row.vs_best = "n/a"
                continue
            low, high = paired_gap(best._stack, row._stack, n_bootstrap)  # type: ignore[attr-defined]
            row.gap_to_best = (low, high)
            row.vs_best = "tied" if not low > 0 else "below"
    return scored + rest


# --- formatting -------------------------------------------------------------------------------------------------
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
