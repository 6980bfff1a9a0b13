"""The loss curves (Learn Concept's loss_curve IMAGE, training's curves PNG): readable at a glance."""

import numpy as np
import pytest

from mod_adapter.modules.curve_plot import MARKER, loss_panel, moving_average, nice_ticks, render_panels


@pytest.mark.parametrize("low, high, expected", [
    (0.0341, 0.345, [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]),
    (1, 1400, [250, 500, 750, 1000, 1250]),
    (0.5, 1.5, [0.6, 0.8, 1.0, 1.2, 1.4]),
])
def test_ticks_are_round_numbers_inside_the_range(low, high, expected):
    assert nice_ticks(low, high) == pytest.approx(expected)


def test_the_moving_average_is_the_mean_of_the_last_values():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([4.0], 10) == [4.0]


def test_the_learn_curve_averages_a_twentieth_of_the_run_and_marks_stage_two():
    rng = np.random.default_rng(0)
    losses = list(np.linspace(1.0, 0.6, 1400) + rng.normal(0, 0.3, 1400))
    losses[10] = 50.0  # one spike does not squash the rest into a flat line
    panel = loss_panel(list(range(1, 1401)), losses, [(801, "stage 2")])
    assert "over 70 steps" in panel.label and panel.robust_range
    image = np.asarray(render_panels([panel], "Learn Concept", panel_height=260))
    marker_columns = np.where((image == MARKER).all(axis=-1).any(axis=0))[0]
    # the frame spans x 80..880 for steps 1..1400: step 801 sits at about x 537
    assert marker_columns.size and abs(marker_columns.min() - (80 + 800 / 1399 * 800)) < 3  # the line, then its label
    dark = (image == (20, 60, 160)).all(axis=-1)
    rows = np.where(dark.any(axis=1))[0]
    assert rows.max() - rows.min() > 40  # the average's fall from 1.0 to 0.6 fills the panel's height
