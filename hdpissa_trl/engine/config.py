"""What the user sets for HD-PiSSA: one dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

INIT_METHODS = ("svd", "randomized")
PRECISION_MODES = ("fp32", "bf16_kahan", "bf16_sr", "model")
FOLD_MATMUL = ("auto", "ieee", "tf32")
ON_MISMATCH = ("raise", "resync")
SLICE_GRADIENTS = ("local", "global")
# Fields that change how a run is carried out, not what it computes: a resume may change them; any other field of
# the checkpoint's config must match (see HDPiSSAEngine.load_state_dict).
OPERATIONAL_FIELDS = ("bucket_size_mb", "sync_check_steps", "on_sync_mismatch", "shard_init", "sharded_comm",
                      "fold_matmul")
SHARDED_COMM = ("auto", "all_gather", "all_to_all")
SUBSPACE_MODES = ("fixed", "refactor", "rotate", "gradient", "moving")


@dataclass
class HDPiSSAConfig:
    """Configuration of HD-PiSSA adapters.

    Parameters (grouped by concern):
        Adapter shape:
            r: rank of the adapter on EACH device; K devices together own the top ``K·r`` singular directions.
            strict_rank: a layer too small for ``K·r`` (``K·r > min(out, in)``) gets the largest ``r`` that fits (one
                warning names those layers); ``True`` makes it an error instead.
            lora_alpha: scale numerator; the update scale is ``s = lora_alpha / r``. As in PEFT's PiSSA the initial
                factors carry ``sqrt(S/s)``, so ``s·B0A0`` is the slice of W and a step moves W like ``sqrt(s)``.
            target_modules: which ``nn.Linear`` modules get adapters: a list of module-name suffixes, a regex string,
                or ``"all-linear"`` (every linear except the output head).
            exclude_modules: name suffixes never adapted, even when ``target_modules`` matches them.
            lora_dropout: LoRA dropout: the adapter path (``s·B0A0`` of W and the adapter gradients) sees the
                dropped input, the rest of W the full input, exactly as PEFT's LoRA/PiSSA.
        Initialisation:
            init_method: ``"svd"`` (exact fp32 SVD) or ``"randomized"`` (``torch.svd_lowrank`` of the top ``K·r``).
            n_iter: power iterations of the randomized SVD.
            shard_init: factor layer ``i`` on rank ``i mod K`` and broadcast, instead of every layer on rank 0.
        Weight precision:
            precision: how the full weight ``W`` absorbs each fold: ``"fp32"`` (fp32 master copy), ``"bf16_kahan"``
                (bf16 weight + bf16 Kahan compensation), ``"bf16_sr"`` (bf16 weight, stochastic rounding) or
                ``"model"`` (plain add in the model dtype; loses small updates in bf16).
            fold_matmul: precision of the fold's GEMM (fp32 factors): ``"ieee"`` (plain fp32), ``"tf32"`` (inputs cut
                to TF32's 10 mantissa bits, fp32 accumulation: tensor cores on CUDA, the same input rounding before an
                fp32 GEMM elsewhere) or ``"auto"`` (TF32 on CUDA, plain fp32 elsewhere). Every device computes the
                same bits either way; TF32 changes each fold's update by at most about 2^-9 of its size
                (docs/parallelism.md).
        Communication and safety:
            bucket_size_mb: W replicated: cap of one gather buffer in MiB, what a device sends; 0 means a single
                buffer (one collective per step). W sharded (FSDP2): cap of what a rank RECEIVES per exchange (K times
                what it sends); 0 means 1024 MiB (``engine.sharded.DEFAULT_RECEIVE_CAP_MB``).
            sharded_comm: with W sharded by rows (FSDP2): ``"all_gather"`` of every device's (dA, dB), or
                ``"all_to_all"`` (all-gather of dA + all-to-all of each rank's dB rows, fewer bytes); ``"auto"`` picks
                the one that moves fewer bytes.
            sync_check_steps: compare a checksum of ``W`` across devices every N folds (0 disables).
            on_sync_mismatch: ``"raise"`` stops with the first differing layer; ``"resync"`` copies rank 0's ``W``.
            seed: seed of the randomized SVD and of stochastic rounding (identical on every device by design).
        Subspace schedule (:mod:`hdpissa_trl.engine.subspace`):
            subspace: ``"fixed"`` (the paper's scheme), ``"rotate"``, ``"refactor"``, ``"gradient"`` or experimental
                ``"moving"``.
            subspace_steps: folds between two changes of the factors (rotate, refactor, gradient).
            rotate_pool: rotate cycles through the top ``rotate_pool·K·r`` initial singular directions.
            subspace_warmup_steps: after each change of the factors the adapters' learning rate ramps up linearly
                over this many optimizer steps (0: none).
            slice_gradient: ``"local"`` (the paper: each device's slice steps on its own micro-batches' gradient) or
                EXPERIMENTAL ``"global"`` (each slice steps on the whole global batch's gradient: one reduce-scatter
                of every slice's adapter gradients per step, before clipping).
    """

    r: int = field(default=16, metadata={"help": "Adapter rank per device. K devices own K·r principal directions."})
    strict_rank: bool = field(
        default=False,
        metadata={"help": "Refuse a layer too small for K·r (default: give it the largest r with K·r <= min(out, in))."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "Scale numerator: s = lora_alpha / r, as in PEFT's PiSSA "
                                                             "(a step moves W in proportion to sqrt(s))."})
    target_modules: list[str] | str = field(
        default="all-linear",
        metadata={"help": "Module-name suffixes (list), a regex (str), or 'all-linear' (all but the output head)."},
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Module-name suffixes that are never adapted."}
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout probability: the principal part s·B0A0 of W sees the dropped input."}
    )
    init_method: str = field(
        default="svd", metadata={"help": "Initial factorisation: 'svd' (exact, fp32) or 'randomized' (svd_lowrank)."}
    )
    n_iter: int = field(default=4, metadata={"help": "Power iterations for init_method='randomized'."})
    shard_init: bool = field(
        default=True, metadata={"help": "Factor layer i on rank i mod K, then broadcast (faster init on K devices)."}
    )
    precision: str = field(
        default="fp32",
        metadata={"help": "How W absorbs folds: 'fp32' master, 'bf16_kahan', 'bf16_sr' or 'model' (plain dtype)."},
    )
    fold_matmul: str = field(
        default="auto",
        metadata={"help": "Precision of the fold's GEMM: 'ieee' (plain fp32), 'tf32' (TF32 tensor cores on CUDA, the "
                          "same input rounding elsewhere) or 'auto' (tf32 on CUDA, ieee elsewhere)."},
    )
    bucket_size_mb: float = field(
        default=0.0, metadata={"help": "Max MiB per gather buffer (W sharded: per receive buffer); 0 = one buffer, "
                                       "one collective per step (W sharded: 1024 MiB)."}
    )
    sharded_comm: str = field(
        default="auto",
        metadata={"help": "W sharded by rows (FSDP2): 'all_gather' of every (dA, dB), 'all_to_all' (A-side gather + "
                          "B rows all-to-all) or 'auto' (fewer bytes)."},
    )
    sync_check_steps: int = field(
        default=50, metadata={"help": "Compare a checksum of W across devices every N folds; 0 disables."}
    )
    on_sync_mismatch: str = field(
        default="raise", metadata={"help": "'raise' (stop, naming the layer) or 'resync' (copy rank 0's W, log)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for randomized SVD and stochastic rounding."})
    subspace: str = field(
        default="fixed",
        metadata={"help": "How the owned singular directions evolve: 'fixed' (the paper: the run's update stays in the "
                          "initial top-K·r subspaces), 'rotate' (every subspace_steps folds the devices move to the next "
                          "K·r of the top rotate_pool·K·r initial directions; optimizer state restarts), 'refactor' "
                          "(every subspace_steps folds re-factor the current W; optimizer state restarts), or "
                          "'gradient' (every subspace_steps folds the devices take the top K·r singular directions of "
                          "the full gradient of W, summed over devices, at W's singular-value magnitudes; optimizer "
                          "state restarts; on SmolLM2 at fixed's best rate it did worse than 'fixed', its gradient "
                          "norms tripling after each change: tune its rate on its own), or EXPERIMENTAL 'moving' "
                          "(factors follow the adapters as in PiSSA; not better than 'fixed' on the multi-task "
                          "benchmark). See BENCHMARKS.md §5c and §6."},
    )
    subspace_steps: int = field(
        default=50,
        metadata={"help": "subspace='refactor'/'rotate'/'gradient': folds between two changes of the factors."},
    )
    rotate_pool: int = field(
        default=2, metadata={"help": "subspace='rotate': the pool holds rotate_pool·K·r initial singular directions."}
    )
    subspace_warmup_steps: int = field(
        default=0,
        metadata={"help": "After each change of the factors (rotate, refactor, gradient) the adapters' learning rate "
                          "ramps linearly from 1/(N+1) to the scheduled rate over N optimizer steps: Adam's restarted "
                          "moments otherwise make the first steps sign-like at the full rate. 0 disables."},
    )

    slice_gradient: str = field(
        default="local",
        metadata={"help": "Which examples each device's slice steps on: 'local' (the paper: its own device's "
                          "micro-batches, so a slice sees 1/K of the global batch) or EXPERIMENTAL 'global' (the whole "
                          "global batch: every device also computes the other slices' adapter gradients on its data, "
                          "and one reduce-scatter per step before clipping gives each slice their mean, as DDP averages). "
                          "'global' adds "
                          "a collective of the fold's size and K·r-rank gradient buffers per layer; each device's "
                          "optimizer state stays rank r. Not with W sharded by rows (FSDP2)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"HDPiSSAConfig.r must be a positive integer, got {self.r!r}.")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"HDPiSSAConfig.lora_alpha must be positive, got {self.lora_alpha!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"HDPiSSAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.init_method not in INIT_METHODS:
            raise ValueError(f"HDPiSSAConfig.init_method must be one of {INIT_METHODS}, got {self.init_method!r}.")
        if self.n_iter < 0:
            raise ValueError(f"HDPiSSAConfig.n_iter must be >= 0, got {self.n_iter!r}.")
        if self.precision not in PRECISION_MODES:
            raise ValueError(f"HDPiSSAConfig.precision must be one of {PRECISION_MODES}, got {self.precision!r}.")
        if self.fold_matmul not in FOLD_MATMUL:
            raise ValueError(f"HDPiSSAConfig.fold_matmul must be one of {FOLD_MATMUL}, got {self.fold_matmul!r}.")
        if self.bucket_size_mb < 0:
            raise ValueError(f"HDPiSSAConfig.bucket_size_mb must be >= 0, got {self.bucket_size_mb!r}.")
        if self.sharded_comm not in SHARDED_COMM:
            raise ValueError(f"HDPiSSAConfig.sharded_comm must be one of {SHARDED_COMM}, got {self.sharded_comm!r}.")
        if self.sync_check_steps < 0:
            raise ValueError(f"HDPiSSAConfig.sync_check_steps must be >= 0, got {self.sync_check_steps!r}.")
        if self.on_sync_mismatch not in ON_MISMATCH:
            raise ValueError(
                f"HDPiSSAConfig.on_sync_mismatch must be one of {ON_MISMATCH}, got {self.on_sync_mismatch!r}."
            )
        if self.slice_gradient not in SLICE_GRADIENTS:
            raise ValueError(f"HDPiSSAConfig.slice_gradient must be one of {SLICE_GRADIENTS}, got "
                             f"{self.slice_gradient!r}.")
        if self.subspace not in SUBSPACE_MODES:
            raise ValueError(f"HDPiSSAConfig.subspace must be one of {SUBSPACE_MODES}, got {self.subspace!r}.")
        if isinstance(self.subspace_warmup_steps, bool) or not isinstance(self.subspace_warmup_steps, int) \
                or self.subspace_warmup_steps < 0:
            raise ValueError(f"HDPiSSAConfig.subspace_warmup_steps must be an integer >= 0, got "
                             f"{self.subspace_warmup_steps!r}.")
        if self.subspace_steps < 1 or self.rotate_pool < 2:
            raise ValueError(f"HDPiSSAConfig.subspace_steps must be >= 1 and rotate_pool >= 2, got "
                             f"{self.subspace_steps!r} and {self.rotate_pool!r}.")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules:
                raise ValueError("HDPiSSAConfig.target_modules is empty; give names, a regex or 'all-linear'.")
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                f"HDPiSSAConfig.target_modules must be a list of names, a regex or 'all-linear', "
                f"got {self.target_modules!r}."
            )

    @property
    def scale(self) -> float:
        """The adapter scale ``s = lora_alpha / r`` used in the gradients and the fold."""
        return float(self.lora_alpha) / self.r

    def to_dict(self) -> dict:
        """All fields, JSON-ready: stored whole in every checkpoint so a resume can refuse a different config."""
        return asdict(self)

    @classmethod
    def from_peft(cls, lora_config, **overrides) -> HDPiSSAConfig:
        """HD-PiSSA with the r, lora_alpha, targets and dropout of an existing PEFT ``LoraConfig``.

        ``init_lora_weights="pissa_niter_N"`` selects the randomized init with N power iterations. LoRA variants that
        HD-PiSSA does not implement (DoRA, rsLoRA, per-layer rank/alpha patterns, biases, extra trained modules,
        layer selection) are refused naming the field, rather than silently dropped. ``overrides`` set any other field.
        """
        unsupported = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
                       "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                       "trainable_token_indices": None, "target_parameters": None}
        for name, neutral in unsupported.items():
            value = getattr(lora_config, name, neutral)
            if value is not None and value != neutral:
                raise ValueError(f"HDPiSSAConfig.from_peft: LoraConfig.{name}={value!r} has no HD-PiSSA equivalent; "
                                 f"set it to {neutral!r} (HD-PiSSA trains only its adapters on the target modules).")
        targets = lora_config.target_modules
        if targets is None:
            raise ValueError("HDPiSSAConfig.from_peft: LoraConfig.target_modules is None (PEFT then picks defaults "
                             "per model type); set it explicitly, e.g. target_modules='all-linear'.")
        kwargs: dict = {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "lora_dropout": lora_config.lora_dropout,
                        "target_modules": sorted(targets) if isinstance(targets, (set, frozenset)) else targets}
        exclude = getattr(lora_config, "exclude_modules", None)
        if isinstance(exclude, str):
            raise ValueError("HDPiSSAConfig.from_peft: LoraConfig.exclude_modules is a regex; HD-PiSSA takes a list of "
                             "module-name suffixes there.")
        if exclude:
            kwargs["exclude_modules"] = sorted(exclude)
        init = lora_config.init_lora_weights
        if isinstance(init, str) and init.startswith("pissa_niter_"):
            kwargs.update(init_method="randomized", n_iter=int(init.rsplit("_", 1)[-1]))
        return cls(**{**kwargs, **overrides})
