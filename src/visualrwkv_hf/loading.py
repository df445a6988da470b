"""`from_pretrained` that refuses weights which do not match the configuration.

transformers loads a checkpoint whose config asks for more layers than its weights hold by initialising the missing
layers at random, and one with fewer layers by dropping the extra weights, in both cases with only a logged table;
a shape mismatch raises, but its message only points at that table. A VisualRWKV model with a random or missing block
gives fluent garbage, so these are errors here, naming the layers, tensors and shapes.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from .checkpoint_io import short_list

# "<prefix>.<index>.<rest>": a tensor of one layer of a layer list (blocks, vision encoder layers).
LAYER_KEY = re.compile(r"^(.*?\.)(\d+)\.")
LISTED = 6  # entries shown per kind of problem (three kinds can share one message)


def summarize_keys(keys: set[str], present: set[str]) -> str:
    """The keys, with every layer none of whose tensors is in `present` folded into `prefix.{i, j}` (the whole layer
    is missing or extra), the rest listed one by one; at most `LISTED` entries."""
    present_layers = {match[0] for key in present if (match := LAYER_KEY.match(key))}
    layers, tensors = defaultdict(list), []
    for key in sorted(keys):
        match = LAYER_KEY.match(key)
        if match and match[0] not in present_layers:
            layers[match[1]].append(int(match[2]))
        else:
            tensors.append(key)
    return short_list(
        [f"layers {prefix}{{{', '.join(map(str, sorted(set(indices))))}}}" for prefix, indices in layers.items()]
        + tensors,
        LISTED,
    )


def weight_mismatch(model, loading_info: dict, check_shapes: bool) -> str | None:
    """What is wrong between the model built from the config and the checkpoint's weights, or None."""
    model_keys = set(model.state_dict())
    problems = []
    if loading_info["missing_keys"]:
        loaded = model_keys - set(loading_info["missing_keys"])
        problems.append(
            f"missing from the weights (they would be random): {summarize_keys(loading_info['missing_keys'], loaded)}"
        )
    if loading_info["unexpected_keys"]:
        unexpected = summarize_keys(loading_info["unexpected_keys"], model_keys)
        problems.append(f"in the weights but not in the model: {unexpected}")
    if check_shapes and loading_info["mismatched_keys"]:
        shapes = [
            f"{key} (weights {tuple(in_weights)}, config {tuple(in_model)})"
            for key, in_weights, in_model in sorted(loading_info["mismatched_keys"])
        ]
        problems.append(f"shapes differ: {short_list(shapes, LISTED)}")
    return "; ".join(problems) or None


class StrictLoadingMixin:
    """Makes `from_pretrained` raise a `ValueError` when the weights do not match the configuration (see the module
    docstring). A model without a head still loads a checkpoint that has one (`AutoModel` from a
    `...ForConditionalGeneration` or `...ForCausalLM` folder); `ignore_mismatched_sizes=True` still re-initialises
    tensors of another shape, as in transformers."""

    # The head a head-less model leaves out.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        # transformers' own shape check is turned off so that ours, which names the tensors, reports all problems.
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True,
            **kwargs,
        )
        problems = weight_mismatch(model, loading_info, check_shapes=not ignore_mismatched_sizes)
        if problems:
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} do not match its configuration, so "
                f"{cls.__name__} cannot load them: {problems}. Check config.json (the layer counts "
                "`num_hidden_layers` and the sizes) against the checkpoint."
            )
        return (model, loading_info) if output_loading_info else model


def visualrwkv_folder_config(model_dir: str | os.PathLike):
    """The `VisualRWKVConfig` of a model folder the commands (`chat`, `eval`, `web`) are pointed at; a path that holds
    no config.json, or a folder of another model type, is refused in one line saying what to do."""
    from .configuration_visualrwkv import VisualRWKVConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a model folder (no config.json): run `visualrwkv demo` (or `make demo`) for a "
            "trained demo model, or convert a checkpoint with `visualrwkv convert --checkpoint X.pth --output DIR`."
        )
    return VisualRWKVConfig.from_pretrained(model_dir)  # refuses a folder of another model type, naming it
