"""Speed and memory of every released VisualRWKV family at its real size on the CPU, with random weights: the image
prefill, one generation step with our recurrent cache, and the original's generation step (the whole sequence, image
included, re-run for every new token), side by side in one run.

Run: .venv/bin/python benchmarks/bench_checkpoint_families.py [--quick] [--families v6.0-1B6,...] [--dtypes float32]
     (the whole run at real sizes takes over an hour on a busy 2-core CPU; UHD in float32 peaks at 19 GB, every other
     family and dtype below 12.1 GB)

Families (the released files' shapes; see docs/checkpoints.md):
  v6.0-1B6     VisualRWKV-6.0 1.6B: CLIP ViT-L/14-336 (577 tokens), linear projector, RWKV-6 24 x 2048;
  hd-v0612     VisualRWKV-HD 1.6B: DINOv2-L/14-reg4 and SigLIP so400m/14 at 448 px + SAM ViT-B at 1024 px (1024 tokens
               x 3200), gated MLP, RWKV-6 24 x 2048;
  uhd-v0613    VisualRWKV-UHD 1.6B: the same towers on the whole image + 2 x 2 tiles (1024 tokens x 6400), ReLU MLP;
  v0700-0B1, v0700-0B4, v0700-1B5
               VisualRWKV-7: the HD towers, input-gated MLP + LayerNorm, RWKV-7 12 x 768 / 24 x 1024 / 24 x 2048 (LoRA
               ranks decay / a / value / gate 64 / 64 / 32 / 128, and 96 / 96 / 64 / 256 for 1.5B).

Each family and dtype runs in a fresh subprocess, one after the other, so that each peak RSS is its own and the
previous model's memory is freed before the next is built. The model is built without initialisation
(transformers' `no_init_weights`: only allocation) and its weights filled by tiling one block of uniform noise (std
0.02; norm weights 1, biases 0): the values are finite and do not matter for timing. The prompt is 20 text tokens
around one image's placeholders (batch 1). Measured, per family:
  prefill: one forward of the whole prompt with the image (vision tower + projector + language model), building the
     cache, timed once; the vision tower's share is timed inside it;
  step: one new token with the cache (greedy: the previous step's argmax, never the placeholder), median over the
     timed steps after a few untimed ones;
  recompute: the original's generation step, the prompt plus the first new token through the model without a cache,
     image included, timed once for the families in --recompute (a whole-sequence forward costs minutes at these
     sizes on a small CPU); its next-token logits are checked against the cached step's (in float32 that family
     fails if they disagree). For the other families it is estimated by the prefill, the same work less one token;
  weights: bytes of the parameters and buffers; peak RSS: the subprocess's VmHWM (Linux), with everything above.
--weights-only lists the parameters and weight bytes of every released file (v6.0 3B and 7B too) in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

TEXT_TOKENS = 20  # prompt text tokens, half before the image placeholders and half after
STEP_WARMUP = 2  # generation steps left out of the timing
FILL_BLOCK = 1 << 20  # elements of the noise block tiled into every weight
FILL_STD = 0.02
DEFAULT_RECOMPUTE = "v6.0-1B6,v0700-0B1"  # the cheapest families of each tower kind
# Timed by default: one per architecture (v6.0 3B and 7B differ from 1.6B only in width and depth; 7B in float32 needs
# more than 24 GB). --weights-only lists every released file.
DEFAULT_FAMILIES = "v6.0-1B6,hd-v0612,uhd-v0613,v0700-0B1,v0700-0B4,v0700-1B5"


@dataclass(frozen=True)
class Family:
    label: str
    file: str  # the released checkpoint
    text_family: str  # "rwkv6" or "rwkv7"
    text: dict  # the text config's sizes
    projector_type: str
    tiles_per_side: int | None = None  # None: the CLIP tower of v6.0; 0 / 2: the three-encoder tower
    settings: dict = field(default_factory=dict)  # other VisualRWKVConfig fields


RWKV7_RANKS_SMALL = {"decay_low_rank_dim": 64, "a_low_rank_dim": 64, "v_low_rank_dim": 32, "gate_low_rank_dim": 128}
RWKV7_RANKS_1B5 = {"decay_low_rank_dim": 96, "a_low_rank_dim": 96, "v_low_rank_dim": 64, "gate_low_rank_dim": 256}
V7_SETTINGS = {"scan_mode": "unidirectional", "image_position": "first", "image_token_id": 65535}

RWKV6_1B6 = {"hidden_size": 2048, "num_hidden_layers": 24}

FAMILIES = {
    "v6.0-1B6": Family("VisualRWKV-6.0 1.6B", "VisualRWKV-v060-1B6-v1.0-20240612.pth", "rwkv6", RWKV6_1B6, "linear"),
    "v6.0-3B": Family(
        "VisualRWKV-6.0 3B", "VisualRWKV-v060-3B-v1.0-20240612.pth", "rwkv6",
        {"hidden_size": 2560, "num_hidden_layers": 32}, "linear",
    ),
    "v6.0-7B": Family(
        "VisualRWKV-6.0 7B", "VisualRWKV-v060-7B-v1.0-20240612.pth", "rwkv6",
        {"hidden_size": 4096, "num_hidden_layers": 32}, "linear",
    ),
    "hd-v0612": Family(
        "VisualRWKV-HD 1.6B", "VisualRWKV-v0612-1B6-v1.0-20241016.pth", "rwkv6", RWKV6_1B6, "gated_mlp",
        tiles_per_side=0,
    ),
    "uhd-v0613": Family(
        "VisualRWKV-UHD 1.6B", "VisualRWKV-v0613-1B6-v1.0-20241016.pth", "rwkv6", RWKV6_1B6, "relu_mlp",
        tiles_per_side=2,
    ),
    "v0700-0B1": Family(
        "VisualRWKV-7 0.1B", "VisualRWKV-v0700-0B1-v1.0-20250109.pth", "rwkv7",
        {"hidden_size": 768, "num_hidden_layers": 12, **RWKV7_RANKS_SMALL},
        "input_gated_mlp", tiles_per_side=0, settings=V7_SETTINGS,
    ),
    "v0700-0B4": Family(
        "VisualRWKV-7 0.4B", "VisualRWKV-v0700-0B4-v1.0-20250109.pth", "rwkv7",
        {"hidden_size": 1024, "num_hidden_layers": 24, **RWKV7_RANKS_SMALL},
        "input_gated_mlp", tiles_per_side=0, settings=V7_SETTINGS,
    ),
    "v0700-1B5": Family(
        "VisualRWKV-7 1.5B", "VisualRWKV-v0700-1B5-v1.0-20250204.pth", "rwkv7",
        {"hidden_size": 2048, "num_hidden_layers": 24, **RWKV7_RANKS_1B5},
        "input_gated_mlp", tiles_per_side=0, settings=V7_SETTINGS,
    ),
}

# --quick: the same architectures, tiny (the three-encoder tower keeps its 448 / 1024 px inputs, which SAM's fold
# needs).
QUICK_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "head_size": 16, "vocab_size": 65536}
QUICK_RWKV6 = {"time_mix_extra_dim": 8, "time_decay_extra_dim": 8}
QUICK_RWKV7 = {"decay_low_rank_dim": 8, "a_low_rank_dim": 8, "v_low_rank_dim": 8, "gate_low_rank_dim": 8}
QUICK_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 56, "patch_size": 14}
QUICK_TOWERS = {
    "dino_config": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2},
    "siglip_config": {"hidden_size": 48, "intermediate_size": 120, "num_hidden_layers": 3, "num_attention_heads": 2},
    "sam_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "global_attn_indexes": [1],
                   "output_channels": 8},
}


# ---------------------------------------------------------------- one family (the subprocess)


def family_config(family: Family, quick: bool):
    from visualrwkv_hf import VisualRWKVConfig
    from visualrwkv_hf.configuration_sam_dino_siglip import SamDinoSiglipVisionConfig

    text = dict(family.text)
    if quick:
        text = QUICK_TEXT | (QUICK_RWKV6 if family.text_family == "rwkv6" else QUICK_RWKV7)
    if family.tiles_per_side is None:
        vision = {"model_type": "clip_vision_model", **QUICK_CLIP} if quick else None  # None: CLIP ViT-L/14-336
    else:
        vision = SamDinoSiglipVisionConfig(tiles_per_side=family.tiles_per_side, **(QUICK_TOWERS if quick else {}))
    if family.text_family == "rwkv7":
        text["model_type"] = "visualrwkv_rwkv7"
    return VisualRWKVConfig(
        vision_config=vision, text_config=text, projector_type=family.projector_type, **family.settings
    )


def fill_weights(model) -> None:
    """Every floating parameter from one tiled block of uniform noise (std FILL_STD); norm weights 1, biases 0."""
    import torch

    bound = FILL_STD * 3**0.5
    block = torch.empty(FILL_BLOCK).uniform_(-bound, bound, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, parameter in module.named_parameters(recurse=False):
                if not parameter.is_floating_point():
                    continue
                if is_norm:
                    parameter.fill_(1.0 if name == "weight" else 0.0)
                    continue
                flat = parameter.view(-1)
                source = block.to(parameter.dtype)
                for start in range(0, flat.numel(), FILL_BLOCK):
                    piece = flat[start : start + FILL_BLOCK]
                    piece.copy_(source[: piece.numel()])


def status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def build_model(family: Family, quick: bool, dtype):
    """The model, with allocated and unfilled weights (only allocation: no initialisation is run)."""
    from transformers.initialization import no_init_weights

    from visualrwkv_hf import VisualRWKVForConditionalGeneration

    with no_init_weights():
        return VisualRWKVForConditionalGeneration._from_config(family_config(family, quick), dtype=dtype).eval()


def next_token(logits, image_token_id: int) -> int:
    """Greedy, never the image placeholder (which only an image span may hold)."""
    scores = logits[0, -1].clone()
    scores[image_token_id] = float("-inf")
    return int(scores.argmax())


def run_family(name: str, dtype_name: str, quick: bool, steps: int, threads: int, recompute: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    family = FAMILIES[name]
    began = time.perf_counter()
    model = build_model(family, quick, dtype)
    fill_weights(model)
    build_seconds = time.perf_counter() - began
    config, vision_tower = model.config, model.model.vision_tower
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    vision_parameters = sum(p.numel() for p in vision_tower.parameters())
    parameters = sum(p.numel() for p in model.parameters())

    generator = torch.Generator().manual_seed(1)
    image_token_id, num_image_tokens = config.image_token_id, config.num_image_tokens
    text = torch.randint(1, 65530, (TEXT_TOKENS,), generator=generator).tolist()
    ids = text[: TEXT_TOKENS // 2] + [image_token_id] * num_image_tokens + text[TEXT_TOKENS // 2 :]
    pixels = {}
    if config.multi_encoder_vision:
        views, vision = config.vision_config.num_views, config.vision_config
        pixels["pixel_values"] = torch.rand(1, views, 3, vision.image_size, vision.image_size, generator=generator)
        pixels["high_res_pixel_values"] = torch.rand(
            1, views, 3, vision.high_res_image_size, vision.high_res_image_size, generator=generator
        )
    else:
        size = config.vision_config.image_size
        pixels["pixel_values"] = torch.rand(1, 3, size, size, generator=generator)

    vision_times = []
    vision_tower.register_forward_pre_hook(lambda *_: vision_times.append(time.perf_counter()))
    vision_tower.register_forward_hook(lambda *_: vision_times.append(time.perf_counter()))

    with torch.inference_mode():
        # Loads (or first compiles) the WKV kernel and warms the language model, outside the timing.
        model(input_ids=torch.tensor([text[:4]]), use_cache=True, logits_to_keep=1)
        began = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), **pixels, use_cache=True, logits_to_keep=1)
        prefill_seconds = time.perf_counter() - began
        vision_seconds = vision_times[1] - vision_times[0]
        if not torch.isfinite(out.logits).all():
            raise SystemExit(f"{name}: the prefill's logits are not finite; the weight fill is wrong.")
        cache, token = out.cache, next_token(out.logits, image_token_id)
        first_token = token
        step_times, first_step_logits = [], None
        for step in range(STEP_WARMUP + steps):
            began = time.perf_counter()
            logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1).logits
            if step >= STEP_WARMUP:
                step_times.append(time.perf_counter() - began)
            if first_step_logits is None:
                first_step_logits = logits[0, -1].float()
            token = next_token(logits, image_token_id)

        recompute_seconds = difference = None
        if recompute:
            # The original's step for the first new token: the whole sequence again, image included, no cache.
            began = time.perf_counter()
            logits = model(input_ids=torch.tensor([ids + [first_token]]), **pixels, use_cache=False, logits_to_keep=1)
            recompute_seconds = time.perf_counter() - began
            recomputed = logits.logits[0, -1].float()
            difference = (first_step_logits - recomputed).abs().max().item() / recomputed.abs().max().item()
            if dtype == torch.float32 and difference > 1e-3:
                raise SystemExit(
                    f"{name}: cached step and full recompute disagree (max |diff| / max |logit| {difference:.1e})."
                )

    return {
        "family": name,
        "dtype": dtype_name,
        "parameters": parameters,
        "vision_parameters": vision_parameters,
        "image_tokens": num_image_tokens,
        "weight_bytes": weight_bytes,
        "build_s": build_seconds,
        "prefill_s": prefill_seconds,
        "vision_s": vision_seconds,
        "step_s": statistics.median(step_times),
        "recompute_s": recompute_seconds,
        "logit_difference": difference,
        "peak_rss": status_bytes("VmHWM"),
    }


# ---------------------------------------------------------------- the driver


TABLE_HEADER = (
    "| family | dtype | parameters (vision) | image tokens | weights GB | prefill s (vision s) | step ms | "
    "recompute s | recompute / step | peak RSS GB |"
)


def table_row(row: dict) -> str:
    # without a measurement, the original's step is estimated by the prefill (the same sequence less one token)
    measured = row["recompute_s"] is not None
    recompute, mark = (row["recompute_s"], "") if measured else (row["prefill_s"], "~")
    return (
        f"| {FAMILIES[row['family']].label} | {row['dtype']} | {row['parameters'] / 1e9:.2f} G "
        f"({row['vision_parameters'] / 1e9:.2f} G) | {row['image_tokens']} | {row['weight_bytes'] / 1e9:.2f} | "
        f"{row['prefill_s']:.1f} ({row['vision_s']:.1f}) | {row['step_s'] * 1e3:.0f} | "
        f"{mark}{recompute:.1f} | {mark}{recompute / row['step_s']:.0f}x | {row['peak_rss'] / 1e9:.1f} |"
    )


def print_weights() -> None:
    """Parameters and weight bytes of every released file at its real size, from models built on the meta device."""
    import torch

    print("| file | release | parameters (vision, projector) | weights GB, bfloat16 | float32 |")
    print("|---|---|---|---|---|")
    for family in FAMILIES.values():
        with torch.device("meta"):
            model = build_model(family, quick=False, dtype=torch.float32)
        count = sum(t.numel() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
        vision = sum(p.numel() for p in model.model.vision_tower.parameters())
        projector_count = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
        print(
            f"| `{family.file}` | {family.label} | {count / 1e9:.3f} G ({vision / 1e9:.3f} G, "
            f"{projector_count / 1e6:.1f} M) | {2 * count / 1e9:.2f} | {4 * count / 1e9:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=DEFAULT_FAMILIES, help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--steps", type=int, default=8, help="timed generation steps per family")
    parser.add_argument(
        "--recompute",
        help="families whose full-recompute step is measured, or 'all' (default: v6.0-1B6,v0700-0B1; with --quick, "
        "all); the others' is estimated as their prefill, the same work less one token",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes of the same architectures: checks the script")
    parser.add_argument(
        "--weights-only", action="store_true",
        help="only the parameters and weight bytes of every released file (built on the meta device: no memory)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # FAMILY:DTYPE, run in the subprocess
    args = parser.parse_args()
    threads = args.threads or os.cpu_count()
    if args.weights_only:
        print_weights()
        return
    if args.worker:
        name, dtype_name, recompute = args.worker.split(":")
        print(json.dumps(run_family(name, dtype_name, args.quick, args.steps, threads, recompute == "recompute")))
        return

    families = args.families.split(",")
    dtypes = args.dtypes.split(",")
    recompute = args.recompute or ("all" if args.quick else DEFAULT_RECOMPUTE)
    recomputed = families if recompute == "all" else recompute.split(",")
    unknown = [f for f in families + recomputed if f not in FAMILIES]
    unknown += [d for d in dtypes if d not in ("float32", "bfloat16")]
    if unknown:
        parser.error(f"unknown families or dtypes {unknown}; families are {list(FAMILIES)}, dtypes float32, bfloat16")
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("Peak RSS is read from Linux's /proc/self/status (VmHWM): run this on Linux.")

    import torch

    print(f"torch {torch.__version__}, {threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"batch 1, {TEXT_TOKENS} text tokens + the image's; {'QUICK (tiny sizes)' if args.quick else 'real sizes'}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = []
    for dtype_name in dtypes:
        for name in families:
            worker = f"{name}:{dtype_name}:{'recompute' if name in recomputed else 'no'}"
            command = [sys.executable, __file__, "--worker", worker, "--steps", str(args.steps),
                       "--threads", str(threads)] + (["--quick"] if args.quick else [])
            began = time.perf_counter()
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if done.returncode:  # the others still run (a kill by the kernel's OOM killer shows as exit -9)
                failed = f"| {FAMILIES[name].label} | {dtype_name} | failed: exit {done.returncode}, error above |"
                print("  " + failed, flush=True)
                rows.append(failed)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            check = row["logit_difference"]
            print(f"  {name} {dtype_name}: done in {time.perf_counter() - began:.0f} s, model built in "
                  f"{row['build_s']:.0f} s (load {os.getloadavg()[0]:.2f})"
                  + ("" if check is None else f"; cached step vs recompute, max |diff| / max |logit| {check:.1e}"))
            print("  " + table_row(row), flush=True)

    print()
    print("recompute: the original's generation step (the whole sequence again, no cache); ~ marks an estimate, the "
          "prefill's time")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(TABLE_HEADER)
    print("|" + "---|" * TABLE_HEADER.count(" | ") + "---|")
    for row in rows:
        print(row if isinstance(row, str) else table_row(row))


if __name__ == "__main__":
    main()
