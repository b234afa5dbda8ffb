"""``compare --budget``: the CLI passes the whole comparison's wall time to the engine and shows the feature-cache
fill as a progress bar (none with --no-progress). The comparison itself is scripted: what is tested is the CLI."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

import pfmseg_engine.compare as compare
from pfmseg_engine.cli import main
from pfmseg_engine.commands.compare import CacheBar
from pfmseg_engine.compare import Phase
from test_compare import write_config


class ScriptedComparison:
    """Stands in for :class:`~pfmseg_engine.compare.Comparison`: records its spec, yields a cache fill of two
    backbones (4 and 2 windows) and a training phase, and ends with an empty leaderboard."""

    specs: ClassVar[list] = []

    def __init__(self, config, spec, output_dir, **options):
        self.spec, self.output_dir = spec, Path(output_dir)
        ScriptedComparison.specs.append(spec)

    def iter_run(self):
        for done in (0, 2, 4):
            yield "phase", Phase("cache", done, 4)
        for done in (1, 2):
            yield "phase", Phase("cache", done, 2)
        yield "phase", Phase("train", 1, 3)
        board = SimpleNamespace(eval_split="test", table=lambda: "TABLE", notes=[], winner=None, next_steps=[],
                                failed=[])
        return SimpleNamespace(leaderboard=board, files={}, failed=[], status="completed")


@pytest.fixture
def scripted(monkeypatch):
    ScriptedComparison.specs = []
    monkeypatch.setattr(compare, "Comparison", ScriptedComparison)
    return ScriptedComparison.specs


def command(config: Path, out: Path, *flags: str) -> list[str]:
    return ["compare", "--config", str(config), "--pfms", "kaiko-vits16", "--tiny", "--output_dir", str(out), *flags]


def test_budget_reaches_the_comparison_and_the_cache_fill_shows_a_bar(slide_tile_dataset, tmp_path, scripted,
                                                                      capsys):
    config = write_config(tmp_path, slide_tile_dataset)
    assert main(command(config, tmp_path / "cmp", "--budget", "90")) == 0
    assert scripted[-1].budget_s == 90.0
    err = capsys.readouterr().err
    assert "caching backbone features" in err and "0/4" in err and "0/2" in err  # one bar per fill
    assert "/3" not in err  # training shows its own bars, not this one

    assert main(command(config, tmp_path / "cmp", "--no-progress")) == 0
    assert scripted[-1].budget_s is None  # no --budget: no limit
    assert "caching backbone features" not in capsys.readouterr().err


def test_budget_must_be_positive(slide_tile_dataset, tmp_path, capsys):
    config = write_config(tmp_path, slide_tile_dataset)
    assert main(command(config, tmp_path / "cmp", "--budget", "0", "--no-progress")) == 2
    assert "time budget must be positive seconds" in capsys.readouterr().err


def test_the_cache_bar_follows_each_fill_and_closes_when_it_is_done():
    bars = CacheBar()
    bars.show(Phase("cache", 0, 4))
    first = bars.bar
    bars.show(Phase("cache", 3, 4))
    bars.show(Phase("train", 1, 3))  # not a cache phase: left alone
    assert bars.bar is first and (first.n, first.total) == (3, 4)
    bars.show(Phase("cache", 4, 4))
    assert bars.bar is None and first.n == 4  # finished: closed
    bars.show(Phase("cache", 1, 2))
    assert (bars.bar.n, bars.bar.total) == (1, 2)  # the next backbone's fill
    bars.close()
    silent = CacheBar(enabled=False)
    silent.show(Phase("cache", 1, 2))
    assert silent.bar is None
