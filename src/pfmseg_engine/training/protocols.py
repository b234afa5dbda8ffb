"""Protocol presets: the settings of a published protocol as one table each, applied by name.

``protocol: densebench`` (or ``frozen_light_decoder``) at the top of a config applies that table
*before* the config's own keys, so every key the config states overrides the preset, key by key.
The presets are plain data in the config's own key names; nothing else in the code branches on
them. ``docs/faithfulness.md`` lists what still differs from the seed framework and why.

* ``densebench``: the model and training defaults of the seed framework (PFM-DenseBench,
  github.com/lingxitong/PFM_Segmentation, commit 5df6c18): ``configs/config.yaml`` for every value
  it states, the code defaults it falls back on for the rest (``scripts/train.py``,
  ``data/transforms.py``, ``utils/scheduler.py``, ``models/losses.py``), and its validation, which
  resizes every validation image to ``ResizedSize`` = the training crop.
* ``frozen_light_decoder``: the frozen-encoder benchmark (Vitoria, Saratxaga et al., MICCAI COMPAYL
  2026): frozen PFM, the 2.6 M-parameter light decoder on the encoder's normalised output, CE + Dice,
  NAdam at 1e-4 annealed to 0 every 10 epochs (cosine with restarts), 50 epochs, batch size 8, 512 px
  inputs, validation every 10 epochs selecting by Dice, ten seeds, test-split results as mean +- sd
  per class.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import ConfigError, closest
from .schema import merge

# The seed's albumentations pipeline (data/transforms.py, SegmentationTransforms.get_training_transforms)
# in this project's transforms; where the seed picks one of several transforms (A.OneOf), the closest
# one here stands in, with the OneOf's probability. docs/faithfulness.md lists the differences.
SEED_TRANSFORMS: dict[str, dict[str, Any]] = {
    "hflip": {"p": 0.5},  # A.HorizontalFlip(p=0.5)
    "vflip": {"p": 0.1},  # A.VerticalFlip(p=0.1)
    "rot90": {"p": 0.225},  # A.RandomRotate90(p=0.3) draws k in 0..3, so it rotates with p 0.3 * 3/4
    "transpose": {"p": 0.3},  # A.Transpose(p=0.3)
    "affine": {"p": 0.0},  # (none in the seed)
    "elastic": {"p": 0.3},  # A.OneOf([ElasticTransform, GridDistortion, OpticalDistortion], p=0.3)
    "color_jitter": {"p": 0.5, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},  # A.OneOf(
    # [ColorJitter(0.4, 0.4, 0.4, 0.1), HueSaturationValue, RGBShift], p=0.5)
    "hed_jitter": {"p": 0.0},  # (none in the seed)
    "brightness_contrast": {"p": 0.4, "brightness": 0.3, "contrast": 0.3},  # A.RandomBrightnessContrast(
    # brightness_limit=0.3, contrast_limit=0.3, p=0.4)
    "gamma": {"p": 0.3, "gamma": [0.7, 1.3]},  # A.RandomGamma(gamma_limit=(70, 130), p=0.3)
    "blur": {"p": 0.2, "kernel_size": 7, "sigma": [0.8, 1.4]},  # A.OneOf([GaussianBlur((3, 7)), MotionBlur,
    # MedianBlur], p=0.2): OpenCV's sigma for kernels 3..7 is 0.8..1.4
    "noise": {"p": 0.3, "sigma": 0.03},  # A.OneOf([GaussNoise, MultiplicativeNoise(0.9, 1.1)], p=0.3)
    "cutout": {"p": 0.3, "scale": [0.01, 0.04], "ratio": [0.5, 2.0], "value": 0.0},  # A.CoarseDropout(p=0.3): holes
    # 0.1-0.2 of the side; the seed's weather effects (A.OneOf([RandomRain, RandomSnow, RandomFog], p=0.2)) have
    # no counterpart here
}

PROTOCOLS: dict[str, dict[str, Any]] = {
    "densebench": {
        "system": {"seed": 42},  # configs/config.yaml
        "model": {
            "head": "cup",  # models/pfm_seg_models.py: DecoderCup (cnn_adapter.py: DecoderCupWithSkip)
            "finetune_mode": {
                "type": "frozen",  # configs/config.yaml
                "rank": 16,  # configs/config.yaml
                # models/lora.py LoRALinear and models/dora.py DoraLinear: update scaled by alpha itself,
                # A ~ kaiming_uniform_(a=sqrt(5)) over (in_features, rank), one scalar DoRA magnitude
                "lora_impl": "seed",
                "alpha": 1.0,  # configs/config.yaml, meant as the seed's layers use it (the scale itself)
                "dropout": 0.0,  # models/lora.py: no LoRA dropout
                "lora_mlp": False,  # models/lora.py: attention qkv and proj only
            },
            "cnn_adapter": {"width_factor": 1.0, "block_units": [3, 4, 9]},  # configs/config.yaml
            "transformer_adapter": {  # configs/config.yaml
                "depth": 2, "mlp_ratio": 4.0, "drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.1,
                "init_values": 1.0e-5, "qk_norm": False,
            },
        },
        "training": {  # configs/config.yaml unless noted
            "batch_size": 8,
            "epochs": 150,
            "learning_rate": 0.001,
            "weight_decay": 0.0001,
            "use_amp": True,
            "amp_dtype": "float16",  # utils/trainer.py: torch.cuda.amp.autocast() (float16) with a GradScaler
            "accumulate_grad_batches": 1,
            "clip_grad_norm": 5.0,
            "augmentation": {
                "RandomResizedCropSize": 224,
                # data/transforms.py: A.RandomResizedCrop(scale=(0.5, 1.0), ratio=(0.75, 1.33))
                "scale": [0.5, 1.0], "ratio": [0.75, 1.33], "zoom": None,
                "transforms": SEED_TRANSFORMS,
            },
            # scripts/train.py create_optimizer: Adam with betas/eps defaults; it reads its weight decay
            # from training.optimizer.weight_decay (default 1e-4), the same value as training.weight_decay
            "optimizer": {"type": "Adam", "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": None},
            # utils/scheduler.py get_scheduler: CosineAnnealingWithWarmup(T_max=100 (code default, as the config
            # gives none), eta_min=0, warmup_epochs=2), stepped once per epoch by utils/trainer.py: warmup from 0,
            # and a cosine that climbs back after epoch 100 (style "seed"; a seed config's scheduler keys keep it)
            "scheduler": {"type": "cosine", "style": "seed", "warmup_epochs": 2.0, "min_lr": 0.0, "T_max": 100},
            # models/losses.py DiceLoss(smooth=1e-5): sums over each image's pixels (dim=(2, 3)), then averages
            # over images and classes; every class counts, also classes absent from the image
            "loss": {"type": "dice", "dice_smooth": 1.0e-5, "class_weights": None, "absent_classes": "include",
                     "overlap_pooling": "image"},
        },
        "validation": {
            "eval_interval": 1,
            "batch_size": 8,
            # scripts/train.py + data/transforms.py get_validation_transforms: A.Resize(ResizedSize) of the whole
            # image; ResizedSize (224) equals the crop in configs/config.yaml, so null (= the crop) keeps them equal
            "augmentation": {"ResizedSize": None},
            "resize_or_windowslide": "resize",
            "monitor": "mIoU",  # utils/trainer.py: the best model is the best mIoU
        },
        "visualization": {"save_interval": 10, "num_vis_samples": 8},  # configs/config.yaml
    },
    "frozen_light_decoder": {
        # ten runs, seeds 0-9; each seed's best checkpoint is scored on the test split and reported as
        # mean +- sd over the seeds (seeds_summary.csv/json)
        "system": {"seeds": list(range(10))},
        # the light decoder reads the encoder's output, i.e. after the ViT's final LayerNorm
        "model": {"head": "light", "light_head": {"final_norm": True}, "finetune_mode": {"type": "frozen"}},
        "training": {
            "batch_size": 8,
            "augmentation": {"RandomResizedCropSize": 512},  # inputs of 512 x 512
            "epochs": 50,
            "learning_rate": 1.0e-4,
            "weight_decay": 0.0,  # NAdam's default (no decay is stated)
            "optimizer": {"type": "NAdam"},
            # annealed to 0 every 10 epochs: cosine with restarts, no warmup
            "scheduler": {"type": "cosine_restarts", "T_0": 10, "T_mult": 1, "min_lr": 0.0, "warmup_epochs": 0.0},
            "loss": {"type": "ce_dice", "ce_weight": 1.0, "dice_weight": 1.0},
        },
        "validation": {"eval_interval": 10, "monitor": "Mean_Dice"},  # the best model is the best Dice
    },
}


def protocol_settings(name: str) -> dict[str, Any]:
    """A copy of preset ``name``'s settings (sections as parsed YAML)."""
    if name not in PROTOCOLS:
        raise ConfigError(
            f"Unknown protocol '{name}'.{closest(str(name), PROTOCOLS)} Choose one of: {', '.join(PROTOCOLS)} "
            "(or leave 'protocol' out)."
        )
    return copy.deepcopy(PROTOCOLS[name])


def apply_protocol(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a parsed config) on top of the preset its ``protocol`` key names; unchanged without one."""
    name = data.get("protocol")
    if name is None:
        return data
    if not isinstance(name, str):
        raise ConfigError(f"'protocol' must be a name such as densebench, got {name!r}.")
    return merge(protocol_settings(name), data)
