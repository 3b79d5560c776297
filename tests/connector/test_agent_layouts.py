"""Every registered layout, both engines, pull and push, between two OS processes.

The receiving process checks every byte of its allocations: the selected logical
blocks equal the source's (torch indexing on a regenerated copy of the source),
and every other byte keeps its poison. The holder of a pulled cache is checked
unchanged and gets the completion notice; so does the receiver of a push.
"""

from __future__ import annotations

import pytest
from kvbridge.topology.layouts import LAYOUTS
from xfer_harness import CacheCfg, pull, push

SRC_IDS = [3, 4, 5, 9, 0, 14]
DST_IDS = [7, 8, 9, 1, 15, 2]
CASES = [(layout, {}) for layout in LAYOUTS] + [
    ("packed", {"storage_offset": 24, "block_pad": 40}),  # layout 9
    ("kv_outer", {"storage_offset": 8, "block_pad": 16}),
]
IDS = [f"{layout}{'+pad' if kw else ''}" for layout, kw in CASES]


@pytest.mark.parametrize(("layout", "extra"), CASES, ids=IDS)
def test_pull_every_layout(procs, layout, extra):
    a, b = procs
    geometry = CacheCfg(layout, 0).with_(**extra)
    nbytes, descriptors, staged = pull(
        a, geometry.seeded(102, poison=103), b, geometry.seeded(101), SRC_IDS, DST_IDS
    )
    assert nbytes > 0 and descriptors >= 1 and not staged


@pytest.mark.parametrize(("layout", "extra"), CASES, ids=IDS)
def test_push_every_layout(procs, layout, extra):
    a, b = procs
    geometry = CacheCfg(layout, 0).with_(**extra)
    nbytes, _, staged = push(
        a, geometry.seeded(201), b, geometry.seeded(202, poison=203), SRC_IDS, DST_IDS
    )
    assert nbytes > 0 and not staged
