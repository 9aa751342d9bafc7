"""Run configuration: model + data + train + mesh, as frozen keyword-only dataclasses filled from YAML.

YAML layout (see ``configs/train_tiny.yaml``)::

    model: {preset: tiny, ...ModelConfig fields}
    data: {...DataConfig fields}
    train: {...TrainConfig fields}
    mesh: {data: 1, expert: 1}
    pipeline: {schedule: none, stages: 1, micro_batches: 0}   # optional: pipeline parallelism

``--set section.field=value`` overrides (values parsed as YAML scalars) apply before the dataclasses are built,
so every override is validated like the file itself.
"""

from __future__ import annotations

import dataclasses
import os

import yaml

from dsjax.config import ConfigError, ModelConfig
from dsjax.layers.common import LAYER_LOOPS, REMAT_POLICIES
from dsjax.layers.mla import ATTENTION_IMPLS
from dsjax.layers.moe import DISPATCH_IMPLS
from dsjax.yaml_config import model_config_from_dict, model_config_to_dict


def _check(cond: bool, field: str, msg: str):
    if not cond:
        raise ConfigError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and loss settings (defaults follow DeepSeek-V3 §4.2 where they apply).

    lambda (``mtp_lambda``) weights the MTP loss, alpha (``balance_alpha``) the sequence-wise balance loss,
    gamma (``bias_gamma``) is the bias update speed of auxiliary-loss-free balancing (0 turns it off).
    """

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    compute_dtype: str = "float32"  # bf16 on accelerators; fp32 is faster on CPU
    moment_dtype: str = "float32"
    remat: str = "none"
    layers: str = "auto"  # how the layer stacks are looped: scan, unroll, or auto (unroll up to 8 layers)
    dispatch: str = "auto"
    # auto: the dense form on CPU; splash attention (Pallas) on TPU; flash attention in XLA on GPU.
    attention: str = "auto"
    # > 0: the output head and cross-entropy run this many sequence positions at a time (all rows at once), so
    # the logits are never materialised whole.
    loss_chunk: int = 0
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    max_nonfinite_run: int = 5
    # Stop cleanly (checkpoint, exit code 75) at the first step ending this many seconds after the start; 0 = no
    # limit. For jobs with a time limit: leave room for one step and a checkpoint save.
    max_runtime_s: float = 0.0
    max_doc_tokens: int = 0  # leave out (and count) longer documents; 0 = keep all (packing splits them losslessly)
    # Record a CRC-32 of every checkpoint file at save and verify it at restore: catches flipped bytes that orbax
    # would restore silently. Costs one read-back of the whole checkpoint by process 0 per save (in the background,
    # delaying the commit) and one read per restore (shared by the processes), at ~1.5-2 GB/s: seconds for small
    # models, minutes for hundreds of GB, where turning it off may be the better trade.
    checkpoint_checksums: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints", "log_every"):
            _check(getattr(self, name) > 0, f"train.{name}", "must be positive")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must lie in [0, 1]")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "train.b1/b2", "must lie in [0, 1)")
        _check(self.grad_clip > 0, "train.grad_clip", "must be positive")
        for name in ("mtp_lambda", "balance_alpha", "bias_gamma", "weight_decay"):
            _check(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
        for name in ("compute_dtype", "moment_dtype"):
            _check(getattr(self, name) in ("float32", "bfloat16"), f"train.{name}", "float32 or bfloat16")
        _check(self.remat in REMAT_POLICIES, "train.remat", f"one of {REMAT_POLICIES}")
        _check(self.layers in LAYER_LOOPS, "train.layers", f"one of {LAYER_LOOPS}")
        _check(self.dispatch in DISPATCH_IMPLS, "train.dispatch", f"one of {DISPATCH_IMPLS}")
        _check(self.attention in ATTENTION_IMPLS, "train.attention", f"one of {ATTENTION_IMPLS}")
        _check(isinstance(self.loss_chunk, int) and self.loss_chunk >= 0, "train.loss_chunk", "an int >= 0")
        _check(self.max_nonfinite_run > 0, "train.max_nonfinite_run", "must be positive")
        _check(self.max_runtime_s >= 0, "train.max_runtime_s", "must be >= 0 (0 = no limit)")
        _check(self.max_doc_tokens >= 0, "train.max_doc_tokens", "must be >= 0 (0 = no limit)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where documents come from and how they are prepared."""

    # "default" = the embedded corpus, a path to a .txt/.jsonl file of documents, or "repo:<path>" for source code
    # ordered by imports (a directory = one repository, or a .jsonl of repositories; see dsjax.data.repo)
    corpus: str = "default"
    tokenizer: str = "byte"  # "byte" or a path to an HF tokenizer.json
    fim_rate: float = 0.1  # DeepSeek-V3: 0.1, DeepSeek-Coder: 0.5
    fim_spm_rate: float = 0.0  # share of FIM documents in SPM layout (0 = PSM only)
    num_docs: int = 4000
    # Stop with an error before training when more than this share of the corpus's documents is left out (corrupt,
    # empty, non-UTF-8, too long, bad ids). Schema or encoding mistakes (a {"content": ...} field, ids for another
    # vocabulary) leave out nearly everything; ordinary dirt or a deliberate train.max_doc_tokens filter stays well
    # below half. 1 = never stop (the count is still logged).
    max_skipped_fraction: float = 0.5

    def __post_init__(self):
        _check(0 <= self.fim_rate <= 1, "data.fim_rate", "must lie in [0, 1]")
        _check(0 <= self.fim_spm_rate <= 1, "data.fim_spm_rate", "must lie in [0, 1]")
        _check(0 <= self.max_skipped_fraction <= 1, "data.max_skipped_fraction", "must lie in [0, 1]")
        _check(self.num_docs > 0, "data.num_docs", "must be positive")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh: ``data`` x ``expert`` devices; ``fsdp`` also shards the weights along ``embed`` over
    ``data`` (see :data:`dsjax.sharding.FSDP_RULES`)."""

    data: int = 1
    expert: int = 1
    fsdp: bool = False

    def __post_init__(self):
        _check(self.data > 0 and self.expert > 0, "mesh", "axis sizes must be positive")


PIPELINE_SCHEDULES = ("none", "1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Pipeline parallelism (`dsjax.pipeline`): ``schedule`` (``none`` = off, ``1f1b``, ``zb1p``, ``dualpipe``,
    ``dualpipev``) over ``stages`` devices (a ``stage`` mesh axis in front of ``data`` x ``expert``), the batch
    split into ``micro_batches``. The model is cut into ``stages`` pieces (DualPipeV: ``2 * stages``, two per
    device in a V), each a contiguous run of MoE layers: their number must be a multiple of the pieces."""

    schedule: str = "none"
    stages: int = 1
    micro_batches: int = 0

    def __post_init__(self):
        _check(self.schedule in PIPELINE_SCHEDULES, "pipeline.schedule", f"one of {PIPELINE_SCHEDULES}")
        _check(self.stages >= 1, "pipeline.stages", "must be >= 1")
        _check(self.micro_batches >= 0, "pipeline.micro_batches", "must be >= 0")
        if self.schedule != "none":
            _check(self.micro_batches >= 1, "pipeline.micro_batches", f"must be >= 1 with schedule {self.schedule}")

    @property
    def enabled(self) -> bool:
        return self.schedule != "none"

    def make_schedule(self):
        """The `dsjax.pipeline.Schedule` (``ConfigError`` when the generator refuses the counts)."""
        from dsjax.pipeline import GENERATORS

        try:
            return GENERATORS[self.schedule](self.stages, self.micro_batches)
        except ValueError as e:
            raise ConfigError(f"pipeline: {e}") from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    pipeline: PipelineConfig = PipelineConfig()

    def __post_init__(self):
        _check(
            self.train.batch_size % (self.mesh.data * self.mesh.expert) == 0,
            "train.batch_size",
            f"{self.train.batch_size} is not divisible by the {self.mesh.data}x{self.mesh.expert} mesh",
        )
        _check(
            self.train.seq_len <= self.model.max_position_embeddings,
            "train.seq_len",
            f"exceeds model.max_position_embeddings={self.model.max_position_embeddings}",
        )
        _check(
            not self.model.fp8_weights,
            "model.fp8_weights",
            "E4M3-stored weights are for inference; train float master weights (model.fp8 runs the FP8 GEMMs)",
        )
        _check(
            self.model.fp8 is None or self.train.dispatch != "dense",
            "train.dispatch",
            "'dense' has no FP8 form; use auto, blocked, ragged or ep with model.fp8",
        )
        if self.pipeline.enabled:
            self._check_pipeline()

    def _check_pipeline(self):
        pp, tc = self.pipeline, self.train
        schedule = pp.make_schedule()  # the generator's own rules: even counts, micro_batches >= 2 * stages, ...
        _check(
            tc.batch_size % pp.micro_batches == 0,
            "pipeline.micro_batches",
            f"train.batch_size={tc.batch_size} does not split into {pp.micro_batches} micro-batches",
        )
        rows, shards = tc.batch_size // pp.micro_batches, self.mesh.data * self.mesh.expert
        _check(
            rows % shards == 0,
            "pipeline.micro_batches",
            f"micro-batches of {rows} rows do not split over the {self.mesh.data}x{self.mesh.expert} mesh",
        )
        layers = self.model.num_moe_layers or self.model.first_k_dense_replace
        _check(
            layers % schedule.stages == 0 and layers >= schedule.stages,
            "pipeline.stages",
            f"the model's {layers} {'MoE' if self.model.num_moe_layers else 'dense'} layers do not split evenly into "
            f"{schedule.stages} pipeline stages ({pp.schedule} over {pp.stages} devices); change "
            "model.num_hidden_layers",
        )


def _coerce(section: str, field: dataclasses.Field, value):
    # YAML 1.1 reads "1e-4" (no dot) as a string; numbers are converted by the field's declared type.
    kind = {"float": float, "int": int, "bool": bool}.get(str(field.type))
    if kind is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    if kind is float and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{section}.{field.name}: expected {kind.__name__}, got {value!r}")


def _build(cls, section: str, values: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{section}: unknown fields {sorted(unknown)}")
    return cls(**{k: _coerce(section, fields[k], v) for k, v in values.items()})


def run_config_from_dict(d: dict) -> RunConfig:
    unknown = set(d) - {"model", "data", "train", "mesh", "pipeline"}
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)} (expected model, data, train, mesh, pipeline)")
    model = dict(d.get("model") or {})
    preset = model.pop("preset", None)
    return RunConfig(
        model=model_config_from_dict({"preset": preset, "model": model} if preset else {"model": model}),
        data=_build(DataConfig, "data", d.get("data") or {}),
        train=_build(TrainConfig, "train", d.get("train") or {}),
        mesh=_build(MeshConfig, "mesh", d.get("mesh") or {}),
        pipeline=_build(PipelineConfig, "pipeline", d.get("pipeline") or {}),
    )


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` strings to a nested dict (values parsed as YAML scalars)."""
    d = {k: dict(v or {}) for k, v in d.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        d.setdefault(section, {})[field] = yaml.safe_load(value)
    return d


def load_run_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a run YAML (or start from defaults with the tiny model when ``path`` is None) and apply overrides."""
    d: dict = {"model": {"preset": "tiny"}}
    if path is not None:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return run_config_from_dict(apply_overrides(d, list(overrides)))


def run_config_to_dict(cfg: RunConfig) -> dict:
    """Plain dict of every field (for writing next to checkpoints and for logs)."""
    return {
        "model": model_config_to_dict(cfg.model)["model"],
        "data": dataclasses.asdict(cfg.data),
        "train": dataclasses.asdict(cfg.train),
        "mesh": dataclasses.asdict(cfg.mesh),
        "pipeline": dataclasses.asdict(cfg.pipeline),
    }
