"""Study configuration: validate against the JSON Schema, fill defaults, expand studies into runs.

Everything here is torch-free so that Snakemake can parse the workflow quickly. A run spec is a
plain JSON-serialisable dict: the complete, resolved description of one run. A run's results are a
pure function of its spec (its `config_hash` identifies it).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ltstudy.data.tokenizer import get_tokenizer
from ltstudy.evaluate.passkey_prompt import min_prompt_length
from ltstudy.evaluate.ruler import check_length
from ltstudy.models.presets import SIZES, resolve_model
from ltstudy.models.variants import VARIANTS

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
STAGES = ("train", "perplexity", "passkey", "ruler", "lm_eval", "throughput")
# lm_eval needs Hugging Face datasets in the local cache, so a study asks for it by name.
DEFAULT_STAGES = tuple(stage for stage in STAGES if stage != "lm_eval")
RUN_FIELDS = ("variant", "size", "context", "seed")


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


@functools.cache
def load_schema() -> dict:
    """The config schema (read once; validators never modify it)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it."""
    return load_study(path)[0]


def load_study(path: str | Path, check_fit: bool = True) -> tuple[dict, dict[str, dict]]:
    """Read a YAML config file: (validated config, its runs by id). `check_fit=False` keeps
    runs the planner finds too big (to show them, as `ltstudy plan` does)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return validate_study(raw, source=str(path), check_fit=check_fit)


def _field(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _with_defaults(cls: type) -> type:
    """A validator class that also fills in `default:` values (jsonschema FAQ recipe)."""
    validate_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


def _raise_first(errors: list[jsonschema.ValidationError], source: str) -> None:
    """Raise the error nearest the top of the document, naming its field."""
    if not errors:
        return
    err = min(errors, key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    best = jsonschema.exceptions.best_match([err]) or err
    raise ConfigError(f"{source}: config field `{_field(best.absolute_path)}`: {best.message}")


def default_settings() -> dict:
    """The settings of a run whose config says nothing: the schema's defaults."""
    schema = load_schema()
    filler = _with_defaults(jsonschema.validators.validator_for(schema))(schema)
    settings: dict = {}
    filler.evolve(schema={"$ref": "#/$defs/settings"}).validate(settings)
    return settings


def validate_config(raw: Mapping, source: str = "config") -> dict:
    """Check `raw` against the schema and the registries; return a copy with defaults filled.

    Raises ConfigError naming the first bad field.
    """
    return validate_study(raw, source)[0]


def validate_study(
    raw: Mapping, source: str = "config", check_fit: bool = True
) -> tuple[dict, dict[str, dict]]:
    """validate_config, also returning the runs (expanding them is part of the check, so
    callers that need both should not expand twice)."""
    schema = load_schema()
    base = jsonschema.validators.validator_for(schema)
    checker = base(schema)
    _raise_first(list(checker.iter_errors(dict(raw))), source)

    config = copy.deepcopy(dict(raw))
    filler = _with_defaults(base)(schema)
    top = {k: v for k, v in schema["properties"].items() if k != "studies"}
    filler.evolve(schema={"type": "object", "properties": top}).validate(config)

    _check_data(config["data"], "data", source)
    runs = expand_runs(config, source=source)  # validates every run's merged settings
    if check_fit:
        _check_fit(runs, source)
    return config, runs


def unrunnable_reason(spec: Mapping[str, Any]) -> str | None:
    """Why a run's training cannot start with this code, or None: its planned layout splits
    sequences over ranks (context parallelism), which training does not do yet."""
    degree = spec.get("layout", {}).get("context", 1)
    if degree == 1:
        return None
    plan = spec.get("plan") or {}
    return (
        f"{spec['run_id']} needs context parallelism of degree {degree} to fit "
        f"({plan.get('detail', '')}); training does not split sequences over ranks yet"
    )


def _check_fit(runs: Mapping[str, Mapping], source: str) -> None:
    """Every run that the planner cannot fit on its GPUs under any layout, named at once."""
    bad = [s for s in runs.values() if (s.get("plan") or {}).get("status") == "does not fit"]
    if not bad:
        return
    lines = [f"  {s['run_id']}: {s['plan']['detail']}" for s in bad[:10]]
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise ConfigError(
        f"{source}: {len(bad)} run(s) do not fit their GPUs under any layout "
        "(`ltstudy plan` shows every run):\n" + "\n".join(lines) + more + "\n"
        "give them more GPUs or nodes (resources.train), a smaller train.micro_batch_size or "
        "activation checkpointing, or a larger resources.train.gpu_memory_gb if the GPUs "
        "have more memory"
    )


def _check_data(data: Mapping, field: str, source: str) -> None:
    corpus = data["corpus"]
    if corpus != "embedded" and not Path(corpus).exists():
        raise ConfigError(
            f"{source}: config field `{field}.corpus`: {corpus!r} is neither 'embedded' nor an "
            "existing file or folder"
        )
    try:
        get_tokenizer(data["tokenizer"])
    except (OSError, ValueError) as err:
        raise ConfigError(f"{source}: config field `{field}.tokenizer`: {err}") from None
    synthetic = data.get("synthetic") or {}
    if synthetic.get("fraction") and not any(synthetic.get("mix", {}).values()):
        raise ConfigError(
            f"{source}: config field `{field}.synthetic.mix`: every weight is 0, but "
            f"synthetic.fraction is {synthetic['fraction']}; give some kind a positive weight"
        )


ANSWER_KINDS = ("recall", "passkey")  # the synthetic kinds that mark answers


def _check_answer_weight(train: Mapping, data: Mapping, source: str) -> None:
    synthetic = data.get("synthetic") or {}
    marked = synthetic.get("fraction") and any(synthetic["mix"].get(k) for k in ANSWER_KINDS)
    if train["answer_loss_weight"] and not marked:
        raise ConfigError(
            f"{source}: config field `train.answer_loss_weight`: {train['answer_loss_weight']} "
            f"weighs answer tokens, but only {' and '.join(ANSWER_KINDS)} documents mark them "
            "and this run's data.synthetic has none"
        )


def study_data(config: Mapping, study: Mapping) -> dict:
    """A study's data settings: the top-level `data` with the study's own `data` over it."""
    return deep_merge(config["data"], study.get("data", {}))


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """Recursive dict merge; values in `update` win, lists are replaced whole."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _dotted(path: str, value: Any) -> dict:
    node: Any = value
    for part in reversed(path.split(".")):
        node = {part: node}
    return node


def context_label(tokens: int) -> str:
    """32768 -> '32k', 1048576 -> '1M'."""
    for unit, suffix in ((1 << 20, "M"), (1 << 10, "k")):
        if tokens % unit == 0:
            return f"{tokens // unit}{suffix}"
    return str(tokens)


def _grid_points(grid: Mapping[str, list]) -> Iterator[dict[str, Any]]:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values, strict=True))


def _run_name(settings: Mapping, point: Mapping[str, Any], explicit: str | None) -> str:
    parts = [settings["variant"], settings["size"], context_label(settings["context"])]
    for key, value in point.items():
        if key in ("variant", "size", "context"):
            continue
        parts.append(f"{key.split('.')[-1]}{value}")
    if explicit:
        parts.append(explicit)
    return "-".join(str(p) for p in parts)


def config_hash(payload: Mapping) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand_runs(config: Mapping, source: str = "config") -> dict[str, dict]:
    """All runs of all studies, keyed by run id ('<study>/<name>'), each a resolved spec."""
    schema = load_schema()
    checker = jsonschema.validators.validator_for(schema)(schema)
    settings_checker = checker.evolve(schema={"$ref": "#/$defs/settings"})
    runs: dict[str, dict] = {}
    seen_studies: set[str] = set()
    for index, study in enumerate(config["studies"]):
        where = f"studies[{index}]"
        if not study.get("enabled", True):
            continue
        if study["name"] in seen_studies:
            raise ConfigError(
                f"{source}: config field `{where}.name`: duplicate study {study['name']!r}"
            )
        seen_studies.add(study["name"])
        if study.get("data"):
            _raise_first(
                list(
                    checker.evolve(schema={"$ref": "#/$defs/data"}).iter_errors(
                        study_data(config, study)
                    )
                ),
                f"{source}: {where}.data",
            )
            _check_data(study_data(config, study), f"{where}.data", source)
        base = deep_merge(config["defaults"], study.get("overrides", {}))
        known_sizes = {**SIZES, **config.get("sizes", {})}
        for size in study.get("size_overrides", {}):
            _check_choice(size, known_sizes, f"{where}.size_overrides", "size", source)
        explicit = study.get("runs") or [{}]
        for point in _grid_points(study.get("grid", {})):
            from_grid: dict = {}
            for key, value in point.items():
                from_grid = deep_merge(from_grid, _dotted(key, value))
            for entry in explicit:
                extra = entry.get("overrides", {})
                size = deep_merge(deep_merge(base, from_grid), extra)["size"]
                by_size = study.get("size_overrides", {}).get(size, {})
                settings = deep_merge(deep_merge(deep_merge(base, by_size), from_grid), extra)
                run_where = f"{where} ({study['name']})"
                _raise_first(list(settings_checker.iter_errors(settings)), f"{source}: {run_where}")
                name = _run_name(settings, point, entry.get("name"))
                run_id = f"{study['name']}/{name}"
                if run_id in runs:
                    raise ConfigError(
                        f"{source}: config field `{where}`: two runs resolve to {run_id!r}; "
                        "give explicit runs distinct names"
                    )
                runs[run_id] = resolve_run(config, study, name, settings, f"{source}: {run_where}")
    _link_init_from(runs, source)
    return runs


def _link_init_from(runs: dict[str, dict], source: str) -> None:
    """Resolve `train.init_from` run ids; the source run's hash joins this run's identity."""
    for run_id in runs:  # runs are in config order; a source must come earlier
        spec = runs[run_id]
        template = spec["train"].get("init_from")
        if not template:
            continue
        target = template.format(variant=spec["variant"], size=spec["size"])
        if target not in runs or list(runs).index(target) >= list(runs).index(run_id):
            raise ConfigError(
                f"{source}: {run_id}: config field `train.init_from`: {target!r} is not an "
                "earlier run of this config"
            )
        if "train" not in runs[target]["stages"]:
            raise ConfigError(
                f"{source}: {run_id}: `train.init_from` run {target!r} is not trained"
            )
        spec["train"]["init_from"] = target
        spec["init_from_dir"] = runs[target]["run_dir"]
        spec["config_hash"] = config_hash(
            {"self": spec["config_hash"], "init": runs[target]["config_hash"]}
        )


def _tasks_per_node(resources: Mapping, group: str, source: str) -> int:
    """One process per GPU for training (GPUs requested = GPUs used); evaluation and data
    preparation run in one process."""
    gpu, tasks = resources["gpu"], resources["tasks_per_node"]
    field = f"{source}: config field `resources.{group}"
    if group != "train":
        if gpu > 1 or resources["nodes"] > 1 or (tasks or 1) > 1:
            raise ConfigError(
                f"{field}`: the {group} stage runs in one process on at most one GPU; set "
                "gpu: 0 or 1, nodes: 1 and tasks_per_node: 1"
            )
        return 1
    if tasks is None:
        return max(gpu, 1)
    if gpu and tasks != gpu:
        raise ConfigError(
            f"{field}.tasks_per_node`: {tasks} processes but gpu: {gpu}; training runs one "
            "process per GPU, so leave tasks_per_node out or set it to gpu"
        )
    return tasks


def _check_choice(value: str, known: Mapping, field: str, what: str, source: str) -> None:
    if value not in known:
        raise ConfigError(
            f"{source}: config field `{field}`: unknown {what} {value!r} "
            f"(known: {', '.join(sorted(known))})"
        )


@functools.cache
def _ruler_prompt_fits(task: str, tokenizer: str, length: int, max_new_tokens: int | None) -> bool:
    try:
        check_length(task, get_tokenizer(tokenizer), length, max_new_tokens)
    except ValueError:
        return False
    return True


def _check_fast_weight_chunk(model: Mapping[str, Any], where: str) -> None:
    """Fast weights beside a sliding window (ttt_swa, lact) are written once per chunk, so a
    token late in a chunk reaches the chunk's first tokens only through the window: the window
    must cover the chunk."""
    window = model.get("swa_window")
    if window is None:
        return
    chunks = []
    if model.get("ttt"):
        chunks.append(("model.ttt.chunk_size", model["ttt"]["chunk_size"]))
    if model["variant"] == "lact":
        chunks.append(("model.lact.chunk_size", model["mixer"]["chunk_size"]))
    for field, chunk in chunks:
        if chunk > window:
            raise ConfigError(
                f"{where}: config field `{field}`: {chunk} is longer than the sliding window "
                f"`model.swa_window` {window}; a token late in a chunk could reach the chunk's "
                "first tokens neither through the window nor through the fast weights (written "
                "when the chunk ends): use a chunk no longer than the window"
            )


def resolve_run(config: Mapping, study: Mapping, name: str, settings: dict, source: str) -> dict:
    """Turn merged settings into a complete run spec, with semantic checks."""
    _check_choice(settings["variant"], VARIANTS, "variant", "variant", source)
    try:
        model = resolve_model(
            settings["variant"],
            settings["size"],
            settings["model"],
            config.get("sizes", {}),
            study_data(config, study)["tokenizer"],
            settings["context"],
        )
    except KeyError as err:
        raise ConfigError(f"{source}: config field `size`: {err.args[0]}") from None
    except ValueError as err:
        raise ConfigError(f"{source}: config field `model`: {err}") from None
    _check_fast_weight_chunk(model, f"{source}: {study['name']}/{name}")
    if model["ttt"] and model["ttt"].get("reset_at_documents"):
        tokenizer = study_data(config, study)["tokenizer"]
        model["ttt"]["document_separator"] = get_tokenizer(tokenizer).eos_id

    train = dict(settings["train"])
    tokens_per_step = train["batch_size"] * settings["context"]
    if (train["steps"] is None) == (train["tokens"] is None):
        raise ConfigError(f"{source}: config field `train`: give exactly one of steps or tokens")
    if train["steps"] is None:
        train["steps"] = math.ceil(train["tokens"] / tokens_per_step)
    train["tokens"] = train["steps"] * tokens_per_step
    if train["warmup_steps"] > train["steps"]:
        train["warmup_steps"] = train["steps"]
    resources = {group: dict(r) for group, r in settings["resources"].items()}
    for group, r in resources.items():
        r["tasks_per_node"] = _tasks_per_node(r, group, source)
    # How the run is spread over ranks does not change what it computes (beyond rounding),
    # so the layout stays out of the config hash: a checkpoint resumes under another layout.
    layout = {
        "nodes": resources["train"]["nodes"],
        "tasks_per_node": resources["train"]["tasks_per_node"],
        "micro_batch_size": train.pop("micro_batch_size"),
        "activation_checkpointing": train.pop("activation_checkpointing"),
        **settings["parallel"],
    }
    micro = layout["micro_batch_size"]
    if micro not in (None, "auto") and micro > train["batch_size"]:
        raise ConfigError(
            f"{source}: config field `train.micro_batch_size`: {micro} is more than batch_size "
            f"{train['batch_size']}"
        )

    evaluate = copy.deepcopy(settings["evaluate"])
    if evaluate["throughput"]["contexts"] is None:
        evaluate["throughput"]["contexts"] = [settings["context"]]

    perplexity = evaluate["perplexity"]
    if perplexity["stride"] and perplexity["stride"] > min(perplexity["lengths"]):
        raise ConfigError(
            f"{source}: config field `evaluate.perplexity.stride`: {perplexity['stride']} is "
            f"longer than the shortest length {min(perplexity['lengths'])}"
        )
    if "final_block" in perplexity["protocols"] and perplexity["block"] >= max(
        perplexity["lengths"]
    ):
        raise ConfigError(
            f"{source}: config field `evaluate.perplexity.block`: {perplexity['block']} leaves "
            f"no context in a window of the longest length {max(perplexity['lengths'])}"
        )
    data = study_data(config, study)
    _check_answer_weight(settings["train"], data, source)
    shortest = min_prompt_length(get_tokenizer(data["tokenizer"]))
    too_short = min(evaluate["passkey"]["lengths"])
    if too_short < shortest:
        raise ConfigError(
            f"{source}: config field `evaluate.passkey.lengths`: {too_short} is shorter than "
            f"the bare prompt ({shortest} tokens)"
        )

    for task in evaluate["ruler"]["tasks"]:
        if not _ruler_prompt_fits(
            task,
            data["tokenizer"],
            min(evaluate["ruler"]["lengths"]),
            evaluate["ruler"]["max_new_tokens"],
        ):
            raise ConfigError(
                f"{source}: config field `evaluate.ruler.lengths`: "
                f"{min(evaluate['ruler']['lengths'])} tokens cannot hold a {task} prompt"
            )

    stages = list(study.get("stages", DEFAULT_STAGES))
    if {"passkey", "perplexity", "ruler", "lm_eval"} & set(stages) and "train" not in stages:
        raise ConfigError(
            f"{source}: config field `stages`: perplexity, passkey, ruler and lm_eval evaluate "
            "a trained model, so `train` must be a stage too"
        )
    results_dir = config.get("results_dir", "results")
    run_id = f"{study['name']}/{name}"
    identity = {
        "variant": settings["variant"],
        "size": settings["size"],
        "context": settings["context"],
        "seed": settings["seed"],
        "model": model,
        "train": train,
        "data": data,
    }
    spec = {
        "run_id": run_id,
        "study": study["name"],
        "name": name,
        **identity,
        "evaluate": evaluate,
        "stages": stages,
        "resources": resources,
        "layout": layout,
        "launcher": config.get("launcher", "local"),
        "config_hash": config_hash(identity),
        "run_dir": str(Path(results_dir) / "runs" / study["name"] / name),
        "data_dir": str(Path(results_dir) / "data" / config_hash(data)[:10]),
    }
    if "train" in stages:
        _plan_layout(spec, source)
    return spec


def _plan_layout(spec: dict, source: str) -> None:
    """Fill the layout's `auto` choices from the planner (`_check_fit` rejects runs that fit
    under no layout)."""
    from ltstudy.plan import GB, PlanError, plan_run

    try:
        plan = plan_run(spec)
    except PlanError as err:
        raise ConfigError(f"{source}: config field `{err.field}`: {err}") from None
    spec["layout"].update(
        micro_batch_size=plan.micro_batch_size,
        activation_checkpointing=plan.activation_checkpointing,
        context=plan.context_parallel,
    )
    spec["plan"] = {
        "status": plan.status,
        "detail": f"at best {plan.describe()}",
        "memory_gb": round(plan.estimate.total / GB, 2),
        "capacity_gb": round(plan.capacity / GB, 2),
        "gpu_hours": round(plan.gpu_hours, 1),
    }
