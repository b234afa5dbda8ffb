"""Every subcommand explains itself: a description and worked examples, in plain text."""

from __future__ import annotations

import re

import pytest

from pfmseg_engine.cli import COMMANDS, build_parser


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help_has_description_and_examples(name, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([name, "--help"])
    text = capsys.readouterr().out
    _, _, rest = text.partition("\n\n")
    description = rest.split("\n\noptions:")[0]
    assert len(description.split()) >= 8, text  # a sentence, not just the usage line
    examples = text.split("examples:\n", 1)[1]
    assert all(line.strip().startswith("python -m pfmseg_engine " + name) for line in examples.strip().splitlines())
    assert not re.search(r"``|:(func|mod|class|meth):|\\\\$", text), text  # no raw docstring markup


def test_training_curve_has_whole_epoch_ticks_on_one_axis(tmp_path):
    from pfmseg_engine.training.history import History

    history = History([{"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "mIoU": 0.4, "Mean_Dice": 0.5}])
    figure = history.figure()
    loss_axis, metric_axis = figure.axes
    figure.canvas.draw()
    assert loss_axis.get_shared_x_axes().joined(loss_axis, metric_axis)
    for axis in (loss_axis, metric_axis):
        ticks = [t for t in axis.get_xticks() if axis.get_xlim()[0] <= t <= axis.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert 1 in ticks and axis.get_xlim()[0] < 1 < axis.get_xlim()[1]
    history.append({"epoch": 2, "train_loss": 0.7})
    history.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0 and not list(tmp_path.glob(".*"))
