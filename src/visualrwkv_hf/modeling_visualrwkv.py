"""VisualRWKV: a vision encoder, a projector, and an RWKV language model: RWKV-6 with image scanning (VisualRWKV-6,
HD, UHD) or RWKV-7 (VisualRWKV-7).

The image features replace the image placeholder tokens (LLaVA style): every image is one contiguous run of
`num_image_tokens` placeholders. With a scanning `scan_mode`, inside every RWKV-6 block the image patches are read in
the block's scan order (see `scanning.py`): each sample's own patch span is reordered at the block input and restored
at its output, so a row holds at most one image. With `scan_mode="unidirectional"` (always for RWKV-7) the tokens
are read in order and a row may hold several images.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_sam_dino_siglip import SamDinoSiglipVisionConfig
from .configuration_visualrwkv import VisualRWKVConfig
from .modeling_rwkv6 import Rwkv6Model
from .modeling_rwkv7 import Rwkv7Model
from .modeling_rwkv_common import RecurrentGenerationMixin, RwkvPreTrainedModel
from .modeling_sam_dino_siglip import SamDinoSiglipVisionModel
from .ops import DecodeLinear
from .projectors import build_mlp_projector, vision_feature_size
from .scanning import block_gather_indices

# `AutoModel.from_config(vision_config)` builds the three-encoder backbone of VisualRWKV-HD/UHD/7 too.
AutoModel.register(SamDinoSiglipVisionConfig, SamDinoSiglipVisionModel, exist_ok=True)


class VisualRWKVPreTrainedModel(RwkvPreTrainedModel):
    config: VisualRWKVConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["Rwkv6Block", "Rwkv7Block"]


class VisualRWKVMultiModalProjector(nn.Module):
    """Maps vision features to the language model's width (the original's `proj`): the linear projector of
    VisualRWKV-6.0; `projectors.py` has the MLP ones of the later releases."""

    def __init__(self, config: VisualRWKVConfig):
        super().__init__()
        self.linear = nn.Linear(
            vision_feature_size(config.vision_config), config.text_config.hidden_size, bias=config.projector_bias
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


class VisualRWKVModel(VisualRWKVPreTrainedModel):
    """The vision tower, the projector and the RWKV-6 or RWKV-7 backbone, without a language-modelling head."""

    def __init__(self, config: VisualRWKVConfig):
        super().__init__(config)
        # Frozen in the original training; left trainable here so users decide.
        if config.multi_encoder_vision:
            # Built by class, not through the AutoModel registry: with remote code, the configuration and modeling
            # files are loaded as separate copies, so the registry would not recognise the config's class.
            self.vision_tower = SamDinoSiglipVisionModel(config.vision_config)
        else:
            self.vision_tower = AutoModel.from_config(config.vision_config)
        if config.projector_type == "linear":
            self.multi_modal_projector = VisualRWKVMultiModalProjector(config)
        else:
            self.multi_modal_projector = build_mlp_projector(
                config.projector_type, vision_feature_size(config.vision_config), config.text_config.hidden_size
            )
        self.language_model = (Rwkv7Model if config.rwkv7_text else Rwkv6Model)(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.language_model.set_input_embeddings(new_embeddings)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor | None, high_res_pixel_values: torch.FloatTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | None:
        """
        As LLaVA's: the vision tower's output, with the image features as the language model sees them in
        `pooler_output`, (images, num_image_tokens, hidden): the selected vision hidden state (no post-layernorm),
        the patches row-major (grid-pooled if configured), then the cls token, then the projector. The whole output
        is the form `mm_encoder_outputs={"image": ...}` takes, to reuse the features instead of running the vision
        tower again. None without images (`generate` asks for the features of `pixel_values=None` too). The
        three-encoder backbone (VisualRWKV-HD/UHD/7) also reads `high_res_pixel_values`, SAM's 1024 px views; its
        output is the feature map itself (`last_hidden_state`).
        """
        if pixel_values is None:
            return None
        config = self.config
        pixel_inputs = {"pixel_values": pixel_values}
        if config.multi_encoder_vision:
            if high_res_pixel_values is None:
                raise ValueError(
                    "This model's vision backbone (DINOv2 + SigLIP + SAM) needs `high_res_pixel_values` (SAM's "
                    "1024 px views) with `pixel_values`: use the model's processor."
                )
            pixel_inputs["high_res_pixel_values"] = high_res_pixel_values
        else:
            rows, cols = config.patch_grid
            patch_size = config.vision_config.patch_size
            expected_size = (rows * patch_size, cols * patch_size)
            if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != expected_size:
                raise ValueError(
                    f"`pixel_values` must be (images, channels, {expected_size[0]}, {expected_size[1]}) for this "
                    f"vision encoder, got {tuple(pixel_values.shape)}: use the model's image processor."
                )
        for name, pixels in pixel_inputs.items():
            nonfinite = ~torch.isfinite(pixels).flatten(1).all(1)
            if bool(nonfinite.any()):
                raise ValueError(
                    f"`{name}` of image(s) {nonfinite.nonzero().flatten().tolist()} hold NaN or infinite values; "
                    "expected finite pixels, as the model's image processor makes them."
                )
        if config.multi_encoder_vision:
            # in [0, 1]: normalised in float32 inside, then cast to the towers' dtype, as the original
            features = self.vision_tower(pixel_values, high_res_pixel_values)
            vision_outputs = BaseModelOutputWithPooling(last_hidden_state=features)
        else:
            vision_outputs = self.vision_tower(
                pixel_values.to(self.vision_tower.dtype), output_hidden_states=True, return_dict=True
            )
            features = vision_outputs.hidden_states[config.vision_feature_layer]
        rows, cols = config.patch_grid
        num_cls = int(config.vision_has_cls_token)
        cls_token, patches = features[:, :num_cls], features[:, num_cls:]
        if config.grid_size == 0:
            patches = patches[:, :0]
        elif config.grid_size > 0:
            patch_grid = patches.transpose(1, 2).unflatten(2, (rows, cols))  # (images, hidden, rows, cols)
            if config.multi_encoder_vision:  # VisualRWKV-7's `adaptive_pooling`: any size, overlapping windows
                patch_grid = F.adaptive_avg_pool2d(patch_grid, config.image_grid)
            else:
                patch_grid = F.avg_pool2d(patch_grid, rows // config.grid_size)
            patches = patch_grid.flatten(2).transpose(1, 2)
        vision_outputs.pooler_output = self.multi_modal_projector(torch.cat([patches, cls_token], dim=1))
        return vision_outputs

    def pre_encoded_image_features(self, image_outputs: BaseModelOutputWithPooling) -> torch.FloatTensor:
        """
        (images, num_image_tokens, hidden) from `mm_encoder_outputs["image"]`: the `pooler_output` of
        `get_image_features(..., return_dict=True)`, a tensor or (as transformers' generation may hand them on) a
        list of tensors, holding whole images.
        """
        features = getattr(image_outputs, "pooler_output", None)
        if features is None:
            raise TypeError(
                "`mm_encoder_outputs['image']` must be what `model.get_image_features(pixel_values)` returns (the "
                f"features in its `pooler_output`), got {type(image_outputs).__name__}."
            )
        if isinstance(features, (list, tuple)):
            features = torch.cat([feature.reshape(-1, feature.shape[-1]) for feature in features])
        num_tokens, hidden = self.config.num_image_tokens, self.config.text_config.hidden_size
        if features.shape[-1] != hidden or features.numel() % (num_tokens * hidden):
            raise ValueError(
                f"The pre-encoded image features are {tuple(features.shape)}; this model reads {num_tokens} vectors of "
                f"size {hidden} per image, as its `get_image_features` returns them."
            )
        return features.reshape(-1, num_tokens, hidden)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor
    ) -> torch.BoolTensor:
        """(batch, seq) mask of the image placeholder positions, from the ids or, without ids, the embeddings."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_token_embedding).all(-1)

    def image_spans(self, placeholder_mask: torch.BoolTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
        """
        (rows, starts) of every image span, in the order the images are given: row by row, left to right within a
        row. Every image is one contiguous run of exactly `num_image_tokens` placeholders (images back to back make
        one run of a multiple); an image split across calls, or a row with a wrong placeholder count, is refused.
        A row holds at most one image unless `scan_mode` is "unidirectional": scanning reorders one span per row.
        """
        config, num_image_tokens = self.config, self.config.num_image_tokens
        counts = placeholder_mask.sum(1)
        rows, positions = placeholder_mask.nonzero(as_tuple=True)  # row-major
        bad_rows = counts % num_image_tokens != 0
        if not bool(bad_rows.any()):
            spans = positions.view(-1, num_image_tokens)
            broken = spans[:, -1] - spans[:, 0] != num_image_tokens - 1
            bad_rows[rows.view(-1, num_image_tokens)[broken, 0]] = True
        if bool(bad_rows.any()):
            row = int(bad_rows.nonzero()[0])
            row_positions = positions[rows == row]
            raise ValueError(
                f"Row {row} holds {int(counts[row])} image placeholder tokens (positions {int(row_positions[0])} to "
                f"{int(row_positions[-1])}); each image needs exactly {num_image_tokens} contiguous placeholders, all "
                "in the same call (with a cache, an image's whole span must be inside one forward call)."
            )
        spans_per_row = counts // num_image_tokens
        if config.scan_mode != "unidirectional" and bool((spans_per_row > 1).any()):
            row = int((spans_per_row > 1).nonzero()[0])
            raise ValueError(
                f"Row {row} holds {int(spans_per_row[row])} images, but `scan_mode={config.scan_mode!r}` reorders one "
                "image span per row: give one image per prompt, or use a model with `scan_mode='unidirectional'` "
                "(such as VisualRWKV-7), which reads several in order."
            )
        return rows[::num_image_tokens], positions[::num_image_tokens]

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        high_res_pixel_values: torch.FloatTensor | None = None,
        **kwargs,
    ) -> MultimodalBaseModelOutputWithPast:
        """
        Args:
            input_ids: Token ids with `num_image_tokens` consecutive `image_token_id` placeholders per image (at most
                one image per row unless `scan_mode` is "unidirectional"; rows without placeholders are text only).
            pixel_values: One image per placeholder span, row by row and left to right within a row; needed whenever
                the call holds placeholders (with a cache, only the call that holds the image spans, usually the
                prefill).
            attention_mask: (batch, seq) 1 for real tokens, 0 for padding (wherever it lies).
            cache: Recurrent state from a previous call (updated in place); created when `use_cache` and none is
                given. `past_key_values=` and `cache_params=` are accepted as deprecated names for it.
            mm_encoder_outputs: `{"image": model.get_image_features(pixel_values)}` instead of `pixel_values`: the
                same images' features, computed once and reused without the vision tower.
            high_res_pixel_values: The three-encoder backbone's second input (SAM's 1024 px views), one per image of
                `pixel_values`.

        Returns the language model's output with the image features this call used in `image_outputs`;
        `output_hidden_states=True` adds the input embeddings (image features merged) and every block's output, in
        position order (under the float16 guard scaled, see `Rwkv6Config.rescale_every`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is not None and pixel_values is not None:
            raise ValueError(
                "Pass the images either as `pixel_values` or as pre-computed features in `mm_encoder_outputs`, not "
                "both."
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        span_rows, span_starts = self.image_spans(placeholder_mask)
        num_spans = len(span_starts)
        if image_outputs is not None:
            image_features = self.pre_encoded_image_features(image_outputs)
            num_images = image_features.shape[0]
        else:
            num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if num_images != num_spans:
            raise ValueError(
                f"Got {num_images} images for {len(span_rows.unique())} rows with image placeholders, which hold "
                f"{num_spans} image spans: pass one image per run of {self.config.num_image_tokens} `image_token_id` "
                f"({self.config.image_token_id}) placeholders, row by row and left to right within a row."
            )
        backbone_inputs = {}
        if num_images:
            if image_outputs is None:
                image_outputs = self.get_image_features(pixel_values, high_res_pixel_values)
                image_features = image_outputs.pooler_output
            inputs_embeds = inputs_embeds.masked_scatter(
                placeholder_mask[:, :, None], image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            )
            if not self.config.rwkv7_text:  # RWKV-7 does not scan
                row_starts = torch.full_like(placeholder_mask[:, 0], -1, dtype=torch.long)
                backbone_inputs["block_gather_indices"] = block_gather_indices(
                    self.config.scan_mode,
                    self.config.text_config.num_hidden_layers,
                    self.config.image_grid,
                    row_starts.index_put((span_rows,), span_starts),  # one span per row when scanning
                    inputs_embeds.shape[1],
                )

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            **backbone_inputs,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(**outputs, image_outputs=image_outputs)


class VisualRWKVForConditionalGeneration(VisualRWKVPreTrainedModel, RecurrentGenerationMixin):
    """VisualRWKV with its (untied) language-modelling head."""

    _tied_weights_keys = {}

    def __init__(self, config: VisualRWKVConfig):
        super().__init__(config)
        self.model = VisualRWKVModel(config)
        self.lm_head = DecodeLinear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # The image placeholder is not text: a generated one would be read back as a lone (partial) image span.
        self.generation_config.suppress_tokens = [config.image_token_id]

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.model.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_image_features(
        self, pixel_values: torch.FloatTensor, high_res_pixel_values: torch.FloatTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, high_res_pixel_values, **kwargs)

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        # transformers expands (for beams, several sequences per prompt) the image features it is given in place:
        # expanding copies keeps features passed in by the user reusable for the next call
        copies = {modality: copy.copy(outputs) for modality, outputs in mm_encoder_output.items()}
        return super()._expand_multimodal_outputs(input_ids, copies, expand_size, inputs_embeds)

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, inputs_embeds=None, is_first_iteration=False, **kwargs
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration:
            self.drop_images_already_in_cache(model_inputs, input_ids, inputs_embeds, next_sequence_length)
        return model_inputs

    def drop_images_already_in_cache(self, model_inputs: dict, input_ids, inputs_embeds, next_sequence_length) -> None:
        """
        Continuing a cache, `generate` feeds only the prompt positions the cache has not seen (the last
        `next_sequence_length`). An image whose span lies in the part already seen is in the recurrent state: its
        `pixel_values` / features are not needed again, and are left out of `model_inputs` (the others kept, in
        order), so the prompt's images can be passed as they are.
        """
        if next_sequence_length is None:
            return
        # on the first step, `input_ids` is empty when the prompt comes as `inputs_embeds`
        placeholder_mask = self.model.get_placeholder_mask(input_ids if inputs_embeds is None else None, inputs_embeds)
        seen = placeholder_mask.shape[1] - int(next_sequence_length)
        try:
            _, span_starts = self.model.image_spans(placeholder_mask)
        except ValueError:
            return  # left for `forward` to report, on the part it reads
        # per image, in the order they are given: its span ends in the unseen part (one that straddles the
        # boundary is kept, for `forward` to refuse as a partial span)
        keep = span_starts + self.config.num_image_tokens > seen
        if bool(keep.all()):
            return
        # a count that does not match is left for `forward` to report
        image_outputs = (model_inputs.get("mm_encoder_outputs") or {}).get("image")
        if image_outputs is not None:
            features = self.model.pre_encoded_image_features(image_outputs)
            if len(features) == len(keep):
                kept = BaseModelOutputWithPooling(pooler_output=features[keep]) if bool(keep.any()) else None
                model_inputs["mm_encoder_outputs"] = {**model_inputs["mm_encoder_outputs"], "image": kept}
        for name in ("pixel_values", "high_res_pixel_values"):
            pixels = model_inputs.get(name)
            if pixels is not None and len(pixels) == len(keep):
                model_inputs[name] = pixels[keep] if bool(keep.any()) else None

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        high_res_pixel_values: torch.FloatTensor | None = None,
        **kwargs,
    ) -> MultimodalCausalLMOutputWithPast:
        """
        Args:
            labels: (batch, seq) next-token targets, shifted inside; -100 is ignored (use it for image, prompt and
                padding positions). The loss is `loss_function`, the mean over valid labels; extra keyword arguments
                (such as Trainer's `num_items_in_batch`) reach it. Other reductions (the original's sample-level
                loss) go through Trainer's `compute_loss_func` (`ops/loss.py`).
            logits_to_keep: Compute logits for the last `n` positions only (0 = all), or for the given indices.
            mm_encoder_outputs: `{"image": model.get_image_features(pixel_values)}` instead of `pixel_values`, to
                reuse an image's features without running the vision tower again.
            high_res_pixel_values: SAM's 1024 px views for the three-encoder backbone (VisualRWKV-HD/UHD/7).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            high_res_pixel_values=high_res_pixel_values,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)).float()

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            image_outputs=outputs.image_outputs,
        )


__all__ = [
    "VisualRWKVForConditionalGeneration",
    "VisualRWKVModel",
    "VisualRWKVMultiModalProjector",
    "VisualRWKVPreTrainedModel",
]
