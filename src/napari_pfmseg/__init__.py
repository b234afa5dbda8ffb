"""napari plugin for pfmseg: open slides, annotate, fine-tune a PFM and stream predictions."""

__version__ = "0.1.0"
