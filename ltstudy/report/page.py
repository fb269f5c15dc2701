"""Assemble report pages: one shared offline Vega bundle, one <div> per chart."""

from __future__ import annotations

import html
import json
from pathlib import Path

import polars as pl

from ltstudy.io import atomic_path
from ltstudy.report import charts
from ltstudy.results.schemas import TABLES

BUNDLE = "assets/vega-bundle.js"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
p.note { color: #555; max-width: 60rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
.empty { color: #888; font-style: italic; }
p.partial { background: #fff3cd; border: 1px solid #e0c060; padding: 0.6rem 1rem; }
"""


def write_vega_bundle(reports_dir: Path) -> Path:
    """Vega, Vega-Lite and vega-embed as one classic script, written once for all pages."""
    import vl_convert

    path = reports_dir / BUNDLE
    if not path.exists():
        with atomic_path(path) as tmp:
            tmp.write_text(vl_convert.javascript_bundle())
    return path


def read_table(results_dir: Path, table: str) -> pl.DataFrame:
    path = results_dir / f"{table}.parquet"
    if not path.exists():
        return pl.DataFrame(schema=TABLES[table])
    return pl.read_parquet(path)


def _format(value: object, column: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if column == "passkey_in_context":
            return f"{value:.2f}"
        if column == "ruler_score":
            return f"{value:.1f}"
        if column.endswith("tokens_per_s"):
            return f"{value:,.0f}"
        return f"{value:.3f}"
    if column == "params" and isinstance(value, int):
        return f"{value / 1e6:,.1f}M"
    return html.escape(str(value))


def html_table(frame: pl.DataFrame) -> str:
    text_columns = {c for c, t in frame.schema.items() if t == pl.String}
    head = "".join(
        f'<th class="{"text" if c in text_columns else ""}">{html.escape(c)}</th>'
        for c in frame.columns
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"text" if c in text_columns else ""}">{_format(v, c)}</td>'
            for c, v in zip(frame.columns, row, strict=True)
        )
        + "</tr>"
        for row in frame.iter_rows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(
    results_dir: str | Path, reports_dir: str | Path, partial: str | None = None
) -> Path:
    """Write reports/index.html from results/*.parquet; return its path. `partial`: the banner
    of a page built from incomplete results, which says what it lacks."""
    results_dir, reports_dir = Path(results_dir), Path(reports_dir)
    write_vega_bundle(reports_dir)
    t = {name: read_table(results_dir, name) for name in TABLES}
    board = charts.leaderboard(t)
    skipped = (
        t["ruler"]
        .filter(pl.col("status") == "skipped")
        .select("task", "reason")
        .unique()
        .sort("task")
    )
    skipped_note = "".join(f" {task}: skipped ({reason})." for task, reason in skipped.iter_rows())
    lm_eval = charts.lm_eval_scores(t["lm_eval"])
    lm_eval_skipped = "".join(
        f" {task}: skipped ({reason})."
        for task, reason in t["lm_eval"]
        .filter(pl.col("status") == "skipped")
        .select("task", "reason")
        .unique()
        .sort("task")
        .iter_rows()
    )
    sections = [
        (
            "Leaderboard",
            "Runs sorted by stride perplexity at their training context. Passkey: "
            "accuracy within the training context; RULER: mean score over tasks and lengths.",
            html_table(board),
            charts.leaderboard_chart(board),
        ),
        (
            "Perplexity vs evaluation length",
            "Sliding-window (stride) perplexity. Lengths beyond "
            "the training context test extrapolation; dashed lines use a position extension.",
            None,
            charts.perplexity_vs_length(t["perplexity"], "stride"),
        ),
        (
            "Perplexity of a fixed final block",
            "The paper's protocol: perplexity of the last "
            "block of long validation documents as the context before it grows (the window, "
            "context and block together, is the evaluation length).",
            None,
            charts.perplexity_vs_length(t["perplexity"], "final_block"),
        ),
        (
            "Loss by token position",
            "Mean loss per position bucket over long validation "
            "documents, at each run's longest evaluated length.",
            None,
            charts.loss_by_position(t["position_loss"]),
        ),
        (
            "Passkey retrieval",
            "Accuracy per prompt length and needle depth (exact match of the "
            "first generated integer).",
            None,
            charts.passkey_heatmaps(t["passkey"]),
        ),
        (
            "Passkey accuracy by needle distance",
            "Accuracy against how many tokens back the needle lies (bucketed by powers of two; "
            "prompts within each run's training context, its own positions). A sliding window "
            "falls to chance once the needle is out of its reach.",
            None,
            charts.passkey_by_distance(t["passkey"]),
        ),
        (
            "RULER by task",
            "Mean score per task (RULER's string match) and length." + skipped_note,
            None,
            charts.ruler_by_task(t["ruler"]),
        ),
        (
            "Short-context tasks (lm-evaluation-harness)",
            "Accuracy (acc) and length-normalised accuracy (acc_norm) in percent per task, as "
            "the paper's Table 3 reports HellaSwag, ARC-E/C, MMLU and PIQA." + lm_eval_skipped,
            html_table(lm_eval) if lm_eval.height else None,
            charts.lm_eval_by_task(lm_eval),
        ),
        (
            "Throughput vs context",
            "Median tokens/s of a training step (forward + backward), of "
            "prefill and of decoding, random weights; log-log. MFU (PaLM/torchtitan FLOPs over "
            "the datasheet, measured or given peak) is in the tooltips.",
            None,
            charts.throughput_vs_context(t["throughput"]),
        ),
        (
            "Training curves",
            "Training loss per optimizer step.",
            None,
            charts.training_curves(t["train_curves"]),
        ),
    ]
    body, scripts = [], []
    for index, (title, note, table, chart) in enumerate(sections):
        body.append(f'<h2>{html.escape(title)}</h2><p class="note">{html.escape(note)}</p>')
        if table is not None:
            body.append(table)
        if table is None and chart is None:
            body.append('<p class="empty">No results for this section yet.</p>')
        if chart is not None:
            body.append(f'<div class="chart" id="chart{index}"></div>')
            spec = json.dumps(chart.to_dict()).replace("</", "<\\/")  # stay inside <script>
            scripts.append(
                f'vegaEmbed("#chart{index}", {spec}, {{renderer: "svg", actions: false}});'
            )
    n_runs = t["runs"].height
    title = "ltstudy report (partial)" if partial else "ltstudy report"
    banner = f'<p class="partial">{html.escape(partial)}</p>' if partial else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{STYLE}</style><script src="{BUNDLE}"></script></head>
<body><h1>{title}</h1>{banner}
<p class="note">{n_runs} runs from {html.escape(str(results_dir))}. Every chart is drawn from
the Parquet tables in that folder; the pages work offline.</p>
{"".join(body)}
<script>
{chr(10).join(scripts)}
</script></body></html>
"""
    out = reports_dir / "index.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out
