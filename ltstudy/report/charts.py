"""Altair charts of the results tables. Each takes an eager Polars frame, pre-aggregated so
that no chart carries more than a few thousand rows, and returns a chart (or None if empty)."""

from __future__ import annotations

import altair as alt
import polars as pl

MAX_CURVE_POINTS = 200


def tokens_axis(field: str, title: str) -> alt.X:
    """A log-2 x axis: lengths, positions and distances in tokens grow by powers of two."""
    return alt.X(f"{field}:Q", scale=alt.Scale(type="log", base=2), title=title)


def leaderboard(t: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """One row per run: size, final training loss, stride perplexity at the training context and
    at the longest evaluated length (best position method), passkey accuracy within the
    training context, mean RULER score, prefill speed at the training context."""
    board = t["runs"].select(
        "run_id", "study", "variant", "size", "context", "params", "status", "final_loss"
    )
    perplexity, passkey, ruler, throughput = (
        t[k] for k in ("perplexity", "passkey", "ruler", "throughput")
    )
    perplexity = perplexity.filter(pl.col("protocol") == "stride")
    if perplexity.height:
        at_ctx = (
            perplexity.filter(pl.col("length") <= pl.col("context"))
            .sort("length")
            .group_by("run_id")
            .last()
            .select("run_id", pl.col("ppl").alias("ppl_at_context"))
        )
        longest = (
            perplexity.sort("length", "ppl", descending=[False, True])
            .group_by("run_id")
            .last()
            .select(
                "run_id",
                pl.col("length").alias("longest_length"),
                pl.col("ppl").alias("ppl_at_longest"),
            )
        )
        board = board.join(at_ctx, on="run_id", how="left").join(longest, on="run_id", how="left")
    if passkey.height:
        acc = (
            passkey.filter(pl.col("length") <= pl.col("context"))
            .group_by("run_id")
            .agg(pl.col("correct").mean().alias("passkey_in_context"))
        )
        board = board.join(acc, on="run_id", how="left")
    ruler = ruler.filter(pl.col("status") == "ok")
    if ruler.height:
        mean = ruler.group_by("run_id").agg(pl.col("score").mean().alias("ruler_score"))
        board = board.join(mean, on="run_id", how="left")
    if throughput.height:
        speed = throughput.filter(
            (pl.col("mode") == "prefill") & (pl.col("seq_len") == pl.col("context"))
        ).select("run_id", pl.col("tokens_per_s").alias("prefill_tokens_per_s"))
        board = board.join(speed, on="run_id", how="left")
    sort_key = "ppl_at_context" if "ppl_at_context" in board.columns else "run_id"
    return board.sort(["study", sort_key], nulls_last=True)


def leaderboard_chart(board: pl.DataFrame) -> alt.Chart | None:
    """Runs ranked by perplexity at their training context (bars), per study."""
    if "ppl_at_context" not in board.columns or board["ppl_at_context"].is_null().all():
        return None
    data = board.filter(pl.col("ppl_at_context").is_not_null())
    tooltip = [
        c
        for c in (
            "run_id",
            "params",
            "final_loss",
            "ppl_at_context",
            "passkey_in_context",
            "ruler_score",
        )
        if c in data.columns
    ]
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("ppl_at_context:Q", title="perplexity at the training context"),
            y=alt.Y("run_id:N", sort="x", title=None),
            color="variant:N",
            tooltip=tooltip,
        )
        .properties(width=420)
        .facet(row=alt.Row("study:N"))
    )


def perplexity_vs_length(perplexity: pl.DataFrame, protocol: str) -> alt.Chart | None:
    """One line per run and position method (dashed: an extension used beyond the context)."""
    perplexity = perplexity.filter(pl.col("protocol") == protocol)
    if not perplexity.height:
        return None
    data = perplexity.select("run_id", "study", "variant", "size", "length", "rope", "ppl")
    data = data.with_columns((pl.col("run_id") + " " + pl.col("rope")).alias("series"))
    return (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=tokens_axis("length", "evaluation length (tokens)"),
            y=alt.Y("ppl:Q", scale=alt.Scale(zero=False), title="perplexity"),
            color=alt.Color("variant:N"),
            strokeDash=alt.StrokeDash("rope:N", title="position method"),
            detail="series:N",
            tooltip=["run_id", "length", "rope", alt.Tooltip("ppl:Q", format=".3f")],
        )
        .properties(width=320, height=220)
        .facet(column=alt.Column("size:N"), row=alt.Row("study:N"))
    )


def loss_by_position(positions: pl.DataFrame) -> alt.Chart | None:
    """Mean loss per position bucket at each run's longest evaluated length."""
    if not positions.height:
        return None
    longest = positions.with_columns(pl.col("length").max().over("run_id").alias("_longest"))
    data = (
        longest.filter(pl.col("length") == pl.col("_longest"))
        .with_columns(
            ((pl.col("bucket_start") + pl.col("bucket_end")) / 2).alias("position"),
            (pl.col("run_id") + " " + pl.col("rope")).alias("series"),
        )
        .select("run_id", "study", "variant", "rope", "series", "position", "nll")
    )
    return (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=tokens_axis("position", "token position"),
            y=alt.Y("nll:Q", scale=alt.Scale(zero=False), title="loss (nats/token)"),
            color="variant:N",
            strokeDash=alt.StrokeDash("rope:N", title="position method"),
            detail="series:N",
            tooltip=["run_id", "rope", "position", alt.Tooltip("nll:Q", format=".3f")],
        )
        .properties(width=420, height=240)
        .facet(row=alt.Row("study:N"))
    )


def ruler_by_task(ruler: pl.DataFrame) -> alt.Chart | None:
    """Mean RULER score per task, variant and length (skipped tasks are listed, not drawn)."""
    ok = ruler.filter(pl.col("status") == "ok")
    if not ok.height:
        return None
    data = ok.group_by("study", "variant", "run_id", "task", "length", "rope").agg(
        pl.col("score").mean().alias("score"), pl.len().alias("samples")
    )
    tooltip = ["run_id", "task", "length", "rope", alt.Tooltip("score:Q", format=".1f"), "samples"]
    return _scores_by_task(data, "score", alt.Row("length:O", title="length"), tooltip)


def _scores_by_task(data: pl.DataFrame, title: str, row: alt.Row, tooltip: list) -> alt.Chart:
    """Bars of a 0-100 `score` per variant, a column per task and a row per `row`."""
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("variant:N", title=None),
            y=alt.Y("score:Q", scale=alt.Scale(domain=[0, 100]), title=title),
            color="variant:N",
            column=alt.Column("task:N", title=None),
            row=row,
            tooltip=tooltip,
        )
        .properties(width=70, height=90)
    )


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
    """Accuracy per task and variant (skipped tasks are listed, not drawn)."""
    if not scores.height:
        return None
    tooltip = ["run_id", "task", "metric", alt.Tooltip("score:Q", format=".2f"), "samples"]
    return _scores_by_task(scores, "accuracy (%)", alt.Row("metric:N", title=None), tooltip)


def passkey_heatmaps(passkey: pl.DataFrame) -> alt.Chart | None:
    """One heatmap per run (and position method), wrapped five to a row."""
    if not passkey.height:
        return None
    cells = (
        passkey.group_by("run_id", "variant", "study", "size", "length", "rope", "depth")
        .agg(pl.col("correct").mean().alias("accuracy"), pl.len().alias("trials"))
        .with_columns(
            (pl.col("depth") * 100).round(0).cast(pl.Int64).alias("depth_pct"),
            pl.when(pl.col("rope") == "none")
            .then(pl.col("run_id"))
            .otherwise(pl.col("run_id") + " (" + pl.col("rope") + ")")
            .alias("panel"),
        )
    )
    return (
        alt.Chart(cells)
        .mark_rect()
        .encode(
            x=alt.X("length:O", title="prompt length (tokens)"),
            y=alt.Y("depth_pct:O", title="needle depth (%)", sort="ascending"),
            color=alt.Color("accuracy:Q", scale=alt.Scale(domain=[0, 1], scheme="viridis")),
            tooltip=[
                "run_id",
                "rope",
                "length",
                "depth_pct",
                alt.Tooltip("accuracy:Q", format=".2f"),
                "trials",
            ],
        )
        .properties(width=150, height=150)
        .facet(facet=alt.Facet("panel:N", title=None), columns=5)
    )


def passkey_by_distance(passkey: pl.DataFrame) -> alt.Chart | None:
    """Accuracy against how far back the needle lies (power-of-two buckets), one line per run,
    over prompts within the run's training context (so length extrapolation does not blur it):
    where a sliding window stops reaching the needle, its accuracy falls to chance."""
    if not passkey.height:
        return None
    buckets = (
        passkey.filter((pl.col("rope") == "none") & (pl.col("length") <= pl.col("context")))
        .with_columns(
            (2 ** pl.col("needle_distance").clip(1).log(2).floor()).cast(pl.Int64).alias("from")
        )
        .group_by("run_id", "variant", "study", "from")
        .agg(pl.col("correct").mean().alias("accuracy"), pl.len().alias("trials"))
        .sort("from")
    )
    return (
        alt.Chart(buckets)
        .mark_line(point=True)
        .encode(
            x=tokens_axis("from", "needle distance (tokens)"),
            y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
            color="variant:N",
            detail="run_id:N",
            tooltip=["run_id", "from", alt.Tooltip("accuracy:Q", format=".2f"), "trials"],
        )
        .properties(width=380, height=220)
        .facet(facet=alt.Facet("study:N", title=None), columns=2)
    )


def throughput_vs_context(throughput: pl.DataFrame) -> alt.Chart | None:
    ok = throughput.filter(pl.col("status") == "ok")
    if not ok.height:
        return None
    base = alt.Chart(
        ok.select(
            "run_id",
            "study",
            "variant",
            "size",
            "mode",
            "seq_len",
            "tokens_per_s",
            "peak_memory_mb",
            "mfu",
            "peak_source",
        )
    )
    return (
        base.mark_line(point=True)
        .encode(
            x=tokens_axis("seq_len", "context (tokens)"),
            y=alt.Y("tokens_per_s:Q", scale=alt.Scale(type="log"), title="tokens / s"),
            color="variant:N",
            strokeDash="size:N",
            detail="run_id:N",
            tooltip=[
                "run_id",
                "seq_len",
                alt.Tooltip("tokens_per_s:Q", format=",.0f"),
                alt.Tooltip("peak_memory_mb:Q", format=",.0f"),
                alt.Tooltip("mfu:Q", format=".1%"),
                "peak_source",
            ],
        )
        .properties(width=320, height=220)
        .facet(column=alt.Column("mode:N"), row=alt.Row("study:N"))
    )


def training_curves(curves: pl.DataFrame) -> alt.Chart | None:
    if not curves.height:
        return None
    thinned = (
        curves.with_columns(pl.col("step").max().over("run_id").alias("_last"))
        .filter(
            (pl.col("step") % (pl.col("_last") // MAX_CURVE_POINTS).clip(1) == 0)
            | (pl.col("step") == pl.col("_last"))
        )
        .select("run_id", "study", "variant", "step", "tokens", "loss")
    )
    base = alt.Chart(thinned)
    return (
        base.mark_line()
        .encode(
            x=alt.X("step:Q"),
            y=alt.Y("loss:Q", scale=alt.Scale(zero=False), title="training loss"),
            color="variant:N",
            detail="run_id:N",
            tooltip=["run_id", "step", alt.Tooltip("loss:Q", format=".4f")],
        )
        .properties(width=420, height=220)
        .facet(row=alt.Row("study:N"))
    )
