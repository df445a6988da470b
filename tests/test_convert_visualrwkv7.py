"""VisualRWKV-7 (v0700) checkpoints: detection, conversion, and the converted model against an independent
reconstruction of the original forward.

The reconstruction uses what the original ran or its code written out: the towers from timm and Meta's
`segment_anything` (`sam_dino_siglip_reference`), `nn.AdaptiveAvgPool2d` as its `adaptive_pooling`, the projector
from its `MLPWithContextGating` (y = LayerNorm(W_o (x * sigmoid(W_g x))), eps 1e-5), the prompt ids from its
`evaluate.py` / `src/dataset.py` steps, and the RWKV-7 language model run by BlinkDL's `rwkv` package (RWKV_V7_ON=1,
in a subprocess: `rwkv7_reference.run_reference`).

The package takes token ids only. The original's `preparing_embedding` overwrites the embeddings of the placeholder
positions (id 65535) with the projected image features, in order, and its block 0 applies `ln0` to every input vector;
the package applies `ln0` to its whole embedding table when it loads a file. So the reference file's `emb.weight` gets
one extra row per image token, holding that token's projected features, and the prompt given to the package has
those rows' ids at the placeholder positions: block 0 then sees ln0(features) there, as in the original.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from visualrwkv_hf import cli
from visualrwkv_hf.convert_visualrwkv import (
    OriginalCheckpoint,
    convert_original_to_hf,
    convert_visualrwkv_checkpoint,
    model_card,
)
from visualrwkv_hf.tokenization_rwkv_world import RwkvWorldTokenizer

from rwkv6_reference import random_blinkdl_rwkv6
from rwkv7_reference import random_blinkdl_rwkv7, run_reference
from sam_dino_siglip_reference import OriginalBackbone, import_original_libraries
from test_convert_sam_dino_siglip import original_pixels, test_image
from test_modeling_sam_dino_siglip import TINY_ORIGINAL, TINY_VISION_CONFIG, randomize

pytestmark = pytest.mark.skipif(
    import_original_libraries() is None, reason="timm and segment-anything (the `test` extra) are not installed"
)

TEXT_WIDTH = 64
TINY_RWKV7 = dict(hidden_size=TEXT_WIDTH, head_size=16, num_layers=2)
FIXED_RANKS = (64, 64, 32, 128)  # decay / a / v / gate: the 0B1 and 0B4 files (before the formula ranks)
FEATURES = 32 + 48 + 4 * 8  # the tiny towers' DINOv2 + SigLIP + folded SAM channels
IMAGE_TOKEN_ID = 65535  # the original's IMAGE_TOKEN_INDEX
STOP_TOKEN_ID = 261  # "\n\n": the original's stop token and left-padding token
TOKENS_PER_IMAGE = 1024
QUESTION = "What color is the bus?\nAnswer the question using a single word or phrase."
NEW_TOKENS = 4
TOLERANCE = 1e-4  # fp32: max |difference| / max |reference|


def original_state_dict(seed: int = 0, ranks: tuple[int, int, int, int] = FIXED_RANKS) -> dict[str, torch.Tensor]:
    """A random v0700 checkpoint in the original layout: rwkv.* (BlinkDL x070, vocabulary 65536),
    vit.{dino,siglip,sam}_featurizer.* (SigLIP's unused pooling head included) and proj.{gate,o_proj,ln_v}."""
    backbone = OriginalBackbone(**TINY_ORIGINAL)
    randomize(backbone, seed)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {f"rwkv.{k}": v for k, v in random_blinkdl_rwkv7(**TINY_RWKV7, ranks=ranks, seed=seed).items()}
    state_dict |= {f"vit.{k}": v.clone() for k, v in backbone.state_dict().items()}
    state_dict |= {
        "proj.gate.weight": torch.randn(FEATURES, FEATURES, generator=generator) * FEATURES**-0.5,
        "proj.o_proj.weight": torch.randn(TEXT_WIDTH, FEATURES, generator=generator) * FEATURES**-0.5,
        "proj.ln_v.weight": 1 + 0.1 * torch.randn(TEXT_WIDTH, generator=generator),
        "proj.ln_v.bias": 0.1 * torch.randn(TEXT_WIDTH, generator=generator),
    }
    return state_dict


@dataclass(frozen=True)
class Release:
    state_dict: dict[str, torch.Tensor]
    checkpoint: Path
    towers: Path
    folder: Path


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    return original_state_dict()


def convert_release(directory: Path, state_dict: dict[str, torch.Tensor]) -> Release:
    """Saves `state_dict` as an original .pth and converts it with `visualrwkv convert` (tiny towers' sizes given as
    the --vision-config JSON)."""
    checkpoint = directory / "VisualRWKV-v0700-tiny.pth"
    torch.save(state_dict, checkpoint)
    towers = directory / "towers.json"
    towers.write_text(json.dumps(TINY_VISION_CONFIG))
    folder = directory / "converted"
    assert cli.main(["convert", "--checkpoint", str(checkpoint), "--vision-config", str(towers), "--output",
                     str(folder), "--no-progress"]) == 0
    return Release(state_dict, checkpoint, towers, folder)


@pytest.fixture(scope="module")
def release(original, tmp_path_factory) -> Release:
    return convert_release(tmp_path_factory.mktemp("v0700"), original)


@pytest.fixture(scope="module")
def model(release):
    return AutoModelForImageTextToText.from_pretrained(release.folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(release):
    return AutoProcessor.from_pretrained(release.folder)


# ------------------------------------------------------------------ the original, written from its code


def original_prompt_ids(question: str, num_images: int, tokens_per_image: int = TOKENS_PER_IMAGE) -> list[int]:
    """The ids `evaluate.py` feeds for one question about `num_images` images: `get_input_text` (image lines first),
    `process_image_tokens_in_conversations`, `_add_speaker_and_signal` ("User: ... \\n\\n", then "Assistant:" for
    inference) and `preprocess` (each turn tokenized alone, split at "<image>" by `tokenize_with_image_token`)."""
    tokenizer = RwkvWorldTokenizer()
    text = "\n".join(num_images * ["<image>"]) + "\n" + question.replace("<image>", "").strip()
    count = text.count("<image>")
    value = re.sub(r"\n(\s*\n)+", "\n", text.replace("<image>", "").strip())
    value = ("\n".join(count * ["<image>"]) + "\n" + value).strip()
    ids = []
    for turn in ("User: " + value + "\n\n", "Assistant:"):
        chunks = [tokenizer.encode(chunk) for chunk in turn.split("<image>")]
        ids += chunks[0]
        for chunk in chunks[1:]:
            ids += [IMAGE_TOKEN_ID] * tokens_per_image + chunk
    return ids


@torch.no_grad()
def original_image_features(state_dict, images, tokens_per_image: int = TOKENS_PER_IMAGE) -> torch.Tensor:
    """`encode_images`: the towers, `adaptive_pooling` (nn.AdaptiveAvgPool2d to sqrt(tokens) per side), then
    `MLPWithContextGating` of v7.00. (images, tokens_per_image, text width)."""
    backbone = OriginalBackbone(**TINY_ORIGINAL).eval()
    backbone.load_state_dict({k[4:]: v for k, v in state_dict.items() if k.startswith("vit.")})
    features = torch.cat([backbone(*original_pixels(image, uhd=False)) for image in images])
    batch, length, width = features.shape
    side = int(length**0.5)
    pool = nn.AdaptiveAvgPool2d(int(tokens_per_image**0.5))
    features = pool(features.view(batch, side, side, width).permute(0, 3, 1, 2)).view(batch, width, -1)
    features = features.permute(0, 2, 1)
    gated = features * torch.sigmoid(features @ state_dict["proj.gate.weight"].T)
    return F.layer_norm(
        gated @ state_dict["proj.o_proj.weight"].T, (TEXT_WIDTH,), state_dict["proj.ln_v.weight"],
        state_dict["proj.ln_v.bias"], eps=1e-5,
    )


def original_language_model(state_dict, ids: list[int], image_features: torch.Tensor, path: Path, greedy: int = 0):
    """BlinkDL's `rwkv` package on the original LM with the image features spliced in as extra embedding rows (see
    the module docstring): `run_reference`'s logits over the prompt and greedy continuation."""
    language_model = {k.removeprefix("rwkv."): v for k, v in state_dict.items() if k.startswith("rwkv.")}
    vocab_size = language_model["emb.weight"].shape[0]
    rows = image_features.reshape(-1, TEXT_WIDTH)
    language_model["emb.weight"] = torch.cat([language_model["emb.weight"], rows])
    ids = torch.tensor(ids)
    placeholders = ids == IMAGE_TOKEN_ID
    assert int(placeholders.sum()) == len(rows)
    ids[placeholders] = vocab_size + torch.arange(len(rows))  # the features in order, as preparing_embedding
    torch.save(language_model, path)
    return run_reference(path, ids.tolist(), greedy_tokens=greedy)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# -------------------------------------------------------------------------------------------------------- tests


def test_release_is_detected_and_configured_as_the_original(release, model, processor):
    config = model.config
    assert config.text_config.model_type == "visualrwkv_rwkv7"
    assert type(model.model.language_model).__name__ == "Rwkv7Model"
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.head_size, text.intermediate_size) == (2, 64, 16, 256)
    ranks = (text.decay_low_rank_dim, text.a_low_rank_dim, text.v_low_rank_dim, text.gate_low_rank_dim)
    assert ranks == FIXED_RANKS
    assert config.vision_config.model_type == "visualrwkv_sam_dino_siglip" and config.vision_config.tiles_per_side == 0
    assert config.projector_type == "input_gated_mlp"
    assert (config.scan_mode, config.image_position, config.image_token_id) == ("unidirectional", "first", 65535)
    assert (config.grid_size, config.num_image_tokens) == (-1, TOKENS_PER_IMAGE)
    assert config.dtype == torch.float32  # the file's own
    assert type(processor.image_processor).__name__ == "SamDinoSiglipImageProcessor"
    assert (processor.image_token_id, processor.image_position, processor.num_image_tokens) == (65535, "first", 1024)
    assert processor.prompt_pad_multiple == 0  # the original's left padding is an option, off by default
    generation = model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id, generation.do_sample) == (STOP_TOKEN_ID, 0, False)
    card = (release.folder / "README.md").read_text()
    assert "# VisualRWKV-7 (v0700) for transformers" in card  # a tiny size: no released row is this model
    assert "| VisualRWKV-7 1.5B (v0700-1B5) | 79.84 | 59.74 | 49.49 | 63.20 |" in card
    assert "RWKV-7 (x070), 2 layers x 64, vocab 65536, LoRA ranks decay 64 / a 64 / v 32 / gate 128" in card
    assert "rwkv7" in card.split("---")[1]  # the Hub tags


def test_converted_weights_are_the_originals(release, model):
    state_dict = model.state_dict()
    sd = release.state_dict
    assert torch.equal(state_dict["model.language_model.embeddings.weight"], sd["rwkv.emb.weight"])
    assert torch.equal(state_dict["lm_head.weight"], sd["rwkv.head.weight"])
    assert torch.equal(state_dict["model.language_model.blocks.0.pre_norm.weight"], sd["rwkv.blocks.0.ln0.weight"])
    assert torch.equal(state_dict["model.multi_modal_projector.gate.weight"], sd["proj.gate.weight"])
    assert torch.equal(state_dict["model.multi_modal_projector.norm.bias"], sd["proj.ln_v.bias"])


@pytest.mark.parametrize("num_images", [1, 2, 3])
def test_prompt_ids_are_the_original_evaluate_codes(processor, num_images):
    images = [test_image(seed=seed) for seed in range(num_images)]
    ids = processor(images=[images], text=[QUESTION])["input_ids"][0]
    expected = original_prompt_ids(QUESTION, num_images)
    assert ids == expected
    # the pieces the original's dataset code names: "User: ", the image lines, "Assistant:"
    assert ids[:3] == [24281, 59, 33] and ids[-3:] == [5585, 41693, 59]
    assert ids.count(IMAGE_TOKEN_ID) == num_images * TOKENS_PER_IMAGE


@pytest.fixture(scope="module")
def features(original):
    """The original's projected features of three test images."""
    return original_image_features(original, [test_image(seed=seed) for seed in range(3)])


@pytest.mark.parametrize("num_images", [1, 2])
@torch.no_grad()
def test_logits_and_greedy_answer_equal_the_original(release, model, processor, features, num_images, tmp_path):
    images = [test_image(seed=seed) for seed in range(num_images)]
    inputs = processor(images=[images], text=[QUESTION], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    reference = original_language_model(
        release.state_dict, ids, features[:num_images], tmp_path / "original.pth", greedy=NEW_TOKENS
    )
    logits = model(**inputs).logits[0]
    assert relative_error(logits, reference["logits"]) < TOLERANCE
    generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=None, suppress_tokens=None)
    assert generated[0, len(ids) :].tolist() == reference["greedy"].tolist()


@torch.no_grad()
def test_left_padding_parity_mode_gives_the_originals_logits(release, model, processor, features, tmp_path):
    """The original's `RWKV.forward` prepends the embedding of id 261 until the length is a multiple of 16 and drops
    their logits; the processor's `prompt_pad_multiple=16` adds the same tokens, so the package run on the padded ids
    is the original's forward: its logits at every prompt position, the first generated token's included."""
    padded = AutoProcessor.from_pretrained(release.folder, prompt_pad_multiple=16)
    inputs = padded(images=[[test_image()]], text=[QUESTION], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    unpadded = original_prompt_ids(QUESTION, 1)
    pad = (16 - len(unpadded) % 16) % 16
    assert pad > 0 and ids == [STOP_TOKEN_ID] * pad + unpadded
    reference = original_language_model(release.state_dict, ids, features[:1], tmp_path / "original.pth")["logits"]
    logits = model(**inputs).logits[0]
    assert relative_error(logits[pad:], reference[pad:]) < TOLERANCE
    assert relative_error(logits[-1], reference[-1]) < TOLERANCE  # the first generated token
    # Without the padding the text before the image reads another state: the check tells the two apart. (The
    # 1024 image tokens between them and the answer fade the difference on these random weights.)
    plain = model(**processor(images=[[test_image()]], text=[QUESTION], return_tensors="pt")).logits[0]
    assert relative_error(plain[:3], reference[pad : pad + 3]) > 100 * TOLERANCE


@pytest.mark.parametrize("tokens", [16, 9])  # 32 x 32 pooled to 4 x 4 windows, and to 3 x 3 overlapping ones
@torch.no_grad()
def test_fewer_tokens_per_image_pool_as_the_original(release, tokens, tmp_path):
    folder = tmp_path / "pooled"
    assert cli.main(["convert", "--checkpoint", str(release.checkpoint), "--vision-config", str(release.towers),
                     "--tokens-per-image", str(tokens), "--output", str(folder), "--no-progress"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert (model.config.grid_size, model.config.num_image_tokens) == (int(tokens**0.5), tokens)
    inputs = processor(images=[[test_image()]], text=[QUESTION], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == original_prompt_ids(QUESTION, 1, tokens_per_image=tokens)
    ours = model.get_image_features(inputs["pixel_values"], inputs["high_res_pixel_values"]).pooler_output
    expected = original_image_features(release.state_dict, [test_image()], tokens_per_image=tokens)
    assert relative_error(ours, expected) < TOLERANCE


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_files_keep_their_dtype_unless_asked(original, stored):
    half = OriginalCheckpoint.from_full({k: v.to(stored) for k, v in original.items()})
    config, state_dict = convert_original_to_hf(half, vision_config=TINY_VISION_CONFIG)
    assert config.dtype == stored and {t.dtype for t in state_dict.values()} == {stored}
    config, state_dict = convert_original_to_hf(half, vision_config=TINY_VISION_CONFIG, dtype="float32")
    assert config.dtype == torch.float32 and {t.dtype for t in state_dict.values()} == {torch.float32}


def test_formula_lora_ranks_are_read_from_the_shapes():
    """The 1B5 file's ranks come from a formula of the width (96 / 96 / 64 / 256 at 2048), not the fixed ones."""
    checkpoint = OriginalCheckpoint.from_full(original_state_dict(seed=1, ranks=(32, 48, 16, 96)))
    config, _ = convert_original_to_hf(checkpoint, vision_config=TINY_VISION_CONFIG)
    text = config.text_config
    assert (text.decay_low_rank_dim, text.a_low_rank_dim, text.v_low_rank_dim, text.gate_low_rank_dim) == (
        32, 48, 16, 96,
    )


def test_the_exported_pair_converts_as_the_full_file(original):
    sd = original
    pair = OriginalCheckpoint.from_pair(
        {k.removeprefix("rwkv."): v for k, v in sd.items() if k.startswith("rwkv.")},
        {k: v for k, v in sd.items() if not k.startswith("rwkv.")},
    )
    config, state_dict = convert_original_to_hf(pair, vision_config=TINY_VISION_CONFIG)
    full_config, full = convert_original_to_hf(OriginalCheckpoint.from_full(sd), vision_config=TINY_VISION_CONFIG)
    assert config.to_dict() == full_config.to_dict()
    assert state_dict.keys() == full.keys() and all(torch.equal(state_dict[k], full[k]) for k in full)


@pytest.mark.parametrize(
    ("layers", "width", "title", "row"),
    [
        (12, 768, "VisualRWKV-7 0.1B (v0700-0B1)", "| VisualRWKV-7 0.1B (v0700-0B1) (this model) | 75.22 | 50.62 | "
                                                   "37.90 | 59.92 |"),
        (24, 1024, "VisualRWKV-7 0.4B (v0700-0B4)", "| VisualRWKV-7 0.4B (v0700-0B4) (this model) | 77.85 | 54.98 | "
                                                    "41.05 | 62.30 |"),
        (24, 2048, "VisualRWKV-7 1.5B (v0700-1B5)", "| VisualRWKV-7 1.5B (v0700-1B5) (this model) | 79.84 | 59.74 | "
                                                    "49.49 | 63.20 |"),
    ],
)
def test_model_card_names_the_release_by_its_language_model_size(original, layers, width, title, row):
    config, _ = convert_original_to_hf(OriginalCheckpoint.from_full(original), vision_config=TINY_VISION_CONFIG)
    config.text_config.num_hidden_layers, config.text_config.hidden_size = layers, width
    card = model_card(config, [f"VisualRWKV-v0700-{title[-4:-1]}-v1.0.pth"])
    assert f"# {title} for transformers" in card and row in card
    assert card.count("(this model)") == 1 and "VisualRWKV-HD" not in card


# ------------------------------------------------------------------------------------------------ bad input


def refused(state_dict, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        convert_original_to_hf(OriginalCheckpoint.from_full(state_dict), vision_config=TINY_VISION_CONFIG, **kwargs)


def test_a_file_without_its_vision_tower_is_refused_naming_the_keys(original):
    no_tower = {k: v for k, v in original.items() if not k.startswith("vit.")}
    with pytest.raises(ValueError, match=r"RWKV-7 \(x070\) language model but not VisualRWKV-7's vision tower.*"
                                         r"'vit\.dino_featurizer\.\*'.*convert-rwkv7"):
        OriginalCheckpoint.from_full(no_tower)
    clip_tower = no_tower | {"vit.vision_model.embeddings.class_embedding": torch.zeros(8)}
    with pytest.raises(ValueError, match="but not VisualRWKV-7's vision tower"):
        OriginalCheckpoint.from_full(clip_tower)


def test_x070_variants_and_damaged_language_models_are_refused_naming_keys(original):
    sd = original
    variant = sd | {"rwkv.blocks.1.att.x_x": torch.zeros(1, 1, TEXT_WIDTH)}
    refused(variant, r"data-dependent token shift.*'rwkv\.blocks\.1\.att\.x_x'")
    refused(sd | {"rwkv.blocks.0.att.extra": torch.zeros(3)}, r"unexpected tensors.*'rwkv\.blocks\.0\.att\.extra'")
    missing = {k: v for k, v in sd.items() if k != "rwkv.blocks.1.att.g2"}
    refused(missing, r"missing tensors.*'rwkv\.blocks\.1\.att\.g2'")
    nan = sd["rwkv.blocks.1.att.w0"].clone()
    nan[0, 0, 3] = float("nan")
    refused(sd | {"rwkv.blocks.1.att.w0": nan}, r"NaN or infinite weights.*'rwkv\.blocks\.1\.att\.w0' \(1 NaN")


def test_other_projectors_and_tiles_are_refused_with_an_rwkv7_language_model(original):
    sd = {k: v for k, v in original.items() if not k.startswith("proj.")}
    hd = {
        "proj.proj.weight": torch.zeros(TEXT_WIDTH, FEATURES),
        "proj.gate.weight": torch.zeros(TEXT_WIDTH, TEXT_WIDTH),
        "proj.o_proj.weight": torch.zeros(TEXT_WIDTH, TEXT_WIDTH),
    }
    refused(sd | hd, r"RWKV-7 \(x070\) language model with the gated_mlp projector tensors")
    tiles = {"proj.gate.weight": torch.zeros(2 * FEATURES, 2 * FEATURES),
             "proj.o_proj.weight": torch.zeros(TEXT_WIDTH, 2 * FEATURES),
             "proj.ln_v.weight": torch.ones(TEXT_WIDTH), "proj.ln_v.bias": torch.zeros(TEXT_WIDTH)}
    refused(sd | tiles, "VisualRWKV-UHD's whole image \\+ tiles; VisualRWKV-7 reads whole images")
    # the original v7 code's --proj_type linear: a plain proj.weight
    config, _ = convert_original_to_hf(
        OriginalCheckpoint.from_full(sd | {"proj.weight": torch.zeros(TEXT_WIDTH, FEATURES)}),
        vision_config=TINY_VISION_CONFIG,
    )
    assert (config.projector_type, config.scan_mode) == ("linear", "unidirectional")


def test_settings_that_do_not_apply_are_refused(original):
    sd = original
    refused(sd, "reads the image tokens in one direction.*scan_mode 'bidirectional' does not apply",
            scan_mode="bidirectional")
    refused(sd, "give its tokens per image as tokens_per_image", grid_size=4)
    with pytest.raises(ValueError, match=r"reads 112 channels, but these towers give 3200 per view"):
        convert_original_to_hf(OriginalCheckpoint.from_full(sd))  # the released towers by default
    hd = {f"rwkv.{k}": v for k, v in random_blinkdl_rwkv6(hidden_size=TEXT_WIDTH, head_size=16, num_layers=2,
                                                              mix_rank=8, decay_rank=16).items()}
    hd |= {k: v for k, v in sd.items() if not k.startswith("rwkv.")}
    refused(hd, r"tokens_per_image \(--tokens-per-image\) applies to VisualRWKV-7", tokens_per_image=16)


@pytest.mark.parametrize("tokens", ["10", "4096", "0", "-4"])
def test_tokens_per_image_that_are_no_square_grid_are_refused_before_reading(tokens, tmp_path, capsys):
    output = tmp_path / "out"
    assert cli.main(["convert", "--checkpoint", str(tmp_path / "missing.pth"), "--tokens-per-image", tokens,
                     "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert f"tokens_per_image {tokens}" in error and "g * g with 1 <= g <= 32" in error
    assert not output.exists()


def test_output_rules_hold(release, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_visualrwkv_checkpoint(output, checkpoint=release.checkpoint, vision_config=release.towers)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="would delete it"):
        convert_visualrwkv_checkpoint(release.checkpoint.parent, checkpoint=release.checkpoint,
                                      vision_config=release.towers, overwrite=True)
    assert release.checkpoint.is_file()
