"""Keep torch from loading Triton's LLVM into a process whose OpenGL driver already loaded Mesa's.

Under Mesa's software OpenGL (llvmpipe: CI runners, virtual machines, remote desktops) the GL
driver maps ``libLLVM``; importing ``triton`` afterwards (torch does so through ``torch._dynamo``,
which torchvision, timm and peft import) loads a second, statically linked LLVM and the process
dies with a segmentation fault. The plugin never compiles kernels, so when ``libLLVM`` is already
mapped and Triton is not loaded yet, Triton is marked unavailable: torch then simply reports
``has_triton() == False``. Set ``PFMSEG_ALLOW_TRITON=1`` to opt out.
"""

from __future__ import annotations

import os
import sys


def llvm_loaded() -> bool:
    """Whether a shared ``libLLVM`` is mapped into this process (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def guard_triton() -> bool:
    """Block ``import triton`` when it would crash the process; returns whether it was blocked."""
    if os.environ.get("PFMSEG_ALLOW_TRITON") == "1" or "triton" in sys.modules:
        return False
    if llvm_loaded():
        sys.modules["triton"] = None  # type: ignore[assignment]  # import triton -> ImportError
        return True
    return False
