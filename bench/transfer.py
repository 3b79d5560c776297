"""Transfer benchmark: ``python bench/transfer.py [--quick] [--json]``.

The logic lives in ``kvbridge.connector.benchmark_transfer`` (also ``kvbridge bench
transfer``); results are recorded in bench/README.md ("Transfer").
"""

from __future__ import annotations

import sys

from kvbridge.connector.benchmark_transfer import main

if __name__ == "__main__":
    sys.exit(main())
