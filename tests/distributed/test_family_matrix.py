"""Every family trains the same in every layout (issue 24): from the same Hugging Face weights and the same
global batch, each layout's first-step gradient of every parameter and the losses of the first steps are
within 1e-5 of one process. The families come from spindle.interop.families.FAMILIES (a new family joins
by getting a folder in tests/family_folders.py, which refuses a family it lacks), the layouts from
tests/distributed/family_matrix.py; all of a world size train in that world's one launch."""

import pytest

from distributed.family_matrix import LAYOUTS, MOE_FOLDERS, offered
from distributed.marks import needs_pipeline_torch
from family_folders import FAMILY_SWITCHES

pytestmark = pytest.mark.dist
TOL = 1e-5


def run_of(layout: str) -> str:
    return f"families_world{LAYOUTS[layout][0]}"


def cases():
    for folder in FAMILY_SWITCHES:
        for layout in LAYOUTS:
            if layout == "single" or not offered(folder, layout):
                continue
            marks = [pytest.mark.runs("families_world1", run_of(layout))]
            if "pipeline" in LAYOUTS[layout][1]:
                marks.append(needs_pipeline_torch)
            yield pytest.param(folder, layout, marks=marks, id=f"{folder}-{layout}")


def test_every_moe_folder_has_its_layouts():
    """A new mixture-of-experts folder in tests/family_folders.py is not left with the one process alone."""
    assert set(MOE_FOLDERS) == {name for name, (_, switches) in FAMILY_SWITCHES.items() if switches.get("num_experts")}


@pytest.mark.parametrize("folder, layout", list(cases()))
def test_family_trains_the_same_in_the_layout(layout_runs, folder, layout):
    reference = layout_runs["families_world1"].output()[(folder, "single")]
    result = layout_runs[run_of(layout)].output()[(folder, layout)]
    assert set(result["grads"]) == set(reference["grads"]), "a layout that loses or adds parameters"
    worst = max(reference["grads"], key=lambda n: (result["grads"][n] - reference["grads"][n]).abs().max().item())
    difference = (result["grads"][worst] - reference["grads"][worst]).abs().max().item()
    print(f"MATRIX {folder} {layout}: gradient {difference:.1e} ({worst})")  # the closing note's table (-s)
    assert difference < TOL, f"{folder} {layout}: gradient of {worst} off by {difference:.2e}"
    losses, expected = result["losses"], reference["losses"]
    assert len(losses) == len(expected) and max(abs(a - b) for a, b in zip(losses, expected)) < TOL, \
        (losses, expected)
