"""ai-toolkit job files (ostris/ai-toolkit: `job: extension`, `config.process[0].type: sd_trainer`)
read as native recipes, key by key.

What each key means follows ai-toolkit's own code: `toolkit/config_modules.py` (NetworkConfig,
SaveConfig, DatasetConfig, TrainConfig, ModelConfig, SampleConfig, EMAConfig, LoggingConfig),
`toolkit/config.py` (`[name]` replaced by the job name in every string when the file is loaded),
`toolkit/optimizer.py` and `toolkit/scheduler.py`. The key tables live in aitoolkit_keys.py.

Every key ends in one of four ways: mapped to a native field (`Conversion.sources` says from
where), accepted with a note (it means nothing here, e.g. `device`), refused with what to do (a
feature not honoured yet, e.g. `network.type: lokr`, `model.quantize: true`), or refused as
unknown, with the nearest known key (a typo such as `linear_alpa`).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from difftrain_dist.models.families import FAMILIES, FAMILY_NAMES, names_where

from .aitoolkit_keys import (
    DTYPES,
    OPTIMIZERS,
    SECTIONS,
    TIMESTEP_TYPES,
    TRAINER_TYPES,
    Key,
)
from .common import RecipeError


def is_aitoolkit_job(raw: Any) -> bool:
    """Whether a parsed YAML document is an ai-toolkit job (top-level `job` and `config`)."""
    return isinstance(raw, dict) and "job" in raw and isinstance(raw.get("config"), dict)


@dataclass
class Conversion:
    """A job read as a native recipe."""

    recipe: dict[str, Any] = field(default_factory=dict)
    """The native recipe (sections run, model, lora, data, train, distributed, checkpoint, sample)."""
    sources: dict[str, str] = field(default_factory=dict)
    """Native dotted field ("lora.rank", "data.datasets.0.folder") → the job key it came from."""
    notes: list[str] = field(default_factory=list)
    """One line per key accepted without a meaning here, or read in ai-toolkit's way."""
    problems: list[str] = field(default_factory=list)

    def set(self, native: str, value: Any, source: str) -> None:
        """Set native field `native` (dotted; digits index lists) to `value`, from job key `source`."""
        node: Any = self.recipe
        parts = native.split(".")
        for part, following in zip(parts, parts[1:], strict=False):
            if part.isdigit():
                while len(node) <= int(part):
                    node.append({})
                node = node[int(part)]
            else:
                node = node.setdefault(part, [] if following.isdigit() else {})
        node[parts[-1]] = value
        self.sources[native] = source

    def note(self, path: str, text: str) -> None:
        self.notes.append(f"{path}: {text}")

    def refuse(self, path: str, text: str) -> None:
        self.problems.append(f"{path}: {text}")


def convert_job(raw: dict[str, Any], source: str = "<job>") -> Conversion:
    """Read an ai-toolkit job as a native recipe.

    Raises:
        RecipeError: listing every key that is unknown (with the nearest known one) or asks for
            something not honoured yet (with what to do), each by its path in the job.
    """
    conv = Conversion()
    raw = _with_name(raw)
    config = raw["config"]
    _check_keys(conv, raw, {"job", "config", "meta"}, "")
    if raw.get("job") != "extension":
        conv.refuse("job", f"{raw.get('job')!r} jobs are not trainers; LoRA jobs are `job: extension`")
    if raw.get("meta"):
        conv.note("meta", "the LoRA header here carries the run's ss_* and modelspec.* fields instead")
    if not isinstance(config, dict):
        conv.refuse("config", f"expected a mapping, found {config!r}")
        raise RecipeError(_report(conv, source))
    _check_keys(conv, config, {"name", "process", "device", "training_folder", "log_dir"}, "config")
    processes = config.get("process")
    if not isinstance(processes, list) or len(processes) != 1 or not isinstance(processes[0], dict):
        conv.refuse("config.process", "expected a list of one trainer process")
        raise RecipeError(_report(conv, source))
    name = config.get("name")
    if not isinstance(name, str) or not name:
        conv.refuse("config.name", "the job needs a name (it names the run and the LoRA file)")
    else:
        conv.set("run.name", name, "config.name")
    _process(conv, processes[0], "config.process[0]")
    if conv.problems:
        raise RecipeError(_report(conv, source))
    return conv


def _with_name(raw: dict[str, Any]) -> dict[str, Any]:
    """ai-toolkit's load-time substitution: `[name]` in every string becomes `config.name`."""
    config = raw.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        return raw
    return json.loads(json.dumps(raw).replace("[name]", name.replace("\\", "\\\\").replace('"', '\\"')))


def _report(conv: Conversion, source: str) -> str:
    return "\n".join([f"cannot train ai-toolkit job {source} as it is:", *(f"  {p}" for p in conv.problems)])


def _check_keys(conv: Conversion, section: dict[str, Any], known: set[str], path: str) -> None:
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            conv.refuse(_join(path, key), f"unknown key{hint}")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _process(conv: Conversion, process: dict[str, Any], path: str) -> None:
    keys = SECTIONS["process"]
    kind = process.get("type")
    if kind not in TRAINER_TYPES:
        conv.refuse(_join(path, "type"), f"{kind!r} is not a LoRA trainer here; use sd_trainer")
    _walk(conv, process, keys, path)
    folder = process.get("training_folder", "output")
    conv.set("run.storage_path", folder, _join(path, "training_folder"))
    conv.set("run.output_dir", f"{folder}/{conv.recipe.get('run', {}).get('name', 'lora')}",
             _join(path, "training_folder"))
    if "training_seed" in process:
        conv.set("run.seed", process["training_seed"], _join(path, "training_seed"))
    trigger = process.get("trigger_word")
    if trigger:
        conv.set("data.trigger_word", trigger, _join(path, "trigger_word"))
    device = str(process.get("device", "cpu"))
    conv.set("distributed.use_gpu", device.startswith("cuda"), _join(path, "device"))
    arch = _model(conv, _mapping(conv, process, "model", path), _join(path, "model"), device)
    _network(conv, _mapping(conv, process, "network", path), _join(path, "network"), arch)
    _save(conv, _mapping(conv, process, "save", path), _join(path, "save"))
    _datasets(conv, process.get("datasets"), _join(path, "datasets"))
    _train(conv, _mapping(conv, process, "train", path), _join(path, "train"), arch)
    _sample(conv, process.get("sample"), _join(path, "sample"), trigger)
    _walk(conv, process.get("logging") or {}, SECTIONS["logging"], _join(path, "logging"))


def _mapping(conv: Conversion, process: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    """`process[key]` when it is a mapping (or absent: {}); otherwise refused, and {}."""
    value = process.get(key) or {}
    if not isinstance(value, dict):
        conv.refuse(_join(path, key), f"expected a mapping, found {value!r}")
        return {}
    return value


def _walk(conv: Conversion, section: Any, keys: dict[str, Key], path: str, skip: frozenset[str] = frozenset(),
          index: int = 0) -> None:
    """Apply the generic outcome of each key (note, refuse, or map to one native field; `index`
    fills a map target's `{i}`)."""
    if not isinstance(section, dict):
        conv.refuse(path, f"expected a mapping, found {section!r}")
        return
    _check_keys(conv, section, set(keys), path)
    for key, value in section.items():
        spec = keys.get(key)
        if spec is None or key in skip or spec.kind == "custom":
            continue
        where = _join(path, key)
        if spec.kind == "note":
            conv.note(where, spec.text)
        elif spec.kind == "refuse" and not spec.harmless(value):
            conv.refuse(where, f"{_yaml_value(value)}: {spec.text}")
        elif spec.kind == "map" and value is not None:
            conv.set(spec.target.format(i=index), value, where)


def _yaml_value(value: Any) -> str:
    """A value as the job file spells it (`true`, not Python's `True`)."""
    return json.dumps(value) if isinstance(value, (bool, type(None))) else repr(value)


def _number(conv: Conversion, value: Any, path: str) -> float | None:
    """A number as ai-toolkit's YAML loader reads it (`1e-4` is a float there, a string in PyYAML)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        conv.refuse(path, f"expected a number, found {value!r}")
        return None
    return number if math.isfinite(number) else None


def _model(conv: Conversion, model: dict[str, Any], path: str, device: str) -> str:
    _walk(conv, model, SECTIONS["model"], path)
    if not model.get("name_or_path"):
        conv.refuse(_join(path, "name_or_path"), "the base model is required (a hub id or a diffusers folder)")
    else:
        name = str(model["name_or_path"])
        if name.endswith((".safetensors", ".ckpt")) or name.startswith(("http://", "https://")):
            conv.refuse(_join(path, "name_or_path"), "single-file and URL models are not read yet; give a hub id "
                        "or a diffusers folder (diffusers' `from_single_file(...).save_pretrained` makes one)")
        conv.set("model.path", name, _join(path, "name_or_path"))
    arch = str(model.get("arch") or "").split(":")[0]
    if arch:
        native = next((f.name for f in FAMILIES.values() if arch in f.aitoolkit_archs), None)
    else:  # the legacy flags; none set is SD 1.x, as in ai-toolkit
        native = next((f.name for f in FAMILIES.values() if f.aitoolkit_flag and model.get(f.aitoolkit_flag)),
                      next(f.name for f in FAMILIES.values() if f.aitoolkit_flag is None))
    if native is None:
        known = sorted(a for f in FAMILIES.values() for a in f.aitoolkit_archs)
        conv.refuse(_join(path, "arch"), f"{arch!r} is not a family trained here; ai-toolkit names of those: {known}")
        return FAMILY_NAMES[0]
    conv.set("model.arch", native, _join(path, "arch") if model.get("arch") else f"{path}.is_*")
    if model.get("is_v_pred"):
        conv.set("model.prediction_type", "v_prediction", _join(path, "is_v_pred"))
    return native


def _network(conv: Conversion, network: dict[str, Any], path: str, arch: str) -> None:
    _walk(conv, network, SECTIONS["network"], path)
    kind = network.get("type", "lora")
    if kind not in ("lora", "lierla"):
        conv.refuse(_join(path, "type"), f"{kind!r} networks are not trained here yet; use type: lora")
    rank_key = "rank" if "rank" in network else "linear"
    rank = int(network.get(rank_key, 4))
    conv.set("lora.rank", rank, _join(path, rank_key))
    alpha_key = "linear_alpha" if "linear_alpha" in network else "alpha"
    alpha = _number(conv, network.get(alpha_key, 1.0), _join(path, alpha_key))
    if arch in names_where(objective="flow_matching"):  # ai-toolkit saves them in peft format, alpha = rank
        if alpha is not None and alpha != rank and alpha_key in network:
            conv.note(_join(path, alpha_key), f"ai-toolkit trains {arch} with alpha = rank ({rank}); so does this run")
        alpha = rank
    if alpha is not None:
        conv.set("lora.alpha", alpha, _join(path, alpha_key))
    if network.get("dropout"):
        conv.set("lora.dropout", _number(conv, network["dropout"], _join(path, "dropout")), _join(path, "dropout"))


def _save(conv: Conversion, save: dict[str, Any], path: str) -> None:
    _walk(conv, save, SECTIONS["save"], path)
    dtype = str(save.get("dtype", "float16"))
    if dtype not in DTYPES:
        conv.refuse(_join(path, "dtype"), f"{dtype!r}: LoRA files are written in float32, float16 or bfloat16")
    else:
        conv.set("checkpoint.lora_dtype", DTYPES[dtype], _join(path, "dtype"))
    conv.set("checkpoint.every_n_steps", save.get("save_every") or 10**9, _join(path, "save_every"))
    conv.set("checkpoint.keep_last", save.get("max_step_saves_to_keep", 5), _join(path, "max_step_saves_to_keep"))


def _datasets(conv: Conversion, datasets: Any, path: str) -> None:
    if not isinstance(datasets, list) or not datasets:
        conv.refuse(path, "expected a list of at least one dataset folder")
        return
    for i, dataset in enumerate(datasets):
        where = _join(path, i)
        _walk(conv, dataset, SECTIONS["dataset"], where, index=i)
        if not isinstance(dataset, dict):
            continue
        folder = dataset.get("folder_path") or dataset.get("dataset_path")
        if not folder:
            conv.refuse(_join(where, "folder_path"), "each dataset needs its image folder")
        conv.set(f"data.datasets.{i}.folder", folder, _join(where, "folder_path"))
        sizes = dataset.get("resolution", 512)
        conv.set(f"data.datasets.{i}.resolutions", sizes if isinstance(sizes, list) else [sizes],
                 _join(where, "resolution"))
        ext = dataset.get("caption_type") or dataset.get("caption_ext", ".txt")
        conv.set(f"data.datasets.{i}.caption_ext", ext, _join(where, "caption_ext"))
        # ai-toolkit trains an image without a caption on "" (plus the trigger word).
        conv.set(f"data.datasets.{i}.default_caption", dataset.get("default_caption") or "",
                 _join(where, "default_caption"))
        if dataset.get("shuffle_tokens") and dataset.get("keep_tokens"):
            conv.note(_join(where, "keep_tokens"), "the first keep_tokens tags stay in place while the rest are "
                      "shuffled (kohya's meaning; ai-toolkit shuffles them too)")
        trigger = dataset.get("trigger_word")
        if trigger and trigger != conv.recipe.get("data", {}).get("trigger_word", trigger):
            conv.refuse(_join(where, "trigger_word"), "one trigger word per run here; set it on the process")
        elif trigger:
            conv.set("data.trigger_word", trigger, _join(where, "trigger_word"))


def _train(conv: Conversion, train: dict[str, Any], path: str, arch: str) -> None:
    _walk(conv, train, SECTIONS["train"], path)
    steps = int(train.get("steps", 1000))
    accumulation = int(train.get("gradient_accumulation", 1))
    legacy = int(train.get("gradient_accumulation_steps", 1))
    if accumulation != 1 and legacy != 1:
        conv.refuse(_join(path, "gradient_accumulation_steps"), "give gradient_accumulation or it, not both")
    if legacy != 1:  # ai-toolkit's legacy key counts every micro-batch as a step
        conv.note(_join(path, "gradient_accumulation_steps"), f"{steps} micro-batch steps are "
                  f"{-(-steps // legacy)} optimizer steps of {legacy} micro-batches")
        steps, accumulation = -(-steps // legacy), legacy
    conv.set("train.max_steps", steps, _join(path, "steps"))
    conv.set("train.gradient_accumulation_steps", accumulation, _join(path, "gradient_accumulation"))
    conv.set("data.micro_batch_size", int(train.get("batch_size", 1)), _join(path, "batch_size"))
    conv.set("train.gradient_checkpointing", bool(train.get("gradient_checkpointing", True)),
             _join(path, "gradient_checkpointing"))
    dtype = str(train.get("dtype", "fp32"))
    if dtype not in DTYPES:
        conv.refuse(_join(path, "dtype"), f"{dtype!r}: train in float32, float16 or bfloat16")
    else:
        conv.set("model.dtype", DTYPES[dtype], _join(path, "dtype"))
    _optimizer(conv, train, path)
    _lr_schedule(conv, train, path)
    timestep = train.get("timestep_type")
    if timestep is not None:
        if timestep not in TIMESTEP_TYPES:
            conv.refuse(_join(path, "timestep_type"), f"{timestep!r} is not drawn here; use one of "
                        f"{sorted(TIMESTEP_TYPES)}")
        else:
            conv.set("train.timestep_sampling", TIMESTEP_TYPES[timestep], _join(path, "timestep_type"))
    scheduler = train.get("noise_scheduler", "ddpm")
    if scheduler not in ("ddpm", "flowmatch"):
        conv.refuse(_join(path, "noise_scheduler"), f"{scheduler!r}: training uses the model's own schedule")
    ema = train.get("ema_config") or {}
    if not isinstance(ema, dict) or set(ema) - {"use_ema", "ema_decay"}:
        conv.refuse(_join(path, "ema_config"), "expected {use_ema, ema_decay}")
    elif ema.get("use_ema"):
        conv.set("train.ema_decay", _number(conv, ema.get("ema_decay", 0.999), _join(path, "ema_config.ema_decay")),
                 _join(path, "ema_config"))


def _optimizer(conv: Conversion, train: dict[str, Any], path: str) -> None:
    name = str(train.get("optimizer", "adamw")).lower()
    native = next((n for prefix, n in OPTIMIZERS
                   if name == prefix or (prefix == "prodigy" and name.startswith(prefix))), None)
    if native is None:
        conv.refuse(_join(path, "optimizer"), f"{name!r} is not offered here; use adamw, adamw8bit, prodigy, "
                    "adafactor, lion or came")
        return
    conv.set("train.optimizer", native, _join(path, "optimizer"))
    lr = _number(conv, train.get("lr", 1e-6), _join(path, "lr"))
    if native == "prodigy" and lr is not None and lr < 0.1:
        conv.note(_join(path, "lr"), f"{lr} < 0.1: prodigy runs at lr 1.0, as in ai-toolkit")
        lr = 1.0
    conv.set("train.lr", lr, _join(path, "lr"))
    params = dict(train.get("optimizer_params") or {})
    if "weight_decay" in params:
        conv.set("train.weight_decay", _number(conv, params.pop("weight_decay"), _join(path, "optimizer_params")),
                 _join(path, "optimizer_params.weight_decay"))
    elif native in ("adamw", "adamw8bit"):  # torch's and bitsandbytes' default, which ai-toolkit keeps
        conv.set("train.weight_decay", 0.01, _join(path, "optimizer"))
    if "betas" in params:
        conv.set("train.betas", list(params.pop("betas")), _join(path, "optimizer_params.betas"))
    if native in ("adamw", "adamw8bit", "prodigy"):
        params.setdefault("eps", 1e-6)  # ai-toolkit's fixed eps for these
    args = {key: (_number(conv, v, _join(path, f"optimizer_params.{key}")) if isinstance(v, str) else v)
            for key, v in params.items()}
    if args:
        conv.set("train.optimizer_args", args, _join(path, "optimizer_params"))


def _lr_schedule(conv: Conversion, train: dict[str, Any], path: str) -> None:
    name = train.get("lr_scheduler", "constant")
    params = dict(train.get("lr_scheduler_params") or {})
    where = _join(path, "lr_scheduler")
    if name == "constant" and params.get("factor", 1.0) == 1.0:
        native, used = "constant", {"factor", "total_iters"}
    elif name in ("cosine", "cosine_with_restarts") and params.get("eta_min", 0) == 0 and "T_0" not in params:
        native, used = "cosine", {"eta_min", "total_iters", "T_max"}  # one wave over train.steps: torch's = diffusers'
    elif name == "linear" and params.get("start_factor") == 1.0 and params.get("end_factor") == 0.0:
        native, used = "linear", {"start_factor", "end_factor", "total_iters"}
    elif name == "constant_with_warmup":
        native, used = "constant_with_warmup", {"num_warmup_steps"}
        conv.set("train.lr_warmup_steps", int(params.get("num_warmup_steps", 1000)), where)
    else:
        conv.refuse(where, f"{name!r} with {params or 'its default parameters'} has no equal here (torch's "
                    "`linear` default rises from lr/3); use constant, cosine, constant_with_warmup, or linear "
                    "with start_factor 1.0 and end_factor 0.0")
        return
    if set(params) - used:
        conv.refuse(_join(path, "lr_scheduler_params"), f"{sorted(set(params) - used)} are not used by {name} here")
    conv.set("train.lr_scheduler", native, where)


def _sample(conv: Conversion, sample: Any, path: str, trigger: str | None) -> None:
    if not sample:
        return
    _walk(conv, sample, SECTIONS["sample"], path)
    prompts = [p if isinstance(p, str) else p.get("prompt", "") for p in (sample.get("samples") or [])] or list(
        sample.get("prompts") or [])
    if trigger:  # ai-toolkit fills [trigger] in sample prompts, and prepends nothing
        prompts = [p.replace("[trigger]", trigger) for p in prompts]
    if not prompts or not sample.get("sample_every", 100):
        return
    conv.set("sample.prompts", prompts, _join(path, "prompts"))
    conv.set("sample.every_n_steps", int(sample.get("sample_every", 100)), _join(path, "sample_every"))
    width, height = int(sample.get("width", 512)), int(sample.get("height", 512))
    if width != height:
        conv.note(_join(path, "width"), f"{width}x{height}: sample grids here are square, {max(width, height)} px")
    conv.set("sample.resolution", max(width, height) // 16 * 16, _join(path, "width"))


def render_recipe(conv: Conversion, source: str) -> str:
    """The native recipe as YAML, each mapped field commented with the job key it came from and
    the notes at the end; `load_recipe` reads it back as the same recipe."""
    import yaml

    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

    lines = [f"# The native recipe of ai-toolkit job {source}; `# ←` names the job key each field comes from."]

    def emit(node: dict[str, Any], path: str, indent: str, first_prefix: str | None = None) -> None:
        for n, (key, value) in enumerate(node.items()):
            lead = indent if first_prefix is None or n else first_prefix
            dotted = f"{path}.{key}" if path else key
            origin = conv.sources.get(dotted)
            comment = f"  # ← {origin}" if origin else ""
            if isinstance(value, dict):
                lines.append(f"{lead}{key}:{comment}")
                emit(value, dotted, indent + "  ")
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                lines.append(f"{lead}{key}:{comment}")
                for i, item in enumerate(value):
                    emit(item, f"{dotted}.{i}", indent + "    ", first_prefix=indent + "  - ")
            else:
                lines.append(f"{lead}{key}: {scalar(value)}{comment}")

    emit(conv.recipe, "", "")
    lines += ["", "# Accepted without a meaning here:", *(f"#   {note}" for note in conv.notes)] if conv.notes else []
    return "\n".join(lines) + "\n"
