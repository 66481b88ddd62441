"""The sections of ``params.yaml``, one typed model each (``vpr.foundations.config`` joins them)."""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from vpr.foundations.registry import check_head, head_names

# a head name declared in vpr.foundations.registry (checked when params are read, so a typo fails before any work)
Head = Annotated[str, AfterValidator(check_head)]


class Strict(BaseModel):
    # unknown keys are errors, and no setting may be infinite or NaN (an .inf learning rate is a typo)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PathsConfig(Strict):
    """Where things live, relative to the project root."""

    data: str = "data"
    artifacts: str = "artifacts"
    metrics: str = "metrics"
    reports: str = "reports"
    inbox: str = "inbox"

    @model_validator(mode="after")
    def _apart(self) -> PathsConfig:
        """No folder inside another: re-indexing moves files out of the inbox and into data, and a
        stage's outputs must never lie in the data tree (or the inbox) they are computed from."""
        folders = {k: PurePosixPath(os.path.normpath(v)) for k, v in self.model_dump().items()}
        for a, pa in folders.items():
            for b, pb in folders.items():
                if a < b and (pa == pb or pa in pb.parents or pb in pa.parents):
                    raise ValueError(f"paths.{a} ({pa}) and paths.{b} ({pb}) overlap: each must be a folder of its own")
        return self


class SplitSize(Strict):
    database: StrictInt = Field(gt=0)
    queries: StrictInt = Field(gt=0)


SplitName = Literal["train", "val", "test"]
# a test set's name: a folder name, and part of DVC stage names (``cross-evaluate@netvlad-town2``)
TestSetName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_]{0,31}$")]


class TownConfig(Strict):
    """A town rendered apart from the city, as a test set only (the city's second test set, as St.
    Lucia is to Pittsburgh): its own streets and facades (``seed``), its own light (``season``),
    ``offset_km`` north of the city, never seen in training."""

    seed: StrictInt = Field(1, ge=0, le=2**32 - 1)
    season: Literal["summer", "winter"] = "winter"
    offset_km: float = Field(30.0, ge=0, le=1000)
    place_spacing_m: float = Field(5.0, gt=0)
    test: SplitSize = SplitSize(database=400, queries=200)


class SynthConfig(Strict):
    """The synthetic city: a deterministic datasets_vg tree (plus ``test_sets``: towns to test on)."""

    seed: StrictInt = Field(0, ge=0, le=2**32 - 1)  # every RNG of the stack takes a 32-bit seed
    height: StrictInt = Field(120, ge=32, le=8192)
    width: StrictInt = Field(160, ge=32, le=8192)
    train: SplitSize = SplitSize(database=4000, queries=3000)
    val: SplitSize = SplitSize(database=600, queries=300)
    test: SplitSize = SplitSize(database=400, queries=200)
    place_spacing_m: float = Field(5.0, gt=0)
    facade_styles: StrictInt = Field(6, gt=0)
    distractors: bool = True
    season: Literal["summer", "winter"] = "summer"  # winter: cold, pale light; the database under snow skies
    offset_km: float = Field(0.0, ge=0, le=1000)  # the districts this far north of the city's origin
    splits: list[SplitName] = Field(default_factory=lambda: ["train", "val", "test"], min_length=1)
    # towns rendered by `vpr synth` into <data>/test-sets/<name>: the demo's extra test sets
    test_sets: dict[TestSetName, TownConfig] = {}

    def town(self, name: str) -> SynthConfig:
        """The config that renders test town ``name``: its test split alone, the city's image size."""
        town = self.test_sets[name]
        return self.model_copy(update={**town.model_dump(), "test": town.test, "splits": ["test"], "test_sets": {}})


class IngestConfig(Strict):
    workers: StrictInt = Field(2, ge=1)
    max_pixels: StrictInt = Field(100_000_000, gt=0)
    max_file_mb: float = Field(64.0, gt=0)  # larger files are refused from their size, never read

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)


class ShardConfig(Strict):
    height: StrictInt = Field(120, ge=16, le=8192)
    width: StrictInt = Field(160, ge=16, le=8192)
    jpeg_quality: StrictInt = Field(90, ge=10, le=100)
    samples_per_shard: StrictInt = Field(1000, gt=0)


class MiningConfig(Strict):
    train_positive_m: float = Field(10.0, gt=0)
    test_positive_m: float = Field(25.0, gt=0)
    # Hard positives must also face the query's way (|heading difference| <= this, where both headings
    # are known): a photo of the opposite street side within 10 m shares no view. null = distance only.
    train_positive_heading_deg: float | None = Field(90.0, gt=0, le=180)

    @model_validator(mode="after")
    def _ordered(self) -> MiningConfig:
        if self.train_positive_m > self.test_positive_m:
            raise ValueError("mining.train_positive_m must not exceed mining.test_positive_m")
        return self


class ModelConfig(Strict):
    weights: str = "imagenet"  # "imagenet", "none", or a path to a local .pth state dict
    freeze_early_layers: bool = True
    netvlad_clusters: StrictInt = Field(16, gt=1, le=4096)  # a bound, so a forged checkpoint cannot ask for GBs
    gem_p: float = Field(3.0, gt=0)
    gem_dim: StrictInt = Field(256, gt=0)
    kmeans_descriptors: StrictInt = Field(50_000, gt=0)


class AugmentConfig(Strict):
    color_jitter: float = Field(0.0, ge=0)
    horizontal_flip: bool = False
    rotate_deg: float = Field(0.0, ge=0, le=180)  # random rotation within ± this (query images)
    random_erasing: float = Field(0.0, ge=0, le=1)

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is on (then query images vary per epoch and draw random numbers)."""
        return self.color_jitter > 0 or self.horizontal_flip or self.rotate_deg > 0 or self.random_erasing > 0


class HeadBudget(Strict):
    """Training budget of one head where it differs from the ``train`` section (``train.per_head``)."""

    lr: float | None = Field(None, gt=0)
    epochs: StrictInt | None = Field(None, ge=1)
    queries_per_epoch: StrictInt | None = Field(None, gt=0)
    patience: StrictInt | None = Field(None, ge=1)


class TrainConfig(Strict):
    heads: list[Head] = Field(default_factory=lambda: list(head_names()), min_length=1)
    lr: float = Field(3e-4, gt=0)
    epochs: StrictInt = Field(4, ge=1)
    queries_per_epoch: StrictInt = Field(400, gt=0)
    batch_queries: StrictInt = Field(4, gt=0)
    negatives: StrictInt = Field(10, gt=0)
    margin: float = Field(0.1, gt=0)
    mining: Literal["full", "partial", "random"] = "partial"
    negative_sample: StrictInt = Field(500, gt=0)
    refresh_every: StrictInt = Field(100, gt=0)
    patience: StrictInt = Field(3, ge=1)
    # which validation Recall@N picks the kept checkpoint (model.pt): N must be one of evaluate.recall_at
    select_by: StrictInt = Field(5, gt=0)
    image_scale: float = Field(1.0, gt=0)
    augment: AugmentConfig = AugmentConfig()
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1)  # every RNG of the stack takes a 32-bit seed
    workers: StrictInt = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc: StrictInt = Field(1, ge=1)  # data-parallel ranks on this node (torchrun; one GPU each on CUDA)
    compile: bool = False  # torch.compile the training step (inductor; on CPU it needs a C++ compiler)
    channels_last: Literal["auto", "on", "off"] = "auto"  # NHWC tensors: auto = on CUDA
    pin_memory: Literal["auto", "on", "off"] = "auto"  # page-locked loader batches: auto = on CUDA
    # Frozen early layers are a fixed function of the image: encode them once per run and train
    # layer3 + head on the cached maps. auto = on CPU when the layers are frozen and it fits in memory.
    cache_frozen_trunk: Literal["auto", "on", "off"] = "auto"
    # Training-step arithmetic. auto = bf16 autocast on CUDA, fp32 on every CPU (so CPU results do not
    # depend on whether the CPU has native bf16); bf16 opts in on CPU (speed-up: BENCHMARKS.md).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # lr / epochs / queries_per_epoch / patience of single heads, e.g. {netvlad: {epochs: 12}}: on a small
    # budget the heads that learn slowly get more of it (the study gives every head the same)
    per_head: dict[Head, HeadBudget] = {}

    def for_head(self, head: str) -> TrainConfig:
        """This section with ``head``'s own budget applied."""
        budget = self.per_head.get(head)  # type: ignore[call-overload]
        if budget is None:
            return self
        return self.model_copy(update=budget.model_dump(exclude_none=True))


class EvalConfig(Strict):
    recall_at: list[int] = [1, 5, 10, 20]
    # extra test sets, each a datasets_vg folder <data>/test-sets/<name>/images/test/{database,queries}:
    # ingested, sharded and mined on their own, and evaluated with every trained head (no retraining)
    test_sets: list[TestSetName] = []
    batch_size: StrictInt = Field(32, gt=0)
    index: Literal["exact", "ivfpq", "hnsw"] = "exact"
    pca_dim: StrictInt | None = Field(None, gt=0)
    # how descriptors are kept on disk (vpr.shared.descstore): float16 halves the bytes of large databases
    descriptor_dtype: Literal["float32", "float16"] = "float32"

    @field_validator("recall_at")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(n <= 0 for n in value):
            raise ValueError("recall_at must be a non-empty list of positive integers")
        return sorted(set(value))


class IndexConfig(Strict):
    """The release's FAISS index (``vpr index``) and the approximate-search knobs of ``vpr evaluate``."""

    head: Head = "netvlad"  # which trained head ``vpr index`` / ``vpr locate`` use by default
    kind: Literal["exact", "ivfpq", "hnsw"] = "exact"
    splits: list[Literal["train", "val", "test"]] | None = Field(
        None, min_length=1
    )  # database images of these splits; None: all
    nlist: StrictInt = Field(64, gt=0)  # IVF cells (clamped to the database size when it is small)
    nprobe: StrictInt = Field(8, gt=0)
    pq_m: StrictInt = Field(32, gt=0)  # PQ sub-quantisers (the largest divisor of the dimension ≤ pq_m is used)
    pq_bits: StrictInt = Field(8, ge=1, le=16)
    hnsw_m: StrictInt = Field(32, gt=1)
    ef_search: StrictInt = Field(64, gt=0)


class LocateConfig(Strict):
    top_k: StrictInt = Field(5, gt=0)
    max_pixels: StrictInt = Field(100_000_000, gt=0)  # larger images are refused from their header, never decoded
    max_file_mb: float = Field(64.0, gt=0)  # larger files are refused from their size, never read

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)


class ApiConfig(Strict):
    """``vpr api``: the HTTP service answering from the live release (per-image limits: ``locate``)."""

    host: str = "127.0.0.1"
    port: StrictInt = Field(8000, ge=0, le=65535)
    max_images: StrictInt = Field(16, gt=0)  # per request; more is a 413
    max_request_mb: float = Field(64.0, gt=0)  # whole request body; more is a 413, never read past
    max_top_k: StrictInt = Field(100, gt=0)
    batch_images: StrictInt = Field(32, gt=0)  # concurrent requests' images encoded together, at most
    batch_wait_ms: float = Field(5.0, ge=0)  # how long the first image waits for others to join its batch
    decode_threads: StrictInt = Field(4, gt=0)  # uploads decoded at once, in threads beside the event loop
    poll_s: float = Field(1.0, gt=0)  # how often the live release pointer is checked (hot swap)
    # Host names answered besides host, localhost, 127.0.0.1 and ::1 ("*": any; DNS rebinding guard)
    allowed_hosts: list[str] = Field(default_factory=list)
    header_timeout_s: float = Field(10.0, gt=0)  # request line + headers must arrive within this, or closed
    max_header_kb: StrictInt = Field(16, gt=0)  # request line + headers larger than this: a 400
    keep_alive_s: float = Field(5.0, gt=0)  # an idle kept-alive connection is closed after this
    body_idle_s: float = Field(10.0, gt=0)  # no body byte for this long: 408, connection closed
    body_timeout_s: float = Field(120.0, gt=0)  # the whole body must arrive within this: 408
    # pixels decoded at once over all requests (≈ 5 bytes each while decoding); more: 503 + Retry-After.
    # At least one image of locate.max_pixels; small decodes always pass (vpr.steps.api.guards)
    decode_budget_mpx: float = Field(100.0, gt=0)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def decode_budget_pixels(self) -> int:
        return int(self.decode_budget_mpx * 1e6)


class OrchestrationConfig(Strict):
    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: StrictInt = Field(2, ge=1)
    # heads trained at once; one training already fills a machine's cores or its GPU, so on one device
    # two at once only contend (measured: README, CPU demo)
    train_lanes: StrictInt = Field(1, ge=1)
    dask_address: str | None = None
    # shards sent to the cluster at once: each task carries the model's bytes, so this bounds the memory a
    # large database's submission holds in the flow and the scheduler (64 × a 10.7 MB model: about 0.7 GB)
    max_in_flight: StrictInt = Field(64, ge=1)
    reindex_cron: str = "*/15 * * * *"
    task_retries: StrictInt = Field(2, ge=0)
    reindex_split: Literal["train", "val", "test"] = "test"  # new inbox imagery joins this split's database

    @field_validator("reindex_cron")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        """A schedule that cannot fire is an error when params are read, not when the deployment is served."""
        from datetime import datetime

        from cronsim import CronSim, CronSimError

        fields = value.split()
        if len(fields) != 5:
            raise ValueError(f"cron {value!r} needs 5 fields (minute hour day month weekday), has {len(fields)}")
        try:
            next(CronSim(value, datetime(2000, 1, 1)))
        except (CronSimError, StopIteration) as exc:
            raise ValueError(f"cron {value!r} does not parse: {exc or 'never fires'}") from None
        return value


class ResourcesConfig(Strict):
    """What a run may use, whatever the database size."""

    # evaluation and indexing read descriptors in chunks sized from this, never a whole database at once
    memory_gb: float = Field(8.0, gt=0)
    # stream the shard tars from here (http(s):// or a pipe: command) instead of the local shard folder;
    # the shard index still comes from paths.artifacts (it is small, and DVC versions it)
    shards_url: str | None = None
    # a ``pipe:`` shards_url runs that shell command: refused unless opted into here
    allow_pipe: bool = False
    # each remote shard transfer: a deadline, and a low-speed limit (under min_bytes_per_s over window_s: cut)
    shards_deadline_s: float = Field(600.0, gt=0)
    shards_min_bytes_per_s: float = Field(1024.0, ge=0)
    shards_speed_window_s: float = Field(30.0, gt=0)
    # data-parallel training: a rank that does not join, or freezes before a collective, fails the run after this
    ddp_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _pipe_needs_opt_in(self) -> ResourcesConfig:
        if self.shards_url and self.shards_url.startswith("pipe:") and not self.allow_pipe:
            raise ValueError(
                f"shards_url {self.shards_url!r} runs a shell command; set resources.allow_pipe: true "
                "to allow it (or serve the shards over http(s))"
            )
        return self


class AblationConfig(Strict):
    """``vpr ablation study``: the budget of each ablation experiment (over the rest of these params)."""

    head: Head = "netvlad"
    epochs: StrictInt = Field(3, ge=1)
    queries_per_epoch: StrictInt = Field(300, gt=0)
    seeds: dict[str, StrictInt] = {"lr": 2}  # seeds per ablation (default 1): two where the study's table is
    out: str = "docs/results/ablations"

    @property
    def budget(self) -> dict:
        return {"train": {"epochs": self.epochs, "queries_per_epoch": self.queries_per_epoch}}
