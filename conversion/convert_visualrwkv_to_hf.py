"""Convert an original VisualRWKV checkpoint (6.0, HD v0612, UHD v0613, VisualRWKV-7 v0700; told apart by its keys)
into a Hugging Face folder.

    python conversion/convert_visualrwkv_to_hf.py \
        --checkpoint VisualRWKV-v060-1B6-v1.0-20240612.pth --output visualrwkv6-1b6
    python conversion/convert_visualrwkv_to_hf.py \
        --checkpoint VisualRWKV-v0700-1B5-v1.0-20250204.pth --output visualrwkv7-1b5
    python conversion/convert_visualrwkv_to_hf.py \
        --rwkv A_rwkv.pth --visual A_visual.pth --output visualrwkv6-1b6
    options: [--vision-config JSON_OR_DIR] [--scan-mode ...] [--image-position ...] [--grid-size ...]
             [--tokens-per-image N (VisualRWKV-7)] [--projector-type gated_mlp|relu_mlp (HD/UHD)]
             [--dtype auto|float32|bfloat16|float16] [--overwrite] [--allow-nonfinite] [--push-to-hub REPO]

Same as `visualrwkv convert ...`. The folder holds the model (config.json, model.safetensors,
generation_config.json), the processor (image processor, RWKV World tokenizer with "<image>", chat template) and a
model card, and loads with `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` after
`import visualrwkv_hf`.
"""

import sys

from visualrwkv_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
