"""Screenshots of the report in headless Chromium: the index, one study page, one run page and
the comparison view at 1400 and 900 px, into docs/screenshots/*.png. With --check, each page is
also opened at 900 px and the script fails if it shows a script error or is wider than the
window (the pages record both into <body data-errors data-overflow>).

    python scripts/screenshots.py [--reports reports] [--out docs/screenshots] [--check]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WIDTHS = (1400, 900)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("error: no Chromium on PATH (install chromium)")


def browse(page: Path, width: int, height: int, *args: str) -> subprocess.CompletedProcess:
    """Open `page` offline in a fresh headless Chromium profile with the given window size."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: the pages must not need it
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--hide-scrollbars",
            "--virtual-time-budget=20000",
            *args,
            page.resolve().as_uri(),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def pages(reports: Path, study: str | None, run: str | None) -> dict[str, Path]:
    """index, a study page, a run page and compare.html (the first study and run by name)."""
    studies = sorted(
        p for p in reports.glob("*.html") if p.name not in ("index.html", "compare.html")
    )
    runs = sorted(reports.glob("runs/*/*.html"))
    chosen = {"index": reports / "index.html", "compare": reports / "compare.html"}
    if study or studies:
        chosen["study"] = reports / f"{study}.html" if study else studies[0]
    if run or runs:
        chosen["run"] = reports / "runs" / f"{run}.html" if run else runs[0]
    for name, path in chosen.items():
        if not path.exists():
            sys.exit(f"error: {path} ({name} page) does not exist; build the report first")
    return chosen


def check(page: Path) -> list[str]:
    """Problems of a page opened at 900 px: script errors, horizontal overflow, empty charts."""
    dom = browse(page, 900, 1000, "--dump-dom").stdout
    body = re.search(r"<body([^>]*)>", dom)
    attrs = body.group(1) if body else ""
    problems = []
    if 'data-rendered="true"' not in attrs:
        problems.append("the charts did not finish rendering")
    if 'data-overflow="false"' not in attrs:
        problems.append("wider than a 900 px window")
    errors = re.search(r'data-errors="([^"]*)"', attrs)
    if errors and errors.group(1) != "[]":
        problems.append(f"script errors {errors.group(1)}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", default="reports", type=Path)
    parser.add_argument("--out", default="docs/screenshots", type=Path)
    parser.add_argument("--study", help="the study page to take (default: the first)")
    parser.add_argument("--run", help="the run page to take, as study/name (default: the first)")
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--check", action="store_true", help="fail on errors or overflow at 900 px")
    args = parser.parse_args()
    failed = False
    for name, page in pages(args.reports, args.study, args.run).items():
        for width in WIDTHS:
            out = args.out / f"{name}-{width}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            proc = browse(page, width, args.height, f"--screenshot={out.resolve()}")
            if proc.returncode != 0 or not out.exists():
                sys.exit(f"error: no screenshot of {page}: {proc.stderr[-1000:]}")
            print(out)
        if args.check:
            for problem in check(page):
                print(f"{page}: {problem}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
