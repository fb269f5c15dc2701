"""HTML of the report pages: the shared style and nav bar, tables, and one <div> per chart
drawn by the one offline Vega bundle. A page records its script errors and whether it is
wider than the window into <body data-...> so that a headless browser can check it."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import altair as alt
import polars as pl

from ltstudy.io import atomic_path
from ltstudy.report.charts import COLUMN_TITLES

BUNDLE = "assets/vega-bundle.js"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 0 1.5rem 2rem;
       max-width: 1400px; color: #222; box-sizing: border-box; }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd;
      padding: 0.5rem 0; display: flex; flex-wrap: wrap; gap: 0.3rem 1rem; z-index: 10; }
nav a { text-decoration: none; color: #0b5394; } nav a.here { font-weight: bold; color: #222; }
h1 { margin: 1rem 0 0.2rem; overflow-wrap: anywhere; }
h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
p.note { color: #555; max-width: 60rem; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
td.long { max-width: 28rem; overflow-wrap: anywhere; }
.chart { display: block !important; overflow-x: auto; max-width: 100%; }
.empty { color: #888; font-style: italic; }
p.partial { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6rem 1rem; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
.filter { margin: 0.5rem 0; display: flex; gap: 0.6rem; flex-wrap: wrap; align-items: center; }
"""

# Records script errors and horizontal overflow (after the charts are drawn) into the DOM.
PROBE = """
window.reportErrors = [];
window.embeds = [];
window.addEventListener("error", e => window.reportErrors.push(String(e.message)));
window.addEventListener("unhandledrejection", e => window.reportErrors.push(String(e.reason)));
const consoleError = console.error;
console.error = (...args) => { window.reportErrors.push(args.join(" ")); consoleError(...args); };
"""
FINISH = """
Promise.allSettled(embeds).then(results => {
  for (const r of results) if (r.status === "rejected") window.reportErrors.push(String(r.reason));
  const root = document.documentElement;
  document.body.dataset.errors = JSON.stringify(window.reportErrors);
  document.body.dataset.overflow = String(root.scrollWidth > window.innerWidth);
  document.body.dataset.rendered = "true";
});
"""

# Column headers in words; others have their underscores replaced by spaces.
HEADERS = {
    "run_id": "run",
    "ppl_at_context": "ppl at context",
    "ppl_at_longest": "ppl at longest",
    "longest_length": "longest length",
    "passkey_in_context": "passkey (in context)",
    "ruler_score": "RULER score",
    "prefill_tokens_per_s": "prefill tokens/s",
    "final_loss": "final loss",
    "gpu_hours": "GPU-hours",
    "wall_s": "wall time (s)",
    "wall_h": "wall hours",
    "params_non_embedding": "params (non-embedding)",
    "num_fewshot": "few-shot",
    "tokens_per_s": "tokens/s",
    "peak_memory_mb": "peak memory (MB)",
    "mfu": "MFU",
    "seq_len": "length",
}


def header(column: str) -> str:
    """A column's title: the charts' own (the leaderboard's), else ours, else in words."""
    return COLUMN_TITLES.get(column) or HEADERS.get(column, column.replace("_", " "))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_vega_bundle(reports_dir: Path) -> Path:
    """Vega, Vega-Lite and vega-embed as one classic script, written once for all pages."""
    import vl_convert

    path = reports_dir / BUNDLE
    if not path.exists():
        with atomic_path(path) as tmp:
            tmp.write_text(vl_convert.javascript_bundle())
    return path


def _format(value: object, column: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if column in ("passkey_in_context", "accuracy"):
            return f"{value:.2f}"
        if column in ("ruler_score", "delta") or column.endswith(" tokens"):
            return f"{value:.1f}"
        if column.endswith("tokens_per_s"):
            return f"{value:,.0f}"
        if column in ("gpu_hours", "wall_h"):
            return f"{value:,.2f}"
        return f"{value:.3f}"
    if column == "params" and isinstance(value, int):
        return parameter_count(value)
    return html.escape(str(value))


def parameter_count(n: int) -> str:
    """A count with 3 significant digits and a K/M/B suffix (31.4K, 503M, 14.2B): tiny models
    do not read as 0.0M beside large ones."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= 0.9995 * scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def html_table(frame: pl.DataFrame, links: dict[str, dict[str, str]] | None = None) -> str:
    """A table in a horizontally scrolling box; `links[column][value]` makes a cell a link."""
    links = links or {}
    text_columns = {c for c, t in frame.schema.items() if t == pl.String}
    head = "".join(
        f'<th class="{"text" if c in text_columns else ""}">{html.escape(header(c))}</th>'
        for c in frame.columns
    )
    rows = []
    for row in frame.iter_rows():
        cells = []
        for c, v in zip(frame.columns, row, strict=True):
            text = _format(v, c)
            href = links.get(c, {}).get(v)
            if href:
                text = f'<a href="{html.escape(href)}">{text}</a>'
            cells.append(f'<td class="{"text" if c in text_columns else ""}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


@dataclass
class Page:
    """One HTML page of the report: its path under reports/, and its sections' HTML and
    charts (by a name unique in the page, for export)."""

    path: str
    title: str
    intro: str = ""
    body: list[str] = field(default_factory=list)
    charts: dict[str, alt.TopLevelMixin] = field(default_factory=dict)

    def section(
        self,
        title: str,
        note: str = "",
        table: str | None = None,
        chart: alt.TopLevelMixin | None = None,
        empty: str = "No results for this section yet.",
    ) -> None:
        self.body.append(f"<h2>{html.escape(title)}</h2>")
        if note:
            self.body.append(f'<p class="note">{html.escape(note)}</p>')
        if table is not None:
            self.body.append(table)
        if table is None and chart is None:
            self.body.append(f'<p class="empty">{html.escape(empty)}</p>')
        if chart is not None:
            name = slug(title)
            while name in self.charts:
                name += "-2"
            self.body.append(f'<div class="chart" id="chart{len(self.charts)}"></div>')
            self.charts[name] = chart

    def link(self, target: str) -> str:
        """`target` (a path under reports/) relative to this page."""
        depth = self.path.count("/")
        return "../" * depth + target

    def render(self, nav: list[tuple[str, str]], banner: str | None = None) -> str:
        links = " ".join(
            f'<a href="{html.escape(self.link(href))}"'
            f"{' class=here' if href == self.path else ''}>{html.escape(text)}</a>"
            for text, href in nav
        )
        scripts = []
        for index, chart in enumerate(self.charts.values()):
            spec = json.dumps(chart.to_dict()).replace("</", "<\\/")  # stay inside <script>
            scripts.append(
                f'embeds.push(vegaEmbed("#chart{index}", {spec}, '
                '{renderer: "svg", actions: false}));'
            )
        banner_html = f'<p class="partial">{html.escape(banner)}</p>' if banner else ""
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(self.title)}</title>
<style>{STYLE}</style><script>{PROBE}</script>
<script src="{self.link(BUNDLE)}"></script></head>
<body><nav>{links}</nav><h1>{html.escape(self.title)}</h1>{banner_html}
{self.intro}
{"".join(self.body)}
<script>
{chr(10).join(scripts)}
</script>
<script>{FINISH}</script></body></html>
"""

    def write(self, reports_dir: Path, nav: list[tuple[str, str]], banner: str | None) -> Path:
        out = reports_dir / self.path
        with atomic_path(out) as tmp:
            tmp.write_text(self.render(nav, banner))
        return out
