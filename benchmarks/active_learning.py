"""Label efficiency of live mode's suggestions: a simulated annotator on real data.

For each dataset (MoNuSeg nuclei, WSSS4LUAD tissue types; seed-JSON datasets in ``../shared/data``),
the training images' backbone features are stored once (the engine's ``SlideFeatureStore``, as live
mode stores a slide's), then three annotators label ``--k`` square boxes (``--box`` model px) per
round, copying the ground truth into them:

* **suggest** - the live head's suggestion rule (``pfmseg_engine.live.suggest``): each unlabelled box
  gets the mean uncertainty (normalised entropy) of the current head and a feature-space descriptor (its
  tokens' unit-length mean); a k-center greedy walk picks boxes maximising uncertainty x distance to the
  nearest labelled or picked box;
* **random** - uniformly random unlabelled boxes;
* **grid** - a uniform grid: boxes in a spatially spread order over every image (van der Corput order).

Every annotator starts from the same random boxes (round 0). After each round the live head trains
``--steps`` more steps on the labelled pixels (warm start, as in live mode) and is scored on the held-out
images (the dataset's val + test splits: mIoU pooled over images). Three seeds; 95 % intervals from the
engine's hierarchical bootstrap over seeds and images. The figure (test mIoU against labelled pixels)
goes to ``docs/images/active_learning.png``; the last line of output is one JSON object holding
``label_ratio_to_match_random`` per dataset: the labelled pixels suggestions need to reach the random
annotator's final mIoU, over the random annotator's final labelled pixels (goal <= 0.5; null when
suggestions never reach it).

No pathology foundation-model weights exist on this machine: the backbone is a **random-weight** ViT
(``kaiko-vits16`` architecture; ``--tiny`` its small test variant), so absolute mIoU values say nothing
about a real PFM; the comparison between annotators on identical features is what is measured::

    nice python benchmarks/active_learning.py --tiny --threads 1   # the figure's run: 28 min on 2 busy cores
    python benchmarks/active_learning.py --backbone uni_v1 --weights /models/uni.bin   # a real PFM (far slower)
    python benchmarks/active_learning.py --datasets monuseg --rounds 3 --seeds 1 --tiny   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
FIGURE = HERE.parent / "docs" / "images" / "active_learning.png"
STRATEGIES = ("suggest", "random", "grid")
IGNORE = 255


@dataclass
class Image:
    """One image at the model's resolution: its windows' stored grids, and the ground truth."""

    name: str
    mask: np.ndarray  # (H, W) class indices
    windows: list[tuple[int, int]]
    grids: Any  # (n_windows, C, t, t) float32 tensor
    valid: list[tuple[int, int]]


@dataclass
class Pool:
    """Candidate boxes of the training images: (image, window index, y, x) with y, x inside the window."""

    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    area: list[int] = field(default_factory=list)


def load_split(root: Path, split: str, scale: float, limit: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from PIL import Image as PILImage

    spec = json.loads((root / "dataset.json").read_text())
    entries = spec["data"][split][:limit] if limit else spec["data"][split]
    out = []
    for entry in entries:
        image = PILImage.open(root / entry["image_path"]).convert("RGB")
        mask = PILImage.open(root / entry["mask_path"])
        if scale != 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image, mask = image.resize(size, PILImage.BILINEAR), mask.resize(size, PILImage.NEAREST)
        out.append((Path(entry["image_path"]).stem, np.asarray(image), np.asarray(mask).astype(np.uint8)))
    return out


def store_images(model: Any, items: list[tuple[str, np.ndarray, np.ndarray]], window: int, root: Path) -> list[Image]:
    """Fill each image's feature store (the engine's, as live mode fills a slide's) and keep its grids."""
    from pfmseg_engine.live import SlideFeatureStore
    from pfmseg_engine.slides import Slide

    images = []
    for name, rgb, mask in items:
        slide = Slide.from_array(rgb, mpp=1.0, name=name)
        store = SlideFeatureStore(model, slide, root=root, mpp=1.0, window=window, dtype="float16", tissue=False)
        windows = [(r, c) for r in range(store.geometry.rows) for c in range(store.geometry.cols)]
        store.fill(windows=windows, batch_size=4)
        grids = store.read(windows)[-1]
        images.append(Image(name, mask, windows, grids, [store.windows.valid(w) for w in windows]))
    return images


def box_pool(images: list[Image], window: int, box: int) -> Pool:
    """Non-overlapping ``box`` squares inside each window, kept when at least half lies on the image."""
    pool = Pool()
    for i, image in enumerate(images):
        for j, (vh, vw) in enumerate(image.valid):
            for y in range(0, window, box):
                for x in range(0, window, box):
                    area = max(0, min(box, vh - y)) * max(0, min(box, vw - x))
                    if area * 2 >= box * box:
                        pool.boxes.append((i, j, y, x))
                        pool.area.append(area)
    return pool


def grid_order(pool: Pool, images: list[Image], window: int, box: int, seed: int) -> list[int]:
    """A uniform grid, coarse to fine: boxes on every 8th lattice row and column of each image first, then
    every 4th, and so on (images interleaved within a level), so any prefix is spread evenly."""
    def coarseness(n: int) -> int:
        return 8 if n == 0 else min(8, (n & -n).bit_length() - 1)

    keys = []
    seen: dict[tuple[int, int], int] = {}
    for index, (i, j, y, x) in enumerate(pool.boxes):
        r, c = images[i].windows[j]
        gy, gx = (r * window + y) // box, (c * window + x) // box
        level = min(coarseness(gy), coarseness(gx))
        seen[(level, i)] = seen.get((level, i), 0) + 1
        keys.append((-level, seen[(level, i)], (i + seed) % len(images), index))
    return [index for *_, index in sorted(keys)]


def window_labels(images: list[Image], pool: Pool, chosen: set[int], window: int, box: int
                  ) -> dict[tuple[int, int], np.ndarray]:
    """Labels of the chosen boxes (ground truth inside, IGNORE elsewhere), per (image, window)."""
    labels: dict[tuple[int, int], np.ndarray] = {}
    for index in chosen:
        i, j, y, x = pool.boxes[index]
        r, c = images[i].windows[j]
        target = labels.setdefault((i, j), np.full((window, window), IGNORE, np.uint8))
        mask = images[i].mask
        y0, x0 = r * window + y, c * window + x
        part = mask[y0:y0 + box, x0:x0 + box]
        target[y:y + part.shape[0], x:x + part.shape[1]] = part
    return labels


def train(model: Any, optimizer: Any, images: list[Image], labels: dict[tuple[int, int], np.ndarray],
          steps: int, batch: int, rng: np.random.Generator) -> None:
    import torch

    from pfmseg_engine.live.head import head_logits

    keys = list(labels)
    window = next(iter(labels.values())).shape[0]
    model.head.train()
    for _ in range(steps):
        picks = [keys[k] for k in rng.integers(0, len(keys), size=min(batch, len(keys)))]
        grids = torch.stack([images[i].grids[j] for i, j in picks]).float()
        target = torch.from_numpy(np.stack([labels[key] for key in picks]).astype(np.int64))
        logits = head_logits(model, [grids], (window, window))
        loss = torch.nn.functional.cross_entropy(logits.float(), target, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.head.eval()


def probabilities(model: Any, image: Image, window: int) -> Any:
    import torch

    from pfmseg_engine.live.head import head_logits

    with torch.inference_mode():
        out = []
        for start in range(0, len(image.windows), 8):
            grids = image.grids[start:start + 8].float()
            out.append(head_logits(model, [grids], (window, window)).float().softmax(1))
        return torch.cat(out)


def confusions(model: Any, images: list[Image], window: int, classes: int) -> np.ndarray:
    """(N images, C, C) confusion matrices (rows: truth) of the head on held-out images."""
    matrices = np.zeros((len(images), classes, classes), np.int64)
    for n, image in enumerate(images):
        predicted = probabilities(model, image, window).argmax(1).numpy()
        for (r, c), (vh, vw), pred in zip(image.windows, image.valid, predicted, strict=True):
            truth = image.mask[r * window:r * window + vh, c * window:c * window + vw].astype(np.int64)
            ok = truth < classes
            matrices[n] += np.bincount(truth[ok] * classes + pred[:vh, :vw][ok],
                                       minlength=classes * classes).reshape(classes, classes)
    return matrices


def box_descriptors(images: list[Image], pool: Pool, box: int, patch: int) -> np.ndarray:
    """Where each box lies in feature space: the unit-length mean of its tokens (fixed: the backbone is frozen)."""
    import torch

    t = box // patch
    out = np.zeros((len(pool.boxes), images[0].grids.shape[1]), np.float32)
    for index, (i, j, y, x) in enumerate(pool.boxes):
        tokens = images[i].grids[j, :, y // patch:y // patch + t, x // patch:x // patch + t].float().mean(dim=(-2, -1))
        out[index] = torch.nn.functional.normalize(tokens, dim=0).numpy()
    return out


def suggest(model: Any, images: list[Image], pool: Pool, descriptors: np.ndarray, labelled: set[int], k: int,
            window: int, box: int) -> list[int]:
    """The live suggestion rule on boxes: mean uncertainty x feature-space distance, k-center greedy."""
    from pfmseg_engine.live.head import uncertainty_map
    from pfmseg_engine.live.suggest import k_center_greedy

    cells = window // box
    means = {}
    for i in sorted({b[0] for b in pool.boxes}):
        maps = uncertainty_map(probabilities(model, images[i], window)).numpy()
        means[i] = maps.reshape(len(maps), cells, box, cells, box).mean(axis=(2, 4))
    uncertainty = np.array([means[i][j, y // box, x // box] for i, j, y, x in pool.boxes])
    free = [i for i in range(len(pool.boxes)) if i not in labelled]
    reference = descriptors[sorted(labelled)] if labelled else None
    picks = k_center_greedy(uncertainty[free], descriptors[free], k, reference)
    return [free[p] for p, _, _ in picks]


def run_dataset(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from pfmseg_engine.live import build_live_model, live_model_config
    from pfmseg_engine.metrics import compute_metrics
    from pfmseg_engine.training.statistics import hierarchical_intervals

    root = DATA / name
    spec = json.loads((root / "dataset.json").read_text())
    class_names = list(spec.get("class_names") or [f"class_{i}" for i in range(spec["num_classes"])])
    classes = len(class_names)
    scale = args.scale.get(name, 1.0)
    began = time.perf_counter()
    torch.manual_seed(0)
    model = build_live_model(live_model_config(args.backbone, class_names, weights=args.weights, tiny=args.tiny,
                                               window=args.window))
    initial_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    patch = int(model.patch_size)
    train_images = store_images(model, load_split(root, "train", scale, args.limit), args.window, work / name)
    held_out = store_images(model, load_split(root, "val", scale, None) + load_split(root, "test", scale, None),
                            args.window, work / name)
    fill_s = time.perf_counter() - began
    pool = box_pool(train_images, args.window, args.box)
    descriptors = box_descriptors(train_images, pool, args.box, patch)
    print(f"{name}: {len(train_images)} training images, {len(held_out)} held out, {len(pool.boxes)} boxes of "
          f"{args.box} px; features stored in {fill_s:.0f} s", file=sys.stderr)
    curves: dict[str, dict[str, Any]] = {}
    for strategy in STRATEGIES:
        per_seed_px, per_seed_stack = [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng([seed, 17])
            torch.manual_seed(seed)
            model.head.load_state_dict(initial_head)
            for module in model.head.modules():  # a fresh head per seed
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr, weight_decay=1e-4)
            labelled = set(int(i) for i in np.random.default_rng([seed, 3]).choice(len(pool.boxes), args.k, False))
            order = grid_order(pool, train_images, args.window, args.box, seed)
            pixels, stacks = [], []
            for round_ in range(args.rounds):
                if round_:
                    free_k = args.k
                    if strategy == "random":
                        free = np.array([i for i in range(len(pool.boxes)) if i not in labelled])
                        picks = [int(i) for i in rng.choice(free, min(free_k, len(free)), replace=False)]
                    elif strategy == "grid":
                        picks = [i for i in order if i not in labelled][:free_k]
                    else:
                        picks = suggest(model, train_images, pool, descriptors, labelled, free_k, args.window, args.box)
                    labelled.update(picks)
                labels = window_labels(train_images, pool, labelled, args.window, args.box)
                train(model, optimizer, train_images, labels, args.steps, args.batch, rng)
                pixels.append(int(sum(pool.area[i] for i in labelled)))
                stacks.append(confusions(model, held_out, args.window, classes))
            per_seed_px.append(pixels)
            per_seed_stack.append(stacks)
            final = compute_metrics(stacks[-1].sum(0).astype(np.float64))["mIoU"]
            print(f"  {strategy:<8} seed {seed}: final mIoU {float(final):.3f} with {pixels[-1]:,} labelled px "
                  f"({time.perf_counter() - began:.0f} s)", file=sys.stderr)
        rounds = []
        for r in range(args.rounds):
            stack = np.stack([per_seed_stack[s][r] for s in range(args.seeds)]).astype(np.float64)
            point = float(compute_metrics(stack.sum((0, 1)))["mIoU"])
            low, high = hierarchical_intervals(stack, n_bootstrap=args.bootstrap, seed=r)["mIoU"]
            rounds.append({"round": r, "labelled_px": float(np.mean([p[r] for p in per_seed_px])), "mIoU": point,
                           "ci95": [low, high]})
        curves[strategy] = {"rounds": rounds}
    target = curves["random"]["rounds"][-1]["mIoU"]
    random_px = curves["random"]["rounds"][-1]["labelled_px"]
    ratios = {s: ratio_to_reach(curves[s]["rounds"], target, random_px) for s in ("suggest", "grid")}
    return {"dataset": name, "classes": class_names, "train_images": len(train_images), "held_out": len(held_out),
            "boxes": len(pool.boxes), "random_final_mIoU": target, "random_final_px": random_px,
            "label_ratio_to_match_random": ratios["suggest"], "grid_ratio_to_match_random": ratios["grid"],
            "curves": curves, "seconds": round(time.perf_counter() - began, 1)}


def ratio_to_reach(rounds: list[dict[str, Any]], target: float, reference_px: float) -> float | None:
    """Labelled pixels at which a curve first reaches ``target`` (linear between rounds) / ``reference_px``."""
    previous = None
    for point in rounds:
        if point["mIoU"] >= target:
            if previous is None or point["mIoU"] == previous["mIoU"]:
                px = point["labelled_px"]
            else:
                share = (target - previous["mIoU"]) / (point["mIoU"] - previous["mIoU"])
                px = previous["labelled_px"] + share * (point["labelled_px"] - previous["labelled_px"])
            return round(px / reference_px, 3)
        previous = point
    return None


def plot(results: list[dict[str, Any]], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"suggest": "#d62728", "random": "#1f77b4", "grid": "#2ca02c"}
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for strategy, curve in result["curves"].items():
            x = [p["labelled_px"] / 1e3 for p in curve["rounds"]]
            y = [p["mIoU"] for p in curve["rounds"]]
            low = [p["ci95"][0] for p in curve["rounds"]]
            high = [p["ci95"][1] for p in curve["rounds"]]
            ax.plot(x, y, marker="o", ms=3, color=colours[strategy], label=strategy)
            ax.fill_between(x, low, high, color=colours[strategy], alpha=0.15)
        ratio = result["label_ratio_to_match_random"]
        ax.set_title(f"{result['dataset']}: suggest/random labels = {ratio if ratio is not None else 'not reached'}",
                     fontsize=10)
        ax.set_xlabel("labelled pixels (thousands, model resolution)")
        ax.set_ylabel("held-out mIoU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["monuseg", "wsss4luad"])
    parser.add_argument("--backbone", default="kaiko-vits16")
    parser.add_argument("--weights", default=None, help="backbone weights (file or hf-hub:...); default random")
    parser.add_argument("--tiny", action="store_true", help="the backbone's tiny test variant (much faster)")
    parser.add_argument("--window", type=int, default=256, help="model window, px")
    parser.add_argument("--box", type=int, default=64, help="side of a labelled box, model px")
    parser.add_argument("--k", type=int, default=6, help="boxes labelled per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="training steps after each round")
    parser.add_argument("--batch", type=int, default=4, help="windows per training step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--limit", type=int, default=None, help="at most this many training images")
    parser.add_argument("--monuseg-scale", type=float, default=0.5, help="MoNuSeg resize (40x tiles -> ~20x)")
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.window % args.box:
        parser.error(f"--box {args.box} must divide --window {args.window}.")
    args.scale = {"monuseg": args.monuseg_scale}
    import warnings

    import torch

    warnings.filterwarnings("ignore", message=".*randomly initialised.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = f"weights {args.weights}" if args.weights else "RANDOM weights (no pathology weights given)"
    note = (f"{args.backbone}{' (tiny)' if args.tiny else ''} with {weights}; "
            f"{args.k} boxes of {args.box} px per round, {args.steps} steps/round, {args.seeds} seeds, "
            "95% hierarchical bootstrap CIs")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pfmseg-active-learning-") as tmp:
        results = [run_dataset(name, args, Path(tmp)) for name in args.datasets]
    plot(results, args.figure, note)
    for result in results:
        print(f"{result['dataset']}: random reaches mIoU {result['random_final_mIoU']:.3f} with "
              f"{result['random_final_px']:,.0f} px; suggestions need {result['label_ratio_to_match_random']} of "
              f"that, the grid {result['grid_ratio_to_match_random']}", file=sys.stderr)
    summary = {"benchmark": "active_learning", "weights": args.weights or "random (no pathology weights given)",
               "backbone": args.backbone + (" tiny" if args.tiny else ""), "figure": str(args.figure),
               "seconds": round(time.perf_counter() - began, 1),
               "settings": {k: v for k, v in vars(args).items() if k not in ("figure", "scale")},
               "label_ratio_to_match_random": {r["dataset"]: r["label_ratio_to_match_random"] for r in results},
               "results": [{k: v for k, v in r.items() if k != "curves"} | {"curves": r["curves"]} for r in results]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
