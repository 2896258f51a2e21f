"""The typed recipe schema: one source of truth for every setting of a training run.

A recipe is a YAML file whose sections map onto :class:`Recipe`. Unknown keys are errors that name
the key and where it is; ``--set section.field=value`` overrides any field before validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from difftrain_dist.distrib.optimizers import (
    LR_SCHEDULERS,
    OPTIMIZER_NAMES,
    OPTIMIZERS,
    check_optimizer,
    optimizer_kwargs,
    stages_for,
    why_not_stage,
)
from difftrain_dist.models.families import FAMILIES, FAMILY_NAMES, names_where

from .common import Section, checks_paths
from .data import DataSection, read_index

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _folder_problem(path: Path) -> str | None:
    """Why the folder `path` cannot be created or written, or None when it can. Creates nothing:
    an existing `path` must be a writable folder; otherwise its nearest existing ancestor must be
    a writable folder (`os.access` W_OK | X_OK, which also sees read-only mounts) and no ancestor
    a file or a broken link. What access(2) cannot see (e.g. creating folders inside /proc) still
    fails later, when the folder is made."""
    path = Path(os.path.abspath(path.expanduser()))
    target = path
    while not os.path.exists(target):  # False for a path under a file, or one stat() may not see
        if os.path.islink(target):
            return f"{target} is a broken symbolic link"
        if target.parent == target:
            return f"{target} does not exist"
        target = target.parent
    if not os.path.isdir(target):
        return f"{target} is a file, not a folder" + ("" if target == path else f", so {path} cannot be created")
    if not os.access(target, os.W_OK | os.X_OK):
        return (f"{target} is not writable" if target == path
                else f"cannot create {path}: {target} is not writable")
    return None


class RunSection(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: names the checkpoint folder and the LoRA file; reuse it to resume."""
    seed: int = Field(0, ge=0, lt=2**63)
    """Seed for LoRA initialisation, data order and noise sampling."""
    output_dir: Path = Path("outputs")
    """Folder that receives `<name>.safetensors` at the end of the run (created if missing; it,
    or its nearest existing parent, must be a writable folder when the recipe loads)."""
    storage_path: Path = Path("runs")
    """Folder holding `<name>/checkpoint_<step>/`; shared storage on multi-node clusters (checked
    writable when the recipe loads, like output_dir)."""

    @field_validator("output_dir", "storage_path")
    @classmethod
    def _writable_folder(cls, value: Path, info: ValidationInfo) -> Path:
        if checks_paths(info) and (problem := _folder_problem(value)):
            raise ValueError(problem)
        return value


ARCHS = FAMILY_NAMES
DDPM_ARCHS = tuple(names_where(objective="ddpm"))
TEXT_ENCODER_LORA_ARCHS = tuple(names_where(text_encoder_lora=True))
OPTIONAL_T5_ARCHS = tuple(names_where(optional_t5=True))


class ModelSection(Section):
    arch: Literal[ARCHS] = ARCHS[0]  # type: ignore[valid-type]
    """Model architecture, a name in the table of families (models/families.py: sd15, sdxl, sd3,
    flux — FLUX.1 dev or schnell); picks the adapter."""
    path: str
    """Local diffusers folder or Hugging Face hub id, loaded with `from_pretrained`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base weights on GPU (CPU runs always use float32)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override of the scheduler's prediction type (sd15, sdxl); None keeps the model's own."""
    use_t5: bool = True
    """sd3 only: load the T5 text encoder (text_encoder_3); false trains without it (zeros)."""

    @model_validator(mode="after")
    def _arch_options(self) -> ModelSection:
        if self.prediction_type is not None and self.arch not in DDPM_ARCHS:
            raise ValueError(f"prediction_type applies to {list(DDPM_ARCHS)}; {self.arch} is a flow-matching model")
        if not self.use_t5 and self.arch not in OPTIONAL_T5_ARCHS:
            raise ValueError(f"use_t5: false is only for {list(OPTIONAL_T5_ARCHS)} (T5 is optional there); "
                             f"{self.arch} needs its encoders")
        return self

    @model_validator(mode="after")
    def _arch_of_the_model(self, info: ValidationInfo) -> ModelSection:
        index = Path(self.path).expanduser() / "model_index.json"
        if not checks_paths(info) or not index.is_file():
            return self
        try:
            pipeline = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return self  # loading the model says what is wrong with the file
        found = next((f.name for f in FAMILIES.values() if f.pipeline_class_name == pipeline), None)
        if found is not None and found != self.arch:
            raise ValueError(f"arch: {self.arch}, but the model at {self.path} is a {pipeline} ({found}); "
                             f"set model.arch: {found}")
        return self

    @field_validator("path")
    @classmethod
    def _path_exists_or_hub_id(cls, value: str, info: ValidationInfo) -> str:
        if not checks_paths(info):
            return value
        local = Path(value).expanduser()
        if local.is_dir():
            if not (local / "model_index.json").is_file():
                raise ValueError(f"{value!r} is a folder but not a diffusers model (no model_index.json)")
            return value
        if HUB_ID.match(value) and not Path(value.split("/")[0]).exists():
            return value
        raise ValueError(f"no diffusers model folder at {value!r} (and it is not a hub id 'org/name')")


class LoraSection(Section):
    rank: int = Field(16, ge=1)
    """LoRA rank r (inner dimension of lora_A / lora_B)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / rank."""
    target_modules: list[str] | None = Field(None, min_length=1)
    """Module names that receive LoRA; None uses the architecture's default attention projections."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability on the LoRA input."""
    train_text_encoder: bool = False
    """Also train a LoRA on the text encoder(s) (sd15, sdxl), with the same rank and alpha."""
    text_encoder_target_modules: list[str] | None = Field(None, min_length=1)
    """Text-encoder modules that receive LoRA; None uses CLIP's q/k/v/out projections."""


class TrainSection(Section):
    max_steps: int = Field(ge=1)
    """Optimizer steps to train for."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    optimizer: Literal[OPTIMIZER_NAMES] = "adamw"
    """Optimizer for the LoRA parameters: adamw (torch), adamw8bit (bitsandbytes), lion
    (lion-pytorch), prodigy (prodigyopt), adafactor (transformers), came (came-pytorch); which
    ZeRO stages each runs under: distrib/optimizers.py and the README."""
    optimizer_args: dict[str, Any] = {}
    """More keyword arguments of the optimizer's constructor (e.g. prodigy's `d_coef`), checked
    against its signature when the recipe loads."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled in AdamW, Lion and Prodigy)."""
    betas: tuple[float, float] | None = None
    """The optimizer's pair of betas, each in [0, 1); None keeps its own (AdamW 0.9, 0.999)."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant_with_warmup"
    """Learning-rate schedule (diffusers' `get_scheduler`): constant, constant_with_warmup,
    linear, cosine, cosine_with_restarts or polynomial, each after `lr_warmup_steps`."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps over which the lr rises linearly from 0 to `lr`."""
    lr_num_cycles: int = Field(1, ge=1)
    """cosine_with_restarts: the number of hard restarts."""
    lr_power: float = Field(1.0, gt=0)
    """polynomial: the decay's exponent (1: linear)."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an exponential moving average of the LoRA weights with this decay (ai-toolkit's
    `ema_config.ema_decay`, e.g. 0.99); LoRA files and samples then hold the average. None: no EMA."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping norm; None disables clipping."""
    log_every_n_steps: int = Field(1, ge=1)
    """How often rank 0 reports loss and throughput."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    timestep_sampling: Literal["uniform", "logit_normal", "sigmoid"] = "uniform"
    """How training timesteps are drawn: uniform, or sigmoid of a normal (SD3 paper's
    logit-normal; kohya calls it "sigmoid"; the two names are the same distribution)."""
    logit_mean: float = 0.0
    """Mean of the normal for logit_normal/sigmoid sampling."""
    logit_std: float = Field(1.0, gt=0)
    """Standard deviation for logit_normal/sigmoid sampling (kohya's sigmoid_scale)."""
    flow_shift: float | None = Field(None, gt=0)
    """sd3/flux: fixed timestep shift; None uses the model scheduler's (SD3: 3.0; FLUX.1-dev: by
    resolution, as kohya's flux_shift). 1.0 gives diffusers' FLUX script's unshifted sigmas."""
    guidance_scale: float = Field(1.0, ge=0)
    """flux dev: the guidance-embedding input during training (1.0, as ai-toolkit and diffusers'
    FLUX LoRA example use)."""


class DistributedSection(Section):
    num_workers: int = Field(1, ge=1)
    """Training processes (one per GPU when use_gpu)."""
    use_gpu: bool = False
    """Train on CUDA GPUs (NCCL) instead of CPUs (gloo)."""
    zero_stage: Literal[0, 1, 2, 3] | None = None
    """DeepSpeed ZeRO stage; None: 1, or 0 for optimizers whose statistics span tensors (prodigy,
    adafactor, came: see distrib/optimizers.py). 1 (optimizer state partitioned, gradients reduced
    once per step) is the fastest for LoRA; 2 adds per-parameter gradient hooks that cost more than
    LoRA's few MB of gradients save; 3 also partitions the frozen base weights (models too big for
    one GPU)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each training worker."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray may make inside one job (-1: unlimited)."""
    address: str | None = None
    """Ray cluster address; None starts an embedded local cluster (or uses RAY_ADDRESS)."""


class CheckpointSection(Section):
    every_n_steps: int = Field(500, ge=1)
    """Save a checkpoint every this many optimizer steps (and always at the last step)."""
    keep_last: int | None = Field(3, ge=1)
    """Checkpoints kept; None keeps all. The newest valid one is never removed."""
    lora_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of the tensors in the LoRA files (ai-toolkit's `save.dtype`); training and the
    checkpoints' optimizer state stay float32."""


class SampleSection(Section):
    every_n_steps: int | None = Field(None, ge=1)
    """Render `prompts` every this many optimizer steps (rank 0, in-memory LoRA); None: never."""
    prompts: list[str] = []
    """Prompts of the sample grid, one image each."""
    seed: int = Field(0, ge=0, lt=2**63)
    """Seed of the initial noise: the same at every step, so grids compare across steps."""
    num_inference_steps: int = Field(20, ge=1)
    """Denoising steps of the model's own scheduler."""
    guidance_scale: float | None = Field(None, ge=0)
    """Guidance scale; None uses the architecture's usual value (sd15 7.5, sdxl 5, sd3 7, flux 3.5)."""
    resolution: int | None = Field(None, ge=64, multiple_of=16)
    """Side of the square samples in px; None uses data.resolution."""

    @model_validator(mode="after")
    def _prompts_when_enabled(self) -> SampleSection:
        if self.every_n_steps is not None and not self.prompts:
            raise ValueError("every_n_steps is set but prompts is empty; give at least one prompt")
        return self


class LoggingSection(Section):
    wandb: bool = False
    """Also send each step's metrics to Weights & Biases from rank 0 (ai-toolkit's `use_wandb`).
    Needs WANDB_API_KEY in the environment (or .env), or WANDB_MODE=offline, which writes the run
    under `RUN/wandb/` without network (upload later with `wandb sync`)."""
    wandb_project: str = "difftrain-dist"
    """The W&B project (ai-toolkit's `project_name`)."""
    wandb_entity: str | None = None
    """The W&B team or user; None: the API key's default entity."""


class Recipe(Section):
    """A whole training run. Load with :func:`load_recipe`."""

    run: RunSection
    model: ModelSection
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = CheckpointSection()
    sample: SampleSection = SampleSection()
    logging: LoggingSection = LoggingSection()
    _identity: dict[str, Any] | None = PrivateAttr(None)
    """`resume_identity`, read on first use (fields are final once `recipe_from_dict` returns)."""

    @model_validator(mode="after")
    def _optimizer_fits_stage(self, info: ValidationInfo) -> Recipe:
        train, distributed = self.train, self.distributed
        if distributed.zero_stage is None:
            distributed.__dict__["zero_stage"] = 1 if 1 in stages_for(train.optimizer) else 0
        reason = why_not_stage(train.optimizer, distributed.zero_stage)
        if reason:
            raise ValueError(f"train.optimizer: {reason}")
        if not checks_paths(info):  # the optimizer's package is where the run starts, not on a submit host
            return self
        if train.betas is None and not train.optimizer_args:  # lr and weight_decay are checked above
            try:
                OPTIMIZERS[train.optimizer].check_installed()
            except ValueError as err:
                raise ValueError(f"train.optimizer: {train.optimizer} {err}") from None
        else:
            check_optimizer(train.optimizer, optimizer_kwargs(train.optimizer, train.lr, train.weight_decay,
                                                               train.betas, train.optimizer_args))
        return self

    @model_validator(mode="after")
    def _cpu_runs_in_fp32(self) -> Recipe:
        if not self.distributed.use_gpu and self.model.dtype != "float32":
            raise ValueError("model.dtype: CPU runs train in float32; set distributed.use_gpu=true for bfloat16")
        return self

    @model_validator(mode="after")
    def _arch_fits_options(self) -> Recipe:
        arch = self.model.arch
        if self.lora.train_text_encoder and arch not in TEXT_ENCODER_LORA_ARCHS:
            raise ValueError(f"lora.train_text_encoder: supported for {list(TEXT_ENCODER_LORA_ARCHS)}, not {arch}")
        if self.lora.train_text_encoder and self.distributed.zero_stage == 3:
            raise ValueError("lora.train_text_encoder needs distributed.zero_stage 0-2: CLIP reads its position "
                             "table's shape outside the forward hooks that ZeRO-3 gathers weights in")
        if self.lora.text_encoder_target_modules and not self.lora.train_text_encoder:
            raise ValueError("lora.text_encoder_target_modules is set but lora.train_text_encoder is false")
        if self.train.ema_decay is not None and self.distributed.zero_stage == 3:
            raise ValueError("train.ema_decay needs distributed.zero_stage 0-2: under ZeRO-3 each rank holds a "
                             "slice of the LoRA weights, and the average is kept of whole weights")
        if self.train.flow_shift is not None and arch in DDPM_ARCHS:
            raise ValueError(f"train.flow_shift applies to flow-matching models "
                             f"({', '.join(names_where(objective='flow_matching'))}), not {arch}")
        return self

    @property
    def run_dir(self) -> Path:
        """`storage_path / run.name`, where this run's checkpoints live."""
        return self.run.storage_path / self.run.name

    def resume_identity(self) -> dict[str, Any]:
        """What must not change for a run to continue from its checkpoints: seed, model, LoRA shape
        and data. Folders count by their contents (model configs, shard checksums), not their paths,
        so moving a model or shards folder keeps the run resumable. Computed once per recipe (it
        reads the model's configs and the shard index); a copy is returned."""
        if self._identity is None:
            self._identity = self._read_identity()
        return dict(self._identity)

    def _read_identity(self) -> dict[str, Any]:
        return {
            "run.seed": self.run.seed,
            "model.arch": self.model.arch,
            "model.path": _model_identity(self.model.path),
            "model.prediction_type": self.model.prediction_type,
            "model.use_t5": self.model.use_t5,
            "lora": self.lora.model_dump(mode="json"),
            "data.shards": _shards_identity(self.data.shards),
            "data.micro_batch_size": self.data.micro_batch_size,
        }

    def forget_identity(self) -> None:
        """Read `resume_identity` again on next use (after `data.shards` was set from `data.datasets`)."""
        self._identity = None

    def recipe_hash(self) -> str:
        """sha256 (hex) of :meth:`resume_identity`."""
        return hashlib.sha256(json.dumps(self.resume_identity(), sort_keys=True).encode()).hexdigest()


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the resume-identity fields that differ between two :meth:`Recipe.resume_identity`."""
    return [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _digest_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _model_identity(path: str) -> str:
    local = Path(path)
    if not local.is_dir():
        return path  # hub id
    return "configs:" + _digest_files(sorted([local / "model_index.json", *local.glob("*/config.json")]))


def _shards_identity(folder: Path) -> str:
    """The shards' checksums, or the folder's path where it cannot be read here (a cluster path)."""
    try:
        shards = read_index(Path(folder)).shards
    except ValueError:
        return str(folder)
    return "shards:" + hashlib.sha256(json.dumps([s.sha256 for s in shards]).encode()).hexdigest()
