"""Put the demo's table (``RUN/results.md``, written by ``graftnet demo``) into README.md between its markers.

The README's demo figures are this script's output, never typed by hand: it runs ``graftnet demo --out RUN``
first unless ``RUN/results.md`` exists, then replaces the text between ``<!-- demo-table:start -->`` and
``<!-- demo-table:end -->``. The table carries the command line and the versions it ran with.

``--rerun`` empties RUN first (it must hold a demo: ``results.md`` or ``teachers/``): the demo reads back every
finished run whose spec is unchanged, which is right for an interrupted demo and wrong after a change to the code.

Run:  python examples/update_demo_table.py [--run runs/demo] [--rerun] [--readme README.md]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"


def replace_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``.

    Raises:
        ValueError: the markers are missing, or out of order.
    """
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if len(pattern.findall(readme)) != 1:
        raise ValueError(f"the README needs exactly one {START} … {END} block")
    return pattern.sub(lambda _: f"{START}\n{table.strip()}\n{END}", readme)


def clear_demo(run: Path) -> None:
    """Remove ``run``, a demo's folder, so that the demo reruns every run; refuse a folder that holds no demo.

    Raises:
        ValueError: ``run`` exists and has neither ``results.md`` nor ``teachers/``.
    """
    if not run.exists():
        return
    if not ((run / "results.md").is_file() or (run / "teachers").is_dir()):
        raise ValueError(f"--rerun: {run} holds no demo (no results.md, no teachers/); not removing it")
    shutil.rmtree(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--rerun", action="store_true", help="remove RUN (a demo's folder) and run the demo afresh")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    run = Path(args.run)
    results = run / "results.md"
    if args.rerun:
        clear_demo(run)
    if not results.is_file():
        subprocess.run([sys.executable, "-m", "graftnet", "demo", "--out", args.run], check=True)
    readme = Path(args.readme)
    readme.write_text(replace_table(readme.read_text(), results.read_text()))
    print(f"wrote the demo table of {results} into {readme}")


if __name__ == "__main__":
    main()
