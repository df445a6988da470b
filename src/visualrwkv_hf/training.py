"""Fine-tuning helpers: LoRA target presets and the original VisualRWKV-6 freezing options.

PEFT targets a module when its name ends with a listed name, so the presets below pick the time-mix (attention)
Linears, the channel-mix (feed-forward) Linears or the projector; RWKV-7 names its Linears as RWKV-6 does, so the same
presets adapt it (it has no `att_gate` / `ffn_receptance`, which PEFT then simply does not find). The vision tower is
always frozen, as in the original: no preset names its layers, and `lora_config` keeps `"all-linear"` (which would
otherwise adapt the CLIP attention and MLP layers too) off it with `exclude_modules`.
"""

from __future__ import annotations

from torch import nn

TIME_MIX_TARGETS = ["att_receptance", "att_key", "att_value", "att_gate", "att_output"]
CHANNEL_MIX_TARGETS = ["ffn_key", "ffn_receptance", "ffn_value"]
# Every projector kind's Linears (`projectors.py`): the linear one of v6.0, the MLPs of HD/UHD and VisualRWKV-7.
PROJECTOR_TARGETS = [
    "multi_modal_projector.linear",
    "multi_modal_projector.in_proj",
    "multi_modal_projector.gate",
    "multi_modal_projector.out_proj",
]

LORA_TARGETS = {
    "time_mix": TIME_MIX_TARGETS,
    "channel_mix": CHANNEL_MIX_TARGETS,
    "projector": PROJECTOR_TARGETS,
    "language_model": TIME_MIX_TARGETS + CHANNEL_MIX_TARGETS,
    "all": TIME_MIX_TARGETS + CHANNEL_MIX_TARGETS + PROJECTOR_TARGETS,
}

# A regex PEFT matches against full module names: everything inside the vision tower.
VISION_TOWER_MODULES = r".*\bvision_tower\b.*"


def lora_config(targets: str | list[str] = "language_model", **lora_kwargs):
    r"""
    A `peft.LoraConfig` for VisualRWKV that never adapts the vision tower.

    Args:
        targets: A `LORA_TARGETS` preset (`"time_mix"`, `"channel_mix"`, `"projector"`, `"language_model"`,
            `"all"`), several joined by `"+"` (`"time_mix+projector"`), `"all-linear"` (PEFT's choice: every Linear
            but the head), or a list of module names.
        **lora_kwargs: Other `LoraConfig` arguments (`r`, `lora_alpha`, `lora_dropout`, `modules_to_save`, ...).
            To train the projector fully instead of through LoRA, as the original did, pass
            `modules_to_save=["multi_modal_projector"]`.
    """
    from peft import LoraConfig

    if isinstance(targets, str) and targets != "all-linear":
        unknown = [name for name in targets.split("+") if name not in LORA_TARGETS]
        if unknown:
            raise ValueError(
                f"Unknown LoRA target preset(s) {unknown}: choose from {sorted(LORA_TARGETS)} or 'all-linear'."
            )
        targets = [module for name in targets.split("+") for module in LORA_TARGETS[name]]
    return LoraConfig(target_modules=targets, exclude_modules=VISION_TOWER_MODULES, **lora_kwargs)


def freeze_for_training(
    model: nn.Module, train_embeddings: bool = False, frozen_blocks: int = 0, train_projector: bool = True
) -> nn.Module:
    r"""
    Sets which parameters of a `VisualRWKVForConditionalGeneration` train, as the original's options did (for full
    fine-tuning; with PEFT, the adapters decide).

    Args:
        model: The model, changed in place and returned.
        train_embeddings: Train the token embedding (the original froze it).
        frozen_blocks: Freeze the first `n` RWKV blocks (block 0 holds `ln0`).
        train_projector: Train the projector (stage 1 trains only the projector; stage 2 projector + RWKV).

    The vision tower is always frozen; the other blocks, the final norm and the head train.
    """
    blocks = model.model.language_model.blocks
    if not 0 <= frozen_blocks <= len(blocks):
        raise ValueError(f"`frozen_blocks` must be in 0..{len(blocks)}, got {frozen_blocks}.")
    model.requires_grad_(True)
    model.model.vision_tower.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(train_embeddings)
    model.model.multi_modal_projector.requires_grad_(train_projector)
    for block in blocks[:frozen_blocks]:
        block.requires_grad_(False)
    return model


__all__ = ["LORA_TARGETS", "freeze_for_training", "lora_config"]
