"""Engine messages word their fix for every caller; the CLI adds its own flag (pfmseg_engine.commands.hints)."""

from __future__ import annotations

import argparse
import ast
import logging
import pickle
import re
from pathlib import Path

import pytest
from PIL import Image

from pfmseg_engine.cli import build_parser
from pfmseg_engine.commands.hints import FLAGS, FlagHints, flag_hint
from pfmseg_engine.errors import ConfigError, SlideError
from pfmseg_engine.slides import open_slide

ENGINE = Path(__file__).resolve().parents[1] / "src" / "pfmseg_engine"
#: The front end's own code, and packages whose messages are checked with their own tests.
FRONT_END = ("commands", "cli.py", "live")
#: Messages not yet worded for every caller (they still name the CLI's flags).
NOT_YET_WORDED: set[str] = set()
LOG_CALLS = {"debug", "info", "warning", "error", "exception", "critical", "warn"}


def engine_modules() -> list[Path]:
    return [p for p in sorted(ENGINE.rglob("*.py"))
            if p.relative_to(ENGINE).parts[0] not in FRONT_END]


def cli_flags() -> set[str]:
    """Every option string of every subcommand (``--mpp``, ``--no-tissue``...)."""
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    flags = set()
    for command in sub.choices.values():
        for action in command._actions:
            flags.update(s for s in action.option_strings if s.startswith("--") and s != "--help")
    return flags


def message_strings(tree: ast.AST):
    """String constants in ``raise ...(...)``, log calls and ``warnings.warn``: what users read."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            roots = [node.exc]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_CALLS:
            roots = list(node.args)
        else:
            continue
        for root in roots:
            for inner in ast.walk(root):
                if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                    yield inner.lineno, inner.value


def fix_with_names(tree: ast.AST):
    """Every setting name an engine error or log record gives as ``fix_with`` (or a lock's ``busy_fix``)."""
    for node in ast.walk(tree):
        values: list[ast.AST] = []
        if isinstance(node, ast.keyword) and node.arg == "fix_with":
            values = [node.value]
        elif isinstance(node, ast.Dict):
            values = [v for k, v in zip(node.keys, node.values, strict=True)
                      if isinstance(k, ast.Constant) and k.value == "fix_with"]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "busy_fix" for t in node.targets):
            values = [node.value]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "busy_fix":
            values = [node.value] if node.value is not None else []
        for value in values:
            if isinstance(value, (ast.Tuple, ast.List)):
                for element in value.elts:
                    assert isinstance(element, ast.Constant), ast.dump(element)
                    yield element.value


def test_every_setting_an_engine_message_names_has_a_cli_spelling():
    used = {name for path in engine_modules() for name in fix_with_names(ast.parse(path.read_text()))}
    assert {"mpp", "target_mpp", "tissue=False", "overwrite=True", "wait", "resume", "weights"} <= used
    assert used - set(FLAGS) == set()


def test_engine_messages_name_no_cli_flag():
    flags = cli_flags()
    assert {"--mpp", "--no-tissue", "--overwrite", "--wait", "--strict", "--class_map"} <= flags
    pattern = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
    found = []
    for path in engine_modules():
        where = path.relative_to(ENGINE).as_posix()
        if where in NOT_YET_WORDED:
            continue
        for line, text in message_strings(ast.parse(path.read_text())):
            found += [f"{where}:{line}: {flag}" for flag in pattern.findall(text) if flag in flags]
    assert found == []


def test_the_cli_adds_its_flag_to_an_engine_message(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "tile.png")
    with pytest.raises(SlideError, match="mpp") as refused:
        open_slide(tmp_path / "tile.png", mpp=-1)
    error = refused.value
    assert "--" not in str(error) and flag_hint(error) == " CLI: --mpp UM_PER_PX."
    assert flag_hint(pickle.loads(pickle.dumps(error))) == " CLI: --mpp UM_PER_PX."  # a cluster task's error
    both = ConfigError("x", fix_with=("resume", "overwrite=True"))
    assert flag_hint(both) == " CLI: --resume RUN or --overwrite."
    assert flag_hint(both, {"overwrite": False}) == " CLI: --overwrite."  # only flags the command has
    assert flag_hint(ConfigError("x")) == flag_hint(ValueError("x")) == flag_hint(None) == ""


def test_the_cli_adds_its_flag_to_an_engine_warning():
    logger = logging.getLogger("pfmseg_engine.test_cli_hints")
    printed: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            printed.append(self.format(record))

    handler = Keep()
    handler.addFilter(FlagHints({"strict": False}))
    logger.addHandler(handler)
    try:
        logger.warning("%s left out 2 points; strict=True refuses them.", "a.geojson",
                       extra={"fix_with": ("strict=True",)})
        logger.warning("no fix named")
    finally:
        logger.removeHandler(handler)
    assert printed == ["a.geojson left out 2 points; strict=True refuses them. CLI: --strict.", "no fix named"]


def test_slide_training_and_comparison_settings_get_their_flag():
    from pfmseg_engine.compare.spec import Combination, CompareSpec, parse_seeds, parse_weights, run_config
    from pfmseg_engine.errors import WeightsError
    from pfmseg_engine.training.slides import prepare_slides

    with pytest.raises(ConfigError, match=r"give one annotation file per slide") as refused:
        prepare_slides(["a.svs"], [], train_mpp=1.0)
    assert flag_hint(refused.value) == " CLI: --slides SLIDE [SLIDE ...] --annotations FILE [FILE ...]."
    for bad in (0, "a,b", [1, 1]):
        with pytest.raises(ConfigError) as refused:
            parse_seeds(bad)
        assert "--" not in str(refused.value) and flag_hint(refused.value) == " CLI: --seeds N or --seeds S,S."
    with pytest.raises(ConfigError, match="pfms") as refused:
        CompareSpec(pfms="")
    assert flag_hint(refused.value) == " CLI: --pfms NAME,NAME."
    with pytest.raises(ConfigError, match="NAME=PATH") as refused:
        parse_weights(["uni_v1"])
    assert flag_hint(refused.value) == " CLI: --weights NAME=PATH."  # a comparison's weights name their backbone

    class Base:  # run_config refuses a full-size backbone without weights before it reads the config
        class model:
            tiny = False

    with pytest.raises(WeightsError, match=r"No weights for uni_v1: add uni_v1=/path/to/weights") as refused:
        run_config(Base(), Combination("uni_v1", "frozen"), 0, Path("run"), weights=None, tiny=False)
    assert "--" not in str(refused.value)
    assert flag_hint(refused.value) == " CLI: --weights NAME=PATH or --tiny."
