"""Build the report from the Parquet tables: an index of the studies with the overview charts,
a page per study, per run and per run's samples, and a comparison of each TTT variant with its
backbone, all sharing one offline Vega bundle."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import polars as pl

from ltstudy.io import atomic_path
from ltstudy.report import charts, paper, views
from ltstudy.report.layout import Page, header, html_table, write_vega_bundle
from ltstudy.results.schemas import TABLES

MAX_SAMPLES = 5000  # rows per sample table: RULER at 7 lengths x 13 tasks x 100 samples is 9100
STATUSES = ["done", "running", "pending", "failed"]


def read_table(results_dir: Path, table: str) -> pl.DataFrame:
    """A results table; columns added to its schema since it was written read as nulls."""
    path = results_dir / f"{table}.parquet"
    if not path.exists():
        return pl.DataFrame(schema=TABLES[table])
    frame = pl.read_parquet(path)
    missing = [
        pl.lit(None, dtype).alias(c) for c, dtype in TABLES[table].items() if c not in frame.columns
    ]
    return frame.with_columns(missing)


def _of(t: dict[str, pl.DataFrame], column: str, value: str) -> dict[str, pl.DataFrame]:
    return {name: frame.filter(pl.col(column) == value) for name, frame in t.items()}


def study_page_path(study: str) -> str:
    return f"{study}.html"


def run_page_path(run_id: str) -> str:
    return f"runs/{run_id}.html"


def samples_page_path(run_id: str) -> str:
    return f"samples/{run_id}.html"


def _skipped(frame: pl.DataFrame) -> str:
    rows = (
        frame.filter(pl.col("status") == "skipped").select("task", "reason").unique().sort("task")
    )
    return "".join(f" {task}: skipped ({reason})." for task, reason in rows.iter_rows())


def overview_sections(page: Page, t: dict[str, pl.DataFrame]) -> None:
    """The charts of every run in `t`, one section each (the index: every study; a study page:
    its runs; a run page: the run)."""
    runs = t["runs"]
    lm_eval = charts.lm_eval_scores(t["lm_eval"])
    stages = planned_stages(runs)
    # a section for a stage none of these runs has (a passkey-only study's perplexity) and with
    # no results is left out rather than shown as waiting for them
    tables = {"train": "train_curves", "perplexity": "perplexity", "passkey": "passkey"}
    tables |= {"ruler": "ruler", "lm_eval": "lm_eval", "throughput": "throughput"}
    section = {
        stage: page.section
        if stages is None or stage in stages or t[table].height
        else lambda *a, **k: None
        for stage, table in tables.items()
    }
    section["perplexity"](
        "Perplexity vs evaluation length",
        "Sliding-window (stride) perplexity. Lengths beyond the training context test "
        "extrapolation; dashed lines use a position extension.",
        chart=charts.perplexity_vs_length(t["perplexity"], "stride", runs),
    )
    section["perplexity"](
        "Perplexity of a fixed final block",
        "The paper's protocol: perplexity of the last block of long validation documents as "
        "the context before it grows (the window, context and block together, is the "
        "evaluation length).",
        chart=charts.perplexity_vs_length(t["perplexity"], "final_block", runs),
    )
    section["perplexity"](
        "Loss by token position",
        "Mean loss per position bucket over long validation documents, at each run's longest "
        "evaluated length.",
        chart=charts.loss_by_position(t["position_loss"], runs),
    )
    section["passkey"](
        "Passkey retrieval",
        "Accuracy per prompt length and needle depth (exact match of the first generated integer).",
        chart=charts.passkey_heatmaps(t["passkey"], runs),
    )
    section["passkey"](
        "Passkey accuracy by needle distance",
        "Accuracy against how many tokens back the needle lies (bucketed by powers of two; "
        "prompts within each run's training context, its own positions). A sliding window "
        "falls to chance once the needle is out of its reach.",
        chart=charts.passkey_by_distance(t["passkey"], runs),
    )
    section["ruler"](
        "RULER by task",
        "Mean score per task (RULER's string match) and length." + _skipped(t["ruler"]),
        chart=charts.ruler_by_task(t["ruler"], runs),
    )
    section["lm_eval"](
        "Short-context tasks (lm-evaluation-harness)",
        "Accuracy (acc) and length-normalised accuracy (acc_norm) in percent per task, as the "
        "paper's Table 3 reports HellaSwag, ARC-E/C, MMLU and PIQA." + _skipped(t["lm_eval"]),
        table=html_table(lm_eval) if lm_eval.height else None,
        chart=charts.lm_eval_by_task(lm_eval),
    )
    section["throughput"](
        "Throughput vs context",
        "Median tokens/s of a training step (forward + backward), of prefill and of decoding, "
        "random weights; log-log. MFU (PaLM/torchtitan FLOPs over the datasheet, measured or "
        "given peak) is in the tooltips.",
        chart=charts.throughput_vs_context(t["throughput"], runs),
    )
    section["train"](
        "Training curves",
        "Training loss per optimizer step.",
        chart=charts.training_curves(t["train_curves"], runs),
    )


def planned_stages(runs: pl.DataFrame) -> set[str] | None:
    """The stages any of `runs` has in its config; None when a run's config does not say."""
    if "config" not in runs.columns or not runs.height:
        return None
    stages: set[str] = set()
    for config in runs["config"]:
        planned = views.run_config(config).get("stages")
        if planned is None:
            return None
        stages.update(planned)
    return stages


def study_summary(runs: pl.DataFrame) -> pl.DataFrame:
    """One row per study: runs by status, GPU-hours and wall hours (failed attempts included)."""
    counts = [
        (pl.col("status") == status).sum().cast(pl.Int64).alias(status) for status in STATUSES
    ]
    return (
        runs.group_by("study", maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("runs"),
            *counts,
            pl.col("gpu_hours").sum().alias("gpu_hours"),
            (pl.col("wall_s").sum() / 3600).alias("wall_h"),
        )
        .sort("study")
    )


def failures(runs: pl.DataFrame) -> pl.DataFrame:
    return runs.filter(pl.col("status") == "failed").select("run_id", "error").sort("run_id")


def index_page(t: dict[str, pl.DataFrame], board: pl.DataFrame, results_dir: Path, title: str):
    page = Page("index.html", title)
    runs = t["runs"]
    page.intro = (
        f'<p class="note">{runs.height} runs in {runs["study"].n_unique()} studies from '
        f"{html.escape(str(results_dir))}. Every chart is drawn from the Parquet tables in that "
        "folder; the pages work offline.</p>"
    )
    summary = study_summary(runs)
    links = {"study": {s: study_page_path(s) for s in summary["study"]}}
    page.section(
        "Studies",
        "Runs per study by status, and the GPU-hours and wall hours their jobs took (failed "
        "and interrupted attempts included). Each study links to its page.",
        table=html_table(summary, links) if summary.height else None,
    )
    failed = failures(runs)
    if failed.height:
        run_links = {"run_id": {r: run_page_path(r) for r in failed["run_id"]}}
        page.section(
            "Failed runs", "The failed stage, its reason and log.", html_table(failed, run_links)
        )
    page.section(
        "Leaderboard",
        "Runs sorted by stride perplexity at their training context. Passkey: accuracy within "
        "the training context; RULER: mean score over tasks and lengths.",
        table=html_table(board, {"run_id": {r: run_page_path(r) for r in board["run_id"]}}),
        chart=charts.leaderboard_chart(board),
    )
    overview_sections(page, t)
    return page


def study_page(study: str, t: dict[str, pl.DataFrame], board: pl.DataFrame) -> Page:
    runs = t["runs"]
    page = Page(study_page_path(study), f"Study {study}")
    title, kind, axis = views.study_axis(runs)
    counts = ", ".join(
        f"{n} {s}" for s, n in runs.group_by("status").len().sort("status").iter_rows()
    )
    gpu_hours = runs["gpu_hours"].sum() or 0.0
    described = runs.select(pl.col("config").str.json_path_match("$.description")).to_series()
    description = next((d for d in described if d), "")
    page.intro = (
        (f"<p>{html.escape(description)}</p>" if description else "")
        + f'<p class="note">{runs.height} runs ({html.escape(counts)}); {gpu_hours:,.2f} '
        f"GPU-hours. The study varies <b>{html.escape(title)}</b>.</p>"
    )
    table = board.drop("study")
    if title not in table.columns:  # a setting from the config: a column after the run id
        table = table.join(
            axis.select("run_id", pl.col("axis").alias(title)), on="run_id", maintain_order="left"
        )
        table = table.select("run_id", title, pl.exclude("run_id", title))
    page.section(
        "Runs",
        "Sorted by stride perplexity at the training context; each run links to its page.",
        table=html_table(table, {"run_id": {r: run_page_path(r) for r in board["run_id"]}}),
    )
    failed = failures(runs)
    if failed.height:
        links = {"run_id": {r: run_page_path(r) for r in failed["run_id"]}}
        page.section(
            "Failed runs", "The failed stage, its reason and log.", html_table(failed, links)
        )
    shape = "a bar per run" if title == "variant" else "a line per variant"
    page.section(
        f"Results by {title}",
        f"Each run's headline numbers against what this study varies ({title}); {shape}.",
        chart=views.axis_chart(board, axis, title, kind),
    )
    page.section("Leaderboard", "", chart=charts.leaderboard_chart(board))
    overview_sections(page, t)
    return page


def _log_links(run_dir: Path, page_dir: Path) -> str:
    """Links to the run's job logs (stdout and stderr of each stage's attempts)."""
    logs = run_dir / "logs"
    files = (
        sorted(p for p in logs.glob("*/*") if p.suffix in (".out", ".err")) if logs.is_dir() else []
    )
    rel = os.path.relpath(logs.absolute(), page_dir.absolute())
    items = "".join(
        f'<li><a href="{html.escape(os.path.relpath(f.absolute(), page_dir.absolute()))}">'
        f"{html.escape(str(f.relative_to(logs)))}</a></li>"
        for f in files
    )
    listing = f"<ul>{items}</ul>" if items else ""
    return f'<p>Logs: <a href="{html.escape(rel)}/">{html.escape(str(logs))}</a></p>{listing}'


RUN_FACTS = [
    "status", "error", "variant", "size", "context", "seed", "params", "params_non_embedding",
    "train_steps", "train_tokens", "final_loss", "world_size", "context_parallel", "attempts",
    "wall_s", "gpu_hours", "config_hash",
]  # fmt: skip


def run_page(run: dict, t: dict[str, pl.DataFrame], reports_dir: Path, results_dir: Path) -> Page:
    run_id = run["run_id"]
    page = Page(run_page_path(run_id), f"Run {run_id}")
    spec = views.run_config(run.get("config"))
    run_dir = Path(spec.get("run_dir") or results_dir / "runs" / run_id)
    facts = pl.DataFrame(
        {
            "field": [header(k) for k in RUN_FACTS],
            "value": [page_value(run.get(k), k) for k in RUN_FACTS],
        }
    )
    page.intro = (
        f'<p class="note">Study <a href="{page.link(study_page_path(run["study"]))}">'
        f'{html.escape(run["study"])}</a>. <a href="{page.link(samples_page_path(run_id))}">'
        "Passkey and RULER predictions per prompt</a>.</p>"
        + html_table(facts)
        + _log_links(run_dir, (reports_dir / page.path).parent)
    )
    overview_sections(page, t)
    by_length = (
        t["ruler"]
        .filter(pl.col("status") == "ok")
        .group_by("task", "length")
        .agg(pl.col("score").mean())
        .sort("length")
        .pivot(on="length", index="task", values="score")
        .sort("task")
    )
    if by_length.height:
        page.section(
            "RULER score per task and length",
            "Mean score (0-100) over samples.",
            table=html_table(by_length.rename({c: f"{c} tokens" for c in by_length.columns[1:]})),
        )
    throughput = t["throughput"].select(
        "mode", "seq_len", "status", "tokens_per_s", "step_ms", "peak_memory_mb", "mfu", "device"
    )
    if throughput.height:
        page.section(
            "Throughput",
            "Median of the repeats.",
            table=html_table(throughput.sort("mode", "seq_len")),
        )
    page.body.append(
        "<h2>Resolved config</h2><details><summary>the run's spec, as the runs table "
        f"records it</summary><pre>{html.escape(_pretty(spec))}</pre></details>"
    )
    return page


def page_value(value: object, key: str) -> str:
    if value is None:
        return "–"
    if key in ("params", "params_non_embedding", "train_tokens") and isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def _pretty(spec: dict) -> str:
    return json.dumps(spec, indent=2, sort_keys=True) if spec else "(no config recorded)"


FILTER_SCRIPT = """
function filterSamples(box) {
  const text = box.querySelector("input").value.toLowerCase();
  const want = box.querySelector("select").value;
  let shown = 0;
  for (const row of box.querySelectorAll("tbody tr")) {
    const keep = (!want || row.dataset.correct === want) &&
                 (!text || row.textContent.toLowerCase().includes(text));
    row.hidden = !keep;
    shown += keep;
  }
  box.querySelector(".count").textContent = shown + " shown";
}
for (const box of document.querySelectorAll(".samples")) filterSamples(box);
"""


def sample_table(frame: pl.DataFrame, correct: pl.Series, title: str, note: str) -> str:
    """A table of predictions with a text filter and a correct/incorrect select (inline JS)."""
    total = frame.height
    frame, correct = frame.head(MAX_SAMPLES), correct.head(MAX_SAMPLES)
    more = f" (the first {MAX_SAMPLES} of {total})" if total > MAX_SAMPLES else ""
    head = "".join(
        f'<th class="text">{html.escape(c.replace("_", " "))}</th>' for c in frame.columns
    )
    rows = "".join(
        f'<tr data-correct="{str(ok).lower()}">'
        + "".join(
            f'<td class="text long">{"–" if v is None else html.escape(str(v))}</td>' for v in row
        )
        + "</tr>"
        for row, ok in zip(frame.iter_rows(), correct, strict=True)
    )
    return (
        f'<div class="samples"><h2>{html.escape(title)}</h2>'
        f'<p class="note">{total} prompts{more}. {html.escape(note)}</p><div class="filter">'
        '<input type="search" placeholder="filter: any text in a row" '
        "oninput=\"filterSamples(this.closest('.samples'))\">"
        "<select onchange=\"filterSamples(this.closest('.samples'))\">"
        '<option value="">all</option><option value="true">correct</option>'
        '<option value="false">incorrect</option></select><span class="count"></span></div>'
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>'
        "</table></div></div>"
    )


def samples_page(run_id: str, t: dict[str, pl.DataFrame]) -> Page:
    """Every passkey and RULER prompt of a run: what was asked, what came back."""
    page = Page(samples_page_path(run_id), f"Samples of {run_id}")
    page.intro = (
        f'<p class="note"><a href="{page.link(run_page_path(run_id))}">Back to the run</a>.</p>'
    )
    passkey = t["passkey"].sort("length", "depth", "trial", "rope")
    if passkey.height:
        page.body.append(
            sample_table(
                passkey.select(
                    "length",
                    "rope",
                    "depth",
                    "needle_distance",
                    "trial",
                    "passkey",
                    "prediction",
                    "correct",
                ),
                passkey["correct"],
                "Passkey",
                "Correct: the first integer generated is the passkey.",
            )
        )
    ruler = t["ruler"].sort("task", "length", "sample")
    if ruler.height:
        page.body.append(
            sample_table(
                ruler.select(
                    "task",
                    "length",
                    "rope",
                    "sample",
                    "status",
                    "reason",
                    "score",
                    "references",
                    "prediction",
                ),
                ruler["score"] >= 100,
                "RULER",
                "Correct: full score (every reference found in the prediction).",
            )
        )
    if not passkey.height and not ruler.height:
        page.body.append('<p class="empty">No passkey or RULER results for this run.</p>')
    page.body.append(f"<script>{FILTER_SCRIPT}</script>")
    return page


def compare_page(t: dict[str, pl.DataFrame], baseline: str | None) -> Page:
    page = Page("compare.html", "TTT variants against their backbones")
    pairs = views.comparison_pairs(t["runs"], baseline)
    chosen = f" and every run against the chosen baseline {baseline}" if baseline else ""
    page.intro = (
        '<p class="note">Each TTT run against the run of its study that differs only in the '
        f"variant (ttt_full vs full, ttt_swa vs swa){html.escape(chosen)}. <code>ltstudy report "
        "--baseline RUN_ID</code> picks a baseline.</p>"
    )
    links = {"run_id": {r: run_page_path(r) for r in t["runs"]["run_id"]}}
    links["reference"] = links["run_id"]
    page.section(
        "Pairs",
        "",
        table=html_table(pairs.select("run_id", "reference"), links) if pairs.height else None,
        empty="No pair: no TTT run has its backbone in the same study, and no baseline was given.",
    )
    d = views.deltas(t, pairs)
    unit = charts.token_unit(t["runs"])
    page.section(
        "Perplexity difference per length",
        "Stride perplexity of the run minus its reference (below 0: the run is better).",
        chart=views.delta_lines(
            d["perplexity"],
            "length",
            "delta",
            "perplexity Δ",
            f"evaluation length ({unit})",
            "position",
        ),
    )
    page.section(
        "Passkey accuracy difference per length",
        "Accuracy of the run minus its reference (above 0: the run retrieves more).",
        chart=views.delta_lines(
            d["passkey"], "length", "delta", "accuracy Δ", f"prompt length ({unit})", "position"
        ),
    )
    page.section(
        "RULER score difference per task and length",
        "Mean score of the run minus its reference (blue: the run is better).",
        chart=views.ruler_delta_chart(d["ruler"]),
    )
    page.section(
        "Throughput ratio",
        "Median tokens/s of the run over its reference, per mode (below 1: the run is slower).",
        chart=views.delta_lines(
            d["throughput"], "seq_len", "ratio", "tokens/s ratio", f"context ({unit})", "mode"
        ),
    )
    matched = views.paper_comparison(t["runs"], t["ruler"])
    published = (
        pl.DataFrame(paper.paper_rows())
        .pivot(on="length", index=["table", "variant"], values="score")
        .rename(lambda c: f"{c} tokens" if c.isdigit() else c)
    )
    note = (
        f"Source: {paper.SOURCE}. Drawn beside ours for runs of the same size, training context "
        "and checkpoint (dashed: the paper)."
    )
    if not matched.height:
        note += (
            " No run here matches a published setting (the demo's tiny models are not "
            "comparable), so only the published table is shown."
        )
    page.section(
        "The paper's RULER scores",
        note,
        table=html_table(published),
        chart=views.paper_chart(matched),
    )
    return page


def build_pages(
    results_dir: Path, reports_dir: Path, partial: str | None = None, baseline: str | None = None
) -> list[Page]:
    t = {name: read_table(results_dir, name) for name in TABLES}
    board = charts.leaderboard(t)
    title = "ltstudy report (partial)" if partial else "ltstudy report"
    pages = [index_page(t, board, results_dir, title), compare_page(t, baseline)]
    for study in sorted(t["runs"]["study"].unique().to_list()):
        pages.append(
            study_page(study, _of(t, "study", study), board.filter(pl.col("study") == study))
        )
    for run in t["runs"].iter_rows(named=True):
        of_run = _of(t, "run_id", run["run_id"])
        pages.append(run_page(run, of_run, reports_dir, results_dir))
        pages.append(samples_page(run["run_id"], of_run))
    return pages


def navigation(pages: list[Page]) -> list[tuple[str, str]]:
    studies = [
        (p.title.removeprefix("Study "), p.path) for p in pages if p.title.startswith("Study ")
    ]
    return [("Index", "index.html"), *studies, ("Compare", "compare.html")]


def build_report(
    results_dir: str | Path,
    reports_dir: str | Path,
    partial: str | None = None,
    baseline: str | None = None,
) -> Path:
    """Write reports/index.html and the pages it links to from results/*.parquet; return the
    index's path. `partial`: the banner of pages built from incomplete results, which says what
    they lack; `baseline`: a run id every run is compared with on compare.html."""
    results_dir, reports_dir = Path(results_dir), Path(reports_dir)
    write_vega_bundle(reports_dir)
    pages = build_pages(results_dir, reports_dir, partial, baseline)
    nav = navigation(pages)
    for page in pages[1:]:
        page.write(reports_dir, nav, partial)
    return pages[0].write(reports_dir, nav, partial)  # last: its links lead to written pages


def export_charts(
    results_dir: str | Path, out_dir: str | Path, fmt: str, baseline: str | None = None
) -> list[Path]:
    """Every chart of every page as an SVG or PNG file (vl_convert), named after its page and
    section; charts sized to their container get a fixed width."""
    import vl_convert

    if fmt not in ("svg", "png"):
        raise ValueError(f"--export {fmt!r}: choose svg or png")
    out_dir = Path(out_dir)
    written = []
    for page in build_pages(Path(results_dir), out_dir, baseline=baseline):
        stem = page.path.removesuffix(".html").replace("/", "__")
        for name, chart in page.charts.items():
            spec = json.loads(json.dumps(chart.to_dict()).replace('"container"', "800"))
            path = out_dir / f"{stem}--{name}.{fmt}"
            with atomic_path(path) as tmp:
                if fmt == "svg":
                    tmp.write_text(vl_convert.vegalite_to_svg(spec))
                else:
                    tmp.write_bytes(vl_convert.vegalite_to_png(spec, scale=2))
            written.append(path)
    return written
