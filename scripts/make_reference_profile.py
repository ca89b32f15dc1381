"""Write data/reference_profile.json from a prepared dataset (run once on real MNIST).

python scripts/make_reference_profile.py data/prepared data/reference_profile.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.atomic import write_json
from pipeline.data.stats import build_reference_profile, compute_stats


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    _, table = compute_stats(Path(argv[0]))
    write_json(Path(argv[1]), build_reference_profile(table))
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
