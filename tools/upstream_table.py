"""The file x plain/patched table from two ``pytest -rA`` logs (tools/upstream_tests.sh).

A test that passes plain and does not pass patched is listed under the table, and the exit status
is 1 then."""

from __future__ import annotations

import collections
import re
import sys

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")


def outcomes(path: str) -> dict[str, str]:
    """test id (or file, for a skip summarised by file) -> outcome, from the -rA summary."""
    got = {}
    for line in open(path, errors="replace"):
        m = re.match(r"(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)", line)
        if m:
            got[m.group(2)] = m.group(1)
            continue
        m = re.match(r"SKIPPED \[(\d+)\] (\S+?):\d+", line)
        if m:
            for i in range(int(m.group(1))):
                got[f"{m.group(2)}::<skip {len(got)}-{i}>"] = "SKIPPED"
    return got


def per_file(results: dict[str, str]) -> dict[str, collections.Counter]:
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for test, outcome in results.items():
        table[test.split("::")[0]][outcome] += 1
    return table


def cell(c: collections.Counter) -> str:
    return " / ".join(f"{c[o]} {o.lower()}" for o in OUTCOMES if c[o]) or "-"


def main(plain_log: str, patched_log: str) -> int:
    plain, patched = outcomes(plain_log), outcomes(patched_log)
    a, b = per_file(plain), per_file(patched)
    print("| file | plain | patched |\n|---|---|---|")
    for f in sorted(set(a) | set(b)):
        print(f"| `{f}` | {cell(a.get(f, collections.Counter()))} | {cell(b.get(f, collections.Counter()))} |")
    broken = sorted(t for t, o in plain.items() if o == "PASSED" and patched.get(t) != "PASSED")
    for t in broken:
        print(f"\npasses plain, not patched: {t} ({patched.get(t, 'not run')})")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
