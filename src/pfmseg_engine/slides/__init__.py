"""Whole-slide images as lazy pyramids with physical resolution, and tissue detection."""

from __future__ import annotations

from .backends import READER_HELP, READERS
from .formats import can_open, open_slide
from .resolution import ResolutionPlan, plan_resolution
from .slide import Slide
from .tissue import TissueMask, detect_tissue, save_tissue_qc

__all__ = ["READERS", "READER_HELP", "ResolutionPlan", "Slide", "TissueMask", "can_open", "detect_tissue", "open_slide",
           "plan_resolution", "save_tissue_qc"]
