"""Data and charts of the pages beyond the overview: the axis a study varies, each TTT variant
against its backbone (or a chosen baseline), and the paper's published scores beside ours."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import altair as alt
import polars as pl

from ltstudy.report import paper
from ltstudy.report.charts import (
    PAGE_WIDTH,
    PANEL_MARGIN,
    POWER_LABEL,
    backbone_run,
    powers_of_two,
    tokens_axis,
    variant_color,
    with_position,
)

# Leaderboard columns drawn against a study's axis, with their titles.
METRICS = {
    "final_loss": "final training loss",
    "ppl_at_context": "perplexity at the training context",
    "passkey_in_context": "passkey accuracy (in context)",
    "ruler_score": "RULER score (mean)",
    "prefill_tokens_per_s": "prefill tokens/s at the context",
}


def run_config(config: str | None) -> dict[str, Any]:
    """A run's resolved spec from the runs table's `config` column ({} if absent)."""
    return json.loads(config) if config else {}


def flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: {'model': {'ttt': {'eta': 3}}} -> {'model.ttt.eta': 3}."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _label(value: Any) -> str:
    return (
        json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def study_axis(runs: pl.DataFrame) -> tuple[str, str, pl.DataFrame]:
    """What a study varies besides the variant: (title, kind, frame of run_id, axis label,
    axis_value). The axis is the model or training settings that differ between runs of the
    same variant, size and context (so settings that follow from those do not count), else
    the context, else the size, else the variant. kind: "quantitative", "log" or "ordinal"."""
    configs = {
        run_id: flatten({k: v for k, v in run_config(c).items() if k in ("model", "train")})
        for run_id, c in runs.select("run_id", "config").iter_rows()
    }
    groups: dict[tuple, list[str]] = defaultdict(list)
    for run_id, *key in runs.select("run_id", "variant", "size", "context").iter_rows():
        groups[tuple(key)].append(run_id)
    keys = sorted({k for flat in configs.values() for k in flat})
    knobs = [
        k
        for k in keys
        if any(len({_label(configs[r].get(k)) for r in ids}) > 1 for ids in groups.values())
    ]
    ids = runs["run_id"].to_list()
    if len(knobs) == 1:
        knob = knobs[0]
        title = " ".join(knob.split(".")[1:]).replace("_", " ")
        values = [configs[r].get(knob) for r in ids]
        if all(isinstance(v, list) for v in values):
            values, title = [len(v) for v in values], f"number of {title}"
        if all(_is_number(v) for v in values):
            kind = "log" if min(values) > 0 and max(values) >= 4 * min(values) else "quantitative"
            return title, kind, _axis_frame(ids, [_label(v) for v in values], values)
        return title, "ordinal", _axis_frame(ids, [_label(v) for v in values], None)
    if knobs:
        labels = [
            ", ".join(f"{k.split('.')[-1]} {_label(configs[r].get(k))}" for k in knobs) for r in ids
        ]
        return "setting", "ordinal", _axis_frame(ids, labels, None)
    for column, title in (("context", "training context (tokens)"), ("size", "size")):
        if runs[column].n_unique() > 1:
            if column == "context":
                values = runs["context"].to_list()
                return title, "log", _axis_frame(ids, [str(v) for v in values], values)
            order = runs.sort("params", nulls_last=True)["size"].to_list()
            return title, "ordinal", _axis_frame(ids, runs["size"].to_list(), None, order)
    return "variant", "ordinal", _axis_frame(ids, runs["variant"].to_list(), None)


def _axis_frame(ids: list, labels: list, values: list | None, order: list | None = None):
    """run_id, axis (label), axis_value (number or null), axis_rank (the labels' order)."""
    order = order or (
        [labels[i] for i in sorted(range(len(labels)), key=lambda i: values[i])]
        if values
        else sorted(labels)
    )
    rank = {label: index for index, label in enumerate(dict.fromkeys(order))}
    return pl.DataFrame(
        {
            "run_id": ids,
            "axis": labels,
            "axis_value": [float(v) for v in values] if values else [None] * len(ids),
            "axis_rank": [rank.get(label, len(rank)) for label in labels],
        },
        schema={
            "run_id": pl.String,
            "axis": pl.String,
            "axis_value": pl.Float64,
            "axis_rank": pl.Int64,
        },
    )


def axis_chart(board: pl.DataFrame, axis: pl.DataFrame, title: str, kind: str) -> alt.Chart | None:
    """Each leaderboard metric against the study's axis, one panel per metric, a line per
    variant: how the varied setting moves loss, perplexity, retrieval and speed."""
    metrics = [m for m in METRICS if m in board.columns and board[m].is_not_null().any()]
    if not metrics:
        return None
    data = (
        board.join(axis, on="run_id")
        .select("run_id", "variant", "size", "context", "axis", "axis_value", "axis_rank", *metrics)
        .unpivot(
            index=["run_id", "variant", "size", "context", "axis", "axis_value", "axis_rank"],
            on=metrics,
        )
        .drop_nulls("value")
        .with_columns(pl.col("variable").replace_strict(METRICS).alias("metric"))
    )
    if kind == "ordinal":
        order = data.sort("axis_rank")["axis"].unique(maintain_order=True).to_list()
        x = alt.X("axis:O", sort=order, title=title, axis=alt.Axis(labelAngle=0, labelLimit=160))
    else:
        ticks = powers_of_two(data["axis_value"]) if kind == "log" else []
        scale = alt.Scale(type="log", base=2) if kind == "log" else alt.Scale(zero=False)
        axis = alt.Axis(values=ticks or alt.Undefined, labelExpr=POWER_LABEL if ticks else "")
        x = alt.X("axis_value:Q", scale=scale, title=title, axis=axis)
    # a line per variant (and size or context, where those vary but are not the axis)
    others = [
        f
        for f in ("size", "context")
        if data[f].n_unique() > 1 and not (data[f].cast(pl.String) == data["axis"]).all()
    ]
    base = alt.Chart().encode(
        x=x,
        y=alt.Y("value:Q", scale=alt.Scale(zero=title == "variant"), title=None),
        tooltip=["run_id", "axis", "metric", alt.Tooltip("value:Q", format=",.4g")],
    )
    colored = {
        "color": variant_color(data["variant"].unique()),
        "detail": [f"{f}:N" for f in others],
    }
    marks = base.mark_bar() if title == "variant" else base.mark_line(point=True)
    # every value written on its mark: an all-zero metric (no retrieval yet) reads as zeros,
    # not as an empty panel
    labels = base.mark_text(dy=-6, fontSize=9, color="#333").encode(
        text=alt.Text("value:Q", format=".3~s")
    )
    return (
        alt.layer(marks.encode(**colored), labels, data=data)
        .properties(width=PAGE_WIDTH // 3 - PANEL_MARGIN - 40, height=180)  # 40: the legend
        .facet(facet=alt.Facet("metric:N", title=None, sort=list(METRICS.values())), columns=3)
        .resolve_scale(y="independent")
        .resolve_axis(x="independent")  # each panel its own axis: no axis under an empty slot
    )


def comparison_pairs(runs: pl.DataFrame, baseline: str | None = None) -> pl.DataFrame:
    """(run_id, reference, pair) to compare: each TTT run against its backbone (the run of the
    same study named alike but for the variant: charts.backbone_run); with a baseline, also
    every other run against it."""
    ids = runs["run_id"].to_list()
    if baseline is not None and baseline not in ids:
        raise ValueError(f"--baseline {baseline!r}: no such run in the runs table")
    pairs = backbone_run(runs).rename({"baseline": "reference"})
    if baseline:
        chosen = [(r, baseline) for r in ids if r != baseline]
        pairs = pl.concat([pairs, pl.DataFrame(chosen, schema=pairs.schema, orient="row")])
    return pairs.unique(maintain_order=True).with_columns(
        (pl.col("run_id") + " vs " + pl.col("reference")).alias("pair")
    )


def _paired(frame: pl.DataFrame, pairs: pl.DataFrame, on: list[str], value: str) -> pl.DataFrame:
    """`value` of each pair's run and of its reference, side by side, on the same `on` keys."""
    ours = frame.select("run_id", *on, value)
    theirs = frame.select(pl.col("run_id").alias("reference"), *on, pl.col(value).alias("ref"))
    return (
        pairs.join(ours, on="run_id")
        .join(theirs, on=["reference", *on])
        .drop_nulls([value, "ref"])
        .sort("run_id", "reference", *on)  # the same page from the same tables
    )


def deltas(t: dict[str, pl.DataFrame], pairs: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Run minus reference for perplexity per length, passkey accuracy per length and RULER
    score per task and length; run over reference for throughput per mode and length."""
    stride = with_position(t["perplexity"].filter(pl.col("protocol") == "stride"))
    passkey = (
        with_position(t["passkey"])
        .group_by("run_id", "length", "position")
        .agg(pl.col("correct").mean().alias("accuracy"))
    )
    ruler = (
        t["ruler"]
        .filter(pl.col("status") == "ok")
        .group_by("run_id", "task", "length")
        .agg(pl.col("score").mean())
    )
    speed = t["throughput"].filter(pl.col("status") == "ok")
    return {
        "perplexity": _paired(stride, pairs, ["length", "position"], "ppl").with_columns(
            (pl.col("ppl") - pl.col("ref")).alias("delta")
        ),
        "passkey": _paired(passkey, pairs, ["length", "position"], "accuracy").with_columns(
            (pl.col("accuracy") - pl.col("ref")).alias("delta")
        ),
        "ruler": _paired(ruler, pairs, ["task", "length"], "score").with_columns(
            (pl.col("score") - pl.col("ref")).alias("delta")
        ),
        "throughput": _paired(speed, pairs, ["mode", "seq_len"], "tokens_per_s").with_columns(
            (pl.col("tokens_per_s") / pl.col("ref")).alias("ratio")
        ),
    }


def delta_lines(
    data: pl.DataFrame, x: str, y: str, title: str, x_title: str, dash: str
) -> alt.Chart | None:
    """A line per pair and `dash` value (position method, throughput mode) of a difference
    against length, over the no-difference line (0, or 1 for a ratio)."""
    if not data.height:
        return None
    data = data.with_columns((pl.col("pair") + " " + pl.col(dash)).alias("series"))
    base = alt.Chart(data)
    lines = base.mark_line(point=True).encode(
        x=tokens_axis(x, x_title, data[x]),
        y=alt.Y(f"{y}:Q", title=title),
        color=alt.Color(
            "pair:N", title=None, legend=alt.Legend(orient="bottom", columns=1, labelLimit=600)
        ),
        strokeDash=alt.StrokeDash(
            f"{dash}:N",
            legend=alt.Legend(
                symbolType="stroke",
                symbolSize=600,
                symbolStrokeWidth=2,
                symbolStrokeColor="#444",
                symbolFillColor="transparent",  # else the points' fill hides the dashes
            ),
        ),
        detail="series:N",
        tooltip=["pair", dash, x, alt.Tooltip(f"{y}:Q", format=".3f")],
    )
    level = base.mark_rule(color="#888").encode(y=alt.datum(1.0 if y == "ratio" else 0.0))
    return alt.layer(level, lines).properties(width="container", height=220)


def ruler_delta_chart(data: pl.DataFrame) -> alt.Chart | None:
    """RULER score difference per task and length, one heatmap per pair (blue: the run is
    better than its reference)."""
    if not data.height:
        return None
    base = alt.Chart(data).encode(
        x=alt.X("length:O", title="length (tokens)"),
        y=alt.Y("task:N", title=None),
    )
    cells = base.mark_rect().encode(
        color=alt.Color(
            "delta:Q", scale=alt.Scale(scheme="redblue", domain=[-100, 100]), title="score Δ"
        ),
        tooltip=["pair", "task", "length", alt.Tooltip("delta:Q", format="+.1f"), "score", "ref"],
    )
    text = base.mark_text(fontSize=10).encode(text=alt.Text("delta:Q", format="+.0f"))
    return (
        alt.layer(cells, text, data=data)
        .properties(width=160)
        .facet(facet=alt.Facet("pair:N", title=None), columns=3)
    )


def paper_comparison(runs: pl.DataFrame, ruler: pl.DataFrame) -> pl.DataFrame:
    """Our mean RULER score per length of each run whose size, context and checkpoint match a
    published setting, with the paper's score for the same variant and length beside it."""
    rows = []
    ok = ruler.filter(pl.col("status") == "ok")
    for run_id, variant, size, context, config in runs.select(
        "run_id", "variant", "size", "context", "config"
    ).iter_rows():
        pretrained = run_config(config).get("model", {}).get("pretrained")
        setting = paper.matching_setting(size, context, pretrained)
        if setting is None or variant not in setting.scores:
            continue
        ours = ok.filter(pl.col("run_id") == run_id).group_by("length").agg(pl.col("score").mean())
        for length, score in ours.iter_rows():
            rows.append(
                {
                    "table": setting.table,
                    "run_id": run_id,
                    "variant": variant,
                    "length": length,
                    "ours": score,
                    "paper": setting.scores[variant].get(length),
                }
            )
    schema = {
        "table": pl.String,
        "run_id": pl.String,
        "variant": pl.String,
        "length": pl.Int64,
        "ours": pl.Float64,
        "paper": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def paper_chart(matched: pl.DataFrame) -> alt.Chart | None:
    """Our RULER score per length (solid) beside the paper's (dashed), per variant."""
    if not matched.height:
        return None
    data = matched.unpivot(
        index=["table", "run_id", "variant", "length"], on=["ours", "paper"], variable_name="source"
    ).drop_nulls("value")
    return (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=tokens_axis("length", "length (tokens)", data["length"]),
            y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 100]), title="RULER score"),
            color=variant_color(data["variant"].unique()),
            strokeDash=alt.StrokeDash("source:N", title=None),
            detail="run_id:N",
            tooltip=["table", "run_id", "source", "length", alt.Tooltip("value:Q", format=".1f")],
        )
        .properties(width=320, height=220)
        .facet(facet=alt.Facet("table:N", title=None), columns=2)
    )
