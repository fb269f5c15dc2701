"""The report's pages from small hand-made tables: which pages exist, what the study axis is,
which runs are compared, the paper's numbers, the sample browser and the chart export."""

from __future__ import annotations

import json
import math
import re

import polars as pl
import pytest

from ltstudy.report import views
from ltstudy.report.page import build_report, export_charts
from ltstudy.results.schemas import write_table

DEMO = ["full", "swa", "ttt_full", "ttt_swa"]
CHUNKS = [256, 1024]


def spec(study: str, name: str, variant: str, chunk: int | None = None, **model) -> dict:
    ttt = {"chunk_size": chunk, "eta": 0.3} if variant.startswith("ttt") else None
    return {
        "run_id": f"{study}/{name}",
        "run_dir": f"results/runs/{study}/{name}",
        "description": f"what {study} is for",
        "model": {"variant": variant, "d_model": 32, "ttt": ttt, **model},
        "train": {"steps": 10, "lr": 1e-3},
    }


def fake_results(results_dir, size: str = "demo", context: int = 512, pretrained=None) -> list:
    """A demo study of four variants (two TTT pairs), one failed, and a chunk-size ablation."""
    runs = [("demo", f"{v}-{size}-512", v, 64) for v in DEMO] + [
        ("ablation_chunk", f"ttt_full-{size}-512-chunk_size{c}", "ttt_full", c) for c in CHUNKS
    ]
    rows = {t: [] for t in ("runs", "train_curves", "perplexity", "passkey", "ruler", "throughput")}
    for index, (study, name, variant, chunk) in enumerate(runs):
        ident = {
            "run_id": f"{study}/{name}",
            "study": study,
            "variant": variant,
            "size": size,
            "context": context,
        }
        config = spec(study, name, variant, chunk, pretrained=pretrained)
        failed = name.startswith("swa")
        gain = 0.3 * index
        rows["runs"].append(
            {
                **{k: v for k, v in ident.items()},
                "name": name,
                "seed": 0,
                "params": 1_000_000,
                "status": "failed" if failed else "done",
                "error": "ruler: out of memory (log x.err)" if failed else None,
                "final_loss": 3.0 - gain,
                "wall_s": 3600.0,
                "gpu_hours": 2.0,
                "config": json.dumps(config),
            }
        )
        for step in range(0, 20, 5):
            rows["train_curves"].append({**ident, "step": step, "loss": 5.0 - step / 10 - gain})
        for length in (256, 512, 1024):
            for rope in ("none", "yarn") if length > 512 else ("none",):
                rows["perplexity"].append(
                    {
                        **ident,
                        "protocol": "stride",
                        "length": length,
                        "rope": rope,
                        "ppl": 20 - gain,
                    }
                )
            for depth in (0.0, 0.5, 1.0):
                correct = (index + int(depth * 2)) % 2 == 0
                rows["passkey"].append(
                    {**ident, "length": length, "rope": "none", "depth": depth, "trial": 0,
                     "needle_distance": int(length * (1 - depth)) + 1, "passkey": "12345",
                     "prediction": "12345" if correct else "999", "correct": correct}
                )  # fmt: skip
        for task in ("niah_single_1", "vt"):
            for length in (4096, 8192):
                rows["ruler"].append(
                    {**ident, "task": task, "length": length, "rope": "none", "sample": 0,
                     "status": "ok", "score": 100.0 * (index % 2), "prediction": "abc",
                     "references": '["abc"]'}
                )  # fmt: skip
        for mode in ("prefill", "decode"):
            for seq_len in (256, 512):
                rows["throughput"].append(
                    {**ident, "mode": mode, "seq_len": seq_len, "status": "ok",
                     "tokens_per_s": 1000.0 * (index + 1)}
                )  # fmt: skip
    for table, table_rows in rows.items():
        write_table(table, table_rows, results_dir / f"{table}.parquet")
    return [f"{study}/{name}" for study, name, *_ in runs]


@pytest.fixture
def built(tmp_path):
    ids = fake_results(tmp_path / "results")
    index = build_report(tmp_path / "results", tmp_path / "reports")
    return tmp_path / "reports", ids, index


def test_every_page_is_written_with_relative_links(built):
    reports, ids, index = built
    assert index == reports / "index.html"
    pages = {p.relative_to(reports).as_posix() for p in reports.rglob("*.html")}
    expected = {"index.html", "compare.html", "demo.html", "ablation_chunk.html"}
    expected |= {f"runs/{r}.html" for r in ids} | {f"samples/{r}.html" for r in ids}
    assert pages == expected
    for page in pages:
        text = (reports / page).read_text()
        depth = page.count("/")
        assert f'src="{"../" * depth}assets/vega-bundle.js"' in text
        for href in re.findall(r"<nav>.*?</nav>", text, re.S)[0].split('href="')[1:]:
            target = (reports / page).parent / href.split('"')[0]
            assert target.exists(), f"{page}: nav link {href.split(chr(34))[0]} leads nowhere"


def test_index_counts_statuses_and_gpu_hours_per_study(built):
    reports, _, _ = built
    text = (reports / "index.html").read_text()
    studies = text.split("<h2>Studies</h2>")[1].split("<h2>")[0]
    # demo: 4 runs, 3 done, 1 failed, 8 GPU-hours; headers in words, not snake_case
    cells = r"</td><td[^>]*>".join(["4", "3", "0", "0", "1", "8.00"])
    assert re.search(rf'<a href="demo.html">demo</a></td><td[^>]*>{cells}</td>', studies)
    assert "GPU-hours" in studies and "gpu_hours" not in studies
    assert "ruler: out of memory" in text.split("<h2>Failed runs</h2>")[1]
    assert "<p>what demo is for</p>" in (reports / "demo.html").read_text()


def test_study_axis_is_the_setting_a_study_varies(tmp_path):
    fake_results(tmp_path)
    runs = pl.read_parquet(tmp_path / "runs.parquet")
    chunk = runs.filter(pl.col("study") == "ablation_chunk")
    title, kind, axis = views.study_axis(chunk)
    assert (title, kind) == ("ttt chunk size", "log")
    assert axis["axis_value"].to_list() == [256.0, 1024.0]
    # the demo varies only the variant (its TTT settings follow from the variant)
    assert views.study_axis(runs.filter(pl.col("study") == "demo"))[:2] == ("variant", "ordinal")
    page = (build_report(tmp_path, tmp_path / "reports").parent / "ablation_chunk.html").read_text()
    assert "<h2>Results by ttt chunk size</h2>" in page
    assert '<th class="text">ttt chunk size</th>' in page


def test_ttt_runs_are_compared_with_their_backbone_or_a_baseline(tmp_path):
    fake_results(tmp_path)
    runs = pl.read_parquet(tmp_path / "runs.parquet")
    pairs = views.comparison_pairs(runs)
    assert pairs.select("run_id", "reference").rows() == [
        ("demo/ttt_full-demo-512", "demo/full-demo-512"),
        ("demo/ttt_swa-demo-512", "demo/swa-demo-512"),
    ]
    t = {
        name: pl.read_parquet(tmp_path / f"{name}.parquet")
        for name in ("perplexity", "passkey", "ruler", "throughput")
    }
    d = views.deltas(t, pairs)
    # ttt_full is the third run, full the first: 0.6 lower perplexity, 3x the tokens/s
    ppl = d["perplexity"].filter(
        (pl.col("pair").str.starts_with("demo/ttt_full")) & (pl.col("length") == 256)
    )
    assert math.isclose(ppl["delta"].item(), -0.6)
    speed = d["throughput"].filter(pl.col("pair").str.starts_with("demo/ttt_full"))
    assert speed["ratio"].to_list() == [3.0] * 4
    with_baseline = views.comparison_pairs(runs, baseline="demo/full-demo-512")
    # every other run against the baseline, ttt_full's pair with it listed once
    assert with_baseline.height == (len(runs) - 1) + 1
    with pytest.raises(ValueError, match="no-such/run"):
        views.comparison_pairs(runs, baseline="no-such/run")


def test_paper_scores_are_drawn_only_for_a_matching_setting(tmp_path):
    fake_results(tmp_path / "demo")
    page = (build_report(tmp_path / "demo", tmp_path / "r1").parent / "compare.html").read_text()
    assert "No run here matches a published setting" in page
    assert "arXiv 2604.06169" in page and "96.6" in page  # the published table is shown anyway
    # runs of the paper's 4B from-scratch setting (Table 3, 8K context) are matched
    fake_results(tmp_path / "4b", size="4B", context=8192)
    runs = pl.read_parquet(tmp_path / "4b" / "runs.parquet")
    matched = views.paper_comparison(runs, pl.read_parquet(tmp_path / "4b" / "ruler.parquet"))
    full = matched.filter(pl.col("run_id") == "demo/full-4B-512", pl.col("length") == 8192)
    assert full.select("ours", "paper").row(0) == (0.0, 38.09)
    page = (build_report(tmp_path / "4b", tmp_path / "r2").parent / "compare.html").read_text()
    assert "No run here matches" not in page


def test_samples_page_lists_every_prompt_with_a_filter(built):
    reports, _, _ = built
    text = (reports / "samples" / "demo" / "full-demo-512.html").read_text()
    passkey = text.split("<h2>Passkey</h2>")[1].split("<h2>")[0]
    assert passkey.count('<tr data-correct="') == 9  # 3 lengths x 3 depths
    assert passkey.count('data-correct="true"') == 6
    assert "<select" in passkey and 'type="search"' in passkey and "filterSamples" in text
    assert "<script src=" in text and "http" not in text.replace("http-equiv", "")


def test_run_page_shows_config_and_log_links(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run folders in the runs table are relative to the workflow's
    fake_results(tmp_path / "results")
    logs = tmp_path / "results" / "runs" / "demo" / "swa-demo-512" / "logs" / "ruler"
    logs.mkdir(parents=True)
    (logs / "7_0_log.err").write_text("out of memory")
    build_report("results", "reports")
    text = (tmp_path / "reports" / "runs" / "demo" / "swa-demo-512.html").read_text()
    assert "ruler: out of memory" in text and "Resolved config" in text
    assert "&quot;d_model&quot;: 32" in text
    assert 'href="../../../results/runs/demo/swa-demo-512/logs/"' in text
    assert 'href="../../../results/runs/demo/swa-demo-512/logs/ruler/7_0_log.err"' in text
    assert 'href="../../samples/demo/swa-demo-512.html"' in text


def test_export_writes_every_chart(tmp_path):
    fake_results(tmp_path / "results")
    written = export_charts(tmp_path / "results", tmp_path / "export", "svg")
    names = {p.name for p in written}
    assert "compare--throughput-ratio.svg" in names and "index--leaderboard.svg" in names
    assert all(p.read_text().startswith("<svg") for p in written)
    with pytest.raises(ValueError, match="svg or png"):
        export_charts(tmp_path / "results", tmp_path / "export", "pdf")


def test_a_context_grid_draws_a_line_per_variant_and_size():
    """A study over sizes and contexts (as `scaling`): context on x, a line per variant and
    size, so that the sizes' points are never joined."""
    rows = [
        {"run_id": f"s/{v}-{size}-{ctx}", "variant": v, "size": size, "context": ctx,
         "params": params, "config": None, "final_loss": 1.0}
        for v in ("full", "swa")
        for size, params in (("500M", 5), ("1.5B", 15))
        for ctx in (1024, 4096)
    ]  # fmt: skip
    board = pl.DataFrame(rows)
    title, kind, axis = views.study_axis(board)
    assert (title, kind) == ("training context (tokens)", "log")
    spec = views.axis_chart(board, axis, title, kind).to_dict()
    lines, labels = spec["spec"]["layer"]  # the lines, and each value written on its point
    assert lines["encoding"]["detail"] == [{"field": "size", "type": "nominal"}]
    assert lines["mark"]["type"] == "line" and labels["mark"]["type"] == "text"


def test_cli_report_takes_a_baseline_and_exports(tmp_path, capsys):
    from ltstudy.cli import main

    fake_results(tmp_path / "results")
    args = ["report", "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "r")]
    assert main([*args, "--baseline", "demo/full-demo-512"]) == 0
    compare = (tmp_path / "r" / "compare.html").read_text()
    assert "demo/ablation_chunk" not in compare and "chosen baseline demo/full-demo-512" in compare
    assert "ablation_chunk/ttt_full-demo-512-chunk_size256</a></td><td" in compare
    assert main([*args, "--baseline", "demo/nope"]) == 2
    assert "--baseline 'demo/nope': no such run" in capsys.readouterr().err
    assert main([*args, "--export", "svg", "--out", str(tmp_path / "svg")]) == 0
    assert len(list((tmp_path / "svg").glob("*.svg"))) > 20


def test_parameter_counts_keep_three_digits_at_every_scale():
    from ltstudy.report.layout import parameter_count

    assert [parameter_count(n) for n in (12, 31_415, 999_600, 503_000_000, 14_2 * 10**8)] == [
        "12",
        "31.4K",
        "1M",
        "503M",
        "14.2B",
    ]


def test_sections_of_stages_no_run_has_are_left_out(tmp_path):
    fake_results(tmp_path / "results")
    runs = pl.read_parquet(tmp_path / "results" / "runs.parquet")
    passkey_only = pl.col("config").map_elements(
        lambda c: json.dumps({**json.loads(c), "stages": ["train", "passkey"]}),
        return_dtype=pl.String,
    )
    write_table("runs", runs.with_columns(passkey_only), tmp_path / "results" / "runs.parquet")
    for table in ("perplexity", "ruler"):  # no results there; throughput keeps its rows
        write_table(table, [], tmp_path / "results" / f"{table}.parquet")
    build_report(tmp_path / "results", tmp_path / "reports")
    text = (tmp_path / "reports" / "demo.html").read_text()
    assert "<h2>Passkey retrieval</h2>" in text and "<h2>Training curves</h2>" in text
    assert "<h2>Throughput vs context</h2>" in text  # results are shown whatever the stages
    for absent in ("Perplexity vs evaluation length", "RULER by task"):
        assert f"<h2>{absent}</h2>" not in text


def test_the_same_tables_give_the_same_pages(tmp_path):
    fake_results(tmp_path / "results")
    for name in ("a", "b"):
        build_report(tmp_path / "results", tmp_path / name)
    pages = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.html"))
    for page in pages:
        assert (tmp_path / "a" / page).read_text() == (tmp_path / "b" / page).read_text(), page
