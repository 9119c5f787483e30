"""Wall-clock time of `wprctl quickstart` (the default demo, not --small) from an empty folder.

    python -m benchmarks.quickstart [--small]

Target: <= 600 s on a 2-core CPU. Also prints the headline figures the demo shows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks._project import wprctl


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wprctl-quickstart-")) / "demo"
    t0 = time.time()
    wprctl("quickstart", str(root), *(["--small"] if args.small else []))
    seconds = time.time() - t0
    status = json.loads(wprctl("status", "-m", str(root / "wprctl.toml"), "--json").stdout)
    print(
        f"quickstart{' --small' if args.small else ''}: {seconds:.0f} s (target <= 600 s) in {root}"
    )
    print(f"{'stage':<26}{'seconds':>9}  key metrics")
    for row in status["stages"]:
        shown = {
            k: v
            for k, v in row["metrics"].items()
            if k.startswith(("eval/", "win", "pass@", "strict"))
        }
        text = ", ".join(f"{k} {v:.3f}" for k, v in list(shown.items())[:6])
        print(f"{row['name']:<26}{(row['seconds'] or 0):>9.0f}  {text}")


if __name__ == "__main__":
    main()
