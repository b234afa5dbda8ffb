"""Are a backbone's weights at hand now: a local file, the local Hugging Face cache, or neither? (torch-free)

Asked by front ends before a run (which backbones a comparison can use without a download, what the
model form shows), so the answer is structured data here and each front end only words it. Nothing
is downloaded and the network is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .specs import BackboneSpec

HUB_PREFIX = "hf-hub:"

#: ``WeightsStatus.kind`` values, with the wording front ends show.
KINDS: dict[str, str] = {
    "none_needed": "none needed (trained from scratch)",
    "file": "weights file found",
    "missing_file": "weights file NOT found",
    "no_public": "no public weights: give a local file",
    "cached": "(in local cache)",
    "download": "(download needs access)",
}


@dataclass(frozen=True)
class WeightsStatus:
    """Where a backbone's weights would come from (``source``: a path or ``hf-hub:<repo>``) and whether
    they are usable without a download (``available``)."""

    kind: str
    source: str = ""

    @property
    def available(self) -> bool:
        return self.kind in ("none_needed", "file", "cached")

    def describe(self) -> str:
        """One line for a model form: "weights file found", "hf-hub:<repo> (in local cache)", ..."""
        return f"{self.source} {KINDS[self.kind]}" if self.kind in ("cached", "download") else KINDS[self.kind]


def weights_status(spec: BackboneSpec, weights: str | Path | None) -> WeightsStatus:
    """Where ``spec``'s weights come from given the user's ``weights`` setting (a path, ``hf-hub:[repo]`` or
    empty for the published repository), looking only at the disk and the local hub cache."""
    if spec.from_scratch:
        return WeightsStatus("none_needed")
    text = str(weights or "")
    if text and not text.startswith(HUB_PREFIX):
        return WeightsStatus("file" if Path(text).expanduser().is_file() else "missing_file", text)
    repo = text[len(HUB_PREFIX):] or spec.hf_hub_id
    if not repo:
        return WeightsStatus("no_public")
    return WeightsStatus("cached" if _in_hub_cache(repo, spec.hf_filenames) else "download", f"{HUB_PREFIX}{repo}")


def weights_available(spec: BackboneSpec, weights: str | Path | None, *, tiny: bool = False) -> bool:
    """Whether a model on ``spec`` can be built now without a download: no weights needed (from scratch,
    or ``tiny`` random test models), a local file, or the hub repository's file in the local cache."""
    return tiny or weights_status(spec, weights).available


def _in_hub_cache(repo: str, filenames: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in filenames)
    except Exception:  # huggingface_hub missing or its cache unreadable: not at hand
        return False
