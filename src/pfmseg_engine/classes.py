"""Default class names: what every front end shows for a class nobody named.

One rule, so a model trained without names, its checkpoint, its predictions and the napari layers
built from them all call class ``i`` the same thing.
"""

from __future__ import annotations


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """``("class_0", ..., "class_{n-1}")``: the names of ``num_classes`` unnamed classes."""
    return tuple(f"class_{i}" for i in range(int(num_classes)))
