"""Convert a BlinkDL RWKV-6 ("Finch", x060) `.pth` checkpoint into a Hugging Face folder.

    python conversion/convert_rwkv6_to_hf.py \
        --checkpoint RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth --output rwkv6-1b6

The folder holds config.json, model.safetensors, generation_config.json and the RWKV World tokenizer, and loads with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` after `import visualrwkv_hf`.
"""

import argparse
import sys

from visualrwkv_hf.convert_rwkv6 import DTYPES, convert_rwkv6_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="BlinkDL RWKV-6 .pth file")
    parser.add_argument("--output", required=True, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights dtype; auto (default) keeps the checkpoint's own, exactly",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        output = convert_rwkv6_checkpoint(
            args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ValueError, OSError) as error:  # user errors: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
