"""A training run's folder: which one a run writes into, and what it may find there.

* **Unnamed runs get a folder of their own.** With ``logging.experiment_name`` null (the default) a
  run writes into a new ``log_dir/run-YYYYmmdd-HHMMSS-NNN`` (:func:`new_run_dir`: created at once, so
  two runs started in the same second never share one); a resumed run continues in its own folder.
  The napari plugin names its runs with the same function.
* **A finished or started run is never trained over silently.** A folder that holds checkpoints is
  refused unless the run resumes it or ``logging.overwrite`` is true (CLI ``--overwrite``).
* **Nothing of the old run stays beside the new model.** Overwriting first removes everything a run
  and its evaluations wrote there (:data:`RUN_OUTPUTS`: checkpoints, ``eval_*`` reports, pictures,
  history, seed runs and their summary); other files in the folder are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..storage import OutputLock

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("pfmseg_engine.training")

#: What a run (and ``evaluate`` beside its checkpoints) writes in its folder, as glob patterns.
RUN_OUTPUTS = ("checkpoints/*.pt", "checkpoints/.*.tmp", "checkpoints/eval_*", "visualizations", "history.csv",
               "history.json", "training_history.png", "training.log", "config.yaml", "seeds_summary.csv",
               "seeds_summary.json")
#: The folders of the runs of ``system.seeds`` inside an experiment folder.
SEED_RUN = re.compile(r"seed_-?\d+")


def new_run_dir(parent: str | Path, prefix: str = "run") -> Path:
    """Create and return a new folder ``parent/<prefix>-YYYYmmdd-HHMMSS-NNN`` (NNN: the first number free).

    The folder is created here, atomically, so concurrent runs never pick the same one.
    """
    parent = Path(parent).expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    number = 0
    while True:
        folder = parent / f"{prefix}-{stamp}-{number:03d}"
        try:
            folder.mkdir()
        except FileExistsError:
            number += 1
            continue
        return folder


def run_folder_of(resume: str | Path) -> Path:
    """The run folder of a ``--resume`` path (a ``last.pt``, its ``checkpoints`` folder or the run folder)."""
    path = Path(resume).expanduser()
    if path.suffix == ".pt" or path.is_file():
        path = path.parent
    return path.parent if path.name == "checkpoints" else path


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoints of the run (or the seed runs) in ``folder``: non-empty means it holds a run.

    Only a folder with a run's own record (``config.yaml`` or ``training.log``) beside its checkpoints
    counts: a ``checkpoints`` folder of the user's (backbone weights, say) is not a run to overwrite.
    """
    if not any((folder / marker).is_file() for marker in ("config.yaml", "training.log")) and not any(
            SEED_RUN.fullmatch(seed_run.name) for seed_run in folder.glob("seed_*")):
        return []
    found = sorted((folder / "checkpoints").glob("*.pt"))
    for seed_run in sorted(folder.glob("seed_*")):
        if SEED_RUN.fullmatch(seed_run.name):
            found += sorted((seed_run / "checkpoints").glob("*.pt"))
    return found


def clear_run(folder: Path) -> None:
    """Remove what a run wrote in ``folder`` (:data:`RUN_OUTPUTS`, and its seed runs); nothing else.

    A ``checkpoints`` that is a symbolic link loses the link only: what it points at is not the run's.
    """
    checkpoints = folder / "checkpoints"
    if checkpoints.is_symlink():
        checkpoints.unlink()
    for pattern in RUN_OUTPUTS:
        for path in folder.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    for seed_run in folder.glob("seed_*"):
        if SEED_RUN.fullmatch(seed_run.name) and seed_run.is_dir() and not seed_run.is_symlink():
            clear_run(seed_run)
            _remove_if_empty(seed_run)
    _remove_if_empty(folder / "checkpoints")


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def check_run_dir(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a ``folder`` that holds one, or clear the old one with ``overwrite``.

    Resuming continues the run that is there, so it is always allowed.
    """
    if resume:
        return
    found = checkpoints_in(folder)
    if found and not overwrite:
        raise ConfigError(
            f"{folder} already holds a training run ({found[0].relative_to(folder)}). Continue it (resume="
            f"'{folder}'), train into another folder (logging.experiment_name; unset, every run gets a new one), or "
            "replace it (logging.overwrite: true), which deletes its checkpoints and evaluations.",
            fix_with=("resume", "overwrite=True"),
        )
    if overwrite and found:  # nothing is removed from a folder that holds no run
        clear_run(folder)
        log.warning("Overwriting the run in %s: its checkpoints, evaluations and history were removed.", folder)


def claim_output_dir(config: TrainConfig, resume: str | Path | None = None) -> TrainConfig:
    """``config`` with the folder this run writes into, checked (or cleared) by :func:`check_run_dir`.

    An unnamed config gets the folder of the run it resumes, or a new one (:func:`new_run_dir`). The
    returned config has ``logging.overwrite`` false: overwriting acts once, on what an earlier run
    left, so the run's own ``config.yaml`` never overwrites anything when it is run again.
    """
    section = config.logging
    if section.experiment_name is None:
        folder = run_folder_of(resume) if resume else new_run_dir(section.log_dir)
        section = replace(section, log_dir=str(folder.parent), experiment_name=folder.name)
    if section != config.logging or section.overwrite:
        config = replace(config, logging=replace(section, overwrite=False))
    check_run_dir(config.output_dir, resume=bool(resume), overwrite=section.overwrite)
    return config


@contextlib.contextmanager
def claimed_output_dir(config: TrainConfig, resume: str | Path | None = None) -> Iterator[TrainConfig]:
    """:func:`claim_output_dir` for the length of a run. The folders a new unnamed run's claim creates
    (its run folder, a missing ``log_dir``) are removed again if the run leaves them empty, so a run that
    fails before writing anything (a bad annotation file, a typo in the config) leaves no trace."""
    fresh = config.logging.experiment_name is None and not resume
    parent = Path(config.logging.log_dir).expanduser().absolute()
    created = [folder for folder in reversed([parent, *parent.parents]) if not folder.exists()] if fresh else []
    config = claim_output_dir(config, resume)
    if fresh:
        created.append(config.output_dir.absolute())
    try:
        yield config
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()  # only ever an empty folder: whatever the run wrote stays
            except OSError:
                break


class RunLock(OutputLock):
    """One training run at a time in a run folder (``.checkpoints.lock`` inside it, held for the whole run).

    Without it two runs started together into the same folder would both find no checkpoint, both pass
    :func:`check_run_dir` and write over each other; the second is refused at once instead.
    """

    def __init__(self, folder: str | Path):
        super().__init__(Path(folder) / "checkpoints", wait=0.0)

    busy_fix = ()  # a training run never waits for another one

    def busy_message(self) -> str:
        return (f"Another training run ({self.holder()}) is writing into {self.output.parent}. Wait for it to "
                "finish, or train into another folder (logging.experiment_name; unset, every run gets a new one).")

