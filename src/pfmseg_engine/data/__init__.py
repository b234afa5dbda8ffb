"""Datasets: seed JSON image sets, sparse-annotation patch sampling, joint augmentation."""

from .augment import DEFAULT_TRANSFORMS, TRANSFORMS, JointAugment, sample_seed
from .dataset import ArrayImageSet, SegmentationDataset
from .images import composite_on_white, read_image
from .masks import check_mask_values, read_mask, sparse_to_targets
from .sampler import EpochSampler
from .seed_json import Sample, SeedDataset, load_seed_json
from .sparse import SparsePatchDataset, annotated_blocks, crop_boxes, split_annotations

__all__ = [
    "DEFAULT_TRANSFORMS",
    "TRANSFORMS",
    "ArrayImageSet",
    "EpochSampler",
    "JointAugment",
    "Sample",
    "SeedDataset",
    "SegmentationDataset",
    "SparsePatchDataset",
    "annotated_blocks",
    "check_mask_values",
    "composite_on_white",
    "crop_boxes",
    "load_seed_json",
    "read_image",
    "read_mask",
    "sample_seed",
    "sparse_to_targets",
    "split_annotations",
]
