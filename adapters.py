"""Parameter-efficient fine-tuning of the ESM-2 backbone: LoRA and bottleneck adapters.

Both replace nn.Linear modules inside fair-esm's transformer layers by subclasses that keep the
pretrained weight and bias under their own names (the plain backbone's state dict still fits) and
add small trainable parameters. They act wherever the layer calls the Linear, so fair-esm's own
layer code and backbone.transformer_layer (fused attention) both use them.

LoRA (Hu et al. 2021): W x + b + (alpha / r) B A dropout(x), A [r, in] Kaiming-uniform, B [out, r]
zero at the start, so the adapted model equals the pretrained one at step 0. Merging W + (alpha / r) B A
gives a plain model (merge_lora). Bottleneck adapters (Houlsby et al. 2019, upstream MUTarget's Adapter
mode): after the attention block (its output projection) and after the feed-forward block (fc2),
h + up(GELU(down(h))) with `up` zero-initialised, so each adapter starts as the identity.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import LORA_TARGETS as TARGET_NAMES
from config import ConfigError

LORA_TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "out": "self_attn.out_proj", "fc1": "fc1", "fc2": "fc2"}  # config name -> module in a layer
assert tuple(LORA_TARGETS) == TARGET_NAMES
ADAPTER_SITES = ("self_attn.out_proj", "fc2")  # the last Linear of the attention and feed-forward blocks


class LoRALinear(nn.Linear):
    """nn.Linear with a low-rank update: x [*, in] -> [*, out] = x W^T + b + s * dropout(x) A^T B^T,
    s = alpha / rank. W and b are the wrapped Linear's (frozen) parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as peft does
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.low_rank_update(x)

    def low_rank_update(self, x: torch.Tensor) -> torch.Tensor:
        """s * dropout(x) A^T B^T [*, out]: what the update adds to the frozen projection."""
        return self.scaling * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + s * B A."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            plain.weight.copy_(self.weight + self.scaling * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain


class Adapter(nn.Module):
    """Bottleneck adapter h [*, d] -> h + up(GELU(down(h))), down d -> dim, up dim -> d (zeros at start)."""

    def __init__(self, d: int, dim: int, device=None):
        super().__init__()
        self.down = nn.Linear(d, dim, device=device)
        self.up = nn.Linear(dim, d, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class AdaptedLinear(nn.Linear):
    """The last nn.Linear of a block followed by a bottleneck adapter: x -> adapter(x W^T + b)."""

    def __init__(self, base: nn.Linear, dim: int):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.adapter = Adapter(base.out_features, dim, device=base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))


def _replace(layer: nn.Module, path: str, make) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, leaf, make(getattr(parent, leaf)))


def first_adapted_layer(num_layers: int, trainable_layers: int, tune: str) -> int:
    """Index of the first layer that gets LoRA / adapters: the last `trainable_layers` (0 = all)."""
    if trainable_layers < 0 or trainable_layers > num_layers:
        raise ConfigError(f"encoder.trainable_layers is {trainable_layers}, but the model has {num_layers} layers "
                          f"(tune: {tune} adapts the last k layers, 0 = all)")
    return 0 if trainable_layers == 0 else num_layers - trainable_layers


def add_lora(backbone, first: int, rank: int, alpha: float, dropout: float, targets) -> None:
    """LoRA on `targets` (names of LORA_TARGETS; config.resolve_config has checked them) of layers
    first..end, in place."""
    for layer in backbone.layers[first:]:
        for target in dict.fromkeys(targets):
            _replace(layer, LORA_TARGETS[target], lambda linear: LoRALinear(linear, rank, alpha, dropout))


def add_adapters(backbone, first: int, dim: int) -> None:
    """Bottleneck adapters after the attention and feed-forward blocks of layers first..end, in place."""
    for layer in backbone.layers[first:]:
        for site in ADAPTER_SITES:
            _replace(layer, site, lambda linear: AdaptedLinear(linear, dim))


def is_peft_parameter(name: str) -> bool:
    """True for the parameters LoRA and adapters add (the only backbone parameters they train)."""
    return ".lora_" in name or ".adapter." in name


def merge_lora(backbone) -> None:
    """Fold every LoRA update into its weight (W + s B A), leaving plain nn.Linear modules: the
    backbone is then a plain ESM-2 that fair-esm or transformers can load. Bottleneck adapters are
    nonlinear and cannot be folded: refused."""
    for name, module in backbone.named_modules():
        if isinstance(module, AdaptedLinear):
            raise ValueError(f"{name}: bottleneck adapters cannot be merged into the weights (they are "
                             f"nonlinear); keep using the train.py checkpoint")
    for layer in backbone.layers:
        for path in LORA_TARGETS.values():
            if isinstance(layer.get_submodule(path), LoRALinear):
                _replace(layer, path, lambda lora: lora.merged())
