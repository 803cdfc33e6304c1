"""Many users in real browsers: a few headless Chromium tabs over the real websocket of one
`make run`-like server, uploading different photos at once; each tab must show its own
prediction (the library's answer for its bytes) and no other tab's. Times are printed, not
asserted (the sweep is `make bench`: benchmarks/tabs.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import tabs
from tests.conftest import DEFAULT_CKPT

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not tabs.HAVE_BROWSER,
                       reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)"),
    pytest.mark.skipif(not DEFAULT_CKPT.exists(), reason="no default checkpoint"),
]


@pytest.mark.timeout(1200)
def test_concurrent_tabs_each_see_their_own_prediction(tmp_path: Path) -> None:
    rows = tabs.sweep([3], tmp_path, check=True)
    row, = rows
    print(row)
    assert row["settled"] == row["tabs"] == 3
    assert row["all_own"], row["failures"]
