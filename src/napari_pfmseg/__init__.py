"""napari plugin for pfmseg: open slides, annotate, fine-tune a PFM and stream predictions.

Importing this package is cheap (no torch); heavy imports happen when a widget is created.
"""

from ._torch_guard import guard_triton

__version__ = "0.1.0"

guard_triton()  # napari imports plugins after its OpenGL canvas exists; see _torch_guard

__all__ = ["__version__"]
