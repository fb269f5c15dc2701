"""The planner: the memory census on the meta device counts what real tensors take; the full
study trains and evaluates on 80 GB GPUs, splitting sequences over the fewest ranks that fit;
context parallelism adds what each layer exchanges; `auto` picks the least recomputation that
fits; a run that fits under no layout fails validation with its numbers and the nodes that would
fit it."""

import contextlib
import copy
import json

import pytest
import torch
import yaml
from torch.utils._pytree import tree_leaves

from ltstudy.cli import main
from ltstudy.config import (
    ConfigError,
    default_settings,
    expand_runs,
    load_study,
    validate_config,
)
from ltstudy.models.presets import resolve_model
from ltstudy.models.transformer import build_model
from ltstudy.plan import HEADROOM, PlanError, plan_evaluations, plan_run
from ltstudy.plan.census import (
    LiveBytes,
    _model,
    block_kinds,
    block_memory,
    cache_memory,
    outer_memory,
)
from ltstudy.plan.memory import (
    Shape,
    longest_span,
    parameter_counts,
    prefill_memory,
    training_memory,
)
from tests.conftest import ROOT


@pytest.mark.parametrize("variant", ["full", "swa", "gla", "deltanet", "lact", "ttt_swa"])
def test_meta_census_counts_what_real_cpu_tensors_take(variant):
    """Kept activations of each kind of block and of the loss head, and a block's decode cache,
    at demo width: the meta count (with the fused-attention stand-in) against the same count on
    real CPU tensors, where torch runs its own CPU flash attention."""
    settings = default_settings()["model"]
    settings["ttt"].update(chunk_size=64, every=2)
    cfg = resolve_model(variant, "demo", settings, context=512)
    key = json.dumps(cfg, sort_keys=True)
    real = build_model(cfg, seed=0)
    T = 256
    for layers in block_kinds(cfg).values():
        block = real.layers[layers[0]]
        x = torch.randn(1, T, cfg["d_model"], requires_grad=True)
        rope = real.rotary(0, T, x.device)
        with LiveBytes() as live:
            out = block(x, x.detach(), rope)
            kept = live.live
        del out
        assert block_memory(key, "cpu", "fp32", layers[0], T).kept == pytest.approx(kept, rel=0.05)
        cache: dict = {}
        with torch.no_grad():
            block(x, x, rope, cache)
        named = [
            (name, t)
            for part in cache.values()
            for name, value in part.items()
            for t in tree_leaves(value)
            if isinstance(t, torch.Tensor)
        ]
        counted = cache_memory(key, "fp32", layers[0], T)
        sizes = {kv: sum(t.nbytes for n, t in named if (n in "kv") == kv) for kv in (True, False)}
        assert (counted.keys_values, counted.states) == (sizes[True], sizes[False])
        assert counted.retained == sum(
            {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for _, t in named}.values()
        )
    ids = torch.randint(0, cfg["vocab_size"], (1, T + 1))
    layers, real.layers = real.layers, torch.nn.ModuleList()
    with LiveBytes() as live:
        losses = real.token_losses(ids[:, :-1], ids[:, 1:])
        kept = live.live
    del losses
    assert outer_memory(key, "cpu", "fp32", T).kept == pytest.approx(kept, rel=0.05)
    assert _model(key, "fp32").cfg == real.cfg


def _trained_runs() -> list[dict]:
    _, runs = load_study(ROOT / "config" / "config.yaml")
    return [s for s in runs.values() if "train" in s["stages"]]


def test_full_study_trains_on_80gb_gpus_with_the_smallest_context_degree_that_fits():
    """Every trained run fits its GPUs, data x context ranks make up its job, and no smaller
    context degree would fit (or split its batch)."""
    trained = _trained_runs()
    assert len(trained) == 60
    for spec in trained:
        plan, layout = spec["plan"], spec["layout"]
        assert plan["status"] == "fits", spec["run_id"]
        assert plan["memory_gb"] <= plan["capacity_gb"] < 80, spec["run_id"]
        world = spec["resources"]["train"]["gpu"] * spec["resources"]["train"]["nodes"]
        assert layout["nodes"] * layout["tasks_per_node"] == world
        assert world % layout["context"] == 0
        for smaller in range(1, layout["context"]):  # none of them forms or fits
            if world % smaller == 0:
                other = copy.deepcopy(spec)
                other["layout"].update(context=smaller, activation_checkpointing="auto")
                with contextlib.suppress(PlanError):  # the batch does not split so
                    assert not plan_run(other).fits, (spec["run_id"], smaller)
    assert {s["layout"]["nodes"] for s in trained if s["study"] == "scratch_4b"} == {8}
    assert max(s["context"] for s in trained if s["layout"]["context"] > 1) == 1 << 20


def test_full_study_evaluates_on_80gb_gpus_splitting_sequences_over_the_jobs_gpus():
    """Each perplexity, passkey and RULER length of every trained run fits its evaluation job's
    GPUs (config/config.yaml gives the 1M runs 4), each sequence split over all of them or run
    whole where it is too short to split, as validation records it; with one GPU the 1M
    passkey does not fit, validation says so, and the plan says how many GPUs it needs."""
    for spec in _trained_runs():
        gpus = spec["resources"]["evaluate"]["gpu"]
        planned = plan_evaluations(spec)
        for e in planned:
            assert e.status == "fits", (spec["run_id"], e.stage, e.length)
            assert e.estimate.total <= e.capacity < 80e9
            assert e.context_parallel in (1, gpus)
        assert [
            (e["stage"], e["length"], e["context"], e["status"]) for e in spec["plan"]["evaluate"]
        ] == [(e.stage, e.length, e.context_parallel, e.status) for e in planned]
    one = next(s for s in _trained_runs() if s["run_id"] == "long_context/full-500M-1M")
    assert one["resources"]["evaluate"]["gpu"] == 4
    single = copy.deepcopy(one)
    single["resources"]["evaluate"]["gpu"] = 1
    (passkey,) = [
        e for e in plan_evaluations(single) if (e.stage, e.length) == ("passkey", 1 << 20)
    ]
    assert passkey.status == "does not fit" and passkey.needs in (2, 4)
    raw = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    study = next(s for s in raw["studies"] if s["name"] == "long_context")
    study["runs"][-1]["overrides"]["resources"] = {"evaluate": {"gpu": 1}}
    with pytest.raises(ConfigError, match=r"full-500M-1M passkey at 1,048,576 tokens.*fits on"):
        validate_config(raw)


def test_a_1m_run_on_8_nodes_of_8_gpus_is_one_config_line():
    """`resources.train: {nodes: 8}` (8 GPUs per node, parallel.context: auto): the 1M run
    splits each sequence over as few of its 64 GPUs as its 2-sequence batch allows."""
    raw = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    study = next(s for s in raw["studies"] if s["name"] == "long_context")
    study["grid"]["variant"] = ["full", "ttt_full"]
    study["runs"] = [r for r in study["runs"] if r["overrides"]["context"] == 1 << 20]
    study["runs"][0]["overrides"]["resources"] = {"train": {"nodes": 8}, "evaluate": {"gpu": 4}}
    raw["studies"] = [study]
    for spec in expand_runs(validate_config(raw)).values():
        layout = spec["layout"]
        assert (layout["nodes"], layout["tasks_per_node"]) == (8, 8)
        assert spec["plan"]["status"] == "fits", spec["plan"]["detail"]
        assert layout["context"] * spec["train"]["batch_size"] == 64  # data 2 x context 32
        assert "data 2 x context 32" in spec["plan"]["detail"]


def test_context_parallelism_adds_what_each_layer_exchanges():
    """Per rank, a step at context degree K holds the census's span-long activations plus the
    whole sequence's keys and values in each full-attention layer, a window's halo in each
    sliding-window layer, and K state summaries in each recurrent layer (independent of T)."""
    settings = default_settings()["model"]
    T, K = 1 << 18, 4
    for variant in ("full", "swa", "deltanet", "ttt_full"):
        cfg = resolve_model(variant, "500M", settings, context=T)
        span = longest_span(T, K, cfg)
        alone = training_memory(cfg, Shape("cuda", "bf16", K, K, span, 1), "none")
        split = training_memory(cfg, Shape("cuda", "bf16", K, K, span, 1, K, T), "none")
        added = split.activations - alone.activations
        kv_width = 2 * cfg["n_kv_heads"] * cfg["head_dim"] * 2  # keys and values, bf16
        layers = cfg["n_layers"]
        if variant == "full":
            assert added == pytest.approx(layers * kv_width * T, rel=1e-6)
        elif variant == "swa":
            q_width = 2 * cfg["n_heads"] * cfg["head_dim"] * 2
            halo = (cfg["swa_window"] - 1) * (kv_width + q_width)
            assert added == pytest.approx(layers * halo, rel=1e-6)
        else:  # state summaries: the same at twice the sequence, twice as many at twice K
            longer = training_memory(cfg, Shape("cuda", "bf16", K, K, span, 1, K, 2 * T), "none")
            more = training_memory(cfg, Shape("cuda", "bf16", K, K, span, 1, 2 * K, T), "none")
            assert added > 0
            assert longer.activations - split.activations == pytest.approx(
                layers * kv_width * T if variant == "ttt_full" else 0, rel=1e-6
            )
            assert more.activations - split.activations == pytest.approx(
                added - (layers * kv_width * T if variant == "ttt_full" else 0), rel=1e-6
            )


def test_evaluation_estimate_shards_the_sequence_and_its_cache():
    """A 1M passkey prompt of full attention at 500M: weights in bf16 on every rank, a span's
    residual stream and keys and values per rank, the whole sequence's keys and values while
    one layer attends; perplexity keeps no cache. The plan splits the sequence over all the
    evaluation job's GPUs, and with too few says how many would fit it."""
    settings = default_settings()["model"]
    T = 1 << 20
    cfg = resolve_model("full", "500M", settings, context=T)
    kv = 2 * cfg["n_kv_heads"] * cfg["head_dim"] * 2
    params = parameter_counts(cfg)["total"]
    estimates = {}
    for K in (1, 2, 4, 8):
        e = prefill_memory(cfg, "cuda", "bf16", T, K, cached=True)
        assert e.state == 2 * params
        assert e.cache == pytest.approx(cfg["n_layers"] * kv * T / K, rel=1e-6)
        assert e.activations == 2 * 2 * cfg["d_model"] * T / K
        assert e.transient >= (2 * kv * T if K > 1 else 0)
        assert prefill_memory(cfg, "cuda", "bf16", T, K).cache == 0
        estimates[K] = e.total
    assert sorted(estimates.values(), reverse=True) == list(estimates.values())
    spec = {
        "run_id": "x/full-500M-1M",
        "study": "x",
        "model": cfg,
        "stages": ["train", "passkey"],
        "train": {"dtype": "bf16"},
        "evaluate": {"passkey": {"lengths": [T]}},
        "resources": {"evaluate": {"gpu": 8, "nodes": 1, "gpu_memory_gb": 80, "tasks_per_node": 1}},
    }
    (plan,) = plan_evaluations(spec)
    capacity = 80e9 * HEADROOM
    assert plan.context_parallel == 8 and plan.status == "fits"  # split over all the job's GPUs
    spec["resources"]["evaluate"]["gpu"] = 1
    (alone,) = plan_evaluations(spec)
    assert alone.status == "does not fit"
    assert alone.needs == min(K for K, total in estimates.items() if total <= capacity)


def test_plan_command_prints_every_run_and_evaluation(capsys):
    trained = _trained_runs()
    evaluations = sum(len(s["plan"]["evaluate"]) for s in trained)
    assert main(["plan", str(ROOT / "config" / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "long_context/full-500M-1M" in out and "needs context parallel" not in out
    assert f"{len(trained)} training runs: {len(trained)} fit as planned" in out
    assert f"{evaluations} evaluations:" in out
    assert main(["plan", str(ROOT / "config" / "config.yaml"), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "| long_context | passkey | 256k-1M | 8 | 4 |" in out


def test_auto_picks_the_least_recomputation_then_the_largest_micro_batch_that_fit(micro_raw):
    """demo at 4K, batch 4 on one CPU process (estimates: no checkpointing 1.38 / 0.87 /
    0.62 GB at micro-batches 4 / 2 / 1, full checkpointing 0.47 GB at 1)."""
    micro_raw["defaults"].update(size="demo", context=4096)
    micro_raw["defaults"]["train"]["micro_batch_size"] = "auto"

    def layout_with(mem_mb):
        micro_raw["defaults"]["resources"]["train"]["mem_mb"] = mem_mb
        spec = expand_runs(validate_config(micro_raw))["micro/full-demo-4k"]
        assert spec["plan"]["memory_gb"] <= mem_mb / 1000
        return spec["layout"]["activation_checkpointing"], spec["layout"]["micro_batch_size"]

    assert layout_with(100_000) == ("none", 4)
    assert layout_with(1_000) == ("none", 2)
    assert layout_with(520) == ("full", 1)


def test_oversized_run_fails_validation_naming_the_run_the_numbers_and_the_nodes(micro_raw):
    micro_raw["defaults"].update(size="8B", context=32768)
    micro_raw["defaults"]["resources"]["train"].update(gpu=1)
    micro_raw["defaults"]["resources"]["evaluate"].update(gpu=1)
    with pytest.raises(ConfigError) as err:
        validate_config(micro_raw)
    message = str(err.value)
    assert "micro/full-8B-32k" in message and "do not fit" in message
    assert "GB of 73.6 GB per rank" in message and "resources.train" in message
    nodes = int(message.split("fits with resources.train.nodes: ")[1].split()[0])
    micro_raw["defaults"]["resources"]["train"].update(nodes=nodes)
    assert expand_runs(validate_config(micro_raw))["micro/full-8B-32k"]["plan"]["status"] == "fits"
