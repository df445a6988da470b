"""The projectors of VisualRWKV-6.0 / HD / UHD / 7 against their formulas written with the original's tensor names."""

import pytest
import torch

from visualrwkv_hf import VisualRWKVConfig
from visualrwkv_hf.projectors import (
    ORIGINAL_KEYS,
    PROJECTOR_TYPES,
    build_mlp_projector,
    check_projector_type,
    detect_projector_type,
)

IN, OUT = 24, 16


def original_weights(projector_type: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "proj.weight": (OUT, IN), "gate.weight": (OUT, OUT), "o_proj.weight": (OUT, OUT),
    } if projector_type != "input_gated_mlp" else {
        "gate.weight": (IN, IN), "o_proj.weight": (OUT, IN), "ln_v.weight": (OUT,), "ln_v.bias": (OUT,),
    }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def original_projection(projector_type: str, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`MLPWithContextGating.forward` of each release, from the original code."""
    if projector_type == "gated_mlp":  # VisualRWKV-HD
        h = x @ w["proj.weight"].T
        return (h * torch.sigmoid(h @ w["gate.weight"].T)) @ w["o_proj.weight"].T
    if projector_type == "relu_mlp":  # VisualRWKV-UHD after 2024-09-14
        return torch.relu(x @ w["proj.weight"].T) @ w["o_proj.weight"].T
    gated = x * torch.sigmoid(x @ w["gate.weight"].T)  # VisualRWKV-7: gate on the input, then LayerNorm
    return torch.nn.functional.layer_norm(gated @ w["o_proj.weight"].T, (OUT,), w["ln_v.weight"], w["ln_v.bias"], 1e-5)


@pytest.mark.parametrize("projector_type", ["gated_mlp", "relu_mlp", "input_gated_mlp"])
def test_mlp_projectors_compute_the_originals_formula(projector_type):
    weights = original_weights(projector_type)
    projector = build_mlp_projector(projector_type, IN, OUT)
    projector.load_state_dict({ORIGINAL_KEYS[projector_type][k]: v for k, v in weights.items()}, strict=True)
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(projector(x), original_projection(projector_type, weights, x))


def test_gated_and_relu_readings_of_the_same_tensors_differ():
    """UHD's checkpoint fits both forms; they must not silently agree (the choice is a documented option)."""
    weights = original_weights("gated_mlp")
    x = torch.randn(3, IN)
    assert not torch.allclose(original_projection("gated_mlp", weights, x), original_projection("relu_mlp", weights, x))


def test_projector_type_is_detected_from_the_original_names():
    assert detect_projector_type({"weight"}) == "linear"
    assert detect_projector_type({"proj.weight", "gate.weight", "o_proj.weight"}) == "gated_mlp"
    assert detect_projector_type({"gate.weight", "o_proj.weight", "ln_v.weight", "ln_v.bias"}) == "input_gated_mlp"
    with pytest.raises(ValueError, match=r"Unrecognised projector tensors \['proj.gate.weight'\]"):
        detect_projector_type({"gate.weight"})


def test_unknown_projector_type_is_refused():
    assert PROJECTOR_TYPES == ("linear", "gated_mlp", "relu_mlp", "input_gated_mlp")
    with pytest.raises(ValueError, match="Unknown `projector_type` 'mlp'; expected one of"):
        check_projector_type("mlp")
    with pytest.raises(ValueError, match="Unknown `projector_type` 'mlp'"):
        VisualRWKVConfig(projector_type="mlp")
    with pytest.raises(ValueError, match="not an MLP projector type"):
        build_mlp_projector("linear", IN, OUT)
