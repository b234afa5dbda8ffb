"""Every supported pathology foundation model, kept as data.

Each :class:`BackboneSpec` row says how to build the exact architecture of the published checkpoint
as a timm model, how that checkpoint is laid out on disk (so the right converter maps it into timm's
key names), how inputs are normalised, and how many parameters the build must have. Adding a model
means adding a row, never a branch somewhere else: the builder, the CLI table, the napari widget and
the tests all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)

# Keyword arguments shared by every build: no classifier, any input that is a multiple of the patch.
COMMON_KWARGS = MappingProxyType({"num_classes": 0, "dynamic_img_size": True})

# Small variants keep each family's code path (patch size, prefix tokens, MLP type, LayerScale) but
# shrink width and depth so numerical tests run in milliseconds on a CPU.
TINY_VIT = MappingProxyType({"embed_dim": 48, "depth": 4, "num_heads": 3})
TINY_VIT_SWIGLU = MappingProxyType({"embed_dim": 48, "depth": 4, "num_heads": 3})


@dataclass(frozen=True)
class BackboneSpec:
    """How to build, load and feed one published backbone.

    ``timm_kwargs`` may use the symbolic values ``"swiglu_packed"`` / ``"silu"`` for ``mlp_layer`` /
    ``act_layer`` and ``norm_eps`` for the LayerNorm epsilon; the builder resolves them, so the table
    stays plain data that can be printed, compared and serialised.

    ``kind`` says which builder :func:`pfmseg_engine.model.build_model` uses: ``"vit"`` (a timm ViT
    PFM: backbone + tuning strategy + head) or ``"unet"`` (a backbone-free model trained from scratch,
    see :mod:`pfmseg_engine.unet`; there ``timm_arch``/``timm_kwargs``/``tiny_kwargs`` name pfmseg's
    own UNet and its settings, ``patch_size`` is the UNet's size multiple, ``embed_dim`` is None and
    ``num_params`` excludes the final 1x1 classifier, which adds ``65 * num_classes``).
    """

    name: str
    title: str
    family: str
    timm_arch: str
    timm_kwargs: dict[str, Any]
    embed_dim: int | None
    patch_size: int
    num_prefix_tokens: int
    num_params: int
    params_exact: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    checkpoint_layout: str = "timm"
    hf_hub_id: str | None = None
    hf_filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    tiny_kwargs: dict[str, Any] = field(default_factory=lambda: dict(TINY_VIT))
    fixed_input_size: int | None = None
    aliases: tuple[str, ...] = ()
    notes: str = ""
    kind: str = "vit"

    @property
    def from_scratch(self) -> bool:
        """A baseline without pretrained weights: every weight trains and lives in the checkpoint."""
        return self.kind == "unet"

    @property
    def weights_source(self) -> str:
        """Where published weights come from, as shown to users."""
        if self.from_scratch:
            return "none (trained from scratch)"
        return f"hf-hub:{self.hf_hub_id}" if self.hf_hub_id else "local file only"

    def build_kwargs(self, tiny: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model`` (symbolic values not yet resolved), or for
        pfmseg's own builder when ``kind`` is not ``"vit"``."""
        kwargs = {**self.timm_kwargs, **(COMMON_KWARGS if self.kind == "vit" else {})}
        if tiny:
            kwargs.update(self.tiny_kwargs)
        return kwargs


def _vit(
    name: str,
    title: str,
    family: str,
    arch: str,
    kwargs: dict[str, Any],
    dim: int,
    patch: int,
    prefix: int,
    params: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    exact: bool = True,
    **extra: Any,
) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        title=title,
        family=family,
        timm_arch=arch,
        timm_kwargs=kwargs,
        embed_dim=dim,
        patch_size=patch,
        num_prefix_tokens=prefix,
        num_params=params,
        params_exact=exact,
        mean=mean,
        std=std,
        **extra,
    )


_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_UNI2_KWARGS = {
    "img_size": 224,
    "patch_size": 14,
    "depth": 24,
    "num_heads": 24,
    "init_values": 1e-5,
    "embed_dim": 1536,
    "mlp_ratio": 2.66667 * 2,
    "no_embed_class": True,
    "reg_tokens": 8,
    **_SWIGLU,
}
_VIRCHOW_KWARGS = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", **_SWIGLU}
_GIGAPATH_KWARGS = {
    "img_size": 224,
    "patch_size": 16,
    "embed_dim": 1536,
    "depth": 40,
    "num_heads": 24,
    "init_values": 1e-5,
    "mlp_ratio": 5.33334,
}
_HOPTIMUS_KWARGS = {"img_size": 224, "init_values": 1e-5, "global_pool": "token"}
_TINY_SWIGLU = {**TINY_VIT_SWIGLU}
_TINY_REG = {**TINY_VIT}

SPECS: tuple[BackboneSpec, ...] = (
    _vit("uni_v1", "UNI", "uni", "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5},
         1024, 16, 1, 303_350_784, hf_hub_id="MahmoodLab/UNI", hf_filenames=("pytorch_model.bin",),
         aliases=("uni", "UNI")),
    _vit("uni_v2", "UNI2-h", "uni", "vit_giant_patch14_224", _UNI2_KWARGS,
         1536, 14, 9, 681_394_176, hf_hub_id="MahmoodLab/UNI2-h", hf_filenames=("pytorch_model.bin",),
         tiny_kwargs=_TINY_SWIGLU, aliases=("uni2", "UNI2-h")),
    _vit("virchow_v1", "Virchow", "virchow", "vit_huge_patch14_224", _VIRCHOW_KWARGS,
         1280, 14, 1, 631_229_184, hf_hub_id="paige-ai/Virchow", hf_filenames=("pytorch_model.bin",),
         tiny_kwargs=_TINY_SWIGLU, aliases=("virchow", "Virchow")),
    _vit("virchow_v2", "Virchow2", "virchow", "vit_huge_patch14_224", {**_VIRCHOW_KWARGS, "reg_tokens": 4},
         1280, 14, 5, 631_239_424, hf_hub_id="paige-ai/Virchow2", hf_filenames=("pytorch_model.bin",),
         tiny_kwargs=_TINY_SWIGLU, aliases=("virchow2", "Virchow2")),
    _vit("conch_v1", "CONCH", "conch", "vit_base_patch16_224", {"img_size": 448},
         768, 16, 1, 86_250_240, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
         checkpoint_layout="open_clip_conch", hf_hub_id="MahmoodLab/CONCH",
         hf_filenames=("pytorch_model.bin",), aliases=("conch", "CONCH"),
         notes="vision trunk of the CoCa model; text tower ignored"),
    _vit("conch_v1_5", "CONCHv1.5", "conch", "vit_large_patch16_224", {"img_size": 448, "init_values": 1e-6},
         1024, 16, 1, 303_952_896, checkpoint_layout="conch_v1_5", hf_hub_id="MahmoodLab/conchv1_5",
         hf_filenames=("pytorch_model_vision.bin", "pytorch_model.bin"), aliases=("conchv1_5", "CONCHv1.5"),
         notes="attentional pooler of the checkpoint is unused for segmentation"),
    _vit("phikon", "Phikon", "phikon", "vit_base_patch16_224", {"img_size": 224, "norm_eps": 1e-12},
         768, 16, 1, 85_798_656, checkpoint_layout="hf_vit", hf_hub_id="owkin/phikon", aliases=("Phikon",),
         notes="published as a transformers ViTModel; converted at load time"),
    _vit("phikon_v2", "Phikon-v2", "phikon", "vit_large_patch16_224",
         {"img_size": 224, "init_values": 1e-5, "norm_eps": 1e-6},
         1024, 16, 1, 303_000_000, exact=False, checkpoint_layout="hf_dinov2", hf_hub_id="owkin/phikon-v2",
         aliases=("phikon-v2", "Phikon-v2"), notes="published as a transformers Dinov2Model"),
    _vit("gigapath", "Prov-GigaPath", "gigapath", "vit_giant_patch14_dinov2", _GIGAPATH_KWARGS,
         1536, 16, 1, 1_134_953_984, hf_hub_id="prov-gigapath/prov-gigapath",
         hf_filenames=("pytorch_model.bin",), tiny_kwargs=_TINY_SWIGLU, aliases=("Gigapath", "prov-gigapath")),
    _vit("hoptimus_0", "H-optimus-0", "hoptimus", "vit_giant_patch14_reg4_dinov2", _HOPTIMUS_KWARGS,
         1536, 14, 5, 1_134_774_272, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, hf_hub_id="bioptimus/H-optimus-0",
         hf_filenames=("pytorch_model.bin",), tiny_kwargs=_TINY_SWIGLU, aliases=("H-optimus-0",)),
    _vit("hoptimus_1", "H-optimus-1", "hoptimus", "vit_giant_patch14_reg4_dinov2", _HOPTIMUS_KWARGS,
         1536, 14, 5, 1_134_774_272, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, hf_hub_id="bioptimus/H-optimus-1",
         hf_filenames=("pytorch_model.bin",), tiny_kwargs=_TINY_SWIGLU, aliases=("H-optimus-1",)),
    _vit("midnight12k", "Midnight-12k", "midnight", "vit_giant_patch14_dinov2",
         {"img_size": 224, "norm_eps": 1e-6},
         1536, 14, 1, 1_130_000_000, mean=HALF_MEAN, std=HALF_STD, exact=False,
         checkpoint_layout="hf_dinov2", hf_hub_id="kaiko-ai/midnight", tiny_kwargs=_TINY_SWIGLU,
         aliases=("midnight",), notes="published as a transformers Dinov2Model"),
    _vit("kaiko-vits16", "Kaiko ViT-S/16", "kaiko", "vit_small_patch16_224", {"img_size": 224},
         384, 16, 1, 21_665_664, mean=HALF_MEAN, std=HALF_STD,
         hf_hub_id="1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms"),
    _vit("kaiko-vits8", "Kaiko ViT-S/8", "kaiko", "vit_small_patch8_224", {"img_size": 224},
         384, 8, 1, 21_670_272, mean=HALF_MEAN, std=HALF_STD,
         hf_hub_id="1aurent/vit_small_patch8_224.kaiko_ai_towards_large_pathology_fms"),
    _vit("kaiko-vitb16", "Kaiko ViT-B/16", "kaiko", "vit_base_patch16_224", {"img_size": 224},
         768, 16, 1, 85_798_656, mean=HALF_MEAN, std=HALF_STD,
         hf_hub_id="1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms"),
    _vit("kaiko-vitb8", "Kaiko ViT-B/8", "kaiko", "vit_base_patch8_224", {"img_size": 224},
         768, 8, 1, 85_807_872, mean=HALF_MEAN, std=HALF_STD,
         hf_hub_id="1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms"),
    _vit("kaiko-vitl14", "Kaiko ViT-L/14", "kaiko", "vit_large_patch14_reg4_dinov2", {"img_size": 518},
         1024, 14, 5, 304_370_688, mean=HALF_MEAN, std=HALF_STD,
         hf_hub_id="1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms",
         tiny_kwargs=_TINY_REG),
    _vit("lunit_vits8", "Lunit DINO ViT-S/8", "lunit", "vit_small_patch8_224", {"img_size": 224},
         384, 8, 1, 21_670_272, mean=LUNIT_MEAN, std=LUNIT_STD,
         hf_hub_id="1aurent/vit_small_patch8_224.lunit_dino", aliases=("lunit",)),
    _vit("hibou_l", "Hibou-L", "hibou", "vit_large_patch14_reg4_dinov2", {"img_size": 224, "norm_eps": 1e-6},
         1024, 14, 5, 303_000_000, mean=HIBOU_MEAN, std=HIBOU_STD, exact=False,
         checkpoint_layout="hf_dinov2", hf_hub_id="histai/hibou-L", tiny_kwargs=_TINY_REG,
         aliases=("hibou-L",), notes="published as transformers DINOv2 with 4 registers"),
    _vit("hibou_b", "Hibou-B", "hibou", "vit_base_patch14_reg4_dinov2", {"img_size": 224, "norm_eps": 1e-6},
         768, 14, 5, 86_000_000, mean=HIBOU_MEAN, std=HIBOU_STD, exact=False,
         checkpoint_layout="hf_dinov2", hf_hub_id="histai/hibou-b", tiny_kwargs=_TINY_REG,
         aliases=("hibou-b",), notes="published as transformers DINOv2 with 4 registers"),
    _vit("musk", "MUSK", "musk", "vit_large_patch16_384",
         {"img_size": 384, "scale_attn_norm": True, "scale_mlp_norm": True, "norm_eps": 1e-5},
         1024, 16, 1, 303_936_512, mean=HALF_MEAN, std=HALF_STD, checkpoint_layout="beit3_musk",
         hf_hub_id="xiangjx/musk", hf_filenames=("model.safetensors",), fixed_input_size=384,
         aliases=("MUSK",),
         notes="vision branch (multiway A experts) of the BEiT3 model as a timm ViT-L/16 with sub-LayerNorms"),
    _vit("PathOrchestra", "PathOrchestra", "pathorchestra", "vit_large_patch16_224",
         {"img_size": 224, "init_values": 1e-5},
         1024, 16, 1, 303_350_784, hf_hub_id="AI4Pathology/PathOrchestra", aliases=("pathorchestra",)),
    _vit("patho3dmatrix-vision", "Patho3DMatrix-Vision", "patho3dmatrix", "vit_large_patch16_224",
         {"img_size": 224, "init_values": 1e-5},
         1024, 16, 1, 303_350_784, aliases=("patho3dmatrix",),
         notes="no public hub repository; DINO teacher checkpoint with 'backbone.' keys"),
)


# Backbone-free baselines trained from scratch through the same trainer, so every comparison can ask
# "does a foundation model help here at all?". Not PFMs, hence a table of their own; the registry, the
# ``models`` listing and the napari widget read both tables.
UNET_MULTIPLE = 16  # 2 ** 4 max-pool downsamplings: inputs are padded to this multiple and cropped back

BASELINES: tuple[BackboneSpec, ...] = (
    BackboneSpec(
        name="unet", title="UNet (from scratch)", family="unet", kind="unet",
        timm_arch="unet", timm_kwargs={"base_width": 64, "bilinear": True},
        # The seed's UNet (milesial Pytorch-UNet): 64-128-256-512-512 channels, BatchNorm, bilinear up.
        embed_dim=None, patch_size=UNET_MULTIPLE, num_prefix_tokens=0, num_params=17_262_912, params_exact=True,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, checkpoint_layout="none", hf_filenames=(),
        tiny_kwargs={"base_width": 8},
        notes="baseline without a foundation model: the seed framework's UNet, every weight trained from scratch",
    ),
)

ALL_SPECS: tuple[BackboneSpec, ...] = SPECS + BASELINES
