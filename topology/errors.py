"""The one exception type of kvbridge.topology."""

from __future__ import annotations


class LayoutError(ValueError):
    """A cache layout, a spec or a transfer request that cannot be planned.

    Messages name the layer (and view) and the problem, e.g.
    ``layer 'layer3' view 1: negative stride (-8) in dim 2``.
    """
