"""Study configuration: validate against the JSON Schema, fill defaults, expand studies into runs.

Everything here is torch-free so that Snakemake can parse the workflow quickly. A run spec is a
plain JSON-serialisable dict: the complete, resolved description of one run. A run's results are a
pure function of its spec (its `config_hash` identifies it).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ltstudy.data.corpus import corpus_fingerprint
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
    """A bad configuration value; the message names the field. `problems` holds one message
    per error (a ConfigError may report several at once)."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


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
    return validate_study(read_yaml(path), source=str(path), check_fit=check_fit)


class _DuplicateKey(yaml.MarkedYAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__()
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping without a word, so a setting
    given twice would silently lose one value: reject it."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` keys may override
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if not isinstance(key, Hashable):  # PyYAML rejects it, naming the line
                    continue
                if key in first:
                    raise _DuplicateKey(key, line, first[key])
                first[key] = line
        return super().construct_mapping(node, deep=deep)


# PyYAML reads YAML 1.1, where a float needs a dot and a signed exponent: `2e-3` and `1e5`
# would be strings. Read them as YAML 1.2 does (a quoted '2e-3' stays a string).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def read_yaml(path: str | Path) -> dict:
    """A YAML config file's contents; a file that is missing, not YAML or gives a key twice
    is a ConfigError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as err:
        raise ConfigError(
            f"{path}:{err.line}: duplicate key {err.key!r} (first given on line {err.first}); "
            "YAML would keep only the last value"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def numbers_as_read(config: Any, read: Any) -> Any:
    """`config` with each string that `read` (its files as read_yaml reads them) holds as a
    float taken as that float: Snakemake reads config files as YAML 1.1, where an unquoted
    2e-3 is a string. A string that --config set, or that the file quotes, stays a string."""
    if isinstance(config, Mapping) and isinstance(read, Mapping):
        return {key: numbers_as_read(value, read.get(key)) for key, value in config.items()}
    if isinstance(config, list) and isinstance(read, list) and len(config) == len(read):
        return [numbers_as_read(c, r) for c, r in zip(config, read, strict=True)]
    if isinstance(config, str) and isinstance(read, float) and _NUMBER.fullmatch(config):
        return read if float(config) == read else config
    return config


def _check_finite(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    """NaN and infinity satisfy every `minimum` of the schema (NaN compares false), so a
    `.nan` learning rate would only show as a NaN loss: reject them wherever they appear.
    Yields (path, message) problems."""
    if isinstance(node, float) and not math.isfinite(node):
        yield path, f"config field `{_field(path)}`: {node} is not a finite number"
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _check_finite(value, (*path, key))
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from _check_finite(value, (*path, index))


TOKENS_FORMS = "an integer, or a size such as 32k, 128K, 1m or 1M (k = 1024, M = 1024 * 1024)"
_TOKENS = re.compile(r"([0-9]+)([kKmM])")


def parse_tokens(text: str) -> int:
    """'32k' -> 32768, '1M' -> 1048576: the inverse of context_label (either case)."""
    match = _TOKENS.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a token count; write {TOKENS_FORMS}")
    return int(match[1]) << (10 if match[2] in "kK" else 20)


def _types(schema: Mapping) -> list[str]:
    types = schema.get("type", [])
    return [types] if isinstance(types, str) else list(types)


def _deref(schema: Mapping) -> Mapping:
    """A subschema with its `$ref` (always local, #/$defs/...) followed; sibling keywords
    (format, default) kept."""
    while "$ref" in schema:
        target: Any = load_schema()
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _read_numbers(node: Any, schema: Mapping) -> Any:
    """`node` with token counts written as '32k' turned into integers and whole floats in
    integer fields (`steps: 1e3`) into integers, by walking it beside its schema. Anything
    that does not read is left for the schema check to refuse, saying why."""
    schema = _deref(schema)
    if isinstance(node, str) and schema.get("format") == "tokens":
        with contextlib.suppress(ValueError):
            return parse_tokens(node)
    if isinstance(node, float) and node.is_integer() and "integer" in _types(schema):
        return int(node)
    for branch in schema.get("oneOf", []) + schema.get("anyOf", []):
        node = _read_numbers(node, branch)
    if isinstance(node, Mapping):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return {
            key: _read_numbers(value, properties[key])
            if key in properties
            else (_read_numbers(value, extra) if isinstance(extra, Mapping) else value)
            for key, value in node.items()
        }
    if isinstance(node, list) and isinstance(schema.get("items"), Mapping):
        return [_read_numbers(value, schema["items"]) for value in node]
    return node


def _settings_field(dotted: str) -> Mapping | None:
    """The subschema of a settings path such as `model.ttt.chunk_size` (a grid key)."""
    node: Mapping = {"$ref": "#/$defs/settings"}
    for part in dotted.split("."):
        node = _deref(node)
        branches = [node, *map(_deref, node.get("oneOf", []) + node.get("anyOf", []))]
        found = [b["properties"][part] for b in branches if part in b.get("properties", {})]
        if not found:
            return None
        node = found[0]
    return node


def read_numbers(raw: Any) -> Any:
    """A copy of a config with sizes (`context: 32k`) and whole floats in integer fields read
    as integers, grid values included; validate_study does this before the schema check
    (which refuses what is not a config at all)."""
    config = _read_numbers(raw, load_schema())
    studies = config.get("studies") if isinstance(config, dict) else None
    for study in studies if isinstance(studies, list) else []:
        grid = study.get("grid") if isinstance(study, dict) else None
        for key, values in grid.items() if isinstance(grid, dict) else ():
            schema = _settings_field(key) if isinstance(key, str) else None
            if schema is not None and isinstance(values, list):
                grid[key] = [_read_numbers(value, schema) for value in values]
    return config


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


# Names people write for a setting, by the setting's key: a misspelt alias suggests the key.
KEY_ALIASES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "seq_len": "context",
    "context_length": "context",
    "max_seq_len": "context",
    "model_size": "size",
}


def _closest(
    value: Any, choices: Iterable[Any], aliases: Mapping[str, str] | None = None
) -> str | None:
    """The choice closest to a misspelt `value` (case aside), or None when none is close."""
    names = {str(c).lower(): str(c) for c in choices}
    names.update({a: key for a, key in (aliases or {}).items() if key in names.values()})
    close = difflib.get_close_matches(str(value).lower(), list(names), n=1)
    return names[close[0]] if close else None


def _did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    best = _closest(value, choices)
    return f"; did you mean {best!r}?" if best else ""


def _schema_problems(error: jsonschema.ValidationError) -> Iterator[tuple[tuple, str]]:
    """(path, message) of a schema error, saying why the value is refused."""
    if error.validator in ("oneOf", "anyOf") and isinstance(error.instance, dict | list):
        # the errors of the branches of the value's own type (a mapping, a list)
        fitting = [e for e in error.context if e.relative_path or e.validator != "type"]
        for sub in fitting:
            yield from _schema_problems(sub)
        if fitting:
            return
    err = jsonschema.exceptions.best_match([error]) or error  # into oneOf/anyOf branches
    path, value, schema = tuple(err.absolute_path), err.instance, err.schema
    field = f"config field `{_field(path)}`"
    if err.validator == "additionalProperties" and err.validator_value is False:
        known = list(schema.get("properties", {}))
        where = f"in `{_field(path)}`" if path else "at the top level"
        for key in sorted(set(value) - set(known), key=str):
            best = _closest(key, known, KEY_ALIASES)
            hint = f"; did you mean `{best}`?" if best else f" (known: {', '.join(known)})"
            yield (*path, key), f"unknown key `{key}` {where}{hint}"
        return
    types = _types(err.schema) if err.validator == "type" else []
    if isinstance(value, str) and {"number", "integer"} & set(types) and _NUMBER.fullmatch(value):
        yield path, f"{field}: {value!r} is a string; write the number unquoted"
    elif isinstance(value, str) and schema.get("format") == "tokens":
        yield path, f"{field}: {value!r} is not a token count; write {TOKENS_FORMS}"
    elif err.validator == "enum" and isinstance(value, str):
        yield path, f"{field}: {err.message}{_did_you_mean(value, err.validator_value)}"
    elif err.validator in ("oneOf", "anyOf") and isinstance(value, str):
        words = [_deref(b).get("const") for b in err.validator_value]
        hint = _did_you_mean(value, [w for w in words if isinstance(w, str)])
        yield path, f"{field}: {err.message}{hint}"
    else:
        yield path, f"{field}: {err.message}"


def _path_order(problem: tuple[tuple, str]) -> tuple:
    path, message = problem
    return tuple((isinstance(part, str), part) for part in path), message


def _raise_schema(
    errors: Iterable[jsonschema.ValidationError],
    source: str,
    found: Iterable[tuple[tuple, str]] = (),
) -> None:
    """Raise every schema error (and the `found` problems) at once, sorted by field."""
    problems = {p for err in errors for p in _schema_problems(err)} | set(found)
    ordered = sorted(problems, key=_path_order)
    _raise_together([f"{source}: {message}" for _, message in ordered], source)


MAX_LISTED = 20  # errors listed of a config's runs (a grid repeats one mistake in many)


def _raise_together(messages: Iterable[str], source: str, limit: int | None = None) -> None:
    """One ConfigError for several: a count, then each message on its own line (the first
    `limit` of them), without the shared `source` prefix."""
    messages = list(dict.fromkeys(messages))
    if len(messages) <= 1:
        if messages:
            raise ConfigError(messages[0])
        return
    lines = [f"  {m.removeprefix(f'{source}: ')}" for m in messages[:limit]]
    if limit is not None and len(messages) > limit:
        lines.append(f"  ... and {len(messages) - limit} more")
    raise ConfigError(f"{source}: {len(messages)} errors\n" + "\n".join(lines), messages)


@contextlib.contextmanager
def _gather(problems: list[str]) -> Iterator[None]:
    """Keep a check's ConfigError in `problems` instead of raising it, to report all at once."""
    try:
        yield
    except ConfigError as err:
        problems.extend(err.problems)


def default_settings() -> dict:
    """The settings of a run whose config says nothing: the schema's defaults."""
    schema = load_schema()
    filler = _with_defaults(jsonschema.validators.validator_for(schema))(schema)
    settings: dict = {}
    filler.evolve(schema={"$ref": "#/$defs/settings"}).validate(settings)
    return settings


def validate_config(raw: Mapping, source: str = "config") -> dict:
    """Check `raw` against the schema and the registries; return a copy with defaults filled.

    Raises ConfigError naming every bad field found.
    """
    return validate_study(raw, source)[0]


def validate_study(
    raw: Mapping, source: str = "config", check_fit: bool = True
) -> tuple[dict, dict[str, dict]]:
    """validate_config, also returning the runs (expanding them is part of the check, so
    callers that need both should not expand twice)."""
    non_finite = list(_check_finite(raw))
    raw = read_numbers(raw)
    schema = load_schema()
    base = jsonschema.validators.validator_for(schema)
    checker = base(schema)
    _raise_schema(checker.iter_errors(raw), source, non_finite)

    config = copy.deepcopy(raw)
    filler = _with_defaults(base)(schema)
    top = {k: v for k, v in schema["properties"].items() if k != "studies"}
    filler.evolve(schema={"type": "object", "properties": top}).validate(config)

    _check_data(config["data"], "data", source)
    runs = expand_runs(config, source=source)  # validates every run's merged settings
    if check_fit:
        _check_fit(runs, source)
    return config, runs


def _check_fit(runs: Mapping[str, Mapping], source: str) -> None:
    """Every run that the planner cannot fit on its GPUs under any layout, and every
    evaluation whose sequence does not fit its job's GPUs, named at once."""
    bad = [s for s in runs.values() if (s.get("plan") or {}).get("status") == "does not fit"]
    if not bad:
        _check_evaluations_fit(runs, source)
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


def _check_evaluations_fit(runs: Mapping[str, Mapping], source: str) -> None:
    bad = [
        (s["run_id"], e)
        for s in runs.values()
        for e in (s.get("plan") or {}).get("evaluate", [])
        if e["status"] == "does not fit"
    ]
    if not bad:
        return
    lines = [
        f"  {run} {e['stage']} at {e['length']:,} tokens: {e['memory_gb']} GB per GPU"
        + (f", fits on {e['needs']} GPUs" if e.get("needs") else "")
        for run, e in bad[:10]
    ]
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise ConfigError(
        f"{source}: {len(bad)} evaluation(s) do not fit their job's GPUs (`ltstudy plan` shows "
        "every one):\n" + "\n".join(lines) + more + "\n"
        "give those runs more GPUs (resources.evaluate.gpu: an evaluation splits each sequence "
        "over them) or shorter evaluation lengths"
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
    return _copy(_merge(base, update))


def _merge(base: Mapping, update: Mapping) -> dict:
    """deep_merge sharing the unchanged parts of both (copy once after several merges)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _copy(node: Any) -> Any:
    """A deep copy of plain config data (dicts, lists, scalars): several times faster than
    copy.deepcopy, which matters at 10,000 runs."""
    if isinstance(node, dict):
        return {key: _copy(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_copy(value) for value in node]
    return node


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


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
SLUG_LENGTH = 40  # the tail of a longer value is kept (a path's last folders say most)


def slug(value: Any) -> str:
    """A grid value as a piece of a folder name: runs of characters other than
    [A-Za-z0-9._-] become `_` (a `/` would leave results/runs), and when that loses
    anything a short hash of the value follows, so two values never share a name."""
    text = str(value)
    safe = _UNSAFE.sub("_", text)
    if safe == text and len(safe) <= SLUG_LENGTH:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{safe[-SLUG_LENGTH:]}_{digest}"


def _run_name(settings: Mapping, point: Mapping[str, Any], explicit: str | None) -> str:
    parts = [settings["variant"], settings["size"], context_label(settings["context"])]
    for key, value in point.items():
        if key in ("variant", "size", "context"):
            continue
        parts.append(f"{key.split('.')[-1]}{slug(value)}")
    if explicit:
        parts.append(explicit)
    return "-".join(str(p) for p in parts)


def config_hash(payload: Mapping) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _SettingsChecker:
    """Schema checks of each run's merged settings, section by section, remembering the
    sections found valid by their value: a grid's runs share all but a few values, and
    jsonschema on every whole run took most of the time to expand thousands of runs. Errors
    come from the check of the whole settings, so they read as before."""

    def __init__(self, checker: jsonschema.protocols.Validator) -> None:
        self.whole = checker.evolve(schema={"$ref": "#/$defs/settings"})
        settings = load_schema()["$defs"]["settings"]
        # sections check alone only while no keyword relates one section to another
        self.split = set(settings) <= {"type", "additionalProperties", "properties", "description"}
        self.sections = {
            key: checker.evolve(schema={"$ref": f"#/$defs/settings/properties/{key}"})
            for key in settings["properties"]
        }
        self.valid: set[tuple] = set()

    def check(self, settings: Mapping, source: str) -> None:
        if not self.split:
            _raise_schema(self.whole.iter_errors(settings), source)
            return
        for key, value in settings.items():
            token = (key, type(value), json.dumps(value, sort_keys=True, default=repr))
            if token not in self.valid:
                section = self.sections.get(key)
                if section is None or not section.is_valid(value):
                    _raise_schema(self.whole.iter_errors(settings), source)
                self.valid.add(token)


def expand_runs(config: Mapping, source: str = "config") -> dict[str, dict]:
    """All runs of all studies, keyed by run id ('<study>/<name>'), each a resolved spec.
    Every study and run is checked before the errors are raised, together."""
    schema = load_schema()
    checker = jsonschema.validators.validator_for(schema)(schema)
    settings_checker = _SettingsChecker(checker)
    runs: dict[str, dict] = {}
    seen_studies: set[str] = set()
    problems: list[str] = []
    for index, study in enumerate(config["studies"]):
        where = f"studies[{index}]"
        if not study.get("enabled", True):
            continue
        found = len(problems)
        with _gather(problems):
            if study["name"] in seen_studies:
                raise ConfigError(
                    f"{source}: config field `{where}.name`: duplicate study {study['name']!r}"
                )
            seen_studies.add(study["name"])
            data = study_data(config, study)
            if study.get("data"):
                _raise_schema(
                    checker.evolve(schema={"$ref": "#/$defs/data"}).iter_errors(data),
                    f"{source}: {where}.data",
                )
                _check_data(data, f"{where}.data", source)
            known_sizes = {**SIZES, **config.get("sizes", {})}
            for size in study.get("size_overrides", {}):
                _check_choice(size, known_sizes, f"{where}.size_overrides", "size", source)
        if len(problems) > found:  # its runs would fail for the same reason
            continue
        base = deep_merge(config["defaults"], study.get("overrides", {}))
        explicit = study.get("runs") or [{}]
        for point in _grid_points(study.get("grid", {})):
            from_grid: dict = {}
            for key, value in point.items():
                from_grid = _merge(from_grid, _dotted(key, value))
            for entry in explicit:
                with _gather(problems):
                    extra = entry.get("overrides", {})
                    size = _merge(_merge(base, from_grid), extra)["size"]
                    by_size = study.get("size_overrides", {}).get(size, {})
                    merged = _merge(_merge(_merge(base, by_size), from_grid), extra)
                    run_where = f"{where} ({study['name']})"
                    settings_checker.check(merged, f"{source}: {run_where}")
                    settings = _copy(merged)
                    name = _run_name(settings, point, entry.get("name"))
                    run_id = f"{study['name']}/{name}"
                    if run_id in runs:
                        raise ConfigError(
                            f"{source}: config field `{where}`: two runs resolve to {run_id!r}; "
                            "give explicit runs distinct names"
                        )
                    runs[run_id] = resolve_run(
                        config, study, name, settings, f"{source}: {run_where}", data
                    )
    _raise_together(problems, source, limit=MAX_LISTED)
    _link_init_from(runs, source)
    return runs


def _link_init_from(runs: dict[str, dict], source: str) -> None:
    """Resolve `train.init_from` run ids; the source run's hash joins this run's identity."""
    order = {run_id: index for index, run_id in enumerate(runs)}
    for run_id in runs:  # runs are in config order; a source must come earlier
        spec = runs[run_id]
        template = spec["train"].get("init_from")
        if not template:
            continue
        target = template.format(variant=spec["variant"], size=spec["size"])
        if target not in runs or order[target] >= order[run_id]:
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
    """One process per GPU for training and evaluation (GPUs requested = GPUs used; an
    evaluation's ranks split each sequence it scores or decodes over them); data preparation
    runs in one process. Evaluation jobs run on one node."""
    gpu, tasks = resources["gpu"], resources["tasks_per_node"]
    field = f"{source}: config field `resources.{group}"
    if group == "data":
        if gpu > 1 or resources["nodes"] > 1 or (tasks or 1) > 1:
            raise ConfigError(
                f"{field}`: the data stage runs in one process on at most one GPU; set "
                "gpu: 0 or 1, nodes: 1 and tasks_per_node: 1"
            )
        return 1
    if group == "evaluate" and resources["nodes"] > 1:
        raise ConfigError(f"{field}.nodes`: evaluation runs on one node; set nodes: 1")
    if tasks is None:
        return max(gpu, 1)
    if gpu and tasks != gpu:
        raise ConfigError(
            f"{field}.tasks_per_node`: {tasks} processes but gpu: {gpu}; {group} runs one "
            "process per GPU, so leave tasks_per_node out or set it to gpu"
        )
    return tasks


def _check_choice(value: str, known: Mapping, field: str, what: str, source: str) -> None:
    if value not in known:
        raise ConfigError(
            f"{source}: config field `{field}`: unknown {what} {value!r}"
            f"{_did_you_mean(value, known)} (known: {', '.join(sorted(known))})"
        )


@functools.cache
def _ruler_prompt_fits(task: str, tokenizer: str, length: int, max_new_tokens: int | None) -> bool:
    try:
        check_length(task, get_tokenizer(tokenizer), length, max_new_tokens)
    except ValueError:
        return False
    return True


def _fast_weight_chunks(model: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(config field, length) of the chunks a model writes its fast weights in."""
    chunks = []
    if model.get("ttt"):
        chunks.append(("model.ttt.chunk_size", model["ttt"]["chunk_size"]))
    if model["variant"] == "lact":
        chunks.append(("model.lact.chunk_size", model["mixer"]["chunk_size"]))
    return chunks


def _check_fast_weight_chunk(model: Mapping[str, Any], where: str) -> None:
    """Fast weights beside a sliding window (ttt_swa, lact) are written once per chunk, so a
    token late in a chunk reaches the chunk's first tokens only through the window: the window
    must cover the chunk."""
    window = model.get("swa_window")
    if window is None:
        return
    for field, chunk in _fast_weight_chunks(model):
        if chunk > window:
            raise ConfigError(
                f"{where}: config field `{field}`: {chunk} is longer than the sliding window "
                f"`model.swa_window` {window}; a token late in a chunk could reach the chunk's "
                "first tokens neither through the window nor through the fast weights (written "
                "when the chunk ends): use a chunk no longer than the window"
            )


def _check_training_context(model: Mapping[str, Any], context: int, where: str) -> None:
    """Lengths that the training context must exceed. A sliding window longer than the
    context is full attention in training, not the variant named. Fast weights (In-Place
    TTT, LaCT) are written when a chunk ends and read only by later chunks, so a chunk as
    long as the context is never read in training and the fast-weight path learns nothing.
    A context that is not a multiple of a chunk is fine: the chunked ops (TTT, LaCT, GLA,
    DeltaNet, Mamba2) pad the last chunk or leave its write out, as at inference."""
    window = model.get("swa_window")
    if window is not None and window > context:
        raise ConfigError(
            f"{where}: config field `model.swa_window`: {window} is longer than the training "
            f"context {context}, so every training window would be full attention: use a "
            "window no longer than the context"
        )
    for field, chunk in _fast_weight_chunks(model):
        if chunk >= context:
            raise ConfigError(
                f"{where}: config field `{field}`: {chunk} is not shorter than the training "
                f"context {context}; fast weights are written when a chunk ends and read only "
                "by later chunks, so training would never use them: use a chunk shorter than "
                "the context"
            )


def resolve_run(
    config: Mapping,
    study: Mapping,
    name: str,
    settings: dict,
    source: str,
    data: Mapping,
) -> dict:
    """Turn merged settings into a complete run spec, with semantic checks. `data` is the
    study's data settings (study_data, computed once per study by expand_runs)."""
    data = _copy(data)
    # the corpus files (paths with sizes and times, or contents: data.fingerprint) join the
    # data id and the run's hash: an edited corpus is tokenized again and its runs retrained
    data["corpus_digest"] = corpus_fingerprint(data["corpus"], data["fingerprint"])
    _check_choice(settings["variant"], VARIANTS, "variant", "variant", source)
    try:
        model = resolve_model(
            settings["variant"],
            settings["size"],
            settings["model"],
            config.get("sizes", {}),
            data["tokenizer"],
            settings["context"],
        )
    except KeyError as err:
        known = {**SIZES, **config.get("sizes", {})}
        hint = _did_you_mean(settings["size"], known)
        raise ConfigError(f"{source}: config field `size`: {err.args[0]}{hint}") from None
    except ValueError as err:
        raise ConfigError(f"{source}: config field `model`: {err}") from None
    _check_fast_weight_chunk(model, f"{source}: {study['name']}/{name}")
    if model["ttt"] and model["ttt"].get("reset_at_documents"):
        model["ttt"]["document_separator"] = get_tokenizer(data["tokenizer"]).eos_id

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
    if model["kernels"] == "triton" and not resources["train"]["gpu"]:
        raise ConfigError(
            f"{source}: config field `model.kernels`: triton runs on GPUs but "
            "resources.train.gpu is 0; use auto (the torch forms on the CPU) or reference"
        )
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

    evaluate = _copy(settings["evaluate"])
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
    if "train" in stages:
        _check_training_context(model, settings["context"], f"{source}: {study['name']}/{name}")
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
        "description": " ".join(study.get("description", "").split()),  # not in the hash
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


_PLANS: dict[str, tuple[dict, dict]] = {}  # what plan_run reads -> (layout choices, plan)


def _plan_layout(spec: dict, source: str) -> None:
    """Fill the layout's `auto` choices from the planner (`_check_fit` rejects runs that fit
    under no layout). Runs that differ only in what the planner does not read (a grid over
    seeds, say) share one plan."""
    from ltstudy.plan import GB, PlanError, plan_evaluations, plan_run

    key = json.dumps(
        [spec[k] for k in ("model", "context", "train", "layout", "stages", "evaluate")]
        + [spec["resources"]["train"], spec["resources"]["evaluate"]],
        sort_keys=True,
    )
    if key not in _PLANS:
        try:
            plan = plan_run(spec)
        except PlanError as err:
            raise ConfigError(f"{source}: config field `{err.field}`: {err}") from None
        choices = {
            "micro_batch_size": plan.micro_batch_size,
            "activation_checkpointing": plan.activation_checkpointing,
            "context": plan.context_parallel,
        }
        summary = {
            "status": plan.status,
            "detail": f"at best {plan.describe()}",
            "memory_gb": round(plan.estimate.total / GB, 2),
            "capacity_gb": round(plan.capacity / GB, 2),
            "gpu_hours": round(plan.gpu_hours, 1),
            # the context degree of each evaluation stage and length (GPUs sharing a sequence)
            "evaluate": [
                {
                    "stage": e.stage,
                    "length": e.length,
                    "context": e.context_parallel,
                    "memory_gb": round(e.estimate.total / GB, 2),
                    "status": e.status,
                    "needs": e.needs,
                }
                for e in plan_evaluations(spec)
            ],
        }
        _PLANS[key] = choices, summary
    choices, summary = _PLANS[key]
    spec["layout"].update(choices)
    spec["plan"] = dict(summary)
