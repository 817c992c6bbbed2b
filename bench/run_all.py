"""Run every benchmark under bench/ (``bench_*.py``), each in its own process, then the cost
model (``cost_model.py``, computed from their results).

Each benchmark writes ``bench/results/<name>.json`` and ``bench/results/<name>.md``. This
runner prints the markdown tables at the end and exits non-zero if any benchmark failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    only = set(sys.argv[1:])
    scripts = sorted(p for p in HERE.glob("bench_*.py") if not only or p.stem in only)
    if not only or "cost_model" in only:  # computes from the results above (docs/scaling.md): last
        scripts.append(HERE / "cost_model.py")
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        print(f"== {script.name}: exit {rc} in {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(script.name)
    for md in sorted((HERE / "results").glob("*.md")):
        print(f"\n## {md.stem}\n")
        print(md.read_text())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
