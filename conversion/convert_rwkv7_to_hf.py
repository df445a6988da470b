"""Convert a BlinkDL RWKV-7 ("Goose", x070) `.pth` checkpoint into a Hugging Face folder.

    python conversion/convert_rwkv7_to_hf.py \
        --checkpoint RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth --output rwkv7-0b1
    options: [--dtype auto|float32|bfloat16|float16] [--overwrite] [--allow-nonfinite] [--no-progress]

Same as `visualrwkv convert-rwkv7 ...` (and `visualrwkv convert --checkpoint ...`, which tells the families apart by
their keys). The folder holds config.json, model.safetensors, generation_config.json and the RWKV World tokenizer, and
loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` after `import visualrwkv_hf`.
"""

import sys

from visualrwkv_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-rwkv7", *sys.argv[1:]]))
