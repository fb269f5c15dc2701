"""The report opens offline in a real headless Chromium and every chart renders."""

import os
import re
import subprocess

import pytest

from tests.conftest import chromium

pytestmark = pytest.mark.browser


def render(page, tmp_path) -> str:
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
        "--virtual-time-budget=20000",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_every_chart_renders_offline(study, tmp_path):
    workdir, _ = study
    dom = render(workdir / "reports" / "index.html", tmp_path)
    charts = re.findall(
        r'<div class="chart[^"]*" id="chart\d+"[^>]*>(.*?)</div>\s*(?:<h2|<script)', dom, re.S
    )
    assert len(charts) == 9
    for chart in charts:
        assert "<svg" in chart and 'class="marks"' in chart
    assert "ttt_swa" in dom and "full" in dom  # legends and the leaderboard name the variants
    assert "<table>" in dom
