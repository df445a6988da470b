"""The `visualrwkv` command line: `demo`, `chat`, `web`, `serve`, `eval`, `convert`, `convert-rwkv6`,
`convert-rwkv7` and `lm-demo`.

A user's mistake (a bad argument, a missing or unreadable file, a full disk) ends the command with one line on stderr
saying what was wrong, never a traceback: argument values are checked by the parser (exit 2), everything found while
running raises `ValueError` / `OSError` (or safetensors' `SafetensorError`), which `main` prints (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

from safetensors import SafetensorError

ALLOW_NONFINITE_HELP = "convert even if weights are NaN or infinite (refused by default: the model would compute NaN)"

REMOTE_CODE_HELP = (
    "also copy this package's code and kernel sources into the folder (auto_map), so it loads with "
    "trust_remote_code=True where the package is not installed"
)

# What a command raises for a user's mistake; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, SafetensorError)


def visual_demo(args: argparse.Namespace) -> int:
    """Trains a tiny VisualRWKV on synthetic shapes and answers held-out questions (see `demo.py`)."""
    from .demo import run_demo

    run_demo(
        Path(args.output), num_train=args.steps * args.batch_size, num_test=args.num_test, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed, progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if args.remote_code:
        from .remote_code import add_remote_code

        add_remote_code(args.output)
        print(f"Added this package's code to {args.output}/: it loads with trust_remote_code=True without it.")
    return 0


def lm_demo(args: argparse.Namespace) -> int:
    """Builds a tiny random RWKV-6 World model, saves it, reloads it through AutoModelForCausalLM and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from . import Rwkv6Config, Rwkv6ForCausalLM, RwkvWorldTokenizer
    from .checkpoint_io import check_output_dir

    torch.manual_seed(args.seed)
    config = Rwkv6Config(hidden_size=128, num_hidden_layers=4, head_size=32, initializer_range=0.2)
    model = Rwkv6ForCausalLM(config).eval()
    tokenizer = RwkvWorldTokenizer()
    output = Path(args.output)
    # an earlier lm-demo's folder (an RWKV-6 config.json) is rewritten; any other non-empty folder needs --overwrite
    earlier = (output / "config.json").is_file() and json.loads((output / "config.json").read_text()).get(
        "model_type"
    ) == Rwkv6Config.model_type
    check_output_dir(output, overwrite=args.overwrite or earlier)
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


def shard_size(text: str) -> int | str:
    """`--max-shard-size`: bytes, or a number with KB, MB, GB or TB, as `save_pretrained` takes it."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMGT]B)?\s*", text, re.IGNORECASE)
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shard size: give a positive number of bytes, or one with KB, MB, GB or TB (e.g. 2GB)"
        )
    return f"{match.group(1)}{match.group(2).upper()}" if match.group(2) else int(match.group(1))


# `--max-shard-size` of the converters (None: the converters' default, 2GB)
SHARD_SIZE_OPTION = (
    ("--max-shard-size",),
    {"type": shard_size, "metavar": "SIZE", "help": "largest safetensors file of the output, e.g. 500MB (default 2GB)"},
)


def shard_options(args: argparse.Namespace) -> dict:
    return {} if args.max_shard_size is None else {"max_shard_size": args.max_shard_size}


def convert_language_model(args: argparse.Namespace) -> int:
    """`convert-rwkv6` / `convert-rwkv7`: a BlinkDL language-model .pth into a transformers folder."""
    if args.family == "rwkv7":
        from .convert_rwkv7 import convert_rwkv7_checkpoint as convert_checkpoint
    else:
        from .convert_rwkv6 import convert_rwkv6_checkpoint as convert_checkpoint

    output = convert_checkpoint(
        args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
        allow_nonfinite=args.allow_nonfinite, **shard_options(args),
    )
    print(f"Wrote {output}")
    return 0


# Options of `convert` that only a VisualRWKV checkpoint has a use for.
VISUAL_ONLY_OPTIONS = ("visual", "vision_config", "scan_mode", "image_position", "grid_size", "tokens_per_image")


def checkpoint_family(path: str) -> str:
    """"rwkv6" or "rwkv7" for a BlinkDL language-model .pth (read from its keys, without loading the tensors where
    the file allows memory-mapping), else "visualrwkv": that converter then says what the file is or lacks."""
    import torch

    from .convert_rwkv6 import RWKV6_MARKER_KEYS
    from .convert_rwkv7 import RWKV7_MARKER_KEYS

    try:
        keys = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()
    except Exception:  # unreadable, not a zip-format file, not a dict: the converter reports it properly
        return "visualrwkv"
    for family, markers in (("rwkv6", RWKV6_MARKER_KEYS), ("rwkv7", RWKV7_MARKER_KEYS)):
        if all(key in keys for key in markers):
            return family
    return "visualrwkv"


def convert_visualrwkv(args: argparse.Namespace) -> int:
    from .convert_visualrwkv import convert_visualrwkv_checkpoint, push_folder_to_hub

    family = checkpoint_family(args.checkpoint) if args.checkpoint else "visualrwkv"
    if family != "visualrwkv":
        given = [f"--{name.replace('_', '-')}" for name in VISUAL_ONLY_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(
                f"{args.checkpoint} is a plain {family.upper().replace('RWKV', 'RWKV-')} language model, which has no "
                f"vision part: leave out {', '.join(given)}."
            )
        args.family = family
        convert_language_model(args)
        if args.remote_code:
            from .remote_code import add_remote_code

            add_remote_code(args.output)
        if args.push_to_hub:
            push_folder_to_hub(Path(args.output), args.push_to_hub)
            print(f"Uploaded it to {args.push_to_hub}")
        return 0

    output = convert_visualrwkv_checkpoint(
        args.output,
        checkpoint=args.checkpoint,
        rwkv=args.rwkv,
        visual=args.visual,
        vision_config=args.vision_config,
        scan_mode=args.scan_mode,
        image_position=args.image_position,
        grid_size=args.grid_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
        push_to_hub=args.push_to_hub,
        progress=not args.no_progress,
        remote_code=args.remote_code,
        allow_nonfinite=args.allow_nonfinite,
        projector_type=args.projector_type,
        tokens_per_image=args.tokens_per_image,
        **shard_options(args),
    )
    print(f"Wrote {output}" + (f" and uploaded it to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def check_device(name: str) -> str:
    """`name` if torch can run on that device here; else a `ValueError` naming what this machine has."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device: expected cpu, cuda, cuda:N, mps, ...") from None
    if device.type == "cpu":
        return name
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != device.type:
        available = f"cpu and {accelerator.type}" if accelerator is not None else "only the cpu"
        raise ValueError(
            f"--device {name}: this machine has no {device.type} device ({available}); pass --device cpu or leave "
            "--device out (cuda when available, else cpu)."
        )
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device {name}: this machine has {count} {device.type} device(s), {device.type}:0 to "
            f"{device.type}:{count - 1}."
        )
    return name


def chat(args: argparse.Namespace) -> int:
    """Answers one question about one image with a converted folder, streaming the answer to stdout."""
    import torch
    from transformers import AutoProcessor, TextStreamer

    from . import VisualRWKVForConditionalGeneration
    from .loading import visualrwkv_folder_config
    from .image_loading import load_rgb_image
    from .tokenization_rwkv_world import TURN_END_TOKEN_ID

    if args.temperature is not None and not args.do_sample:
        raise ValueError(
            "--temperature only applies with --do-sample (greedy decoding is the default): add --do-sample, or "
            "leave --temperature out."
        )
    device = check_device(args.device) if args.device else "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = Path(args.model)
    config = visualrwkv_folder_config(model_dir)
    image = load_rgb_image(Path(args.image))
    processor = AutoProcessor.from_pretrained(model_dir)
    model = VisualRWKVForConditionalGeneration.from_pretrained(model_dir, config=config).to(device).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, image_position=args.image_position)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
    sampling = {"do_sample": True, "temperature": args.temperature or 1.0} if args.do_sample else {"do_sample": False}
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=TURN_END_TOKEN_ID,  # "\n\n" ends the assistant's turn
            streamer=TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True),
            **sampling,
        )
    return 0


def web(args: argparse.Namespace) -> int:
    """Serves the browser chat app (Gradio) on a converted folder until interrupted; see `web.py`."""
    import importlib.util

    import torch

    if importlib.util.find_spec("gradio") is None:
        raise ValueError("`visualrwkv web` needs Gradio: pip install 'visualrwkv-hf[web]'.")
    from .web import serve_web

    device = check_device(args.device) if args.device else "cuda" if torch.cuda.is_available() else "cpu"
    serve_web(args.model, host=args.host, port=args.port, device=device, max_new_tokens=args.max_new_tokens)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Answers a LLaVA-1.5 benchmark's questions with a converted folder and scores them (see `evaluation.py`)."""
    from .evaluation import run_evaluation

    run_evaluation(
        args.model, args.benchmark, args.questions, args.images, args.output, answers=args.answers,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        device=check_device(args.device) if args.device else None, progress=not args.no_progress,
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    """Runs `transformers serve` (its own options, after `serve`) able to serve VisualRWKV folders; see `serving.py`."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ValueError(
            "`visualrwkv serve` needs transformers' serving dependencies (fastapi, uvicorn, openai): "
            "pip install 'visualrwkv-hf[serve]'."
        )
    from .serving import main as serve_main

    serve_main(args.serve_args)
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a one-line error (the usage is one `--help` away), as for every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="visualrwkv", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo import DEFAULT_BATCH_SIZE, DEFAULT_LEARNING_RATE, DEFAULT_OUTPUT, DEFAULT_STEPS

    visual = commands.add_parser(
        "demo", help="train a tiny VisualRWKV on synthetic shapes on the CPU, then answer held-out questions"
    )
    visual.add_argument("--output", default=DEFAULT_OUTPUT, help="folder the trained model is saved in")
    visual.add_argument(
        "--steps", type=positive_int, default=DEFAULT_STEPS, help="training steps (one fresh batch each)"
    )
    visual.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    visual.add_argument("--learning-rate", type=positive_float, default=DEFAULT_LEARNING_RATE)
    visual.add_argument("--num-test", type=positive_int, default=200, help="held-out questions")
    visual.add_argument("--seed", type=int, default=0)
    visual.add_argument("--no-progress", action="store_true", help="no progress bar")
    visual.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --output that no earlier demo wrote"
    )
    visual.add_argument("--remote-code", action="store_true", help=REMOTE_CODE_HELP)
    visual.set_defaults(run=visual_demo)

    demo = commands.add_parser("lm-demo", help="build a tiny random RWKV-6 model, save, reload and generate")
    demo.add_argument("--output", default="outputs/tiny-rwkv6", help="folder to save the tiny model in")
    demo.add_argument("--prompt", default="User: Tell me about linear RNNs.\n\nAssistant:")
    demo.add_argument("--max-new-tokens", type=positive_int, default=24)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --output that no earlier lm-demo wrote"
    )
    demo.set_defaults(run=lm_demo)

    from .configuration_visualrwkv import IMAGE_POSITIONS, VisualRWKVConfig
    from .checkpoint_io import DTYPES
    from .scanning import SCAN_MODES

    chat_parser = commands.add_parser(
        "chat", help="ask a converted VisualRWKV model about an image (streams the answer)"
    )
    chat_parser.add_argument("question", help="the question about the image")
    chat_parser.add_argument("--model", required=True, help="a folder written by `visualrwkv convert`")
    chat_parser.add_argument("--image", required=True, help="image file")
    chat_parser.add_argument(
        "--image-position", choices=IMAGE_POSITIONS, default=None,
        help="where the image goes in the prompt (default: the folder's, middle = the sandwich prompt)",
    )
    chat_parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    chat_parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    chat_parser.add_argument(
        "--temperature", type=positive_float, help="sampling temperature (with --do-sample; default 1)"
    )
    chat_parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    chat_parser.set_defaults(run=chat)

    from .web import DEFAULT_HOST, DEFAULT_MAX_NEW_TOKENS as WEB_MAX_NEW_TOKENS, DEFAULT_PORT

    web_parser = commands.add_parser(
        "web", help="chat about images in the browser (Gradio): streamed answers, follow-up questions"
    )
    web_parser.add_argument(
        "--model", required=True, help="a folder written by `visualrwkv convert` or `visualrwkv demo`"
    )
    web_parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    web_parser.add_argument("--port", type=positive_int, default=DEFAULT_PORT)
    web_parser.add_argument("--max-new-tokens", type=positive_int, default=WEB_MAX_NEW_TOKENS)
    web_parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    web_parser.set_defaults(run=web)

    from .evaluation import BENCHMARKS, DEFAULT_BATCH_SIZE as EVAL_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS

    eval_parser = commands.add_parser(
        "eval", help="answer a benchmark's LLaVA-1.5 question file (resumable) and score the answers"
    )
    eval_parser.add_argument("--model", required=True, help="a folder written by `visualrwkv convert`")
    eval_parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    eval_parser.add_argument("--questions", required=True, help="the LLaVA question file (.jsonl, or .json list)")
    eval_parser.add_argument("--images", help="the folder the question file's image paths are relative to")
    eval_parser.add_argument(
        "--answers", help="ground truth: the official annotation file or folder (see docs/evaluation.md)"
    )
    eval_parser.add_argument(
        "--output", required=True, help="answers JSONL (resumed when it exists); scores go to <stem>.scores.json"
    )
    eval_parser.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH_SIZE)
    eval_parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    eval_parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    eval_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    eval_parser.set_defaults(run=evaluate)

    convert_parser = commands.add_parser(
        "convert",
        help="convert an original VisualRWKV checkpoint (6.0, HD, UHD, 7), or a BlinkDL RWKV-6 / RWKV-7 language model "
        "(told apart by its keys), into a transformers folder",
    )
    source = convert_parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="full VisualRWKV .pth (rwkv.*, vit.*, proj.*), or a BlinkDL RWKV-6 / RWKV-7 .pth"
    )
    source.add_argument("--rwkv", help="the exported pair's RWKV-6 file (<name>_rwkv.pth); needs --visual")
    convert_parser.add_argument("--visual", help="the exported pair's vision file (<name>_visual.pth)")
    convert_parser.add_argument(
        "--output", required=True, help="output folder (created; must be empty unless --overwrite)"
    )
    convert_parser.add_argument(
        "--vision-config", metavar="JSON_OR_DIR",
        help="vision encoder config: a JSON file or a folder holding config.json (default: CLIP ViT-L/14-336); for "
        'VisualRWKV-HD/UHD/7, a JSON file {"dino": {...}, "siglip": {...}, "sam": {...}} (default: the released '
        "towers)",
    )
    convert_parser.add_argument(
        "--projector-type", choices=["gated_mlp", "relu_mlp"],
        help="how an HD/UHD MLP projector is read (default: gated for HD v0612, ReLU for UHD v0613, as their code)",
    )
    convert_parser.add_argument(
        "--scan-mode", choices=SCAN_MODES,
        help=f"image scanning (default: {VisualRWKVConfig.scan_mode}, as released; VisualRWKV-7: unidirectional only)",
    )
    convert_parser.add_argument(
        "--image-position", choices=IMAGE_POSITIONS,
        help=f"the processor's image position (default: {VisualRWKVConfig.image_position}, the sandwich prompt; "
        "VisualRWKV-7: first)",
    )
    convert_parser.add_argument(
        "--grid-size", type=int,
        help=f"patch pooling: -1 all patches, 0 cls only, g > 0 a g x g grid (default: {VisualRWKVConfig.grid_size})",
    )
    convert_parser.add_argument(
        "--tokens-per-image", type=int, metavar="N",
        help="VisualRWKV-7 only: image tokens per image, the original's num_token_per_image (default: "
        "1024, as the release scripts; a square dividing 32 x 32 average-pools the feature map)",
    )
    convert_parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto",
        help="weights dtype; auto (default) keeps the checkpoint's own, exactly",
    )
    convert_parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output folder (never one holding an input)"
    )
    convert_parser.add_argument(*SHARD_SIZE_OPTION[0], **SHARD_SIZE_OPTION[1])
    convert_parser.add_argument("--allow-nonfinite", action="store_true", help=ALLOW_NONFINITE_HELP)
    convert_parser.add_argument(
        "--push-to-hub", metavar="REPO", help="then upload the folder to this Hub model repository (created if needed)"
    )
    convert_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert_parser.add_argument(
        "--remote-code", action="store_true", help=REMOTE_CODE_HELP,
    )
    convert_parser.set_defaults(run=convert_visualrwkv)

    serve_parser = commands.add_parser(
        "serve", add_help=False, prefix_chars="\0",
        help="transformers' OpenAI-compatible server (`transformers serve`) for VisualRWKV folders; "
        "`visualrwkv serve --help` lists its options",
    )
    serve_parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="`transformers serve`'s arguments")
    serve_parser.set_defaults(run=serve)

    for family, name in (("rwkv6", "RWKV-6 (x060)"), ("rwkv7", "RWKV-7 (x070)")):
        convert = commands.add_parser(
            f"convert-{family}", help=f"convert a BlinkDL {name.split()[0]} .pth into a transformers folder"
        )
        convert.add_argument("--checkpoint", required=True, help=f"BlinkDL {name} .pth file")
        convert.add_argument(
            "--output", required=True, help="output folder (created; must be empty unless --overwrite)"
        )
        convert.add_argument(
            "--dtype", choices=["auto", *DTYPES], default="auto",
            help="weights dtype; auto (default) keeps the checkpoint's own, exactly",
        )
        convert.add_argument(
            "--overwrite", action="store_true", help="replace a non-empty output folder (never one holding an input)"
        )
        convert.add_argument(*SHARD_SIZE_OPTION[0], **SHARD_SIZE_OPTION[1])
        convert.add_argument("--allow-nonfinite", action="store_true", help=ALLOW_NONFINITE_HELP)
        convert.add_argument("--no-progress", action="store_true", help="no progress bar")
        convert.set_defaults(run=convert_language_model, family=family)
    return parser


def is_full_disk(error: BaseException) -> bool:
    """Whether a write failed for want of space and the message does not say so yet (the converters' does)."""
    from .checkpoint_io import OutOfSpaceError, no_space_errno

    return no_space_errno(error) is not None and not isinstance(error, OutOfSpaceError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:  # a user's mistake: one line, no traceback
        message = re.sub(r"\s*\n\s*", " ", str(error).strip())  # some library messages span lines
        if is_full_disk(error):
            where = f" in {args.output}" if getattr(args, "output", None) else ""
            message = (
                f"no space left to write{where} ({error}): free some disk space (or raise the file size limit) or "
                "write elsewhere, then run again."
            )
        elif isinstance(error, SafetensorError):  # its messages do not say what kind of file it is
            message = f"cannot read or write a .safetensors file: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
