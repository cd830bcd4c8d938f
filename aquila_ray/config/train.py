"""The training run config: one ``TrainConfig`` per pretraining stage (``aquila_ray.train.run_training``).

Typed dataclasses with a docstring per field, checked in ``__post_init__`` (STYLE.md rule 3). Everything the
Ray Train workers need travels in this config (no globals on workers, rule 9). YAML is a thin overlay:

.. code-block:: yaml

    model: tiny                 # a preset name, or {preset: tiny, hidden_size: 96, ...}, or every field
    data_dir: /data/tokens
    steps: 200
    global_batch_tokens: 8192   # fixed; gradient accumulation adapts to the number of workers
    micro_batch_size: 8
    optimizer: {lr: 3.0e-3, weight_decay: 0.1, grad_clip: 1.0}
    schedule: {kind: cosine, warmup_steps: 20, min_lr_ratio: 0.1}
    checkpoint: {every: 50, num_to_keep: 2}
    scaling: {num_workers: 2, min_workers: 1, zero_stage: 1}

Checks that need the data or the init checkpoint (shards present, seq_len, vocabulary) run in the driver in
``aquila_ray.train.validate`` before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aquila_ray.config.base import preset_field, resolve
from aquila_ray.config.model import ModelConfig
from aquila_ray.config.presets import get_preset
from aquila_ray.errors import ConfigError

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def _check_positive_int(owner: str, **values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{owner}.{name}={v!r} must be a positive integer")


@dataclass
class OptimizerConfig:
    """AdamW (torch's, handed to DeepSpeed) and gradient clipping."""

    lr: float = 1e-3
    """Peak learning rate (the seed's table: 1.2e-3 for 7B, 4e-4 for 16B, 1.5e-4 for 8x16B)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices and embeddings; norms and biases get none."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"OptimizerConfig.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"OptimizerConfig.weight_decay={self.weight_decay} must be >= 0")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"OptimizerConfig.{name}={v} must lie in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"OptimizerConfig.eps={self.eps} must be > 0")
        if self.grad_clip < 0:
            raise ConfigError(f"OptimizerConfig.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine decay or constant."""

    kind: Literal["cosine", "constant"] = "cosine"
    """Shape after warmup."""
    warmup_steps: int = 0
    """Linear warmup from lr / warmup_steps to lr over this many steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio at ``decay_steps``."""
    decay_steps: int | None = None
    """Step at which the cosine ends; None means the run's ``steps``."""

    def __post_init__(self) -> None:
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"ScheduleConfig.warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"ScheduleConfig.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.decay_steps is not None:
            _check_positive_int("ScheduleConfig", decay_steps=self.decay_steps)


@dataclass
class CheckpointingConfig:
    """When training checkpoints are registered with Ray Train and how many are kept."""

    every: int = 50
    """Register a checkpoint every N optimizer steps (and always after the last step)."""
    num_to_keep: int | None = 2
    """Ray Train keeps this many registered checkpoints (None: all)."""
    export_every: int | None = None
    """Also write the model checkpoint (config.json + safetensors, what ``load_model`` opens) into every
    N-th step's training checkpoint; None: only into the last one. Training checkpoints are sharded (one
    file per rank) and resume without it."""
    max_shard_bytes: int = 2 * 1024**3
    """Split the model checkpoint's safetensors files above this size."""
    state_file_bytes: int = 256 * 1024**2
    """Each rank writes its training state in files of about this size (object-store-friendly pieces that
    upload and download in parallel). The files are streamed, so this does not change a save's memory."""
    async_upload: bool = True
    """Upload each rank's files to the storage path in the background (Ray Train's
    ``checkpoint_upload_mode=ASYNC``) while training goes on; the step that checkpoints then only waits for
    the local write. The last checkpoint (with the model export) is always uploaded before the run ends."""

    def __post_init__(self) -> None:
        _check_positive_int("CheckpointingConfig", every=self.every, max_shard_bytes=self.max_shard_bytes,
                            state_file_bytes=self.state_file_bytes)
        if self.export_every is not None:
            _check_positive_int("CheckpointingConfig", export_every=self.export_every)
        if self.num_to_keep is not None:
            _check_positive_int("CheckpointingConfig", num_to_keep=self.num_to_keep)


@dataclass
class WandbConfig:
    """Weights & Biases logging from rank 0 (offline unless WANDB_MODE or WANDB_API_KEY says otherwise)."""

    enabled: bool = True
    """Log to W&B at all."""
    project: str = "aquila-ray"
    """W&B project."""
    group: str | None = None
    """W&B group (the EfficientScale pipeline puts its stages in one group)."""
    entity: str | None = None
    """W&B entity (team); None: the API key's default."""
    mode: Literal["online", "offline", "disabled"] | None = None
    """None: WANDB_MODE if set, else online when WANDB_API_KEY is set, else offline."""


@dataclass
class ScalingOptions:
    """Workers, resources and parallelism (turned into Ray's ScalingConfig and the DeepSpeed config)."""

    num_workers: int = 1
    """Ray Train workers (one GPU each with use_gpu); the most the run asks for."""
    min_workers: int | None = None
    """Elastic lower bound: ScalingConfig(num_workers=(min_workers, num_workers)); None: fixed size."""
    use_gpu: bool = False
    """One GPU per worker, bf16 autocast in DeepSpeed; CPU workers train in fp32."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per worker (also torch's intra-op threads on CPU workers)."""
    zero_stage: Literal[0, 1, 2] = 1
    """DeepSpeed ZeRO stage: 1 partitions optimizer state, 2 also gradients."""
    expert_parallel: int = 1
    """Expert-parallel group size for MoE models; divides num_experts and every allowed worker count."""
    max_failures: int = 3
    """Worker-group restarts (from the last registered checkpoint) before the run fails."""

    def __post_init__(self) -> None:
        _check_positive_int("ScalingOptions", num_workers=self.num_workers, cpus_per_worker=self.cpus_per_worker,
                            expert_parallel=self.expert_parallel)
        if self.min_workers is not None:
            _check_positive_int("ScalingOptions", min_workers=self.min_workers)
            if self.min_workers > self.num_workers:
                raise ConfigError(f"ScalingOptions.min_workers={self.min_workers} exceeds num_workers="
                                  f"{self.num_workers}; valid: 1 <= min_workers <= num_workers")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"ScalingOptions.zero_stage={self.zero_stage!r} is not valid; choose 0, 1 or 2")
        if self.use_gpu and self.zero_stage == 0:
            raise ConfigError("ScalingOptions.zero_stage=0 with use_gpu=true is not valid: bf16 gradients are "
                              "accumulated in fp32 only by DeepSpeed's ZeRO optimizers; choose 1 or 2")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError(f"ScalingOptions.max_failures={self.max_failures!r} must be an integer >= 0 "
                              f"(-1: unlimited)")

    def worker_counts(self) -> list[int]:
        """Every worker count the run may train at."""
        return list(range(self.min_workers or self.num_workers, self.num_workers + 1))


@dataclass
class TrainConfig:
    """One training run (one EfficientScale stage): model, data, batch, optimizer, schedule, workers."""

    model: ModelConfig = preset_field(get_preset, "tiny")
    """The model shape (dense or MoE). In YAML: a preset name, {preset: NAME, field: value...}, or all fields."""
    data_dir: str = ""
    """A prepared data directory (manifest.json + tokens/{train,validation}/*.arrow): a local path or a URI
    that pyarrow opens (s3://bucket/data, gs://..., file://...)."""
    data_cache_bytes: int = 1 << 30
    """Bytes of token-shard record batches each data reader (train, validation) keeps between steps: an LRU
    drops the least recently used batch beyond this. Memory-mapped batches count their full size."""
    data_shuffle_window: int = 0
    """0: each epoch is one keyed permutation of all train sequences. N > 0: windows of N consecutive
    sequences come in a keyed order and rows within each window in another, so a step reads few record
    batches (for object storage, where a row costs its whole batch; keep N * (seq_len + 1) * 4 bytes below
    data_cache_bytes). Changing it changes the sample order, like the seed."""
    init: Literal["scratch", "checkpoint", "upcycle"] = "scratch"
    """scratch: seeded random init; checkpoint: weights from ``init_from`` (same shape); upcycle: the MoE
    model is built online from the dense checkpoint ``init_from`` (each expert-parallel rank its experts)."""
    init_from: str | None = None
    """Checkpoint directory for init=checkpoint|upcycle. Only used on a fresh start: a resumed run always
    continues from its own last registered checkpoint."""
    steps: int = 100
    """Optimizer steps of this run."""
    global_batch_tokens: int = 16 * 128
    """Tokens per optimizer step over all workers; a multiple of seq_len (fixed whatever the worker count)."""
    micro_batch_size: int = 8
    """Sequences per worker per forward/backward; gradient accumulation = per-worker batch / this."""
    seed: int = 0
    """Seeds the model init, the data order (a permutation per epoch) and the router init."""
    data_start: int = 0
    """Position in the sample stream where a fresh run starts (a resumed run continues from its own): a
    continued-pretraining stage passes the previous stage's end so the token stream continues, not replays."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and clipping."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    checkpoint: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    """Checkpoint frequency and retention."""
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    """Workers and parallelism."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B logging."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them: "full" keeps one hidden-size tensor per
    layer (the 16B stages at 4k context need it on 80 GB GPUs); "selective" recomputes each block's MLP half
    (its activations are ~4F of the block's ~6D + 4F + attention per token). Same numbers; the --dry-run
    memory plan uses this setting."""
    eval_every: int = 0
    """Validation loss on the held-out split every N steps (0: only after the last step; -1: never)."""
    eval_max_sequences: int | None = 64
    """Validation sequences per evaluation (None: the whole split, within ``eval_tokens``)."""
    eval_tokens: int | None = 10_000_000
    """Token budget of one validation pass (None: no budget): at most this many tokens' sequences are read,
    whatever ``eval_max_sequences`` and the split's size, so an evaluation's cost stays bounded at scale."""
    eval_tasks: str | None = None
    """Multiple-choice tasks (JSONL, local path or URI; "sample": the bundled cloze task) scored by the workers
    after the last step, sharded over the ranks, with the data's tokenizer. None: none."""
    log_every: int = 1
    """Console line every N steps (metrics.jsonl and W&B get every step)."""
    peak_flops_per_worker: float | None = None
    """Peak FLOP/s of one worker's device, for MFU; None: 989e12 (H100 bf16 dense) on GPU, 1e12 on CPU."""
    deterministic: bool = True
    """torch.use_deterministic_algorithms (warn only) and fixed seeds: kill/resume gives bit-identical
    weights at the same worker count."""
    fault_injection: str | None = None
    """Testing only: "RANK@STEP" makes that rank SIGKILL its own process, once, when it reaches STEP (after
    a 2 s pause so the checkpoint reported before is registered; a marker file in the run directory keeps
    it from firing again after the restart)."""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = get_preset(self.model)
        _check_positive_int("TrainConfig", data_cache_bytes=self.data_cache_bytes)
        window = self.data_shuffle_window
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise ConfigError(f"TrainConfig.data_shuffle_window={window!r} must be an integer >= 0 (0: one "
                              f"permutation of all sequences per epoch)")
        if not isinstance(self.data_start, int) or self.data_start < 0:
            raise ConfigError(f"TrainConfig.data_start={self.data_start!r} must be an integer >= 0")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(f"TrainConfig.activation_checkpointing={self.activation_checkpointing!r} is not valid; "
                              f"choose one of {list(ACTIVATION_CHECKPOINTING)}")
        _check_positive_int("TrainConfig", steps=self.steps, global_batch_tokens=self.global_batch_tokens,
                            micro_batch_size=self.micro_batch_size, log_every=self.log_every)
        if self.init != "scratch" and not self.init_from:
            raise ConfigError(f"TrainConfig.init={self.init!r} needs init_from=CHECKPOINT_DIR")
        if self.init == "upcycle" and self.model.moe is None:
            raise ConfigError("TrainConfig.init='upcycle' needs an MoE model (model.moe set); the dense "
                              "checkpoint in init_from is upcycled into it")
        if not isinstance(self.eval_every, int) or self.eval_every < -1:
            raise ConfigError(f"TrainConfig.eval_every={self.eval_every!r} must be an integer >= -1")
        if self.eval_max_sequences is not None:
            _check_positive_int("TrainConfig", eval_max_sequences=self.eval_max_sequences)
        if self.eval_tokens is not None:
            _check_positive_int("TrainConfig", eval_tokens=self.eval_tokens)
        if self.eval_tasks not in (None, "sample") and "://" not in str(self.eval_tasks) \
                and not Path(str(self.eval_tasks)).is_file():
            raise ConfigError(f"TrainConfig.eval_tasks={self.eval_tasks!r} is not a file; valid: a JSONL task file "
                              f"(local path or URI), \"sample\" (the bundled cloze task) or None")
        if self.peak_flops_per_worker is not None and not self.peak_flops_per_worker > 0:
            raise ConfigError(f"TrainConfig.peak_flops_per_worker={self.peak_flops_per_worker} must be > 0")
        moe = self.model.moe
        ep = self.scaling.expert_parallel
        if moe is None and ep != 1:
            raise ConfigError(f"ScalingOptions.expert_parallel={ep} needs an MoE model; dense models use 1")
        if moe is not None and moe.num_experts % ep:
            raise ConfigError(f"ScalingOptions.expert_parallel={ep} does not divide model.moe.num_experts="
                              f"{moe.num_experts}; valid: a divisor of {moe.num_experts}")
        bad_ep = [w for w in self.scaling.worker_counts() if w % ep]
        if bad_ep:
            raise ConfigError(f"ScalingOptions.expert_parallel={ep} does not divide the worker count(s) {bad_ep}; "
                              f"every allowed worker count (min_workers..num_workers) must be a multiple of it")
        if self.fault_injection is not None:
            parts = self.fault_injection.split("@")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ConfigError(f"TrainConfig.fault_injection={self.fault_injection!r} must look like "
                                  f"RANK@STEP (e.g. 1@5)")

    def eval_sequences(self, seq_len: int, available: int) -> int:
        """How many validation sequences one evaluation reads: ``eval_max_sequences`` and the ``eval_tokens``
        budget (sequences of ``seq_len`` predicted tokens), within the ``available`` ones."""
        n = min(self.eval_max_sequences or available, available)
        return max(1, min(n, self.eval_tokens // seq_len)) if self.eval_tokens is not None else n

    def batch_sequences(self, seq_len: int) -> int:
        """Global batch in sequences; raises a ConfigError unless it divides into every worker count."""
        if self.global_batch_tokens % seq_len:
            raise ConfigError(f"TrainConfig.global_batch_tokens={self.global_batch_tokens} is not a multiple of the "
                              f"data's seq_len={seq_len}; valid: k * {seq_len}, e.g. "
                              f"{max(1, self.global_batch_tokens // seq_len) * seq_len}")
        batch = self.global_batch_tokens // seq_len
        for w in self.scaling.worker_counts():
            if batch % (w * self.micro_batch_size):
                raise ConfigError(
                    f"TrainConfig.global_batch_tokens={self.global_batch_tokens} ({batch} sequences of {seq_len}) "
                    f"is not divisible by num_workers={w} x micro_batch_size={self.micro_batch_size}; valid: a "
                    f"batch of k * {w * self.micro_batch_size} sequences for every allowed worker count "
                    f"{self.scaling.worker_counts()}")
        return batch


def build_train_config(overlay: dict[str, Any] | str | Path | None = None,
                       overrides: list[str] | None = None) -> TrainConfig:
    """``resolve(TrainConfig, ...)``: the defaults <- a YAML/JSON file or mapping <- ``a.b=value`` overrides.
    ``model`` may be a preset name or ``{preset: NAME, field: value}``; ``--set model=tiny-moe`` works too."""
    return resolve(TrainConfig, None, overlay, overrides)
