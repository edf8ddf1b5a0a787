"""The one typed configuration tree of a run.

Hydra composes YAML (``conf/`` groups + a ``recipes/`` file + command-line overrides) at the entry
point only; :func:`nemodiff_train.config.load.to_config` validates the result against these
dataclasses (unknown keys and wrong types fail naming the key) and :func:`validate` rejects
impossible values. Nothing below ``cli/`` sees a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "Config", "RunConfig", "ModelConfig", "DiffusionConfig", "DataConfig", "StageConfig", "OptimConfig",
    "ScheduleConfig", "EngineConfig", "CheckpointConfig", "LoggingConfig", "WandbConfig", "ExportConfig",
    "EvalAtEndConfig", "AdapterConfig", "DistillConfig", "STAGE_KINDS",
]

STAGE_KINDS = ("pretrain", "sft", "distill")


@dataclass
class RunConfig:
    """Where the run goes and what seeds it."""

    dir: Optional[str] = None  # default: runs/<recipe>-<time> (shared by all ranks)
    name: Optional[str] = None  # the recipe name by default
    seed: int = 0


@dataclass
class ModelConfig:
    """The AR checkpoint to convert and how to make it a DLM."""

    path: str = "embedded"  # an HF directory; "embedded" = the tiny model shipped in the package
    hub_id: Optional[str] = None  # documentation of where real recipes' weights come from
    revision: Optional[str] = None  # Hub branch, tag or commit of a Hub model.path (a pinned download; recorded)
    mask_token_id: Optional[int] = None  # a reserved id (NLD: 100); None = use/add mask_token
    mask_token: str = "<|mask|>"
    untie_head: bool = True
    dtype: str = "float32"  # torch engine: the COMPUTE dtype (float32 | bfloat16); master weights are float32
    attn_implementation: Optional[str] = None  # sdpa (CPU default) | flex_attention (CUDA default)
    gradient_checkpointing: bool = False


@dataclass
class AdapterConfig:
    """Full conversion (``none``) or a drafter LoRA on a frozen base (``lora``; docs/adapters.md).

    With ``lora`` every base weight stays as loaded (bit for bit); only the LoRA pairs on
    ``target_modules`` (last name components of the decoder's linear layers) and the mask token's
    input embedding row train. The drafter is on for the noisy half of the training row and for
    draft / denoise passes at inference, off everywhere else. ``model.untie_head`` is ignored then (the
    frozen base keeps its head as it is).
    """

    name: str = "none"  # none | lora
    rank: int = 16
    alpha: float = 32.0  # the LoRA delta is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DiffusionConfig:
    """The method's knobs (docs/method.md)."""

    block_size: int = 64  # training block
    inference_block_size: int = 32
    pattern: str = "two_stream"
    schedule: str = "uniform"  # uniform | position_dependent
    eps: float = 1e-3
    half_life_ratio: float = 0.25
    # never mask a block's first token: at inference it is always clean (the AR seed); docs/method.md
    keep_block_start: bool = False
    # probability that a block is masked whole: the state every draft starts from (docs/method.md)
    full_block_fraction: float = 0.0
    alpha: float = 0.3  # diffusion loss weight
    beta: float = 1.0  # AR loss weight
    loss_chunk_size: int = 2048
    # Soft-target terms (docs/method.md, "Soft-target terms"; 0 = off): each a per-position mean over the
    # optimizer step, added to the joint loss with this weight.
    drafter_kl: float = 0.0  # KL(detached AR view || diffusion view) on masked positions: trains acceptance
    certainty: float = 0.0  # entropy of the diffusion view where it is already right (per masked position)
    certainty_temperature: float = 1.0
    teacher_kl: float = 0.0  # KL(frozen base || clean stream) on supervised AR targets (one teacher forward)


@dataclass
class DistillConfig:
    """A ``distill`` stage's teacher and decoding (docs/distill.md): its answers to the prompts become SFT rows."""

    teacher: str = "base"  # base (the untouched model.path) | current (the model being trained, AR mode)
    prompt_field: Optional[str] = None  # a prompt column; null = messages_field's turns up to the last user turn
    max_new_tokens: int = 256  # answers that reach this without a stop token are left out (counted)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0  # prompt n samples with seed + n
    batch_size: int = 32  # prompts per decoder batch (and per resumable chunk)
    max_prompts: Optional[int] = None  # per source; null = all
    device: str = "cpu"  # where teacher=base runs (float32): cpu | cuda

    def problems(self, engine: str = "torch") -> list[tuple[str, str]]:
        """``(key, message)`` of every impossible value (keys relative to ``data.distill``) under ``engine``."""
        checks = [
            (self.teacher in ("base", "current"), "teacher", f"{self.teacher!r} is not one of ['base', 'current']"),
            (self.teacher != "current" or engine == "torch", "teacher",
             "current (the model being trained answers) needs engine=torch; use teacher=base with engine=megatron"),
            (self.prompt_field is None or bool(self.prompt_field), "prompt_field", "must be a field name or null"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.seed >= 0, "seed", "must be >= 0"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1 (or null)"),
            (self.device in ("cpu", "cuda"), "device", f"{self.device!r} is not one of ['cpu', 'cuda']"),
        ]
        return [(key, msg) for ok, key, msg in checks if not ok]


@dataclass
class DataConfig:
    """One stage's data: raw sources, prepared (tokenized, packed, memory-mapped) on first use."""

    kind: str = "pretrain"  # pretrain | sft | distill
    sources: list[str] = field(default_factory=list)  # path-or-hub-name[:weight]
    val_sources: list[str] = field(default_factory=list)
    text_field: str = "text"
    messages_field: str = "messages"
    seq_len: int = 256
    val_fraction: float = 0.01
    num_proc: int = 1
    pack: bool = True
    prepared_dir: Optional[str] = None  # default: <run.dir>/data/<stage name>
    max_documents: Optional[int] = None
    max_bad_fraction: Optional[float] = None  # stop when a source has more bad rows than this (None: skip them)
    distill: DistillConfig = field(default_factory=DistillConfig)  # kind=distill: the teacher answers the prompts


@dataclass
class StageConfig:
    """A training stage; stages run one after the other on the same model (global step counts on)."""

    name: str = "pretrain"
    kind: str = "pretrain"  # pretrain (joint AR + diffusion CPT) | sft | distill (SFT on a teacher's answers)
    steps: int = 100
    data: DataConfig = field(default_factory=DataConfig)
    lr: Optional[float] = None  # overrides optim.lr for this stage
    global_batch_size: int = 8  # sequences per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int = 4  # sequences per forward per rank


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    name: str = "wsd"  # wsd | cosine | constant
    warmup_fraction: float = 0.01
    decay_fraction: float = 0.2  # wsd: share of the stage spent decaying to min_lr


@dataclass
class EngineConfig:
    name: str = "torch"  # torch | megatron
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 if model.dtype=bfloat16 or on CUDA, else fp32) | fp32 | bf16
    distributed: Optional[str] = "ddp"  # ddp | fsdp2 (torch engine; conf/engine/megatron.yaml sets null)
    compile: bool = False  # not supported: true is rejected at validation
    dist_timeout_s: float = 1800.0  # process-group time-out of every collective (init_process_group)
    main_work_timeout_s: float = 21600.0  # torch: how long ranks wait for one rank's data prep / download / export
    # torch: compute only the positions the loss reads and those they attend to (exact; sdpa / eager
    # attention): noisy blocks without a masked token, SFT prompts' among them, leave the forward
    skip_unmasked_blocks: bool = True
    # megatron engine
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    recompute: Optional[str] = None  # null | selective | full
    transformer_impl: str = "auto"  # auto (TE when installed) | local | transformer_engine
    megatron_checkpoint_format: str = "torch_dist"
    megatron_attention: str = "auto"  # auto (flex on CUDA, SDPA fallback) | flex | sdpa
    stage_index: Optional[int] = None  # megatron: which stage this job trains (one stage per job)
    init_from: str = "hf"  # megatron: hf (the model's weights) | random (Megatron's initialisation, model.path: a config)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (also written at the end and on SIGTERM/SIGUSR1)
    keep_last: int = 3
    resume: bool = True


@dataclass
class WandbConfig:
    project: Optional[str] = None  # set to enable W&B
    entity: Optional[str] = None
    name: Optional[str] = None
    mode: str = "online"  # online | offline | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every: int = 10
    progress_bar: bool = True
    val_every: int = 100
    val_batches: int = 4
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ExportConfig:
    at_end: bool = False
    dtype: str = "float32"
    remote_code: bool = False
    merge: bool = False  # adapter=lora: also write <run.dir>/hf_merged, the adapter folded in (diffusion-only)
    push_to_hub: Optional[str] = None
    private: bool = True


@dataclass
class EvalSweepConfig:
    """TPF-versus-accuracy curve points: each is one more ``eval.json`` row (nemodiff-eval's ``sweep``)."""

    threshold: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.95])
    """Diffusion re-run at each τ (when ``diffusion`` is among the modes); [] = off."""
    block_size: list[int] = field(default_factory=list)
    """linear_spec and quadratic_spec (those among the modes) re-run at each block size; [] = off."""
    commit_rule: list[str] = field(default_factory=list)
    """Diffusion re-run under each of these commit rules (``confident``, ``prefix``, ``prefix_ar``) other
    than the main one: the method's rule beside the one a recipe decodes with; [] = off."""
    tasks: list[str] = field(default_factory=list)
    """The tasks swept (names as given in ``task``); [] = every task. A task without parallel
    headroom (code_completion on the embedded model) gives a curve of one point at many costs."""


def _modes(reference: bool) -> list[str]:
    """The decoder registry's modes (with or without AR, the reference), read when a config is built:
    importing the decoders (torch) here would make ``import nemodiff_train.config`` heavy."""
    from ..decoding.modes import ALL_MODES, REFERENCE_MODE

    return [m for m in ALL_MODES if reference or m != REFERENCE_MODE]


@dataclass
class EvalProbeConfig:
    """TPF during training (nemodiff_train.eval.training_probe): decode a few held-out prompts at
    every validation and log per-mode TPF, accuracy and lossless fraction."""

    samples: int = 0  # prompts per validation; 0 = off
    task: str = "code_completion"
    modes: list[str] = field(default_factory=lambda: _modes(reference=False))  # every mode but AR
    max_new_tokens: int = 64
    block_size: Optional[int] = None  # None = the model's inference block size
    threshold: float = 0.9
    commit_rule: str = "confident"  # block diffusion: confident (the method's), prefix or prefix_ar


@dataclass
class EvalAtEndConfig:
    at_end: bool = False
    modes: list[str] = field(default_factory=lambda: _modes(reference=True))  # every mode
    task: Any = "code_completion"  # a task name / .jsonl path, or a list of them
    limit: Any = None  # rows per task: an int for every task, or {task: n} for the tasks it names
    max_new_tokens: int = 64
    block_size: Optional[int] = None
    threshold: float = 0.9
    commit_rule: str = "confident"  # block diffusion: confident (the method's), prefix or prefix_ar (docs/decoding.md)
    batch_size: int = 1  # prompts per decoder call (nemodiff-eval batch_size)
    compare_base: bool = False  # also decode the untouched base (model.path) in AR mode: the table's `base` row
    sweep: EvalSweepConfig = field(default_factory=EvalSweepConfig)
    probe: EvalProbeConfig = field(default_factory=EvalProbeConfig)


@dataclass
class Config:
    recipe: Optional[str] = None
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalAtEndConfig = field(default_factory=EvalAtEndConfig)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)
