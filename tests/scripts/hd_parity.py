"""Prints the parity numbers of docs/checkpoints.md: VisualRWKV-HD / UHD converted from tiny random original-layout
checkpoints against the independent reconstruction of the original (timm / segment_anything towers, the original's
projector and scan), with the fixtures of the tests (which assert the bounds)."""

import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_convert_sam_dino_siglip as release_tests  # noqa: E402
import test_modeling_sam_dino_siglip as backbone_tests  # noqa: E402


@torch.no_grad()
def main() -> None:
    for uhd in (False, True):
        name = "UHD" if uhd else "HD"
        original = backbone_tests.original_backbone(uhd=uhd, seed=3)
        model = backbone_tests.converted(original, tiles_per_side=2 if uhd else 0)
        low, high = backbone_tests.random_pixels(1, 5, seed=4) if uhd else backbone_tests.random_pixels(2)
        expected = backbone_tests.original_features(original, low, high)
        print(f"{name} vision features: {backbone_tests.rel_err(model(low, high), expected):.2g}")

        release = release_tests.convert_release(Path(tempfile.mkdtemp()), uhd)
        model = AutoModelForImageTextToText.from_pretrained(release.folder, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(release.folder)
        image = release_tests.test_image()
        inputs = processor(images=image, text=release_tests.QUESTION, return_tensors="pt")
        features = release_tests.original_image_features(release, image)
        expected = release_tests.original_logits(release, features, inputs["input_ids"][0], model)
        print(f"{name} logits: {release_tests.relative_error(model(**inputs).logits[0], expected):.2g}")


if __name__ == "__main__":
    main()
