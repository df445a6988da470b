"""The vision-to-text projectors of the VisualRWKV releases (the original's `proj`), chosen by
`VisualRWKVConfig.projector_type`:

* "linear" (VisualRWKV-6.0): y = W x. Built by `modeling_visualrwkv.VisualRWKVMultiModalProjector`.
* "gated_mlp" (VisualRWKV-HD, v0612): h = W_in x; y = W_out (h * sigmoid(W_gate h)).
* "relu_mlp" (VisualRWKV-UHD, v0613): y = W_out relu(W_in x). The original's class still creates the gate of the
  gated form (its forward was changed to ReLU on 2024-09-14, before the release) and the checkpoint stores it; it is
  kept, unused, so switching `projector_type` to "gated_mlp" tries the other reading of the release.
* "input_gated_mlp" (VisualRWKV-7, v0700): y = LayerNorm(W_out (x * sigmoid(W_gate x))), the gate on the input side.

None has biases except the LayerNorm. The original names (`proj.proj`, `proj.gate`, `proj.o_proj`, `proj.ln_v`) tell
the kinds apart in a checkpoint: `ORIGINAL_KEYS`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR_TYPES = ("linear", "gated_mlp", "relu_mlp", "input_gated_mlp")

# The original's projector tensors (under `proj.`) per type -> our names (under `multi_modal_projector.`). "gated_mlp"
# and "relu_mlp" store the same tensors: their checkpoints differ only in the code that reads them.
ORIGINAL_KEYS = {
    "linear": {"weight": "linear.weight"},
    "gated_mlp": {"proj.weight": "in_proj.weight", "gate.weight": "gate.weight", "o_proj.weight": "out_proj.weight"},
    "relu_mlp": {"proj.weight": "in_proj.weight", "gate.weight": "gate.weight", "o_proj.weight": "out_proj.weight"},
    "input_gated_mlp": {
        "gate.weight": "gate.weight",
        "o_proj.weight": "out_proj.weight",
        "ln_v.weight": "norm.weight",
        "ln_v.bias": "norm.bias",
    },
}


def check_projector_type(projector_type: str) -> None:
    if projector_type not in PROJECTOR_TYPES:
        raise ValueError(f"Unknown `projector_type` {projector_type!r}; expected one of {PROJECTOR_TYPES}.")


def vision_feature_size(vision_config) -> int:
    """Width of the vision features the projector reads: the three-encoder backbone's concatenation, or a single
    encoder's hidden size."""
    return getattr(vision_config, "feature_size", None) or vision_config.hidden_size


class GatedMLPProjector(nn.Module):
    """VisualRWKV-HD (gated) and -UHD (ReLU): an input projection, then a gated or ReLU hidden layer."""

    def __init__(self, in_features: int, out_features: int, gated: bool):
        super().__init__()
        self.in_proj = nn.Linear(in_features, out_features, bias=False)
        self.gate = nn.Linear(out_features, out_features, bias=False)
        self.out_proj = nn.Linear(out_features, out_features, bias=False)
        self.gated = gated

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.in_proj(features)
        hidden = hidden * torch.sigmoid(self.gate(hidden)) if self.gated else F.relu(hidden)
        return self.out_proj(hidden)


class InputGatedMLPProjector(nn.Module):
    """VisualRWKV-7: the input gated by itself, projected, then LayerNorm."""

    def __init__(self, in_features: int, out_features: int, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.gate = nn.Linear(in_features, in_features, bias=False)
        self.out_proj = nn.Linear(in_features, out_features, bias=False)
        self.norm = nn.LayerNorm(out_features, eps=layer_norm_eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.out_proj(features * torch.sigmoid(self.gate(features))))


def build_mlp_projector(projector_type: str, in_features: int, out_features: int) -> nn.Module:
    """The projector of a non-linear `projector_type`."""
    if projector_type in ("gated_mlp", "relu_mlp"):
        return GatedMLPProjector(in_features, out_features, gated=projector_type == "gated_mlp")
    if projector_type == "input_gated_mlp":
        return InputGatedMLPProjector(in_features, out_features)
    raise ValueError(f"{projector_type!r} is not an MLP projector type; expected one of {PROJECTOR_TYPES[1:]}.")


def detect_projector_type(names: set[str]) -> str:
    """The projector type of an original checkpoint from its tensor names under `proj.`; ValueError if they fit
    none. "gated_mlp" for the HD/UHD layout: whether it is read gated or with ReLU is the caller's choice."""
    for projector_type in ("linear", "gated_mlp", "input_gated_mlp"):
        if names == set(ORIGINAL_KEYS[projector_type]):
            return projector_type
    raise ValueError(
        f"Unrecognised projector tensors {sorted('proj.' + n for n in names)}: expected proj.weight (linear), "
        "proj.{proj,gate,o_proj}.weight (VisualRWKV-HD/UHD MLP) or proj.{gate,o_proj}.weight + proj.ln_v.{weight,bias} "
        "(VisualRWKV-7 MLP)."
    )


__all__ = [
    "GatedMLPProjector",
    "InputGatedMLPProjector",
    "ORIGINAL_KEYS",
    "PROJECTOR_TYPES",
    "build_mlp_projector",
    "check_projector_type",
    "detect_projector_type",
    "vision_feature_size",
]
