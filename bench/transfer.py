"""Transfer benchmark: ``python bench/transfer.py [--quick] [--json]``.

The logic lives in ``kvbridge.connector.benchmark_transfer`` (also ``kvbridge bench
transfer``); results are recorded in bench/README.md ("Transfer").
"""

from __future__ import annotations

import argparse
import sys

from kvbridge.connector import benchmark_transfer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=benchmark_transfer.__doc__.splitlines()[0])
    benchmark_transfer.add_arguments(p)
    return benchmark_transfer.run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
