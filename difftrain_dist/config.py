"""The typed recipe schema: one source of truth for every setting of a training run.

A recipe is a YAML file whose sections map onto :class:`Recipe`. Unknown keys are errors that name
the key and where it is; ``--set section.field=value`` overrides any field before validation.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names every offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunSection(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: names the checkpoint folder and the LoRA file; reuse it to resume."""
    seed: int = 0
    """Seed for LoRA initialisation, data order and noise sampling."""
    output_dir: Path = Path("outputs")
    """Folder that receives `<name>.safetensors` at the end of the run."""
    storage_path: Path = Path("runs")
    """Folder holding `<name>/checkpoint_<step>/`; shared storage on multi-node clusters."""


class ModelSection(_Section):
    arch: Literal["sd15"] = "sd15"
    """Model architecture; picks the adapter from the registry."""
    path: str
    """Local diffusers folder or Hugging Face hub id, loaded with `from_pretrained`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base weights on GPU (CPU runs always use float32)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override of the scheduler's prediction type; None keeps the model's own."""

    @field_validator("path")
    @classmethod
    def _path_exists_or_hub_id(cls, value: str) -> str:
        if Path(value).expanduser().is_dir() or (HUB_ID.match(value) and not Path(value).exists()):
            return value
        raise ValueError(f"no diffusers model folder at {value!r} (and it is not a hub id 'org/name')")


class LoraSection(_Section):
    rank: int = Field(16, ge=1)
    """LoRA rank r (inner dimension of lora_A / lora_B)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / rank."""
    target_modules: list[str] | None = None
    """Module names that receive LoRA; None uses the architecture's default attention projections."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability on the LoRA input."""


class DataSection(_Section):
    shards: Path
    """Folder holding `index.json` and `shard-*.tar` written by `difftrain-dist shards build`."""
    resolution: int = Field(512, ge=64, multiple_of=8)
    """Training resolution in pixels (square side); must match the shards."""
    micro_batch_size: int = Field(1, ge=1)
    """Samples per rank per forward pass."""
    loader_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0 decodes in the training process)."""

    @field_validator("shards")
    @classmethod
    def _index_exists(cls, value: Path) -> Path:
        if not (value.expanduser() / "index.json").is_file():
            raise ValueError(f"no index.json in {str(value)!r}; build shards with `difftrain-dist shards build`")
        return value


class TrainSection(_Section):
    max_steps: int = Field(ge=1)
    """Optimizer steps to train for."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    optimizer: Literal["adamw"] = "adamw"
    """Optimizer for the LoRA parameters."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps before the constant learning rate."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping norm; None disables clipping."""
    log_every_n_steps: int = Field(1, ge=1)
    """How often rank 0 reports loss and throughput."""


class DistributedSection(_Section):
    num_workers: int = Field(1, ge=1)
    """Training processes (one per GPU when use_gpu)."""
    use_gpu: bool = False
    """Train on CUDA GPUs (NCCL) instead of CPUs (gloo)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each training worker."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray may make inside one job (-1: unlimited)."""
    address: str | None = None
    """Ray cluster address; None starts an embedded local cluster (or uses RAY_ADDRESS)."""


class CheckpointSection(_Section):
    every_n_steps: int = Field(500, ge=1)
    """Save a checkpoint every this many optimizer steps (and always at the last step)."""
    keep_last: int | None = Field(3, ge=1)
    """Checkpoints kept; None keeps all. The newest valid one is never removed."""


class Recipe(_Section):
    """A whole training run. Load with :func:`load_recipe`."""

    run: RunSection
    model: ModelSection
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection
    distributed: DistributedSection = DistributedSection()
    checkpoint: CheckpointSection = CheckpointSection()

    @model_validator(mode="after")
    def _cpu_runs_in_fp32(self) -> Recipe:
        if not self.distributed.use_gpu and self.model.dtype != "float32":
            raise ValueError("model.dtype: CPU runs train in float32; set distributed.use_gpu=true for bfloat16")
        return self

    @property
    def run_dir(self) -> Path:
        """`storage_path / run.name`, where this run's checkpoints live."""
        return self.run.storage_path / self.run.name

    def recipe_hash(self) -> str:
        """sha256 (hex) of the fields that must not change on resume (model, LoRA shape, seed, data)."""
        frozen = {
            "seed": self.run.seed,
            "model": self.model.model_dump(mode="json"),
            "lora": self.lora.model_dump(mode="json"),
            "shards": str(self.data.shards),
            "resolution": self.data.resolution,
            "micro_batch_size": self.data.micro_batch_size,
        }
        return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides to a raw recipe dict (values parsed as YAML scalars).

    Raises:
        RecipeError: an override without `=` or whose path crosses a non-mapping value.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text else None
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        else:
            found = e.get("input")
            shown = "" if isinstance(found, dict) else f" (found {found!r})"
            lines.append(f"  {where}: {e['msg']}{shown}")
    return "\n".join(lines)


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Validate a raw mapping into a :class:`Recipe`, resolving paths to absolute ones.

    Raises:
        RecipeError: listing every invalid, missing or unknown field with its dotted path.
    """
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None
    return _absolute_paths(recipe)


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides and validate it.

    Relative paths in the recipe are taken relative to the current directory.

    Raises:
        RecipeError: the file is missing, is not a YAML mapping, or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of sections (run, model, data, train, ...)")
    return recipe_from_dict(apply_overrides(raw, overrides or []), source=str(path))


def _absolute_paths(recipe: Recipe) -> Recipe:
    recipe.run.output_dir = recipe.run.output_dir.expanduser().resolve()
    recipe.run.storage_path = recipe.run.storage_path.expanduser().resolve()
    recipe.data.shards = recipe.data.shards.expanduser().resolve()
    local = Path(recipe.model.path).expanduser()
    if local.is_dir():
        recipe.model.path = str(local.resolve())
    return recipe
