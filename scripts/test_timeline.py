"""How the pytest workers shared a run: each worker's modules in the order it ran them, their wall time, and how long
each worker sat idle at the end. Reads the file ``STEERING_TEST_TIMELINE=FILE pytest -n 2`` wrote.

    python scripts/test_timeline.py FILE
"""

from __future__ import annotations

import sys
from collections import defaultdict


def main(path: str) -> None:
    modules: dict[str, dict[str, list[float]]] = defaultdict(dict)  # worker -> module -> [start, end]
    for line in open(path):
        worker, nodeid, start, end = line.rstrip("\n").split("\t")
        span = modules[worker].setdefault(nodeid.split("::")[0], [float(start), float(end)])
        span[0], span[1] = min(span[0], float(start)), max(span[1], float(end))
    first = min(span[0] for spans in modules.values() for span in spans.values())
    last = max(span[1] for spans in modules.values() for span in spans.values())
    print(f"run: {(last - first) / 60:.1f} min from the first test's start to the last test's end")
    for worker, spans in sorted(modules.items()):
        end = max(span[1] for span in spans.values())
        print(f"\n{worker}: busy until {(end - first) / 60:.1f} min, idle {(last - end) / 60:.1f} min at the end")
        for module, (start, stop) in sorted(spans.items(), key=lambda item: item[1][0]):
            print(f"  {(start - first) / 60:5.1f} min  {stop - start:6.0f} s  {module}")


if __name__ == "__main__":
    main(sys.argv[1])
