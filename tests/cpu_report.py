"""Sum a JCDM_TEST_CPU_LOG file (tests/conftest.py) per test file, most expensive first.

JCDM_TEST_CPU_LOG=/tmp/cpu.jsonl bash tests/run.sh --no-install --slow
python tests/cpu_report.py /tmp/cpu.jsonl [--tests]
"""

from __future__ import annotations

import argparse
import collections
import json
import signal


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("log")
    p.add_argument("--tests", action="store_true", help="one line per test, not per file")
    args = p.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the listing quietly
    cpu, wall = collections.Counter(), collections.Counter()
    with open(args.log) as f:
        for line in f:
            row = json.loads(line)
            key = row["test"] if args.tests else row["test"].split("::")[0]
            cpu[key] += row["cpu_s"]
            wall[key] += row["wall_s"]
    for key, c in cpu.most_common():
        print(f"{c:8.1f} cpu-s {wall[key]:8.1f} wall-s  {key}")
    print(f"{sum(cpu.values()):8.1f} cpu-s {sum(wall.values()):8.1f} wall-s  total")


if __name__ == "__main__":
    main()
