"""``models``: the table of every registered backbone (the PFMs, then the from-scratch ``unet`` baseline)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..backbones.specs import ALL_SPECS, BASELINES, BackboneSpec
from . import add_command

COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "name"),
    ("title", "model"),
    ("architecture", "architecture"),
    ("embed_dim", "dim"),
    ("patch_size", "patch"),
    ("prefix_tokens", "prefix"),
    ("params", "params"),
    ("normalization", "mean / std"),
    ("weights", "weights from"),
)


def spec_row(spec: BackboneSpec) -> dict[str, Any]:
    """One backbone as plain data (what ``--json`` prints and the napari widget shows)."""
    return {
        "name": spec.name,
        "title": spec.title,
        "family": spec.family,
        "kind": spec.kind,
        "from_scratch": spec.from_scratch,
        "architecture": spec.timm_arch,
        "embed_dim": spec.embed_dim,
        "patch_size": spec.patch_size,
        "prefix_tokens": spec.num_prefix_tokens,
        "params": spec.num_params,
        "params_exact": spec.params_exact,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "checkpoint_layout": spec.checkpoint_layout,
        "weights": spec.weights_source,
        "hf_hub_id": spec.hf_hub_id,
        "aliases": list(spec.aliases),
        "fixed_input_size": spec.fixed_input_size,
        "notes": spec.notes,
    }


def _cell(row: dict[str, Any], key: str) -> str:
    if row.get(key, "") is None:  # e.g. the embedding width of the unet baseline
        return "-"
    if key == "params":
        millions = row["params"] / 1e6
        return f"{millions:,.1f}M" if row["params_exact"] else f"~{millions:,.0f}M"
    if key == "normalization":
        return "{} / {}".format(*("(" + ", ".join(f"{v:.3g}" for v in row[k]) + ")" for k in ("mean", "std")))
    return str(row[key])


def format_table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title in COLUMNS]] + [[_cell(r, key) for key, _ in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = [spec_row(spec) for spec in ALL_SPECS]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        baselines = ", ".join(spec.name for spec in BASELINES)
        print(f"\n{len(rows)} backbones. Weights: a local file or hf-hub id via 'pfm_weights_path'/--weights; "
              f"{baselines}: from-scratch baseline without a foundation model (no weights, every weight trains).")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "models", summary="list every supported pathology foundation model",
        description="List every backbone pfmseg builds: name, architecture, embedding size, patch size,\n"
                    "parameter count, input normalisation and where its published weights are.",
        examples=["python -m pfmseg_engine models", "python -m pfmseg_engine models --json > backbones.json"])
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)
