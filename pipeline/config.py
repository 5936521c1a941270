"""The experiment config: one typed tree shared by every subcommand.

A YAML file plus dotted overrides (``--set train.lr=3e-4``) become an ``ExperimentConfig``.
Unknown keys are errors with a "did you mean" hint; every failure is a ``UserError``.
"""

from __future__ import annotations

import argparse
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_prep.atomic import write_text
from pipeline.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class SyntheticConfig(Section):
    """The built-in long-range books (see data_prep/synthetic.py for their structure)."""

    seed: int = 0
    """Seed of the generator: the same seed gives byte-identical books."""
    words_per_book: int = Field(6000, ge=200)
    """Approximate length of one book in words."""
    facts_per_book: int = Field(12, ge=1)
    """Facts ("the key of Mara is in the cellar") introduced over one book."""
    min_recall_distance_segments: int = Field(4, ge=1)
    """A recall token counts (recall_mask=1) only when the fact's previous mention lies this many
    segments earlier in the same sample."""
    active_facts: int = Field(2, ge=1)
    """Facts in play at the same time; their mentions interleave so most samples hold a recall."""
    places: int = Field(24, ge=2, le=24)
    """Distinct places a fact can name: a model without memory guesses a recall at 1 in this many."""
    scene_share: float = Field(0.0, ge=0.0, le=1.0)
    """Share of filler sentences set at the place of the fact mentioned last ("Mara waited near the
    barn"): the story's current scene, repeated between mentions. Every occurrence of a place is a
    recall candidate, so a nonzero share gives memory a strong, frequent signal to learn from."""


class BabilongDataConfig(Section):
    """``data.source: babilong:qa1[,qa2,...]``: bAbI questions whose facts are scattered through background
    text (see data_prep/babilong.py)."""

    background: str = "filler"
    """Background text: `filler` (built-in neutral sentences), or any book source (folder, .jsonl, .parquet, hf:ID)."""
    facts: str | None = None
    """Story source: unset = memtrain's own bAbI generator; `hf:facebook/babi_qa` or a local .jsonl in its schema."""
    lengths: list[int] = [1, 2, 4]
    """Sample lengths in segments; every sample is exactly n x data.segment_len tokens, question and answer at its end."""
    train_samples: int = Field(2000, ge=1)
    """Train samples per length."""
    val_samples: int = Field(100, ge=0)
    """Validation samples per length."""
    test_samples: int = Field(100, ge=0)
    """Test samples per length."""
    loss: Literal["answer", "lm+answer"] = "answer"
    """Training targets: the answer tokens only, or every token (language modelling plus the answer)."""
    min_facts: int = Field(2, ge=1)
    """Fewest story sentences before the question (own generator)."""
    max_facts: int = Field(10, ge=1)
    """Most story sentences before the question (own generator)."""
    filler_books: int = Field(8, ge=1)
    """Books of built-in filler per split (background `filler`)."""

    @field_validator("lengths")
    @classmethod
    def _lengths_valid(cls, lengths: list[int]) -> list[int]:
        if not lengths or any(n < 1 for n in lengths) or len(set(lengths)) != len(lengths):
            raise ValueError("data.babilong.lengths needs distinct segment counts >= 1")
        return sorted(lengths)


class DataConfig(Section):
    source: str = "synthetic:200"
    """synthetic:N, a folder of .txt/.txt.gz books, a .jsonl or .parquet file, hf:ID[:split], or babilong:qa1[,...]."""
    output_dir: str = "runs/demo/data"
    text_field: str = "text"
    """Field holding the book text in JSONL/Parquet/hf records."""
    hf_streaming: bool = False
    """An hf: source (and an hf: data.babilong.facts): false = downloaded once into the HF cache (HF_HOME;
    shared by every prep pass and array task); true = streamed, no disk copy, but read in full by every
    pass and every array task."""
    segment_len: int = Field(128, ge=8)
    n_segments: int = Field(8, ge=1)
    tail: Literal["drop", "pad"] = "drop"
    """A book's last partial sample: dropped, or padded with loss_mask 0."""
    workers: int = Field(1, ge=1)
    """Worker processes that read, clean and tokenize; the output is identical for any value."""
    tokenizer: str | None = None
    """An HF tokenizer folder to use; unset = train SentencePiece on the corpus."""
    vocab_size: int = Field(4000, ge=64)
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    tokenizer_sample_sentences: int = Field(2_000_000, ge=1000)
    """Lines SentencePiece samples (seeded) from the corpus to train on."""
    tokenizer_threads: int = Field(4, ge=1)
    """SentencePiece training threads; part of the tokenizer's identity (another value can give
    another vocabulary), so it is not tied to data.workers."""
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    samples_per_shard: int = Field(1024, ge=1)
    """Target samples per shard file (estimated before tokenizing; shards end at a book boundary)."""
    seed: int = 0
    """Seed of the train/val/test split (a stable hash of each book id)."""
    plan_wait_s: float = Field(21600, ge=0)
    """Array tasks other than 0 wait this long for task 0's plan.json (book list and tokenizer)."""
    synthetic: SyntheticConfig = SyntheticConfig()
    babilong: BabilongDataConfig = BabilongDataConfig()

    @property
    def sample_len(self) -> int:
        return self.segment_len * self.n_segments

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction:g} "
                             "leaves no books to train on; keep the sum below 1")
        return self


class LoraSettings(Section):
    """``model.lora``: fine-tune ``model.pretrained`` through PEFT LoRA adapters (the base decoder's weights stay
    frozen; the memory parameters always train)."""

    rank: int = Field(8, ge=1)
    """LoRA rank r of every adapted layer."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha: the adapter's update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input."""
    target_modules: list[str] = Field(min_length=1)
    """Names of the decoder's layers to adapt (the last part of a module name: c_attn, q_proj, v_proj, ...)."""

    @field_validator("target_modules")
    @classmethod
    def _names_distinct(cls, names: list[str]) -> list[str]:
        if any(not name.strip() for name in names) or len(set(names)) != len(names):
            raise ValueError(f"model.lora.target_modules needs distinct, non-empty module names, got {names}")
        return names


class ModelConfig(Section):
    """The base decoder: a local HF folder (``pretrained``) or a random init of ``arch``."""

    arch: Literal["gpt2", "llama", "gpt_neox", "qwen2", "mistral"] = "gpt2"
    pretrained: str | None = None
    """A local Hugging Face causal-LM folder to start from (its config.json, not model.hidden_size etc., sets the sizes)."""
    lora: LoraSettings | None = None
    """Fine-tune model.pretrained through LoRA adapters ({rank, alpha, dropout, target_modules}); unset: train every weight."""
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int | None = None
    max_positions: int = Field(1024, ge=16)
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout of a randomly initialised decoder (residual, embedding and attention)."""
    layer_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (HF activation checkpointing, non-reentrant)."""
    segment_checkpointing: bool = True
    """Recompute each segment in the backward pass: activation memory stays flat as n_segments grows."""
    checkpoint_policy: Literal["full", "save_matmuls"] = "full"
    """What segment checkpointing recomputes. ``full``: the whole segment (activation memory flat in
    n_segments). ``save_matmuls``: torch's selective checkpointing keeps the outputs of the matmuls
    and attention (most of a segment's FLOPs) and recomputes only the pointwise ops: a cheaper
    backward, and activation memory that grows with n_segments by those outputs."""

    @model_validator(mode="after")
    def _lora_needs_a_base(self) -> "ModelConfig":
        if self.lora is not None and not self.pretrained:
            raise ValueError("model.lora fine-tunes a pretrained decoder: set model.pretrained to its local folder")
        return self


class MemoryConfig(Section):
    kind: Literal["rmt", "armt", "none", "full"] = "rmt"
    """rmt: read/write memory tokens; armt: per-layer associative memory; none: same segments, no
    memory; full: one attention pass over the whole sample (needs sample_len <= max_positions)."""
    num_tokens: int = Field(8, ge=0)
    """Memory tokens per segment (rmt spends 2x this many positions, armt 1x)."""
    bptt_depth: int = Field(-1, ge=-1)
    """Segment k's loss reaches segment j's inputs through memory iff k - j <= bptt_depth; -1 = no limit.
    0 < depth < n_segments - 1 costs up to (depth + 1)x compute (exact per-pair truncation)."""
    write: Literal["paper", "norm", "gated"] = "norm"
    """rmt: how the output at the write positions becomes the next read memory. norm: RMS-normalised
    times a learned gain that starts at the embedding std (memory enters at a token's scale); paper: as
    is, the final post-norm hidden state (~sqrt(hidden_size) per row, Bulatov et al.); gated: a learned
    per-channel keep-or-replace of the normed write. norm is the default by measurement on real text
    (README, "Memory on real text")."""
    armt_nu: int = Field(3, ge=1)
    """Order of ARMT's DPFP feature map (keys have 2 * armt_d_mem * armt_nu features)."""
    armt_d_mem: int | None = None
    """Width of ARMT's memory keys before DPFP; unset = min(64, hidden_size)."""
    armt_schedule: Literal["sequential", "diagonal"] = "sequential"
    """armt inference order: sequential (segment by segment) or diagonal (the (segment, layer) cells of
    one anti-diagonal in one vmapped layer call; same outputs; eval/generation only, never under
    gradients or ZeRO-3). README, "Models"."""

    @property
    def has_parameters(self) -> bool:
        """The memory has parameters of its own (rmt with memory tokens, armt): ``train.memory_lr_scale`` applies."""
        return self.kind == "armt" or (self.kind == "rmt" and self.num_tokens > 0)


def separate_memory_groups(memory_lr_scale: float) -> bool:
    """Whether the memory's own parameters get optimizer groups of their own (``optim.param_groups``):
    only at a scale other than 1, so runs at 1 keep the two groups of runs that predate the setting.
    A checkpoint's optimizer state fits only a run on the same side of this line."""
    return memory_lr_scale != 1.0


class CurriculumStage(Section):
    from_step: int = Field(ge=0)
    n_segments: int = Field(ge=1)


def auto_curriculum(n_segments: int, max_steps: int) -> list[CurriculumStage]:
    """Every divisor of ``n_segments`` from 1 up, one stage each, evenly spaced over ``max_steps``
    (6 segments, 300 steps: 1, 2, 3, 6 from steps 0, 75, 150, 225); [] for one segment."""
    sizes = [n for n in range(1, n_segments + 1) if n_segments % n == 0]
    if len(sizes) == 1:
        return []
    starts = [round(i * max_steps / len(sizes)) for i in range(len(sizes))]
    if len(set(starts)) < len(starts):  # fewer steps than stages: whole samples throughout
        return []
    return [CurriculumStage(from_step=start, n_segments=n) for start, n in zip(starts, sizes)]


class TrainConfig(Section):
    """`memtrain train`: DeepSpeed, batch, optimizer, schedule, checkpoints."""

    output_dir: str = "runs/demo/train"
    """Run folder: config, checkpoints/, eval/, logs/; rerunning on it resumes from the latest checkpoint."""
    ds_config: str = "ds_configs/zero3_cpu.json"
    """DeepSpeed JSON (relative paths also resolve against the repository); batch fields and clipping are filled from here."""
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """Fills the JSON's bf16/fp16 "enabled" where it says "auto" or nothing; an explicit JSON value stands unless this is set and disagrees (an error)."""
    max_steps: int = Field(200, ge=1)
    """Optimizer steps in all."""
    save_every: int = Field(100, ge=1)
    """Checkpoint every N steps (and at the end, and on preemption)."""
    keep_last: int = Field(2, ge=1)
    """How many checkpoints to keep."""
    micro_batch_size: int = Field(4, ge=1)
    """Samples per rank per forward/backward (train_micro_batch_size_per_gpu)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step (gradient_accumulation_steps); derived when global_batch_size is set."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks (train_batch_size); fixed across world-size changes when set."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (AdamW)."""
    min_lr: float = Field(1e-4, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps before the cosine decay."""
    memory_lr_scale: float | None = Field(None, ge=0)
    """The memory's own parameters (rmt's initial memory and write gain, armt's write tokens and per-layer projections) train at this times the LR; 0 freezes them. Unset: 0.1 when training grows from 1-segment chains (a curriculum with train.curriculum_split, the default), else 1 (by measurement on real text: README, "Memory on real text"); written out in the run's config.yaml."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay (matrices only)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient clipping norm (gradient_clipping); 0 turns clipping off."""
    seed: int = 0
    """Seed of initialisation, data order and truncation."""
    curriculum: list[CurriculumStage] | Literal["auto"] = "auto"
    """n_segments schedule: [{from_step: 0, n_segments: 2}, {from_step: 1000, n_segments: 4}, ...]; empty: always data.n_segments. auto: every divisor of data.n_segments from 1 up, evenly spaced over train.max_steps (none for BABILong samples); written out in the run's config.yaml."""
    curriculum_split: bool | None = None
    """A stage of n segments cuts each sample into chains of n segments (every token trained on) instead of keeping its first n. Unset: on, except with train.random_truncation or BABILong samples (drawn by length, never cut)."""
    random_truncation: float = Field(0.0, ge=0.0, le=1.0)
    """Share of batches cut to a random number of segments (same on every rank)."""
    log_every: int = Field(10, ge=1)
    """Print a progress line every N steps (terminal and logs/train.log); MLflow gets every step's metrics."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on eval.split every N steps (0: only at the end)."""
    dist_timeout_s: float | None = Field(None, gt=0)
    """How long a rank waits in one collective (the process group's timeout), in seconds; unset: DeepSpeed's (DEEPSPEED_TIMEOUT minutes, 30 by default). A rank that waits longer (a peer that died without a word, or hangs) fails with the backend's timeout error instead of holding its GPUs."""
    peak_tflops: float | None = Field(None, gt=0)
    """Peak TFLOP/s of one device, for the MFU metric; unset: built in for known GPUs (H100, A100, ...) in bf16/fp16, none for fp32 or CPU."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"AdamW betas must lie in [0, 1), got {list(betas)}")
        return betas

    @field_validator("curriculum")
    @classmethod
    def _curriculum_sorted(cls, stages: list[CurriculumStage] | str) -> list[CurriculumStage] | str:
        if stages == "auto":
            return stages
        starts = [s.from_step for s in stages]
        if starts != sorted(set(starts)):
            raise ValueError("curriculum stages need strictly increasing from_step")
        if stages and starts[0] != 0:
            raise ValueError("the first curriculum stage must start at from_step 0")
        return stages


class BabilongEvalConfig(Section):
    """``memtrain eval --task babilong``: question-answering accuracy against context length."""

    source: str | None = None
    """Samples: unset = generated like the run's babilong prep (test split); a babilong prep folder; hf:RMT-team/babilong; a local .parquet/.jsonl with input, question, target."""
    lengths: list[int] | None = None
    """Context lengths in segments for generated samples (default 1, 2, 4, ... up to 16x the training length); hf: length configs are `configs`."""
    configs: list[str] = ["0k", "1k", "2k", "4k"]
    """Length configs of an hf:RMT-team/babilong source."""
    tasks: list[str] | None = None
    """Tasks scored (default: the run's babilong tasks; qa1..qa5 for official data)."""
    samples: int = Field(100, ge=1)
    """Samples per (task, length)."""
    max_new_tokens: int = Field(5, ge=1)
    """Greedy tokens generated after the question (the official protocol uses about 20 for LLMs)."""


class EvalConfig(Section):
    """Per-segment perplexity (``memtrain eval`` and the periodic eval during training)."""

    split: Literal["val", "test", "train"] = "val"
    """The data split scored."""
    max_samples: int = Field(64, ge=1)
    """Score the first N samples of the split (all of them if it holds fewer)."""
    batch_size: int = Field(8, ge=1)
    """Samples per forward call, per rank."""
    baseline: str | None = None
    """A `none` run's train.output_dir, evaluated on the same samples by `memtrain eval`."""
    history_target: bool = False
    """Also score only the last segment of each sample given h = 0..n-1 segments of history."""
    babilong: BabilongEvalConfig = BabilongEvalConfig()


class TrackingConfig(Section):
    """MLflow tracking (rank 0)."""

    enabled: bool = True
    """Log to MLflow at all."""
    uri: str | None = None
    """Tracking URI; unset: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    experiment: str = "memtrain"
    """MLflow experiment name; unset in the config, MLFLOW_EXPERIMENT_ID or MLFLOW_EXPERIMENT_NAME win over the default."""
    run_name: str | None = None
    """MLflow run name (default: the basename of train.output_dir)."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """How long the start of training waits for an HTTP tracking server before it is an error."""
    flush_timeout_s: float = Field(30.0, ge=0)
    """How long the end of training waits to deliver buffered points; what is left stays in the spool file."""
    system_metrics: bool = True
    """MLflow's own system metrics (system/cpu_utilization_percentage, memory, disk, network; GPU with pynvml) from local rank 0 of each node."""
    system_metrics_interval_s: float = Field(10.0, gt=0)
    """Seconds between system metrics samples (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins, as in MLflow)."""


class SlurmConfig(Section):
    """`memtrain submit`: the values rendered into slurm/*.sbatch."""

    nodes: int = Field(1, ge=1)
    """Nodes of the training job."""
    gpus_per_node: int = Field(8, ge=0)
    """GPUs per node, one rank each; 0: CPU-only nodes with tasks_per_node ranks each."""
    tasks_per_node: int | None = Field(None, ge=1)
    """Ranks per node; unset: one per GPU (1 when gpus_per_node is 0)."""
    cpus_per_task: int = Field(8, ge=1)
    """CPU cores per rank (also its OMP_NUM_THREADS)."""
    partition: str | None = None
    """SLURM partition (--partition)."""
    account: str | None = None
    """SLURM account (--account)."""
    time: str = "24:00:00"
    """Time limit of each job (--time)."""
    job_name: str = "memtrain"
    """Job name; prep jobs get a -prep / -merge suffix."""
    signal_lead_s: int = Field(300, ge=10)
    """SIGUSR2 this many seconds before the time limit: save, exit 85, requeue."""
    setup: list[str] = []
    """Shell lines run before memtrain in every job (module load ..., source venv)."""
    prep_array_tasks: int = Field(4, ge=1)
    """Array tasks of `memtrain submit --what prep|all` (memtrain prep --num-shards)."""
    log_dir: str = "slurm-logs"
    """Folder of the jobs' output files."""

    @field_validator("time", mode="before")
    @classmethod
    def _minutes_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # sbatch --time=30

    @model_validator(mode="after")
    def _time_outlasts_the_signal_lead(self) -> "SlurmConfig":
        seconds = slurm_time_seconds(self.time)
        if seconds <= self.signal_lead_s:
            raise ValueError(f"slurm.time={self.time} is not longer than slurm.signal_lead_s={self.signal_lead_s}: "
                             "the job would be told to save before it starts")
        return self


SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_time_seconds(text: str) -> int:
    """sbatch --time in seconds: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes, days-hours:minutes:seconds (ValueError for anything else)."""
    match = SLURM_TIME.match(text.strip())
    if match is None:
        raise ValueError(f"slurm.time={text!r} is not a SLURM time (minutes, HH:MM:SS, D-HH, D-HH:MM:SS)")
    days, first, second, third = match.groups()
    if days is not None:  # days-hours[:minutes[:seconds]]
        return ((int(days) * 24 + int(first)) * 60 + int(second or 0)) * 60 + int(third or 0)
    if third is not None:  # hours:minutes:seconds
        return (int(first) * 60 + int(second)) * 60 + int(third)
    return int(first) * 60 + int(second or 0)  # minutes[:seconds]


class ExportConfig(Section):
    """`memtrain export`: the Hugging Face folder and its model card."""

    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights dtype of the export (bf16 casts every floating tensor); `--dtype` overrides it."""
    license: str = "apache-2.0"
    """License in the model card metadata."""
    tags: list[str] = []
    """Extra model card tags (memtrain, the memory kind and the base arch are always there)."""
    max_shard_size: str = "2GB"
    """Largest safetensors shard `save_pretrained` writes."""
    max_new_tokens: int = Field(128, ge=1)
    """Default `max_new_tokens` in generation_config.json."""
    log_to_mlflow: bool = False
    """Also upload the exported folder (weights included) to the training's MLflow run; every export is recorded there anyway (tags, card, an external model)."""
    register_as: str | None = None
    """Register each export in the MLflow model registry under this name (a new version per export)."""
    base_model: str | None = None
    """Hub id of the base model in the card's metadata; unset: model.pretrained's own Hub id (its config's _name_or_path), if it has one."""
    datasets: list[str] = []
    """Hub dataset ids in the card's metadata; empty: the `hf:` data.source, if it is one."""
    language: list[str] = []
    """Languages of the card's metadata (ISO 639-1, e.g. [en])."""
    lora: Literal["merged", "adapter"] = "merged"
    """A model.lora run: merged = full weights with the adapters merged in (no PEFT needed to load); adapter = the base
    weights (with the trained memory) plus the PEFT adapter in adapter/ (PeftModel.from_pretrained(model, "DIR/adapter"))."""


class ExperimentConfig(Section):
    """One experiment: every section every subcommand reads."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    memory: MemoryConfig = MemoryConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    slurm: SlurmConfig = SlurmConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        self._resolve_curriculum()
        for stage in self.train.curriculum:
            if stage.n_segments > self.data.n_segments:
                raise ValueError(
                    f"train.curriculum asks for {stage.n_segments} segments but samples hold "
                    f"data.n_segments={self.data.n_segments}"
                )
            if self.train.curriculum_split and self.data.n_segments % stage.n_segments:
                raise ValueError(f"train.curriculum_split cuts samples of data.n_segments={self.data.n_segments} into "
                                 f"chains of {stage.n_segments} segments: use a divisor of {self.data.n_segments}")
        if self.data.source.startswith("babilong:"):
            self._babilong_checks()
        return self

    def _resolve_curriculum(self) -> None:
        """Fill the "auto" curriculum, the unset split and the unset memory LR scale in (the run's
        config.yaml holds the result).

        Why this default: on real text (README, "Memory on real text") an rmt trained on whole
        6-segment samples from the first step is 11% worse than no memory in every segment, segment 0
        included: while the decoder is young, reading memory slows how it learns language at all.
        Trained first on 1-segment chains (its read memory is then the learned initial memory, a
        constant prefix), then on 2, 3 and 6 with every token kept, the same rmt is 2% better than
        no memory in every segment at the same budget (at 64-token segments, where whole samples do
        not hurt, the curriculum costs 3-4%: the smaller worst case).

        The memory's LR scale goes with it: growing from 1-segment chains, the memory's own
        parameters at 0.1x the LR make rmt 1.8% better than no memory (three seeds; 1x: level) and
        take the 64-token cost to 0.4%; on whole samples from the first step 0.1x is far worse than
        1x (92 vs 72 ppl at 128-token segments), so whole-sample runs (the demo, BABILong) keep 1."""
        train, qa = self.train, self.data.source.startswith("babilong:")
        if train.curriculum_split and (qa or train.random_truncation):
            why = "BABILong samples are drawn by length and never cut" if qa else "train.random_truncation cuts samples"
            raise ValueError(f"train.curriculum_split does not apply: {why}; leave it unset")
        if train.curriculum_split is None:
            train.curriculum_split = not (qa or train.random_truncation)
        if train.curriculum == "auto":
            train.curriculum = [] if qa else auto_curriculum(self.data.n_segments, train.max_steps)
        if train.memory_lr_scale is None:
            train.memory_lr_scale = 0.1 if train.curriculum and train.curriculum_split else 1.0

    def _babilong_checks(self) -> None:
        """QA samples are never truncated: each step trains on samples of exactly its segment count."""
        lengths = self.data.babilong.lengths
        if self.data.n_segments != max(lengths):
            raise ValueError(f"data.n_segments={self.data.n_segments} must be the longest of "
                             f"data.babilong.lengths={lengths}")
        stages = [s.n_segments for s in self.train.curriculum] or [self.data.n_segments]
        missing = [n for n in stages if n not in lengths]
        if missing:
            raise ValueError(f"train.curriculum trains on {missing[0]} segments but data.babilong.lengths={lengths} "
                             f"has no samples of that length")
        if self.train.random_truncation:
            raise ValueError("train.random_truncation would cut the question off QA samples; use train.curriculum")
        if self.data.babilong.min_facts > self.data.babilong.max_facts:
            raise ValueError("data.babilong.min_facts is above data.babilong.max_facts")

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params (credentials in tracking.uri masked)."""
        return flatten(self.public_tree())

    def to_yaml(self) -> str:
        """The config as saved beside checkpoints and logged to MLflow (credentials masked)."""
        return yaml.safe_dump(self.public_tree(), sort_keys=False)

    def public_tree(self) -> dict[str, Any]:
        tree = self.model_dump(mode="json")
        tree["tracking"]["uri"] = mask_credentials(tree["tracking"]["uri"])
        return tree

    def save(self, path: str | Path) -> None:
        """Write the resolved config atomically."""
        write_text(path, self.to_yaml())


def mask_credentials(uri: str | None) -> str | None:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host`` (MLflow reads credentials from
    MLFLOW_TRACKING_USERNAME/PASSWORD too; a secret in the URI must not reach files or logs)."""
    if uri is None:
        return None
    match = re.match(r"^([a-z][\w+.-]*://)([^/@]+)@", uri, flags=re.I)
    if match is None:
        return uri
    user = match.group(2).split(":", 1)[0] + ":" if ":" in match.group(2) else ""
    return f"{match.group(1)}{user}***@{uri[match.end():]}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml-parsed c)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field annotated ``Section`` or ``Section | None`` (an optional section), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        model = section_type(getattr(field, "annotation", None))
        if model is None:
            return []
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if not isinstance(p, int))
    where = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suffix = f"; did you mean {'.'.join([*map(str, loc[:-1]), hint[0]])!r}?" if hint else ""
        return f"unknown config key {where!r}{suffix}"
    return f"{where}: {error['msg']}"


def build_config(tree: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError("invalid config: " + "; ".join(_describe(e) for e in err.errors())) from None


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The config of a subcommand's ``--config FILE --set KEY=VALUE ...``."""
    return load_config(args.config, args.overrides)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read YAML (or start from defaults), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {err}".splitlines()[0]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
        tree = loaded or {}
    return build_config(apply_overrides(tree, overrides or []))
