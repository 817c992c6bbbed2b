"""A process with no relation to a bevctl job: connects to a Ray GCS address and tries to run
code of its own on that cluster (a task that creates a marker file).

    python ray_intruder.py HOST:PORT MARKER

Prints one line: ``ran`` (the task ran: the marker exists), ``refused <reason>`` (Ray refused
the connection for its token: ``InvalidAuthToken``), or ``failed <reason>`` (anything else, e.g.
nothing listening). The test runs it with a bare environment: another HOME, no RAY_AUTH_*.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def _touch(marker: str) -> str:
    Path(marker).touch()
    return marker


def main() -> None:
    address, marker = sys.argv[1], sys.argv[2]
    import ray

    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - the outcome is the report
        text = f"{e} {e.__cause__ or ''}"
        verdict = "refused" if "InvalidAuthToken" in text else "failed"
        print(f"{verdict} {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
        return
    try:
        ray.get(ray.remote(num_cpus=0)(_touch).remote(marker), timeout=60)
        print("ran" if Path(marker).exists() else "failed the task ran but left no marker", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
