"""The report's charts and leaderboard on small hand-made tables: fixed colours and dashes,
smoothing, explicit zeros, per-seed means, and a leaderboard that never mixes position
methods or calls a run with only throughput missing "pending"."""

import json
import math

import polars as pl
import pytest

from ltstudy.report import charts
from ltstudy.results.schemas import TABLES, table_frame

CONTEXT = 64


def ident(run_id: str) -> dict:
    """Identity columns from a run id like "demo/ttt_full-micro-64-seed1"."""
    study, name = run_id.split("/")
    variant = next(
        v for v in sorted(charts.VARIANT_COLORS, key=len, reverse=True) if name.startswith(v)
    )
    return {
        "run_id": run_id,
        "study": study,
        "variant": variant,
        "size": "micro",
        "context": CONTEXT,
    }


def perplexity(run_ids, ppl=lambda run, length, rope: 10.0) -> pl.DataFrame:
    rows = []
    for run in run_ids:
        for length in (32, 64, 256):
            for rope in ("none", "yarn x4") if length > CONTEXT else ("none",):
                value = ppl(run, length, rope)
                rows.append(
                    {
                        **ident(run),
                        "protocol": "stride",
                        "length": length,
                        "rope": rope,
                        "ppl": value,
                    }
                )
    return table_frame("perplexity", rows)


def runs(
    run_ids, status="done", stages=("train", "perplexity", "passkey", "throughput")
) -> pl.DataFrame:
    rows = []
    for run in run_ids:
        seed = int(run.rsplit("seed", 1)[1]) if "-seed" in run else 0
        config = {"stages": list(stages), "data": {"tokenizer": "bytes"}}
        rows.append(
            {
                **ident(run),
                "name": run.split("/")[1],
                "seed": seed,
                "status": status,
                "final_loss": 3.0,
                "config": json.dumps(config),
            }
        )
    return table_frame("runs", rows)


def tables(**given: pl.DataFrame) -> dict[str, pl.DataFrame]:
    return {name: given.get(name, table_frame(name, [])) for name in TABLES}


def encodings(spec, channel: str) -> list[dict]:
    """Every `channel` encoding in a Vega-Lite spec, however nested (layers, facets)."""
    found = []
    if isinstance(spec, dict):
        if isinstance(spec.get("encoding"), dict) and channel in spec["encoding"]:
            found.append(spec["encoding"][channel])
        for value in spec.values():
            found += encodings(value, channel)
    elif isinstance(spec, list):
        for value in spec:
            found += encodings(value, channel)
    return found


def colours(chart) -> dict[str, str]:
    (scale,) = {
        json.dumps(e["scale"])
        for e in encodings(chart.to_dict(), "color")
        if e.get("field") == "variant"
    }
    scale = json.loads(scale)
    return dict(zip(scale["domain"], scale["range"], strict=True))


def test_a_variant_keeps_its_colour_when_another_is_missing():
    all_three = colours(
        charts.perplexity_vs_length(perplexity(["d/full-a", "d/hybrid-a", "d/gla-a"]), "stride")
    )
    no_hybrid = colours(charts.perplexity_vs_length(perplexity(["d/full-a", "d/gla-a"]), "stride"))
    assert all_three == no_hybrid
    assert no_hybrid["gla"] != no_hybrid["hybrid"]
    assert list(no_hybrid)[: len(charts.VARIANT_COLORS)] == list(charts.VARIANT_COLORS)
    assert len(set(charts.VARIANT_COLORS.values())) == len(charts.VARIANT_COLORS) == 9
    # every chart colouring by variant uses the same scale
    curves = table_frame(
        "train_curves",
        [{**ident("d/gla-a"), "step": s, "tokens": 8 * s, "loss": 1.0} for s in range(1, 5)],
    )
    assert colours(charts.training_curves(curves)) == no_hybrid


def test_an_unknown_variant_gets_a_colour_and_leaves_the_others_alone():
    colour = charts.variant_color(["full", "my_mixer"]).to_dict()
    mapping = dict(zip(colour["scale"]["domain"], colour["scale"]["range"], strict=True))
    assert mapping["full"] == charts.VARIANT_COLORS["full"]
    assert mapping["my_mixer"] in charts.EXTRA_COLORS
    assert colour["legend"]["values"] == ["full", "my_mixer"]  # the legend lists what is drawn


def test_position_dashes_are_fixed_and_drawn_in_the_legend():
    from ltstudy.models.rope import METHODS

    assert ("native", *METHODS) == charts.POSITION_METHODS
    native_only = perplexity(["d/full-a"]).filter(pl.col("rope") == "none")
    for frame in (native_only, perplexity(["d/full-a"])):
        (dash,) = encodings(charts.perplexity_vs_length(frame, "stride").to_dict(), "strokeDash")
        assert dash["scale"]["domain"] == list(charts.POSITION_METHODS)
        assert dash["scale"]["range"][0] == [1, 0]  # native: solid
        assert dash["legend"]["symbolType"] == "stroke"


def test_line_charts_highlight_a_variant_from_the_legend():
    spec = charts.perplexity_vs_length(perplexity(["d/full-a", "d/gla-a"]), "stride").to_dict()
    text = json.dumps(spec)
    assert '"bind": "legend"' in text and '"fields": ["variant"]' in text
    assert any("condition" in e for e in encodings(spec, "opacity"))


def test_one_study_is_one_full_width_view_several_are_panels_without_field_titles():
    one = charts.perplexity_vs_length(perplexity(["d/full-a", "d/gla-a"]), "stride").to_dict()
    assert one["width"] == "container" and "facet" not in one
    two = charts.perplexity_vs_length(perplexity(["d/full-a", "e/full-a"]), "stride").to_dict()
    assert two["facet"]["title"] is None and two["facet"]["header"]["title"] is None
    assert two["spec"]["width"] == charts.PAGE_WIDTH // 2 - charts.PANEL_MARGIN


def test_smoothing_keeps_the_length_and_reduces_the_variance():
    noise = [math.sin(7 * s) for s in range(1, 201)]
    curves = table_frame(
        "train_curves",
        [
            {**ident("d/full-a"), "step": s, "tokens": 8 * s, "loss": 3 + n}
            for s, n in enumerate(noise, 1)
        ]
        + [{**ident("d/gla-a"), "step": s, "tokens": 8 * s, "loss": 2.0} for s in range(1, 201)],
    )
    smoothed = charts.smooth(curves, window=9)
    assert smoothed.height == curves.height
    full = smoothed.filter(pl.col("variant") == "full")
    assert full["loss_smooth"].var() < full["loss"].var() / 10
    assert abs(full["loss_smooth"].mean() - full["loss"].mean()) < 0.05
    # runs are smoothed apart: the constant one stays constant
    assert smoothed.filter(pl.col("variant") == "gla")["loss_smooth"].to_list() == [2.0] * 200


def test_training_curves_use_tokens_in_the_runs_unit_and_carry_the_raw_loss():
    ids = ["d/full-a"]
    curves = table_frame(
        "train_curves",
        [{**ident(ids[0]), "step": s, "tokens": 8 * s, "loss": 3.0 + s % 2} for s in range(1, 50)],
    )
    spec = charts.training_curves(curves, runs=runs(ids)).to_dict()
    (x,) = {json.dumps(e) for e in encodings(spec, "x")}
    assert json.loads(x)["field"] == "tokens" and json.loads(x)["title"] == "bytes seen"
    assert "raw loss (nats/token)" in json.dumps(spec)


def test_seeds_are_one_line_with_an_interval():
    ids = [f"d/full-a-seed{s}" for s in range(3)]
    data = charts.seed_mean(
        perplexity(ids, lambda run, length, rope: 10.0 + int(run[-1]))
        .filter(pl.col("rope") == "none")
        .with_columns(position=pl.lit("native")),
        "ppl",
        ["variant", "position", "length"],
    )
    assert data["series"].unique().to_list() == ["d/full-a"]
    assert data["seeds"].unique().to_list() == [3]
    assert data["ppl"].unique().to_list() == [11.0]
    assert (data["lo"] < 11.0).all() and (data["hi"] > 11.0).all()
    spec = json.dumps(charts.perplexity_vs_length(perplexity(ids), "stride").to_dict())
    assert '"y2"' in spec  # the interval band


def passkey_rows(run_id: str, correct) -> list[dict]:
    return [
        {
            **ident(run_id),
            "length": CONTEXT,
            "rope": "none",
            "depth": d,
            "needle_distance": 1,
            "trial": trial,
            "correct": correct(trial),
        }
        for d in (0.0, 1.0)
        for trial in range(2)
    ]


def test_an_all_zero_passkey_reads_0_of_n_and_identical_panels_are_drawn_once():
    zero = [*passkey_rows("d/full-a", lambda t: False), *passkey_rows("d/gla-a", lambda t: False)]
    some = passkey_rows("d/swa-a", lambda t: t == 0)
    cells = charts.passkey_cells(table_frame("passkey", zero + some))
    assert cells["panel"].n_unique() == 2
    assert cells.filter(pl.col("variant") == "swa")["label"].unique().to_list() == ["1 of 2"]
    merged = cells.filter(pl.col("variant") != "swa")["panel"].unique().item()
    assert "full-a" in merged and "gla-a" in merged and merged.startswith("all 0")
    spec = json.dumps(charts.passkey_heatmaps(table_frame("passkey", zero)).to_dict())
    assert "0 of 2" in spec


def test_an_all_zero_ruler_result_reads_0_of_n():
    rows = [
        {
            **ident(run),
            "task": task,
            "length": 128,
            "rope": "none",
            "sample": s,
            "status": "ok",
            "score": 0.0,
        }
        for run in ("d/full-a", "d/gla-a")
        for task in ("vt", "cwe")
        for s in range(3)
    ]
    spec = charts.ruler_by_task(table_frame("ruler", rows)).to_dict()
    assert "0 of 3" in json.dumps(spec)
    (y,) = [e for e in encodings(spec, "y") if e.get("field") == "score"]
    assert y["scale"]["domain"] == [0, 100]  # the axis still spans the scale


def test_leaderboard_ppl_at_longest_is_native_with_yarn_beside_it():
    def ppl(run, length, rope):
        return {"none": 15.972, "yarn x4": 15.943}[rope] if length == 256 else 12.0

    board = charts.leaderboard(
        tables(runs=runs(["d/full-a"]), perplexity=perplexity(["d/full-a"], ppl))
    )
    row = board.row(0, named=True)
    assert row["ppl_at_longest"] == 15.972 and row["longest_length"] == 256
    assert row["ppl_at_longest_yarn"] == 15.943
    assert row["ppl_at_context"] == 12.0
    assert "ppl_at_longest_yarn" in charts.COLUMN_TITLES


def test_leaderboard_status_names_missing_stages_and_throughput_alone_is_done():
    ids = ["d/full-a", "d/gla-a", "d/swa-a"]
    run_table = runs(ids, status="pending").with_columns(
        status=pl.when(pl.col("run_id") == "d/swa-a").then(pl.lit("failed")).otherwise("status")
    )
    passkey = table_frame(
        "passkey",
        passkey_rows("d/full-a", lambda t: True) + passkey_rows("d/swa-a", lambda t: True),
    )
    board = charts.leaderboard(tables(runs=run_table, perplexity=perplexity(ids), passkey=passkey))
    status = {r["run_id"]: (r["status"], r["missing"]) for r in board.iter_rows(named=True)}
    assert status["d/full-a"] == ("done", "throughput")
    assert status["d/gla-a"] == ("pending", "passkey, throughput")
    assert status["d/swa-a"] == ("failed", "throughput")


def test_leaderboard_per_study_and_sorted_within_studies():
    ids = ["a/full-x", "a/gla-x", "b/full-x"]
    t = tables(
        runs=runs(ids),
        perplexity=perplexity(ids, lambda run, length, rope: 12.0 - ("gla" in run)),
    )
    assert charts.leaderboard(t, study="a")["run_id"].to_list() == ["a/gla-x", "a/full-x"]
    assert charts.leaderboard(t)["study"].to_list() == ["a", "a", "b"]


def test_deltas_of_ttt_runs_against_their_backbone():
    ids = [
        "d/full-a-seed0",
        "d/ttt_full-a-seed0",
        "d/full-a-seed1",
        "d/ttt_full-a-seed1",
        "d/swa-a",
        "d/ttt_swa-a",
        "d/gla-a",
    ]
    value = {"full": 20.0, "ttt_full": 18.0, "swa": 25.0, "ttt_swa": 30.0, "gla": 22.0}

    def ppl(run, length, rope):
        return value[ident(run)["variant"]] + (0.5 if run.endswith("seed1") else 0.0)

    board = charts.leaderboard(tables(runs=runs(ids), perplexity=perplexity(ids, ppl)))
    deltas = {r["run_id"]: r for r in charts.with_deltas(board, "backbone").iter_rows(named=True)}
    assert deltas["d/ttt_full-a-seed1"]["baseline"] == "d/full-a-seed1"
    assert deltas["d/ttt_full-a-seed1"]["ppl_at_context_delta"] == pytest.approx(-2.0)
    assert deltas["d/ttt_full-a-seed1"]["ppl_at_context_delta_pct"] == pytest.approx(
        -2.0 / 20.5 * 100
    )
    assert deltas["d/ttt_swa-a"]["baseline"] == "d/swa-a"
    assert deltas["d/ttt_swa-a"]["ppl_at_longest_delta"] == pytest.approx(5.0)
    assert (
        deltas["d/gla-a"]["baseline"] is None and deltas["d/gla-a"]["ppl_at_context_delta"] is None
    )
    against_gla = {
        r["run_id"]: r for r in charts.with_deltas(board, "d/gla-a").iter_rows(named=True)
    }
    assert against_gla["d/swa-a"]["ppl_at_context_delta"] == pytest.approx(3.0)
    assert against_gla["d/gla-a"]["ppl_at_context_delta"] == 0.0
    with pytest.raises(ValueError, match="d/nope"):
        charts.with_deltas(board, "d/nope")


def test_every_chart_compiles_to_a_drawing():
    """Vega-Lite accepts each spec and Vega draws it (vl-convert, offline, no browser)."""
    import vl_convert

    ids = ["d/full-a", "d/ttt_full-a", "e/gla-a"]
    positions = table_frame(
        "position_loss",
        [
            {
                **ident(r),
                "length": 256,
                "rope": rope,
                "bucket_start": b,
                "bucket_end": 2 * b,
                "tokens": 10,
                "nll": 3.0,
            }
            for r in ids
            for rope in ("none", "yarn x4")
            for b in (1, 2, 4, 8)
        ],
    )
    passkey = table_frame(
        "passkey", [row for r in ids for row in passkey_rows(r, lambda t: t == 0)]
    )
    throughput = table_frame(
        "throughput",
        [
            {
                **ident(r),
                "mode": m,
                "seq_len": n,
                "status": "ok",
                "tokens_per_s": 1e4 / n,
                "tokens_per_s_min": 9e3 / n,
                "tokens_per_s_max": 1.1e4 / n,
            }
            for r in ids
            for m in ("train", "prefill")
            for n in (64, 128)
        ],
    )
    curves = table_frame(
        "train_curves",
        [
            {**ident(r), "step": s, "tokens": 64 * s, "loss": 4.0 / s}
            for r in ids
            for s in range(1, 30)
        ],
    )
    board = charts.leaderboard(tables(runs=runs(ids), perplexity=perplexity(ids)))
    drawn = [
        charts.leaderboard_chart(board),
        charts.perplexity_vs_length(perplexity(ids), "stride"),
        charts.loss_by_position(positions),
        charts.passkey_heatmaps(passkey),
        charts.passkey_by_distance(passkey),
        charts.throughput_vs_context(throughput),
        charts.training_curves(curves, runs=runs(ids)),
    ]
    for chart in drawn:
        spec = json.loads(json.dumps(chart.to_dict()).replace('"container"', "600"))
        assert "<svg" in vl_convert.vegalite_to_svg(spec)
