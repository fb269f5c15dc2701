"""Altair charts of the results tables. Each takes an eager Polars frame, pre-aggregated so
that no chart carries more than a few thousand rows, and returns a chart (or None if empty).

Every chart colours by variant with `variant_color()` (one colour per variant on every page)
and dashes by position method with `position_dash()`. A chart of one panel takes the page's
full width (width "container"); Vega-Lite cannot size facets to their container, so a chart
of several panels (studies, lengths, modes, passkey runs) gets a width per panel computed
from PAGE_WIDTH and scrolls sideways on narrower windows. Callers may filter the frames to
one study or one run: a facet appears only for what varies."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence

import altair as alt
import polars as pl

from ltstudy.models.variants import VARIANTS
from ltstudy.results.schemas import TABLE_STAGE

MAX_CURVE_POINTS = 200
PAGE_WIDTH = 1300  # chart area of the 1400 px page, less its padding
PANEL_MARGIN = 90  # a panel's axis labels and gap, within its share of PAGE_WIDTH
HEIGHT = 300

# Fixed per variant (tableau10), so a variant keeps its colour when another is absent.
VARIANT_COLORS = dict(
    zip(
        VARIANTS,
        [
            "#4c78a8",  # full: blue
            "#f58518",  # swa: orange
            "#b279a2",  # hybrid: purple
            "#72b7b2",  # gla: teal
            "#54a24b",  # deltanet: green
            "#9d755d",  # mamba2: brown
            "#79706e",  # lact: grey
            "#e45756",  # ttt_full: red
            "#d6a60a",  # ttt_swa: dark yellow
        ],
        strict=True,
    )
)
# Variants outside the registry (a plugin mixer, say) get one of these, by a hash of the name.
EXTRA_COLORS = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#17becf"]

# "native" is the run's own positions; the others are ltstudy.models.rope.METHODS (not imported:
# that module needs torch, and the report must not).
POSITION_METHODS = ("native", "linear", "ntk", "dynamic", "yarn", "llama3")
POSITION_DASHES = [[1, 0], [2, 2], [6, 2, 2, 2], [4, 4], [8, 4], [1, 3]]

# The backbone each TTT variant adds fast weights to: `with_deltas(board, "backbone")`.
TTT_BACKBONE = {"ttt_full": "full", "ttt_swa": "swa"}
# Stages whose absence still leaves a run's results complete enough to call it done.
OPTIONAL_STAGES = ("throughput",)
# A seed grid axis in a run name (`full-micro-64-seed1`): runs equal but for it are one series.
SEED_PART = r"-seed[^-/]*"

# Table headers for the leaderboard and its deltas (other columns: underscores as spaces).
COLUMN_TITLES = {
    "run_id": "run",
    "study": "study",
    "variant": "variant",
    "size": "size",
    "context": "train ctx",
    "seed": "seed",
    "params": "params",
    "status": "status",
    "missing": "missing",
    "final_loss": "final loss (nats/token)",
    "ppl_at_context": "PPL @ train ctx",
    "longest_length": "longest length",
    "ppl_at_longest": "PPL @ longest",
    **{f"ppl_at_longest_{m}": f"PPL @ longest ({m})" for m in POSITION_METHODS[1:]},
    "ppl_at_longest_yarn": "PPL @ longest (YaRN)",
    "passkey_in_context": "passkey (in ctx)",
    "ruler_score": "RULER",
    "prefill_tokens_per_s": "prefill tokens/s",
    "baseline": "baseline",
    "ppl_at_context_delta": "Δ PPL @ train ctx",
    "ppl_at_context_delta_pct": "Δ PPL @ train ctx (%)",
    "ppl_at_longest_delta": "Δ PPL @ longest",
    "ppl_at_longest_delta_pct": "Δ PPL @ longest (%)",
    "ppl_at_longest_yarn_delta": "Δ PPL @ longest (YaRN)",
    "ppl_at_longest_yarn_delta_pct": "Δ PPL @ longest (YaRN, %)",
    "passkey_in_context_delta": "Δ passkey (in ctx)",
    "ruler_score_delta": "Δ RULER",
}
# Columns `with_deltas` compares; perplexities also as a percentage of the baseline's.
DELTA_METRICS = ("ppl_at_context", "ppl_at_longest", "ppl_at_longest_yarn")
DELTA_SCORES = ("passkey_in_context", "ruler_score")


def variant_color(variants: Iterable[str] = (), legend: bool = True) -> alt.Color:
    """Colour by `variant`, fixed per variant on every chart and page. `variants`: those in
    the chart; the legend lists only them, and unknown ones get a colour from their name."""
    present = list(dict.fromkeys(variants))
    extra = sorted(v for v in present if v not in VARIANT_COLORS)
    domain = [*VARIANT_COLORS, *extra]
    colors = [
        *VARIANT_COLORS.values(),
        *(EXTRA_COLORS[zlib.crc32(v.encode()) % len(EXTRA_COLORS)] for v in extra),
    ]
    shown = [v for v in domain if v in present] or alt.Undefined
    return alt.Color(
        "variant:N",
        scale=alt.Scale(domain=domain, range=colors),
        title="variant",
        legend=alt.Legend(values=shown, symbolOpacity=1) if legend else None,
    )


def position_dash(methods: Iterable[str] = ()) -> alt.StrokeDash:
    """Dashes by `position` (native: solid), fixed per method; the legend draws the dashes."""
    shown = [m for m in POSITION_METHODS if m in set(methods)] or alt.Undefined
    return alt.StrokeDash(
        "position:N",
        scale=alt.Scale(domain=list(POSITION_METHODS), range=POSITION_DASHES),
        title="position method",
        legend=alt.Legend(values=shown, symbolType="stroke", symbolSize=600, symbolStrokeWidth=2),
    )


def variant_highlight() -> alt.Parameter:
    """Click a variant in the legend to highlight its lines (shift-click adds more)."""
    return alt.selection_point(fields=["variant"], bind="legend")


def _opacity(selection: alt.Parameter, on: float = 1.0, off: float = 0.12) -> alt.OpacityValue:
    return alt.condition(selection, alt.value(on), alt.value(off))


def powers_of_two(values: Iterable[float], most: int = 8) -> list[int]:
    """Tick values for a log-2 axis over `values`: powers of two, every other one (or every
    fourth...) when more than `most` would crowd the axis."""
    values = [v for v in values if v is not None and v > 0]
    if not values:
        return []
    low, high = min(values), max(values)
    ticks = [1 << e for e in range(64) if low / 2 < 1 << e <= high * 1.01]
    step = -(-len(ticks) // most)
    return ticks[::-1][::step][::-1]


# 1024 -> "1k", 32768 -> "32k", 1048576 -> "1M": lengths are powers of two
POWER_LABEL = (
    "datum.value >= 1048576 ? format(datum.value / 1048576, '~g') + 'M' : "
    "datum.value >= 1024 ? format(datum.value / 1024, '~g') + 'k' : format(datum.value, '~g')"
)


def tokens_axis(field: str, title: str, values: Iterable[float] | None = None) -> alt.X:
    """A log-2 x axis: lengths, positions and distances in tokens grow by powers of two.
    `values`: the data, to put ticks at its powers of two only."""
    ticks = powers_of_two(values) if values is not None else []
    axis = alt.Axis(values=ticks or alt.Undefined, labelExpr=POWER_LABEL, tickCount=6)
    return alt.X(f"{field}:Q", scale=alt.Scale(type="log", base=2), title=title, axis=axis)


def token_unit(runs: pl.DataFrame | None) -> str:
    """What the runs' tokens are: "bytes" under the byte tokenizer (the demo), else "tokens"."""
    if runs is None or not runs.height or "config" not in runs.columns:
        return "tokens"
    tokenizers = runs.select(
        pl.col("config").str.json_path_match("$.data.tokenizer").unique()
    ).to_series()
    return "bytes" if tokenizers.to_list() == ["bytes"] else "tokens"


def with_position(frame: pl.DataFrame) -> pl.DataFrame:
    """Add `position`: "native" for the run's own position method (the one evaluated within
    its training context; "none" when nothing is), else the extension's method ("yarn")."""
    own = (
        frame.filter(pl.col("length") <= pl.col("context"))
        .group_by("run_id")
        .agg(pl.col("rope").first().alias("_own"))
    )
    return (
        frame.join(own, on="run_id", how="left")
        .with_columns(
            pl.when(pl.col("rope") == pl.col("_own").fill_null("none"))
            .then(pl.lit("native"))
            .otherwise(pl.col("rope").str.split(" ").list.first())
            .alias("position")
        )
        .drop("_own")
    )


def seed_mean(data: pl.DataFrame, value: str, by: Sequence[str]) -> pl.DataFrame:
    """Mean of `value` per `by` over runs that differ only by seed (named by `series`, the
    run id without its seed), with a 95% normal interval `lo`..`hi` (null for one seed)."""
    half = 1.96 * pl.col(value).std() / pl.len().sqrt()
    return (
        data.with_columns(pl.col("run_id").str.replace(SEED_PART, "").alias("series"))
        .group_by("series", *by, maintain_order=True)
        .agg(pl.col(value).mean(), half.alias("_half"), pl.len().alias("seeds"))
        .with_columns(
            (pl.col(value) - pl.col("_half")).alias("lo"),
            (pl.col(value) + pl.col("_half")).alias("hi"),
        )
        .drop("_half")
    )


def _panels(
    layers: Sequence[alt.Chart],
    data: pl.DataFrame,
    by: Sequence[str] = ("study",),
    columns: int = 2,
    height: int = HEIGHT,
    formats: Mapping[str, str] | None = None,
) -> alt.LayerChart | alt.FacetChart:
    """The layers over `data`, full width; a panel per value of the `by` fields that vary
    (none: a single view), `columns` to a row, in the fields' order, labelled by value alone
    (no "study / x") or by `formats[field]` ("{} tokens")."""
    varying = [f for f in by if f in data.columns and data[f].n_unique() > 1]
    if not varying:
        return alt.layer(*layers, data=data).properties(width="container", height=height)
    formats = formats or {}
    label = pl.concat_str(
        [pl.format(formats.get(f, "{}"), pl.col(f)) for f in varying], separator=" · "
    )
    data = data.sort(varying, maintain_order=True).with_columns(label.alias("panel"))
    order = data["panel"].unique(maintain_order=True).to_list()
    columns = min(columns, len(order))
    width = PAGE_WIDTH // columns - PANEL_MARGIN
    header = alt.Header(title=None, labelFontSize=13, labelFontWeight="bold", labelLimit=width)
    return (
        alt.layer(*layers, data=data)
        .properties(width=width, height=height)
        .facet(facet=alt.Facet("panel:N", title=None, header=header, sort=order), columns=columns)
    )


def _lines(
    data: pl.DataFrame,
    x: alt.X,
    y: alt.Y,
    tooltip: list,
    dashes: bool = False,
    band: bool = False,
) -> list[alt.Chart]:
    """Layers of a line chart over `series`: lines with points, coloured by variant (legend
    click highlights one), dashed by `position` if `dashes`, and a `lo`..`hi` band if `band`."""
    highlight = variant_highlight()
    encoding = {"x": x, "color": variant_color(data["variant"].unique())}
    encoding["detail"] = ["series:N", "position:N"] if dashes else "series:N"
    if dashes:
        encoding["strokeDash"] = position_dash(data["position"].unique())
    lines = (
        alt.Chart()
        .mark_line(point=alt.OverlayMarkDef(size=30), strokeWidth=2)
        .encode(y=y, opacity=_opacity(highlight), tooltip=tooltip, **encoding)
        .add_params(highlight)
    )
    if not band:
        return [lines]
    bands = (
        alt.Chart()
        .mark_area()
        .encode(y=alt.Y("lo:Q"), y2="hi:Q", opacity=_opacity(highlight, 0.2, 0.03), **encoding)
    )
    return [bands, lines]


def leaderboard(t: Mapping[str, pl.DataFrame], study: str | None = None) -> pl.DataFrame:
    """One row per run (of `study`, or of every study sorted within each): size, final training
    loss, stride perplexity with the run's own positions at the training context and at the
    longest evaluated length, and per extension method beside it (`ppl_at_longest_yarn`; never
    merged), passkey accuracy within the training context, mean RULER score (own positions),
    prefill speed at the training context. `missing`: the run's stages with no results yet;
    `status` is "done" once all but the optional ones (throughput) have results."""
    t = {k: v.filter(pl.col("study") == study) if study else v for k, v in t.items()}
    runs = t["runs"]
    board = runs.select(
        "run_id", "study", "variant", "size", "context", "seed", "params", "status", "final_loss"
    )
    perplexity = with_position(t["perplexity"].filter(pl.col("protocol") == "stride"))
    native = perplexity.filter(pl.col("position") == "native")
    if native.height:
        at_ctx = (
            native.filter(pl.col("length") <= pl.col("context"))
            .sort("length")
            .group_by("run_id")
            .last()
            .select("run_id", pl.col("ppl").alias("ppl_at_context"))
        )
        longest = (
            native.sort("length")
            .group_by("run_id")
            .last()
            .select(
                "run_id",
                pl.col("length").alias("longest_length"),
                pl.col("ppl").alias("ppl_at_longest"),
            )
        )
        board = board.join(at_ctx, on="run_id", how="left").join(longest, on="run_id", how="left")
    for method in POSITION_METHODS[1:]:
        extended = perplexity.filter(pl.col("position") == method)
        if extended.height:
            longest = extended.sort("length").group_by("run_id").last()
            column = pl.col("ppl").alias(f"ppl_at_longest_{method}")
            board = board.join(longest.select("run_id", column), on="run_id", how="left")
    passkey = t["passkey"]
    if passkey.height:
        acc = (
            passkey.filter(pl.col("length") <= pl.col("context"))
            .group_by("run_id")
            .agg(pl.col("correct").mean().alias("passkey_in_context"))
        )
        board = board.join(acc, on="run_id", how="left")
    ruler = t["ruler"].filter(pl.col("status") == "ok")
    if ruler.height:
        own = with_position(ruler).filter(pl.col("position") == "native")
        mean = own.group_by("run_id").agg(pl.col("score").mean().alias("ruler_score"))
        board = board.join(mean, on="run_id", how="left")
    throughput = t["throughput"]
    if throughput.height:
        speed = throughput.filter(
            (pl.col("mode") == "prefill") & (pl.col("seq_len") == pl.col("context"))
        ).select("run_id", pl.col("tokens_per_s").alias("prefill_tokens_per_s"))
        board = board.join(speed, on="run_id", how="left")
    board = board.join(_missing_stages(t), on="run_id", how="left")
    complete = (
        pl.col("missing").is_null()
        | pl.col("missing")
        .str.split(", ")
        .list.eval(pl.element().is_in(OPTIONAL_STAGES))
        .list.all()
    )
    board = board.with_columns(
        pl.when((pl.col("status") != "failed") & complete)
        .then(pl.lit("done"))
        .otherwise(pl.col("status"))
        .alias("status")
    )
    sort_key = "ppl_at_context" if "ppl_at_context" in board.columns else "run_id"
    return board.sort(["study", sort_key], nulls_last=True)


def _missing_stages(t: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """Per run: its stages (from its config; else those any run of its study has results
    of) that have no rows in their table yet, comma-separated, or null."""
    runs = t["runs"]
    done = {(r, stage) for table, stage in TABLE_STAGE.items() for r in t[table]["run_id"]}
    done |= {(r, "train") for r in runs.filter(pl.col("final_loss").is_not_null())["run_id"]}
    study_of = dict(runs.select("run_id", "study").iter_rows())
    by_study: dict[str, list[str]] = {}
    for stage in dict.fromkeys(TABLE_STAGE.values()):  # in workflow order
        for study in {study_of.get(r) for r, s in done if s == stage}:
            by_study.setdefault(study, []).append(stage)
    rows = []
    for run_id, study, config in runs.select("run_id", "study", "config").iter_rows():
        expected = (json.loads(config) if config else {}).get("stages") or by_study.get(study, [])
        missing = [s for s in expected if (run_id, s) not in done]
        rows.append({"run_id": run_id, "missing": ", ".join(missing) or None})
    return pl.DataFrame(rows, schema={"run_id": pl.String, "missing": pl.String})


def backbone_run(board: pl.DataFrame) -> pl.DataFrame:
    """Each TTT run's backbone run (`run_id`, `baseline`): the run of the same study named
    alike but for the variant (ttt_full-500M-32k -> full-500M-32k), else the only run of the
    backbone variant with the same study, size, context and seed."""
    ids = set(board["run_id"])
    rows = []
    for run_id, study, variant, size, context, seed in board.select(
        "run_id", "study", "variant", "size", "context", "seed"
    ).iter_rows():
        backbone = TTT_BACKBONE.get(variant)
        if backbone is None:
            continue
        name = run_id.removeprefix(f"{study}/")
        alike = f"{study}/{backbone}{name.removeprefix(variant)}"
        if name.startswith(variant) and alike in ids:
            rows.append({"run_id": run_id, "baseline": alike})
            continue
        same = board.filter(
            (pl.col("study") == study)
            & (pl.col("variant") == backbone)
            & (pl.col("size") == size)
            & (pl.col("context") == context)
            & (pl.col("seed") == seed)
        )
        if same.height == 1:
            rows.append({"run_id": run_id, "baseline": same["run_id"].item()})
    return pl.DataFrame(rows, schema={"run_id": pl.String, "baseline": pl.String})


def with_deltas(board: pl.DataFrame, baseline: str = "backbone") -> pl.DataFrame:
    """The leaderboard with `baseline` and `<metric>_delta` columns (run minus baseline; for
    perplexities also `_delta_pct`, in % of the baseline's). `baseline`: a run id, every run
    against it, or "backbone": each TTT run against its backbone (`backbone_run`), other
    runs without deltas."""
    if baseline == "backbone":
        pairs = backbone_run(board)
    elif baseline in set(board["run_id"]):
        pairs = board.select("run_id", pl.lit(baseline).alias("baseline"))
    else:
        raise ValueError(f"baseline {baseline!r}: not a run of the leaderboard, nor 'backbone'")
    metrics = [m for m in (*DELTA_METRICS, *DELTA_SCORES) if m in board.columns]
    reference = board.select(
        pl.col("run_id").alias("baseline"), *(pl.col(m).alias(f"_ref_{m}") for m in metrics)
    )
    out = board.join(pairs, on="run_id", how="left").join(reference, on="baseline", how="left")
    deltas = []
    for m in metrics:
        deltas.append((pl.col(m) - pl.col(f"_ref_{m}")).alias(f"{m}_delta"))
        if m in DELTA_METRICS:
            pct = 100 * (pl.col(m) - pl.col(f"_ref_{m}")) / pl.col(f"_ref_{m}")
            deltas.append(pct.alias(f"{m}_delta_pct"))
    return out.with_columns(deltas).drop(f"_ref_{m}" for m in metrics)


def leaderboard_chart(board: pl.DataFrame) -> alt.Chart | None:
    """Runs ranked by perplexity at their training context (bars, value at the end)."""
    if "ppl_at_context" not in board.columns or board["ppl_at_context"].is_null().all():
        return None
    columns = ("run_id", "variant", "params", "final_loss", "ppl_at_context")
    extra = ("ppl_at_longest", "passkey_in_context", "ruler_score")
    data = board.filter(pl.col("ppl_at_context").is_not_null()).select(
        *columns, *(c for c in extra if c in board.columns)
    )
    tooltip = [alt.Tooltip(c, title=COLUMN_TITLES.get(c, c)) for c in data.columns]
    highlight = variant_highlight()
    base = alt.Chart().encode(
        x=alt.X("ppl_at_context:Q", title="perplexity at the training context (lower is better)"),
        y=alt.Y("run_id:N", sort="x", title=None, axis=alt.Axis(labelLimit=400)),
        tooltip=tooltip,
    )
    bars = base.mark_bar().encode(
        color=variant_color(data["variant"].unique()), opacity=_opacity(highlight, 1, 0.3)
    )
    values = base.mark_text(align="left", dx=3).encode(
        text=alt.Text("ppl_at_context:Q", format=".2f")
    )
    return alt.layer(bars.add_params(highlight), values, data=data).properties(
        width="container", height=max(120, 22 * data.height)
    )


def perplexity_vs_length(
    perplexity: pl.DataFrame, protocol: str, runs: pl.DataFrame | None = None
) -> alt.Chart | None:
    """One line per run (mean over seeds, with its interval) and position method (dashed: an
    extension used beyond the context); a panel per study and size when several."""
    perplexity = perplexity.filter(pl.col("protocol") == protocol)
    if not perplexity.height:
        return None
    data = seed_mean(
        with_position(perplexity), "ppl", ["study", "variant", "size", "position", "length"]
    )
    unit = token_unit(runs)
    tooltip = [
        alt.Tooltip("series", title="run"),
        "position",
        alt.Tooltip("length", title=f"length ({unit})"),
        alt.Tooltip("ppl:Q", format=".3f", title="perplexity"),
        "seeds",
    ]
    layers = _lines(
        data,
        tokens_axis("length", f"evaluation length ({unit}, log scale)", data["length"]),
        alt.Y("ppl:Q", scale=alt.Scale(zero=False), title="perplexity (exp of nats/token)"),
        tooltip,
        dashes=True,
        band=bool(data["lo"].is_not_null().any()),
    )
    return _panels(layers, data, ("study", "size"))


def loss_by_position(positions: pl.DataFrame, runs: pl.DataFrame | None = None) -> alt.Chart | None:
    """Mean loss per position bucket at each run's longest evaluated length."""
    if not positions.height:
        return None
    longest = positions.with_columns(pl.col("length").max().over("run_id").alias("_longest"))
    data = with_position(longest).filter(pl.col("length") == pl.col("_longest"))
    data = data.with_columns(((pl.col("bucket_start") + pl.col("bucket_end")) / 2).alias("at"))
    data = seed_mean(data, "nll", ["study", "variant", "position", "at"])
    unit = token_unit(runs)
    tooltip = [
        alt.Tooltip("series", title="run"),
        "position",
        alt.Tooltip("at:Q", title=f"position ({unit})", format=",.0f"),
        alt.Tooltip("nll:Q", format=".3f", title="loss (nats/token)"),
        "seeds",
    ]
    layers = _lines(
        data,
        tokens_axis("at", f"token position ({unit}, log scale)", data["at"]),
        alt.Y("nll:Q", scale=alt.Scale(zero=False), title="loss (nats/token)"),
        tooltip,
        dashes=True,
        band=bool(data["lo"].is_not_null().any()),
    )
    return _panels(layers, data)


def _zero_label(score: str) -> pl.Expr:
    """Label a zero `score` "0 of N" (N: samples), so that an all-zero result reads as one."""
    return (
        pl.when(pl.col(score) == 0)
        .then(pl.lit("0 of ") + pl.col("samples").cast(pl.String))
        .otherwise(pl.lit(""))
        .alias("label")
    )


def ruler_by_task(ruler: pl.DataFrame, runs: pl.DataFrame | None = None) -> alt.Chart | None:
    """Mean RULER score per task and run (skipped tasks are listed, not drawn); a panel per
    length and position method."""
    ok = ruler.filter(pl.col("status") == "ok")
    if not ok.height:
        return None
    data = (
        with_position(ok)
        .group_by("study", "variant", "run_id", "task", "length", "position", maintain_order=True)
        .agg(pl.col("score").mean().alias("score"), pl.len().alias("samples"))
        .with_columns(_zero_label("score"))
    )
    unit = token_unit(runs)
    tooltip = [
        "run_id",
        "task",
        alt.Tooltip("length", title=f"length ({unit})"),
        "position",
        alt.Tooltip("score:Q", format=".1f"),
        "samples",
    ]
    formats = {"length": f"{{}} {unit}"}
    return _scores_by_task(data, "score (%)", ("study", "length", "position"), tooltip, formats)


def _scores_by_task(
    data: pl.DataFrame,
    title: str,
    by: Sequence[str],
    tooltip: list,
    formats: Mapping[str, str] | None = None,
) -> alt.Chart:
    """Bars of a 0-100 `score` per task, one per run coloured by variant, with "0 of N"
    (`label`) on zero bars; a panel per value of the `by` fields that vary."""
    highlight = variant_highlight()
    base = alt.Chart().encode(
        x=alt.X("task:N", title=None, axis=alt.Axis(labelAngle=0, labelLimit=160)),
        xOffset=alt.XOffset("run_id:N", sort=data["run_id"].unique(maintain_order=True).to_list()),
        tooltip=tooltip,
    )
    bars = base.mark_bar().encode(
        y=alt.Y("score:Q", scale=alt.Scale(domain=[0, 100]), title=title),
        color=variant_color(data["variant"].unique()),
        opacity=_opacity(highlight, 1, 0.25),
    )
    zeros = base.mark_text(angle=270, align="left", dx=4, fontSize=11, color="#444").encode(
        y=alt.datum(0), text="label:N"
    )
    return _panels([bars.add_params(highlight), zeros], data, by, columns=3, formats=formats)


def lm_eval_scores(lm_eval: pl.DataFrame) -> pl.DataFrame:
    """Each run's score per requested task (as the paper's Table 3): accuracy and normalised
    accuracy of the task itself (a group's aggregate for mmlu), unfiltered, in percent."""
    return (
        lm_eval.filter(
            (pl.col("status") == "ok")
            & (pl.col("subtask") == pl.col("task"))
            & pl.col("metric").is_in(["acc", "acc_norm"])
            & (pl.col("filter") == "none")
        )
        .with_columns((pl.col("value") * 100).alias("score"))
        .select("study", "run_id", "variant", "task", "metric", "score", "samples", "num_fewshot")
        .sort("study", "run_id", "task", "metric")
    )


def lm_eval_by_task(scores: pl.DataFrame) -> alt.Chart | None:
    """Accuracy per task and run, a panel per metric (skipped tasks are listed, not drawn)."""
    if not scores.height:
        return None
    tooltip = ["run_id", "task", "metric", alt.Tooltip("score:Q", format=".2f"), "samples"]
    data = scores.with_columns(_zero_label("score"))
    return _scores_by_task(data, "accuracy (%)", ("study", "metric"), tooltip)


def passkey_cells(passkey: pl.DataFrame) -> pl.DataFrame:
    """Passkey accuracy per run, position method, length and depth, "k of N" in `label`; runs
    whose cells are all zero on the same grid share one panel, named by all of them."""
    cells = (
        with_position(passkey)
        .sort("run_id", "rope", "length", "depth")  # the same page from the same tables
        .group_by(
            "run_id", "study", "variant", "position", "rope", "length", "depth", maintain_order=True
        )
        .agg(pl.col("correct").sum().alias("correct"), pl.len().alias("trials"))
        .with_columns(
            (100 * pl.col("correct") / pl.col("trials")).alias("accuracy"),
            (pl.col("depth") * 100).round(0).cast(pl.Int64).alias("depth_pct"),
            pl.format("{} of {}", "correct", "trials").alias("label"),
        )
    )
    one_study = cells["study"].n_unique() == 1
    name = pl.col("run_id").str.splitn("/", 2).struct.field("field_1") if one_study else "run_id"
    cells = cells.with_columns(
        pl.when(pl.col("position") == "native")
        .then(name)
        .otherwise(pl.format("{} ({})", name, "rope"))
        .alias("panel")
    )
    panels = cells.group_by("panel").agg(
        (pl.col("correct").sum() == 0).alias("zero"),
        pl.concat_str(
            pl.concat_str("length", "depth_pct", "trials", separator=":").sort(), separator=","
        ).alias("grid"),
    )
    zero = panels.filter("zero").group_by("grid").agg(pl.col("panel").sort())
    merged = {
        p: "\n".join([f"all 0 ({len(group)} runs):", *group])
        for group in zero["panel"]
        if len(group) > 1
        for p in group
    }
    rank = {v: i for i, v in enumerate(VARIANT_COLORS)}
    cells = cells.with_columns(
        pl.col("panel").replace(merged),
        pl.col("variant").replace_strict(rank, default=len(rank)).alias("order"),
    )
    if merged:
        cells = cells.with_columns(pl.col("order").min().over("panel")).unique(
            ["panel", "length", "depth_pct"], keep="first", maintain_order=True
        )
    merged_last = pl.col("panel").is_in(list(merged.values()))
    return cells.sort(merged_last, "order", "panel", "length", "depth_pct").with_columns(
        pl.int_range(pl.len()).first().over("panel").alias("order")
    )


def passkey_heatmaps(passkey: pl.DataFrame, runs: pl.DataFrame | None = None) -> alt.Chart | None:
    """One heatmap per run (and position method), up to four to a row, "k of N" in each cell;
    identical all-zero heatmaps are drawn once."""
    if not passkey.height:
        return None
    cells = passkey_cells(passkey)
    unit = token_unit(runs)
    n = cells["panel"].n_unique()
    columns = min(n, 4)
    depths = cells["depth_pct"].n_unique()
    base = alt.Chart().encode(
        x=alt.X(
            "length:O",
            title=f"prompt length ({unit})",
            axis=alt.Axis(labelAngle=0, labelExpr=POWER_LABEL),
        ),
        y=alt.Y("depth_pct:O", title="needle depth (%)", sort="ascending"),
        tooltip=[
            alt.Tooltip("panel", title="run"),
            alt.Tooltip("length", title=f"length ({unit})"),
            "depth_pct",
            alt.Tooltip("accuracy:Q", format=".0f", title="accuracy (%)"),
            "label",
        ],
    )
    rects = base.mark_rect().encode(
        color=alt.Color(
            "accuracy:Q", scale=alt.Scale(domain=[0, 100], scheme="viridis"), title="accuracy (%)"
        )
    )
    text = base.mark_text(fontSize=11).encode(
        text="label:N",
        color=alt.condition("datum.accuracy < 50", alt.value("white"), alt.value("black")),
    )
    height = min(HEIGHT, max(80, 26 * depths))
    width = min(PAGE_WIDTH // columns - PANEL_MARGIN, max(160, 70 * cells["length"].n_unique()))
    layers = alt.layer(rects, text, data=cells).properties(width=width, height=height)
    if n == 1:
        return layers.properties(title=cells["panel"][0].split("\n"))
    header = alt.Header(
        title=None,
        labelFontSize=12,
        labelFontWeight="bold",
        labelLimit=width,
        labelExpr="split(datum.value, '\\n')",
    )
    panel = alt.Facet(
        "panel:N", title=None, header=header, sort=alt.EncodingSortField("order", op="min")
    )
    return layers.facet(facet=panel, columns=columns).resolve_axis(x="independent")


def passkey_by_distance(
    passkey: pl.DataFrame, runs: pl.DataFrame | None = None
) -> alt.Chart | None:
    """Accuracy against how far back the needle lies (power-of-two buckets), one line per run,
    over prompts within the run's training context (so length extrapolation does not blur it):
    where a sliding window stops reaching the needle, its accuracy falls to chance."""
    within = with_position(passkey).filter(
        (pl.col("position") == "native") & (pl.col("length") <= pl.col("context"))
    )
    if not within.height:
        return None
    buckets = (
        within.with_columns(
            (2 ** pl.col("needle_distance").clip(1).log(2).floor()).cast(pl.Int64).alias("from")
        )
        .group_by("run_id", "variant", "study", "from")
        .agg((100 * pl.col("correct").mean()).alias("accuracy"), pl.len().alias("trials"))
    )
    data = seed_mean(buckets, "accuracy", ["study", "variant", "from"]).sort("from", "series")
    unit = token_unit(runs)
    tooltip = [
        alt.Tooltip("series", title="run"),
        alt.Tooltip("from", title=f"distance from ({unit})"),
        alt.Tooltip("accuracy:Q", format=".0f", title="accuracy (%)"),
        "seeds",
    ]
    layers = _lines(
        data,
        tokens_axis("from", f"needle distance ({unit}, log scale)", data["from"]),
        alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 100]), title="accuracy (%)"),
        tooltip,
        band=bool(data["lo"].is_not_null().any()),
    )
    return _panels(layers, data)


def throughput_vs_context(
    throughput: pl.DataFrame, runs: pl.DataFrame | None = None
) -> alt.Chart | None:
    """Median tokens/s per context, a line per run (band: fastest to slowest repeat), a panel
    per mode (train step, prefill, decode) and study; log-log."""
    ok = throughput.filter(pl.col("status") == "ok")
    if not ok.height:
        return None
    data = ok.select(
        "run_id",
        "study",
        "variant",
        "size",
        "mode",
        "seq_len",
        "tokens_per_s",
        pl.col("tokens_per_s_min").alias("lo"),
        pl.col("tokens_per_s_max").alias("hi"),
        "peak_memory_mb",
        "mfu",
        "peak_source",
    ).with_columns(pl.col("run_id").alias("series"))
    unit = token_unit(runs)
    tooltip = [
        "run_id",
        "mode",
        alt.Tooltip("seq_len", title=f"context ({unit})"),
        alt.Tooltip("tokens_per_s:Q", format=",.0f", title=f"{unit}/s"),
        alt.Tooltip("peak_memory_mb:Q", format=",.0f", title="peak memory (MB)"),
        alt.Tooltip("mfu:Q", format=".1%", title="MFU"),
        "peak_source",
    ]
    y = alt.Y(
        "tokens_per_s:Q",
        scale=alt.Scale(type="log"),
        axis=alt.Axis(tickCount=5, format="~s"),
        title=f"{unit}/s (log scale)",
    )
    x = tokens_axis("seq_len", f"context ({unit}, log scale)", data["seq_len"])
    layers = _lines(data, x, y, tooltip, band=bool(data["lo"].is_not_null().any()))
    modes = data["mode"].n_unique()
    return _panels(layers, data, ("study", "mode"), columns=min(modes, 3))


def smooth(curves: pl.DataFrame, column: str = "loss", window: int | None = None) -> pl.DataFrame:
    """Add `<column>_smooth`: a centred rolling mean (no lag, unlike an EMA) over `window`
    logged steps of each run (default: a 25th of the longest run's rows, odd); same length."""
    rows = curves.group_by("run_id").len()["len"].max() or 1
    window = window or max(1, rows // 25) | 1
    return curves.sort("run_id", "step").with_columns(
        pl.col(column)
        .rolling_mean(window, center=True, min_samples=1)
        .over("run_id")
        .alias(f"{column}_smooth")
    )


def training_curves(
    curves: pl.DataFrame, runs: pl.DataFrame | None = None, window: int | None = None
) -> alt.Chart | None:
    """Smoothed training loss (`smooth`) against tokens seen, a line per run or mean over
    seeds with its 95% interval; the raw loss of each drawn step is in the tooltip."""
    if not curves.height:
        return None
    smoothed = smooth(curves, window=window)
    thinned = smoothed.with_columns(pl.col("step").max().over("run_id").alias("_last")).filter(
        (pl.col("step") % (pl.col("_last") // MAX_CURVE_POINTS).clip(1) == 0)
        | (pl.col("step") == pl.col("_last"))
    )
    data = seed_mean(thinned, "loss_smooth", ["study", "variant", "step", "tokens"])
    raw = thinned.with_columns(pl.col("run_id").str.replace(SEED_PART, "").alias("series"))
    raw = raw.group_by("series", "step").agg(pl.col("loss").mean().alias("raw"))
    data = data.join(raw, on=["series", "step"], how="left").with_columns(
        pl.col("loss_smooth", "raw", "lo", "hi").round(4)
    )
    unit = token_unit(runs)
    tooltip = [
        alt.Tooltip("series", title="run"),
        "step",
        alt.Tooltip("tokens:Q", format=",", title=unit),
        alt.Tooltip("loss_smooth:Q", format=".4f", title="smoothed loss (nats/token)"),
        alt.Tooltip("raw:Q", format=".4f", title="raw loss (nats/token)"),
        "seeds",
    ]
    highlight = variant_highlight()
    encoding = {
        "x": alt.X("tokens:Q", title=f"{unit} seen", axis=alt.Axis(format="~s", tickCount=8)),
        "color": variant_color(data["variant"].unique()),
        "detail": "series:N",
    }
    lines = (
        alt.Chart()
        .mark_line(strokeWidth=2)
        .encode(
            y=alt.Y(
                "loss_smooth:Q", scale=alt.Scale(zero=False), title="training loss (nats/token)"
            ),
            opacity=_opacity(highlight),
            **encoding,
        )
        .add_params(highlight)
    )
    hover = (
        alt.Chart()
        .mark_point(size=40, opacity=0, filled=True)
        .encode(y="loss_smooth:Q", tooltip=tooltip, **encoding)
    )
    layers = [lines, hover]
    if data["lo"].is_not_null().any():
        band = (
            alt.Chart()
            .mark_area()
            .encode(y="lo:Q", y2="hi:Q", opacity=_opacity(highlight, 0.2, 0.03), **encoding)
        )
        layers.insert(0, band)
    return _panels(layers, data)
