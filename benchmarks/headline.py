"""The headline table of a recorded run, for the README: ``python -m benchmarks.headline REPORT.json``.

    python -m benchmarks.headline docs/benchmarks/report-h100.json                          # print it
    python -m benchmarks.headline docs/benchmarks/report-h100.json --write docs/quickstart.md  # fill the block

``--write`` replaces the text between ``<!-- headline:start -->`` and ``<!-- headline:end -->`` in the file. Needs
no GPU: it reads the JSON the suite wrote.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def headline(json_path: Path) -> str:
    from triton_ops.benchmark import BenchmarkSuite, headline_table

    suite = BenchmarkSuite.from_json(json_path)
    env = suite.environment
    lines = [
        f"Measured on {env.get('device', '?')} (torch {env.get('torch')}, triton {env.get('triton')}, "
        f"{env.get('date_utc', '')}), every baseline in the same run; speedup = baseline time / ours, "
        "geometric mean over the shapes of each row; bandwidth as % of a device copy of the same bytes, and of the "
        "peak copy bandwidth with L2 emptied before each run by a zero-fill (dirty lines for the timed kernel to "
        "write back) or by a read (clean L2; above 100 % where the outputs stay in L2).",
        "",
        *headline_table(suite.results),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", type=Path, help="a report JSON written by the suite (e.g. docs/benchmarks/report-h100.json)")
    p.add_argument("--write", type=Path, default=None, help="Markdown file whose headline block to replace")
    args = p.parse_args(argv)
    table = headline(args.json)
    if args.write is None:
        print(table)
        return 0
    text = args.write.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        print(f"{args.write}: no {START} ... {END} block", file=sys.stderr)
        return 1
    args.write.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))
    print(f"wrote the headline table into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
