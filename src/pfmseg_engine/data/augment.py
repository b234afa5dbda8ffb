"""Joint image/mask augmentation built on torchvision.transforms.v2.

The image travels as a ``tv_tensors.Image`` (float, [0, 1]) and the mask as a ``tv_tensors.Mask``,
so torchvision applies geometric transforms to both (nearest-neighbour for the mask) and photometric
transforms to the image only. Pixels that geometric transforms bring in from outside the image are
``ignore_index`` in the mask, so the model is never taught that padding is a class.

Every transform is a registry entry (name -> factory). A configuration is plain data, e.g.
``{"hflip": {"p": 0.5}, "hed_jitter": {"p": 0.5, "sigma": 0.05}}``; transforms run in registry order
(geometric, then photometric, then cutout) whatever the order of the mapping. Randomness comes only
from torch's generator, and :meth:`JointAugment.__call__` seeds it per sample, so a sample's
augmentation depends on (seed, epoch, index) alone: reproducible, and independent of data-loader
workers, which is what makes an exactly resumable training run possible.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import ConfigError, closest


@dataclass(frozen=True)
class AugmentContext:
    """What factories need besides their own parameters."""

    ignore_index: int = 255

    @property
    def fill(self) -> dict[type, float | int]:
        return {tv_tensors.Image: 0.0, tv_tensors.Mask: self.ignore_index}


class _Joint(v2.Transform):
    """A custom v2 transform applied with probability ``p`` to images and masks alike."""

    _transformed_types: tuple[type | Callable[[Any], bool], ...] = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, *inputs: Any) -> Any:
        if self.p < 1.0 and torch.rand(1).item() >= self.p:
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)


class RandomRot90(_Joint):
    """Rotate by 90, 180 or 270 degrees (tissue has no preferred orientation)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(1, 4, (1,)).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(torch.rot90(inpt, params["k"], dims=(-2, -1)), like=inpt)


class RandomTranspose(_Joint):
    """Swap height and width (a reflection about the diagonal)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(inpt.transpose(-2, -1).contiguous(), like=inpt)


class HEDJitter(_Joint):
    """Stain augmentation: perturb haematoxylin, eosin and DAB concentrations independently.

    Colour deconvolution (``skimage.color.rgb2hed``) separates the stains; each stain channel is
    scaled by U(1-sigma, 1+sigma) and shifted by U(-bias, bias) before converting back. This mimics
    lab-to-lab staining differences far better than RGB colour jitter.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, p: float = 0.5, sigma: float = 0.05, bias: float = 0.02):
        super().__init__(p)
        self.sigma, self.bias = float(sigma), float(bias)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        alpha = 1.0 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.bias
        return {"alpha": alpha.numpy(), "beta": beta.numpy()}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        from skimage.color import hed2rgb, rgb2hed

        rgb = inpt.permute(1, 2, 0).cpu().numpy().astype(np.float64)
        hed = rgb2hed(rgb) * params["alpha"] + params["beta"]
        out = np.clip(hed2rgb(hed), 0.0, 1.0).astype(np.float32)
        return tv_tensors.wrap(torch.from_numpy(out).permute(2, 0, 1).contiguous(), like=inpt)


class RandomGamma(_Joint):
    """Gamma correction with gamma drawn log-uniformly from ``gamma`` (exposure differences)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, p: float = 0.3, gamma: tuple[float, float] = (0.7, 1.5)):
        super().__init__(p)
        self.gamma = (float(gamma[0]), float(gamma[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = math.log(self.gamma[0]), math.log(self.gamma[1])
        return {"gamma": math.exp(lo + (hi - lo) * torch.rand(1).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return tv_tensors.wrap(inpt.clamp(0, 1) ** params["gamma"], like=inpt)


class Cutout(_Joint):
    """Erase one random rectangle; the erased mask pixels become ``ignore_index``.

    Unlike ``v2.RandomErasing`` (which leaves masks untouched), the model is not asked to predict
    tissue it cannot see.
    """

    def __init__(self, p: float = 0.2, scale: tuple[float, float] = (0.02, 0.1),
                 ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0, ignore_index: int = 255):
        super().__init__(p)
        self.scale, self.ratio, self.value, self.ignore_index = scale, ratio, float(value), int(ignore_index)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = flat_inputs[0].shape[-2:]
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(1).item())
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * torch.rand(1).item()
        h = max(1, min(height, round(math.sqrt(area * math.exp(log_r)))))
        w = max(1, min(width, round(math.sqrt(area / math.exp(log_r)))))
        top = int(torch.randint(0, height - h + 1, (1,)).item())
        left = int(torch.randint(0, width - w + 1, (1,)).item())
        return {"box": (top, left, h, w)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, h, w = params["box"]
        out = inpt.clone()
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else self.value
        out[..., top:top + h, left:left + w] = fill
        return out


class ZoomCrop(v2.Transform):
    """A ``size`` x ``size`` crop at native resolution, zoomed by a factor drawn from ``zoom``.

    The zoom ``z`` (output pixels per source pixel) is drawn log-uniformly from ``zoom``, so 0.8 and
    1.25 are equally likely and the typical crop keeps the source magnification; a square of
    ``round(size / z)`` source pixels is cut at a random position and resized to ``size`` (bilinear
    for images, nearest for masks). Where the square reaches past the image it is padded: 0 in the
    image, ``ignore_index`` in the mask. ``zoom=(1, 1)`` is a plain native-resolution random crop.

    This is the default training crop: validation and slide inference run at native resolution, so
    the model should train at (about) the magnification it is later used at. The seed's
    RandomResizedCrop instead draws a share of the *image area*, so the magnification a crop gets
    depends on how large the source image is.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, size: int, zoom: tuple[float, float] = (0.8, 1.25), ignore_index: int = 255):
        super().__init__()
        lo, hi = float(zoom[0]), float(zoom[1])
        if not 0 < lo <= hi:
            raise ConfigError(f"zoom must satisfy 0 < min <= max, got {[lo, hi]}.")
        self.size, self.zoom, self.ignore_index = int(size), (lo, hi), int(ignore_index)

    @staticmethod
    def _offset(extent: int, side: int) -> int:
        """Start of the window: inside the image, or (when the image is smaller) the image inside it."""
        if extent >= side:
            return int(torch.randint(0, extent - side + 1, (1,)).item())
        return -int(torch.randint(0, side - extent + 1, (1,)).item())

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = flat_inputs[0].shape[-2:]
        lo, hi = math.log(self.zoom[0]), math.log(self.zoom[1])
        z = math.exp(lo + (hi - lo) * torch.rand(1).item())
        side = max(1, round(self.size / z))
        return {"top": self._offset(height, side), "left": self._offset(width, side), "side": side}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, side = params["top"], params["left"], params["side"]
        height, width = inpt.shape[-2:]
        pads = (max(0, -left), max(0, left + side - width), max(0, -top), max(0, top + side - height))
        out = inpt.as_subclass(torch.Tensor)
        if any(pads):
            fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0.0
            out = torch.nn.functional.pad(out, pads, value=fill)
        y0, x0 = top + pads[2], left + pads[0]
        out = tv_tensors.wrap(out[..., y0:y0 + side, x0:x0 + side].contiguous(), like=inpt)
        if side != self.size:  # Mask: nearest neighbour; Image: bilinear with antialiasing
            out = v2.functional.resize(out, [self.size, self.size], antialias=True)
        return out


def _apply(p: float, transform: v2.Transform) -> v2.Transform:
    return v2.RandomApply([transform], p=float(p)) if p < 1.0 else transform


def _pair(value: Any) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return (-float(value), float(value))
    return (float(value[0]), float(value[1]))


# name -> factory(ctx, **params). Registry order is application order.
TRANSFORMS: dict[str, Callable[..., v2.Transform]] = {
    "hflip": lambda ctx, p=0.5: v2.RandomHorizontalFlip(p=p),
    "vflip": lambda ctx, p=0.5: v2.RandomVerticalFlip(p=p),
    "rot90": lambda ctx, p=0.5: RandomRot90(p),
    "transpose": lambda ctx, p=0.3: RandomTranspose(p),
    "affine": lambda ctx, p=0.3, degrees=15.0, translate=0.05, scale=(0.9, 1.1), shear=5.0: _apply(
        p, v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=tuple(scale),
                           shear=shear, fill=ctx.fill)),
    "elastic": lambda ctx, p=0.2, alpha=30.0, sigma=5.0: _apply(
        p, v2.ElasticTransform(alpha=alpha, sigma=sigma, fill=ctx.fill)),
    "color_jitter": lambda ctx, p=0.5, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.03: _apply(
        p, v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)),
    "hed_jitter": lambda ctx, p=0.5, sigma=0.05, bias=0.02: HEDJitter(p, sigma, bias),
    "brightness_contrast": lambda ctx, p=0.3, brightness=0.2, contrast=0.2: _apply(
        p, v2.ColorJitter(brightness=brightness, contrast=contrast)),
    "gamma": lambda ctx, p=0.3, gamma=(0.7, 1.5): RandomGamma(p, tuple(gamma)),
    "blur": lambda ctx, p=0.2, kernel_size=5, sigma=(0.1, 1.5): _apply(
        p, v2.GaussianBlur(kernel_size=kernel_size, sigma=tuple(sigma) if not isinstance(sigma, (int, float))
                           else float(sigma))),
    "noise": lambda ctx, p=0.2, sigma=0.03: _apply(p, v2.GaussianNoise(mean=0.0, sigma=sigma, clip=True)),
    "cutout": lambda ctx, p=0.2, scale=(0.02, 0.1), ratio=(0.3, 3.3), value=0.0: Cutout(
        p, tuple(scale), tuple(ratio), value, ctx.ignore_index),
}

#: Transforms that permute the pixels of a square crop exactly (the generators of D4): a frozen backbone
#: sees only inputs it has seen before, which is what lets a comparison reuse cached features.
EXACT_TRANSFORMS: tuple[str, ...] = ("hflip", "vflip", "rot90", "transpose")


def exact_only() -> dict[str, dict[str, Any]]:
    """An augmentation ``transforms`` mapping that switches off (``p`` = 0) every transform that is not in
    :data:`EXACT_TRANSFORMS`, in registry order; the exact ones keep their configured settings."""
    return {name: {"p": 0.0} for name in TRANSFORMS if name not in EXACT_TRANSFORMS}


# The defaults follow the seed's pipeline in spirit (flips, rot90/transpose, distortion, colour,
# noise/blur, lighting, cutout) with strengths suited to H&E; stain jitter replaces weather effects.
DEFAULT_PROBABILITIES: dict[str, float] = {
    "hflip": 0.5, "vflip": 0.5, "rot90": 0.5, "transpose": 0.3, "affine": 0.2, "elastic": 0.1,
    "color_jitter": 0.5, "hed_jitter": 0.5, "brightness_contrast": 0.3, "gamma": 0.2, "blur": 0.1,
    "noise": 0.1, "cutout": 0.1,
}


def transform_parameters(name: str) -> dict[str, Any]:
    """Parameter names and defaults of transform ``name`` (for docs and validation)."""
    params = inspect.signature(TRANSFORMS[name]).parameters
    return {k: v.default for k, v in list(params.items())[1:]}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


#: Every transform with all its parameters spelled out (what the default config contains).
DEFAULT_TRANSFORMS: dict[str, dict[str, Any]] = {
    name: {"p": DEFAULT_PROBABILITIES[name],
           **{k: _plain(v) for k, v in transform_parameters(name).items() if k != "p"}}
    for name in TRANSFORMS
}


def build_transform(name: str, params: Mapping[str, Any], ctx: AugmentContext) -> v2.Transform:
    """One configured transform; unknown names or parameters are errors naming the closest valid one."""
    if name not in TRANSFORMS:
        raise ConfigError(
            f"Unknown augmentation '{name}'.{closest(name, TRANSFORMS)} Available: {', '.join(TRANSFORMS)}."
        )
    known = transform_parameters(name)
    for key in params:
        if key not in known:
            raise ConfigError(
                f"Unknown parameter '{key}' for augmentation '{name}'.{closest(key, known)} "
                f"Parameters: {', '.join(known)}."
            )
    p = params.get("p", known.get("p", 1.0))
    if not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"Augmentation '{name}': probability p must be in [0, 1], got {p}.")
    try:
        return TRANSFORMS[name](ctx, **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Augmentation '{name}' with {dict(params)} is invalid: {exc}") from exc


class JointAugment:
    """Callable ``(image (3,H,W) float, mask (H,W) long, seed) -> (image, mask)``.

    ``crop_size`` adds a crop to a fixed square (the seed's ``RandomResizedCropSize``), chosen by:

    * ``crop_zoom=(a, b)``: a :class:`ZoomCrop` at native resolution, zoomed by a factor in [a, b]
      (the training default, (0.8, 1.25), keeps the magnification validation and inference use);
    * ``crop_scale=(a, b)``: the seed's RandomResizedCrop covering a..b of the image *area* (with
      aspect ratios in ``crop_ratio``), whose magnification depends on the image size;
    * neither: a plain native-resolution crop.

    Crops are padded with ``ignore_index`` where the image is smaller. Without ``crop_size`` the
    spatial size is unchanged (used for patches that are already cut to size).
    """

    def __init__(
        self,
        transforms: Mapping[str, Mapping[str, Any]] | None = None,
        crop_size: int | None = None,
        crop_scale: tuple[float, float] | None = None,
        crop_ratio: tuple[float, float] = (0.75, 1.33),
        ignore_index: int = 255,
        crop_zoom: tuple[float, float] | None = None,
    ):
        ctx = AugmentContext(ignore_index=ignore_index)
        config = dict(DEFAULT_TRANSFORMS if transforms is None else transforms)
        for name in config:  # validate names even when disabled
            if name not in TRANSFORMS:
                build_transform(name, {}, ctx)
        if crop_scale is not None and crop_zoom is not None:
            raise ConfigError("Give crop_scale (area-scale crops, as the seed) or crop_zoom (native-resolution "
                              "crops with zoom jitter), not both.")
        steps: list[v2.Transform] = []
        if crop_size is not None and crop_scale is not None:
            steps.append(v2.RandomResizedCrop(size=(crop_size, crop_size), scale=tuple(crop_scale),
                                              ratio=tuple(crop_ratio), antialias=True))
        elif crop_size is not None and crop_zoom is not None:
            steps.append(ZoomCrop(crop_size, (crop_zoom[0], crop_zoom[1]), ignore_index))
        elif crop_size is not None:
            steps.append(v2.RandomCrop(size=(crop_size, crop_size), pad_if_needed=True, fill=ctx.fill))
        for name in TRANSFORMS:
            if name in config and config[name] is not None:
                params = dict(config[name])
                transform = build_transform(name, params, ctx)
                if float(params.get("p", 1.0)) > 0.0:
                    steps.append(transform)
        self.names = [n for n in TRANSFORMS if n in config and config[n] is not None
                      and float(dict(config[n]).get("p", 1.0)) > 0.0]
        self.pipeline = v2.Compose(steps) if steps else v2.Identity()
        self.crop_size, self.crop_scale, self.crop_ratio, self.crop_zoom = crop_size, crop_scale, crop_ratio, crop_zoom

    def crop_shrink(self, image_sizes: Iterable[tuple[int, int]] = ()) -> CropShrink:
        """How much this pipeline's crop shrinks the source (see :func:`crop_shrink`; ``image_sizes``
        (height, width) of the training images are needed for area-scale crops only)."""
        return crop_shrink(self.crop_size, scale=self.crop_scale, ratio=self.crop_ratio, zoom=self.crop_zoom,
                           image_sizes=image_sizes)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, seed: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if seed is None:
            out_img, out_msk = self.pipeline(img, msk)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out_img, out_msk = self.pipeline(img, msk)
        return out_img.as_subclass(torch.Tensor).clamp_(0, 1), out_msk.as_subclass(torch.Tensor).long()


# --- crop geometry: how many source pixels one model pixel spans -------------------------------------------
#: Grid points per axis over (area share, log aspect ratio) on which the area-scale crop's distribution is
#: integrated (midpoint rule): the median is then exact to far better than the 25 % a resolution check needs.
AREA_GRID = 256
#: torchvision's RandomResizedCrop draws at most this many crops before it falls back to a centre crop.
AREA_TRIES = 10
#: Quantiles kept per image size when the crops of images of several sizes are pooled.
POOLED_QUANTILES = 1024


@dataclass(frozen=True)
class CropShrink:
    """Source pixels per model pixel (per side) of the training crops: the median crop's and the range.

    1 is native resolution; 3.8 means a stretch of 3.8 source pixels became one model pixel (the model
    saw the source 3.8x smaller). A resize to another aspect ratio (area-scale crops) counts as the
    geometric mean of its two sides, the factor that keeps areas. ``crop``: "native" (plain crops, or
    none), "zoom" (:class:`ZoomCrop`) or "area" (RandomResizedCrop).
    """

    median: float
    low: float
    high: float
    crop: str


def crop_shrink(crop_size: int | None, *, scale: tuple[float, float] | None = None,
                ratio: tuple[float, float] = (0.75, 1.33), zoom: tuple[float, float] | None = None,
                image_sizes: Iterable[tuple[int, int]] = ()) -> CropShrink:
    """The shrink of the crop :class:`JointAugment` (or a patch sampler) takes, from the crop code itself.

    * no ``crop_size`` (patches already cut to size), or neither ``scale`` nor ``zoom`` (a plain
      ``RandomCrop``, padded where the image is smaller): native resolution, 1.
    * ``zoom=(a, b)`` (:class:`ZoomCrop`, and the same draw in ``SparsePatchDataset``): a square of
      ``round(size / z)`` source pixels, z log-uniform in [a, b], resized to ``size``. The shrink
      falls as z grows, so its median is the shrink at the median z, √(ab).
    * ``scale=(a, b)`` (torchvision's ``RandomResizedCrop``, the seed's crop): a share s ~ U(a, b) of
      the image area with aspect r (log-uniform in ``ratio``) gives a ``round(√(A s r))`` x
      ``round(√(A s / r))`` box, resized to ``size`` x ``size``; a box that does not fit the image is
      drawn again, up to :data:`AREA_TRIES` times, then the centre crop is used. Every try draws the
      same way, so the crop is an accepted box with probability 1 - (1 - p)^tries (p: the share of
      draws that fit) and the centre crop otherwise. That distribution is integrated on a grid for
      each distinct image size of ``image_sizes`` ((height, width) of every training image; each
      image is cropped once per epoch, so each counts once) and pooled. Draws that do not fit are
      the large, elongated ones, so the median sits below the naive √(A·(a+b)/2) / size.
    """
    if scale is not None and zoom is not None:
        raise ConfigError("Give crop_scale (area-scale crops, as the seed) or crop_zoom (native-resolution "
                          "crops with zoom jitter), not both.")
    if crop_size is None or (scale is None and zoom is None):
        return CropShrink(1.0, 1.0, 1.0, "native")
    if zoom is not None:
        size = int(crop_size)

        def shrink(z: float) -> float:
            return max(1, round(size / z)) / size

        return CropShrink(shrink(math.sqrt(zoom[0] * zoom[1])), shrink(zoom[1]), shrink(zoom[0]), "zoom")
    sizes = Counter((int(h), int(w)) for h, w in image_sizes)
    if not sizes:
        raise ConfigError("The shrink of area-scale crops depends on the image sizes; pass image_sizes.")
    assert scale is not None  # neither native nor zoom: area-scale crops
    parts = [_area_crop_shrinks(h, w, int(crop_size), scale, ratio) for h, w in sizes]
    low, high = min(v.min() for v, _ in parts), max(v.max() for v, _ in parts)
    if len(parts) == 1:
        values, weights = parts[0]
    else:  # each size as equally likely quantiles, weighted by how many images have it
        probabilities = (np.arange(POOLED_QUANTILES) + 0.5) / POOLED_QUANTILES
        values = np.concatenate([_weighted_quantiles(v, w, probabilities) for v, w in parts])
        weights = np.concatenate([np.full(POOLED_QUANTILES, count / POOLED_QUANTILES) for count in sizes.values()])
    median = float(_weighted_quantiles(values, weights, np.array([0.5]))[0])
    return CropShrink(median, float(low), float(high), "area")


def _area_crop_shrinks(height: int, width: int, size: int, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(shrink values, probabilities) of torchvision's RandomResizedCrop on one image size (see :func:`crop_shrink`)."""
    mid = (np.arange(AREA_GRID) + 0.5) / AREA_GRID
    share = scale[0] + (scale[1] - scale[0]) * mid
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * mid)
    target = float(height * width) * share[:, None]
    w = np.round(np.sqrt(target * aspect[None, :]))  # round half to even, as Python's round() in torchvision
    h = np.round(np.sqrt(target / aspect[None, :]))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    missed_all = (1.0 - fits.mean()) ** AREA_TRIES
    fw, fh = _centre_crop(height, width, ratio)
    values = np.append(np.sqrt(w[fits] * h[fits]), math.sqrt(fw * fh)) / size
    weights = np.append(np.full(int(fits.sum()), (1.0 - missed_all) / max(1, int(fits.sum()))), missed_all)
    return values, weights


def _centre_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(width, height) of RandomResizedCrop's fallback: the whole image, cut to the nearest allowed aspect."""
    aspect = width / height
    if aspect < min(ratio):
        return width, round(width / min(ratio))
    if aspect > max(ratio):
        return round(height * max(ratio)), height
    return width, height


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """The smallest value whose cumulative weight reaches each probability (the lower weighted quantile)."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    positions = np.searchsorted(cumulative, probabilities * cumulative[-1], side="left")
    return values[order][np.minimum(positions, len(values) - 1)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (stable across processes and workers)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint64)[0] >> 1)
