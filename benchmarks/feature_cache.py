"""Epoch time with the frozen-feature cache against without, on the same crops, model and schedule.

Builds a small seed-format dataset from the shipped CMU slide (tiles with brightness-class masks), then
trains the same frozen backbone + head twice on the same fixed crop set (the one ``compare`` uses):
once computing the backbone live every step, once reading its features from the memory-mapped cache
(filled once before training). The two runs' epochs alternate, so on a shared machine both see the
same background load. Both runs start from the same weights and see the same crops, ops and
batch order, so their losses and test scores should agree up to floating-point noise. Reports seconds
per epoch, their ratio, the one-off fill time, when it pays off, and the test mIoU / mean Dice of both.

    python benchmarks/feature_cache.py                              # kaiko-vits16 (full size), 224 px, no flips
    python benchmarks/feature_cache.py --ops d4                     # with flips/rotations: 8 ops per crop
    python benchmarks/feature_cache.py --backbone uni_v1 --device cuda --tiles 24

Backbones are randomly initialised (speed does not depend on the weights), so no download happens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
GEOMETRIC = ("hflip", "vflip", "rot90", "transpose")


def make_dataset(root: Path, tiles: int, size: int) -> Path:
    """``tiles`` training tiles and two test tiles of ``size`` px from the CMU slide, four brightness classes."""
    import tiffslide
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    entries = []
    with tiffslide.TiffSlide(CMU) as slide:
        width, height = slide.dimensions
        rng = np.random.default_rng(0)
        for i in range(tiles + 2):
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            rgb = np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
            mask = 3 - np.digitize(rgb.mean(-1), [120, 170, 215])
            Image.fromarray(rgb).save(root / "images" / f"tile{i}.png")
            Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"tile{i}.png")
            entries.append({"image_path": f"images/tile{i}.png", "mask_path": f"masks/tile{i}.png"})
    data = {"num_classes": 4, "class_names": ["background", "pale", "stained", "dark"],
            "data": {"train": entries[:tiles], "test": entries[tiles:]}}
    path = root / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def build(config, dataset, out: Path, cache_root: Path | None, device: str) -> dict:
    """A trainer of the frozen model on ``dataset``, reading cached features when ``cache_root`` is given."""
    from pfmseg_engine.compare.cache import FeatureCache, cached_forward
    from pfmseg_engine.training.runner import build_model_for
    from pfmseg_engine.training.trainer import Trainer

    model = build_model_for(config).to(device)
    forward, fill_seconds = None, 0.0
    if cache_root is not None:
        cache = FeatureCache(cache_root, model, crop=config.crop_size)
        start = time.perf_counter()
        cache.fill(dataset, device=device, batch_size=config.training.batch_size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        fill_seconds = time.perf_counter() - start
        dataset.attach_features(cache.store(dataset))
        forward = cached_forward
    trainer = Trainer(config, model, dataset, None, device=device, output_dir=out, forward=forward)
    return {"trainer": trainer, "events": trainer.iter_fit(), "fill": fill_seconds, "epochs": [], "losses": []}


def next_epoch(run: dict) -> bool:
    """Advance ``run`` by one epoch (its seconds and loss recorded); False when it has finished."""
    for kind, info in run["events"]:
        if kind == "epoch":
            run["epochs"].append(info.seconds)
            run["losses"].append(info.train_loss)
            return True
    return False


def scores(run: dict, data, config, device: str) -> None:
    from pfmseg_engine.compare.runner import score_model

    model = run["trainer"].model.eval()
    metrics = score_model(model, data.test, config, device=device)["metrics"]
    run.update(mIoU=metrics["mIoU"], Mean_Dice=metrics["Mean_Dice"])
    del run["trainer"], run["events"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="kaiko-vits16")
    parser.add_argument("--tiny", action="store_true", help="small variant of the backbone family")
    parser.add_argument("--head", default=None, help="head (default: the model default)")
    parser.add_argument("--tiles", type=int, default=6, help="training tiles")
    parser.add_argument("--tile", type=int, default=448, help="tile side in pixels")
    parser.add_argument("--crop", type=int, default=224, help="training crop (a multiple of the patch size)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ops", choices=("none", "d4"), default="none",
                        help="none: no augmentation (1 op per crop); d4: flips/rotations (8 ops per crop)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from pfmseg_engine.compare.data import CompareData, CropSetDataset
    from pfmseg_engine.training.config import config_from_dict

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset_json = make_dataset(root / "data", args.tiles, args.tile)
        transforms = {name: {"p": 0.0} for name in ("affine", "elastic", "color_jitter", "hed_jitter",
                                                    "brightness_contrast", "gamma", "blur", "noise", "cutout")}
        for name in GEOMETRIC:
            transforms[name] = {"p": 0.5 if args.ops == "d4" else 0.0}
        model = {"pfm_name": args.backbone, "tiny": args.tiny, "finetune_mode": {"type": "frozen"}}
        if args.head:
            model["head"] = args.head
        config = config_from_dict({
            "dataset": {"json_file": str(dataset_json)},
            "system": {"num_workers": 0, "device": args.device, "seed": 0},
            "model": model,
            "training": {"batch_size": args.batch_size, "epochs": args.epochs, "use_amp": args.device != "cpu",
                         "augmentation": {"RandomResizedCropSize": args.crop, "zoom": None, "transforms": transforms}},
            "validation": {"batch_size": args.batch_size, "overlap": 0.0},
            "logging": {"plot_history": False},
            "visualization": {"save_predictions": False},
        })
        data = CompareData.from_seed_json(config)
        crops = CropSetDataset(data.train, crop=args.crop, transforms=transforms, seed=0)
        live = build(config, crops, root / "live", None, args.device)
        crops = CropSetDataset(data.train, crop=args.crop, transforms=transforms, seed=0)
        cached = build(config, crops, root / "cached", root / "cache", args.device)
        # epochs alternate between the two runs, so both see the same load on a shared machine
        while next_epoch(live) and next_epoch(cached):
            pass
        for run in (live, cached):
            scores(run, data, config, args.device)

    threads = torch.get_num_threads()
    print(f"{args.backbone}{' (tiny)' if args.tiny else ''}, frozen, head {config.model.head}, {args.device} "
          f"({threads} threads); {len(crops.boxes)} crops of {args.crop} px x {len(crops.ops)} op(s), "
          f"batch {args.batch_size}, {args.epochs} epochs")
    print(f"{'epoch':>5} {'live s':>8} {'cached s':>9} {'speed-up':>9} {'live loss':>10} {'cached loss':>12}")
    for epoch, (a, b, la, lb) in enumerate(zip(live["epochs"], cached["epochs"], live["losses"], cached["losses"],
                                               strict=True), 1):
        print(f"{epoch:>5} {a:>8.2f} {b:>9.2f} {a / b:>8.1f}x {la:>10.5f} {lb:>12.5f}")
    later_live = float(np.median(live["epochs"][1:] or live["epochs"]))
    later_cached = float(np.median(cached["epochs"][1:] or cached["epochs"]))
    saved = later_live - later_cached
    print(f"cache fill (once per backbone, weights and crop set): {cached['fill']:.2f} s "
          f"= {cached['fill'] / later_live:.1f} live epochs; pays off after "
          f"{cached['fill'] / saved if saved > 0 else float('inf'):.1f} epochs")
    print(f"median epoch from the second on: live {later_live:.2f} s, cached {later_cached:.2f} s, "
          f"{later_live / later_cached:.1f}x faster (goal >= 5x)")
    print(f"test mIoU live {live['mIoU']:.4f} / cached {cached['mIoU']:.4f}; mean Dice live "
          f"{live['Mean_Dice']:.4f} / cached {cached['Mean_Dice']:.4f}")
    if args.json:
        print(json.dumps({"live": live, "cached": cached, "speedup": later_live / later_cached}))


if __name__ == "__main__":
    main()
