"""The CLI's spelling of the settings that fix an engine error or warning.

Engine messages word their fix for every caller (``mpp=0.5``, ``tissue=False``, config keys) and name the
settings in :attr:`~pfmseg_engine.errors.PfmsegError.fix_with` (a log record: ``extra={"fix_with": ...}``).
The CLI adds its flags for them here, and only the flags the running command has, so a message never
points at a flag the user cannot pass.
"""

from __future__ import annotations

import logging
from collections.abc import Container

#: setting named in ``fix_with`` -> (the command's argparse dest, how the CLI says it).
FLAGS: dict[str, tuple[str, str]] = {
    "mpp": ("mpp", "--mpp UM_PER_PX"),
    "target_mpp": ("target_mpp", "--target_mpp UM_PER_PX"),
    "tissue=False": ("tissue", "--no-tissue"),
    "reader": ("reader", "--reader NAME"),
    "overwrite=True": ("overwrite", "--overwrite"),
    "resume": ("resume", "--resume RUN"),
    "wait": ("wait", "--wait SECONDS"),
    "weights": ("weights", "--weights PATH"),
    "CompareSpec.weights": ("weights", "--weights NAME=PATH"),  # a comparison's weights: one per backbone
    "weights=None": ("weights", "leave out --weights"),
    "strategy='full'": ("strategy", "--strategy full"),
    "strict=True": ("strict", "--strict"),
    "strict=False": ("strict", "leave out --strict"),
    "frame='file'": ("annotation_frame", "--annotation_frame file"),
    "clip=True": ("clip_annotations", "--clip_annotations"),
    "class_map": ("class_map", "--class_map OLD=NEW"),
    "dataset.json_file": ("input_json", "--input_json PATH"),
    "slides": ("slides", "--slides SLIDE [SLIDE ...] --annotations FILE [FILE ...]"),
    "pfms": ("pfms", "--pfms NAME,NAME"),
    "seeds": ("seeds", "--seeds N or --seeds S,S"),
    "tiny": ("tiny", "--tiny"),
    "checkpoints": ("checkpoints", "--checkpoints PATH [PATH ...]"),
}


def flag_hint(source: object, dests: Container[str] | None = None) -> str:
    """" CLI: --mpp UM_PER_PX." for an error or log record whose ``fix_with`` names settings with a flag
    ("" when none has one). ``dests``: the running command's argparse dests (``vars(args)``); None: any."""
    names = getattr(source, "fix_with", None) or ()
    phrases = []
    for name in names:
        dest, phrase = FLAGS.get(name, ("", ""))
        if phrase and (dests is None or dest in dests) and phrase not in phrases:
            phrases.append(phrase)
    return f" CLI: {' or '.join(phrases)}." if phrases else ""


class FlagHints(logging.Filter):
    """Adds :func:`flag_hint` to the log records the CLI prints (engine warnings that name a fix)."""

    def __init__(self, dests: Container[str] | None = None):
        super().__init__()
        self.dests = dests

    def filter(self, record: logging.LogRecord) -> bool:
        hint = flag_hint(record, self.dests)
        if hint:
            record.msg, record.args = f"{record.getMessage()}{hint}", None
            record.fix_with = ()  # worded once, however many handlers print it
        return True
