"""Every report page opens offline in a real headless Chromium at 900 px: no script or console
error, no horizontal overflow, and every chart draws data marks. The pages record errors and
overflow into <body data-errors data-overflow data-rendered> once their charts are drawn."""

import json
import os
import re
import subprocess
from html import unescape

import pytest

from ltstudy.report.page import build_report
from tests.conftest import chromium
from tests.test_report_pages import fake_results

pytestmark = pytest.mark.browser


def render(page, tmp_path, width: int = 900) -> str:
    browser = chromium()
    if browser is None:
        if os.environ.get("LTSTUDY_REQUIRE_BROWSER"):
            pytest.fail("no Chromium found (set LTSTUDY_BROWSER or install chromium)")
        pytest.skip("no Chromium on this machine")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must work offline
        f"--window-size={width},1000",
        "--virtual-time-budget=20000",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def charts_of(dom: str) -> list[str]:
    """The rendered content of each chart <div> (up to the next chart)."""
    return re.split(r'<div class="chart[^"]*" id="chart\d+"', dom)[1:]


def page_problems(dom: str) -> list[str]:
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body))
    problems = []
    if attrs.get("rendered") != "true":
        problems.append("charts never finished rendering")
    if json.loads(unescape(attrs.get("errors", "[]"))):
        problems.append(f"errors: {unescape(attrs['errors'])}")
    if attrs.get("overflow") != "false":
        problems.append("wider than the 900 px window")
    for index, chart in enumerate(charts_of(dom)):
        # a data mark carries an aria-label with its values; axes and empty marks do not
        if "<svg" not in chart or not re.search(r'role-mark[^>]*><\w+ aria-label="', chart):
            problems.append(f"chart {index} draws no marks")
    return problems


def check_every_page(reports, tmp_path) -> dict[str, str]:
    doms, problems = {}, {}
    for page in sorted(reports.rglob("*.html")):
        name = page.relative_to(reports).as_posix()
        doms[name] = render(page, tmp_path)
        if found := page_problems(doms[name]):
            problems[name] = found
    assert not problems
    return doms


def test_every_page_of_the_study_renders_offline(study, tmp_path):
    workdir, _ = study
    doms = check_every_page(workdir / "reports", tmp_path)
    assert {"index.html", "compare.html", "micro.html"} <= set(doms)
    assert len([n for n in doms if n.startswith("runs/")]) == 3
    index = (workdir / "reports" / "index.html").read_text()
    assert len(charts_of(doms["index.html"])) == index.count('class="chart"') >= 7
    assert "ttt_swa" in doms["index.html"] and "<table>" in doms["index.html"]
    assert len(charts_of(doms["runs/micro/full-micro-64.html"])) >= 6


def test_comparison_and_study_axis_render(tmp_path):
    """Hand-made tables with TTT pairs and a chunk-size ablation: the charts of compare.html
    and of the study axis, which the micro study does not have."""
    fake_results(tmp_path / "results")
    build_report(tmp_path / "results", tmp_path / "reports")
    for name in ("compare.html", "ablation_chunk.html"):
        dom = render(tmp_path / "reports" / name, tmp_path)
        assert page_problems(dom) == []
    assert len(charts_of(render(tmp_path / "reports" / "compare.html", tmp_path))) == 4


def test_a_page_wider_than_the_window_fails_the_check(tmp_path):
    """The check can fail: a wide element and a script error are both caught."""
    fake_results(tmp_path / "results")
    page = build_report(tmp_path / "results", tmp_path / "reports")
    text = page.read_text().replace(
        "<h2>Studies</h2>", '<h2>Studies</h2><div style="width:2000px">x</div>'
    )
    page.write_text(text.replace("embeds.push(", "undefinedCall(); embeds.push(", 1))
    problems = page_problems(render(page, tmp_path))
    assert "wider than the 900 px window" in problems
    assert any("undefinedCall" in p for p in problems)
