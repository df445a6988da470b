"""Prints the VisualRWKV-7 parity numbers of docs/checkpoints.md: a tiny random original-layout v0700 checkpoint
converted by `visualrwkv convert`, against the independent reconstruction of the original (timm / segment_anything
towers, the original's pooling and projector, BlinkDL's `rwkv` package for the RWKV-7 language model), with the
fixtures of tests/test_convert_visualrwkv7.py (which assert the bounds)."""

import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_convert_visualrwkv7 as v7  # noqa: E402


@torch.no_grad()
def main() -> None:
    directory = Path(tempfile.mkdtemp())
    release = v7.convert_release(directory, v7.original_state_dict())
    model = AutoModelForImageTextToText.from_pretrained(release.folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(release.folder)
    images = [v7.test_image(seed=seed) for seed in range(2)]
    features = v7.original_image_features(release.state_dict, images)
    for count in (1, 2):
        inputs = processor(images=[images[:count]], text=[v7.QUESTION], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        reference = v7.original_language_model(
            release.state_dict, ids, features[:count], directory / "original.pth", greedy=v7.NEW_TOKENS
        )
        generated = model.generate(**inputs, max_new_tokens=v7.NEW_TOKENS, eos_token_id=None, suppress_tokens=None)
        same = generated[0, len(ids) :].tolist() == reference["greedy"].tolist()
        same_ids = ids == v7.original_prompt_ids(v7.QUESTION, count)
        print(
            f"{count} image(s), {len(ids)} prompt tokens: ids == original's {same_ids}, "
            f"logits {v7.relative_error(model(**inputs).logits[0], reference['logits']):.2g}, "
            f"greedy {v7.NEW_TOKENS} tokens identical {same}"
        )

    padded = AutoProcessor.from_pretrained(release.folder, prompt_pad_multiple=16)
    inputs = padded(images=[images[:1]], text=[v7.QUESTION], return_tensors="pt")
    pad = inputs["input_ids"][0].tolist().index(24281)  # the 261s before "User: " (24281 59 33)
    reference = v7.original_language_model(
        release.state_dict, inputs["input_ids"][0].tolist(), features[:1], directory / "original.pth"
    )["logits"]
    logits = model(**inputs).logits[0]
    plain = model(**processor(images=[images[:1]], text=[v7.QUESTION], return_tensors="pt")).logits[0]
    same_token = bool(plain[-1].argmax() == reference[-1].argmax())
    print(
        f"prompt_pad_multiple=16 ({pad} pad tokens) vs the original's padded forward: logits after the pad "
        f"{v7.relative_error(logits[pad:], reference[pad:]):.2g}, first generated token "
        f"{v7.relative_error(logits[-1], reference[-1]):.2g}. Unpadded prompt vs the original's padded forward: "
        f'"User: " {v7.relative_error(plain[:3], reference[pad : pad + 3]):.2g}, first generated token '
        f"{v7.relative_error(plain[-1], reference[-1]):.2g} (same argmax: {same_token})"
    )

if __name__ == "__main__":
    main()
