"""The layout tests' shared launches (layout_runs.py): a test declares the jobs it reads with
`@pytest.mark.runs("single", "dp2", ...)` and gets them from the `layout_runs` fixture."""

import pytest

from distributed.layout_runs import LayoutRuns


@pytest.fixture(scope="session")
def layout_runs(request, tmp_path_factory):
    wanted = {name for item in request.session.items for mark in item.iter_markers("runs") for name in mark.args}
    return LayoutRuns(tmp_path_factory.mktemp("layout_runs"), wanted)
