"""What the configurations of this package share: the model-type check (with the model types older folders were
saved under) and the recurrent cache layout of an RWKV language model."""

from __future__ import annotations

from transformers.configuration_utils import PreTrainedConfig


def accepted_model_types(config_class: type[PreTrainedConfig]) -> tuple[str, ...]:
    """The class's model type, then the older names its folders may have been saved under."""
    return (config_class.model_type, *getattr(config_class, "legacy_model_types", ()))


def check_model_type(config_class: type[PreTrainedConfig], model_type: str | None, source: str) -> None:
    """Refuses a configuration of another model type. transformers only warns, keeps the foreign `model_type` on the
    config (and writes it back on save) and builds our model from fields that mean something else or nothing."""
    if model_type is not None and model_type not in accepted_model_types(config_class):
        raise ValueError(
            f"{source} is a `{model_type}` configuration, not a `{config_class.model_type}` one: "
            f"{config_class.__name__} cannot load it. Load it with the classes of its own type (AutoConfig, "
            f"AutoModel...), or, if it really is a `{config_class.model_type}` model, correct its `model_type`."
        )


class ModelTypeCheckMixin:
    """`from_pretrained` refuses a folder whose config.json is of another model type, naming the folder; the
    constructor refuses a `model_type` argument of another type and drops an accepted older one, so the config is
    saved under the current name."""

    # Older model types of this configuration, which its folders may still carry.
    legacy_model_types = ()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        # As transformers' `from_pretrained` reads it: our part of a composite config, or a sub-dict of our type.
        ours = config_dict.get(cls.base_config_key, config_dict) if cls.base_config_key else config_dict
        accepted = accepted_model_types(cls)
        nested = any(isinstance(value, dict) and value.get("model_type") in accepted for value in ours.values())
        if not nested:
            check_model_type(cls, ours.get("model_type"), f"{pretrained_model_name_or_path}'s config.json")
        return config_dict, kwargs

    def pop_model_type(self, kwargs: dict) -> None:
        """Checks and removes a `model_type` passed to the constructor (config.json's own, when loading)."""
        check_model_type(type(self), kwargs.pop("model_type", None), "This")


class RecurrentLayersMixin:
    """The cache layout of an RWKV language model: per block one recurrent cache layer (transformers'
    `LinearAttentionLayer`) holding two token-shift vectors as "conv" states and the WKV matrix as recurrent state
    (see `modeling_rwkv_common`)."""

    number_of_conv_states = 2

    def check_sizes(self, family: str, *names: str) -> None:
        """Refuses a size that is not a positive integer (the shared ones and `names`), and a width that does not
        split into heads."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "head_size_divisor", *names):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.head_size != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be a multiple of `head_size` ({self.head_size}): "
                f"{family} splits the model width into heads of `head_size` channels."
            )

    @property
    def layer_types(self) -> list[str]:
        # Read by transformers' DynamicCache to build one recurrent (LinearAttentionLayer) cache layer per block.
        return ["linear_attention"] * self.num_hidden_layers


__all__ = ["ModelTypeCheckMixin", "RecurrentLayersMixin", "check_model_type"]
