"""Convert a BlinkDL RWKV-6 ("Finch", x060) `.pth` checkpoint into a Hugging Face folder.

    python conversion/convert_rwkv6_to_hf.py \
        --checkpoint RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth --output rwkv6-1b6
    options: [--dtype auto|float32|bfloat16|float16] [--overwrite] [--allow-nonfinite] [--no-progress]

Same as `visualrwkv convert-rwkv6 ...`. The folder holds config.json, model.safetensors, generation_config.json and
the RWKV World tokenizer, and loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`
after `import visualrwkv_hf`.
"""

import sys

from visualrwkv_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-rwkv6", *sys.argv[1:]]))
