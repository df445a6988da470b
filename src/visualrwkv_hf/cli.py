"""The `visualrwkv` command line: `lm-demo` and `convert-rwkv6`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def lm_demo(args: argparse.Namespace) -> int:
    """Builds a tiny random RWKV-6 World model, saves it, reloads it through AutoModelForCausalLM and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from . import RwkvWorldTokenizer, VisualRWKVForCausalLM, VisualRWKVTextConfig

    torch.manual_seed(args.seed)
    config = VisualRWKVTextConfig(hidden_size=128, num_hidden_layers=4, head_size=32, initializer_range=0.2)
    model = VisualRWKVForCausalLM(config).eval()
    tokenizer = RwkvWorldTokenizer()
    output = Path(args.output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    model.generation_config.save_pretrained(output)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Built a random RWKV-6 model: {config.num_hidden_layers} layers x {config.hidden_size} wide, "
          f"{config.num_heads} heads of {config.head_size}, vocab {config.vocab_size}, {n_params / 1e6:.1f}M parameters")
    print(f"Saved to {output}/ and reloading it with AutoModelForCausalLM / AutoTokenizer ...")

    model = AutoModelForCausalLM.from_pretrained(output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    prompt = args.prompt
    inputs = tokenizer(prompt, return_tensors="pt")
    print(f"Prompt {prompt!r} -> {inputs.input_ids.shape[1]} tokens: {inputs.input_ids[0].tolist()}")
    print("Greedy continuation (random weights, so expect gibberish), streamed:")
    start = time.perf_counter()
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True)
        )
    elapsed = time.perf_counter() - start
    new_tokens = generated[0, inputs.input_ids.shape[1]:]
    with torch.no_grad():
        recomputed = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=False)
    print(f"\nGenerated {len(new_tokens)} tokens in {elapsed:.2f}s ({elapsed / max(len(new_tokens), 1) * 1e3:.1f} ms/token) "
          f"with the recurrent cache: {new_tokens.tolist()}")
    same = torch.equal(generated, recomputed)
    print(f"Full recompute without cache gives the same tokens: {same}")
    return 0 if same else 1


def convert_rwkv6(args: argparse.Namespace) -> int:
    from .convert_rwkv6 import convert_rwkv6_checkpoint

    try:
        output = convert_rwkv6_checkpoint(
            args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ValueError, OSError) as error:  # user errors: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visualrwkv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("lm-demo", help="build a tiny random RWKV-6 model, save, reload and generate")
    demo.add_argument("--output", default="outputs/tiny-rwkv6", help="folder to save the tiny model in")
    demo.add_argument("--prompt", default="User: Tell me about linear RNNs.\n\nAssistant:")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=lm_demo)

    from .convert_rwkv6 import DTYPES

    convert = commands.add_parser("convert-rwkv6", help="convert a BlinkDL RWKV-6 .pth into a transformers folder")
    convert.add_argument("--checkpoint", required=True, help="BlinkDL RWKV-6 (x060) .pth file")
    convert.add_argument("--output", required=True, help="output folder (created; must be empty unless --overwrite)")
    convert.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto",
        help="weights dtype; auto (default) keeps the checkpoint's own, exactly",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.set_defaults(run=convert_rwkv6)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
