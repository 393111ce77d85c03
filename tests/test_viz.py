"""viz.sliders: ipywidgets sliders in Jupyter, the start values drawn once in a static render."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import pytest  # noqa: E402

from ldm_mini import viz  # noqa: E402


def test_sliders_are_widgets_with_the_given_ranges_and_draw_the_start_values():
    calls = []

    def draw(step, guidance, sampler):
        calls.append((step, guidance, sampler))

    shown = viz.sliders(draw, step=(0, 19, 1, 5), guidance=(0.0, 8.0, 0.5, 2.0), sampler=["ddim", "plms"])
    knobs = {w.description: w for w in shown.widget.children if hasattr(w, "description") and w.description}
    assert isinstance(knobs["step"], ipywidgets.IntSlider)
    assert (knobs["step"].min, knobs["step"].max, knobs["step"].value) == (0, 19, 5)
    assert isinstance(knobs["guidance"], ipywidgets.FloatSlider) and knobs["guidance"].value == 2.0
    assert list(knobs["sampler"].options) == ["ddim", "plms"]
    assert not knobs["step"].continuous_update  # a sample takes seconds: redraw on release
    assert calls == [(5, 2.0, "ddim")]  # interact draws the start values at once
    knobs["step"].value = 7
    assert calls[-1] == (7, 2.0, "ddim")


def test_a_static_render_draws_the_start_values_once_without_widgets(monkeypatch):
    monkeypatch.setenv("LDM_MINI_STATIC", "1")
    calls = []
    result = viz.sliders(lambda t, seed: calls.append((t, seed)) or "drawn", t=(0, 999, 1, 500), seed=[3, 4])
    assert calls == [(500, 3)] and result == "drawn"


@pytest.mark.parametrize("knob", [(0, 10, 1), "abc", []])
def test_a_malformed_knob_is_a_clear_error(knob):
    with pytest.raises(ValueError, match="knob 'x'"):
        viz.sliders(lambda x: None, x=knob)


def test_differences_draws_the_images_and_their_difference_maps_on_one_scale():
    import torch

    images = torch.zeros(3, 3, 8, 8)
    images[1, :, 2, 2] = 0.5  # one pixel differs by a quarter of [-1, 1]
    top, bottom = viz.differences(images, ["a", "b", "c"], title="t")
    assert [t.get_text() for t in bottom.get_xticklabels()] == [
        "(the reference)",
        "max 2.5e-01",
        "max 0.0e+00",
    ]
    with pytest.raises(ValueError, match="one label per image"):
        viz.differences(images, ["a", "b"])
