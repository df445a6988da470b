"""Peak memory of `visualrwkv convert` on a checkpoint of the released VisualRWKV-HD 1.6B (v0612) size, against
converting with the whole file in memory.

Run: .venv/bin/python benchmarks/bench_conversion_memory.py [--text-layers 24] [--dtypes auto float32] [--workdir /tmp]

The script writes a synthetic checkpoint in the original layout at the released sizes (random bfloat16, 4.87 GB with
the default 24 layers): `rwkv.*` an RWKV-6 24 x 2048 (vocabulary 65536, the key table of `convert_rwkv6`), `vit.*` the
three towers as timm and Meta's `segment_anything` name them (DINOv2 ViT-L/14 with 4 registers and SigLIP so400m/14,
both at 448 px, SAM ViT-B at 1024 px with its neck), `proj.*` the gated MLP. It then converts it in a child process,
once per way and `--dtypes` entry, and reads the child's memory:

  streamed:   `python -m visualrwkv_hf.cli convert --checkpoint F --output D [--dtype X]`, the command line
  in memory:  `torch.load` of the whole file (no mmap), `convert_original_to_hf` (tensors cast as they are mapped),
              `save_visualrwkv_folder`: how the converter read and wrote before it streamed, through the public API

Figures per run: the peak RSS (`ru_maxrss` of the child, from `wait4`: exact), and the peaks of its anonymous and of
its file-backed resident memory (`RssAnon`, `RssFile` of /proc/PID/status, sampled every 20 ms). File-backed pages
are the memory-mapped checkpoint's: the kernel drops them under memory pressure (they are re-read from the file), so
the anonymous peak is the memory a conversion cannot do without. Linux only. The synthetic files and the outputs are
deleted at the end. A run whose estimated need exceeds the memory available is skipped, saying so; each child marks
itself the out-of-memory killer's first choice.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from visualrwkv_hf.configuration_rwkv6 import Rwkv6Config
from visualrwkv_hf.convert_rwkv6 import rwkv6_parameters

GIB = 1024**3

# The previous way, through the public API: the whole file in memory, tensors cast as they are mapped.
IN_MEMORY = """
import sys, torch
from visualrwkv_hf.checkpoint_io import atomic_output_dir
from visualrwkv_hf.convert_visualrwkv import OriginalCheckpoint, convert_original_to_hf, save_visualrwkv_folder
checkpoint, output, dtype = sys.argv[1:]
state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
config, converted = convert_original_to_hf(OriginalCheckpoint.from_full(state_dict, checkpoint), dtype=dtype)
with atomic_output_dir(output) as staging:
    save_visualrwkv_folder(staging, config, converted, [checkpoint])
"""


def vit_block(prefix: str, width: int, mlp: int, layer_scale: bool) -> dict[str, tuple[int, ...]]:
    """One timm ViT block: fused qkv, proj, two LayerNorms, fc1/fc2 (and DINOv2's layer scales)."""
    shapes = {
        f"{prefix}norm1.weight": (width,), f"{prefix}norm1.bias": (width,),
        f"{prefix}attn.qkv.weight": (3 * width, width), f"{prefix}attn.qkv.bias": (3 * width,),
        f"{prefix}attn.proj.weight": (width, width), f"{prefix}attn.proj.bias": (width,),
        f"{prefix}norm2.weight": (width,), f"{prefix}norm2.bias": (width,),
        f"{prefix}mlp.fc1.weight": (mlp, width), f"{prefix}mlp.fc1.bias": (mlp,),
        f"{prefix}mlp.fc2.weight": (width, mlp), f"{prefix}mlp.fc2.bias": (width,),
    }
    if layer_scale:
        shapes |= {f"{prefix}ls1.gamma": (width,), f"{prefix}ls2.gamma": (width,)}
    return shapes


def hd_checkpoint_shapes(text_layers: int = 24) -> dict[str, tuple[int, ...]]:
    """Every tensor of a VisualRWKV-HD 1.6B `.pth` (v0612) and its shape, in the original's names."""
    text = Rwkv6Config(vocab_size=65536, hidden_size=2048, num_hidden_layers=text_layers, head_size=64)
    shapes = {f"rwkv.{p.blinkdl_key}": p.blinkdl_shape for p in rwkv6_parameters(text)}
    dino, siglip, tokens = "vit.dino_featurizer.", "vit.siglip_featurizer.", 1024  # 32 x 32 patches at 448 px
    shapes |= {
        f"{dino}cls_token": (1, 1, 1024), f"{dino}reg_token": (1, 4, 1024), f"{dino}pos_embed": (1, tokens, 1024),
        f"{dino}patch_embed.proj.weight": (1024, 3, 14, 14), f"{dino}patch_embed.proj.bias": (1024,),
        f"{dino}norm.weight": (1024,), f"{dino}norm.bias": (1024,),
    }
    for i in range(24):
        shapes |= vit_block(f"{dino}blocks.{i}.", 1024, 4096, layer_scale=True)
    shapes |= {
        f"{siglip}pos_embed": (1, tokens, 1152),
        f"{siglip}patch_embed.proj.weight": (1152, 3, 14, 14), f"{siglip}patch_embed.proj.bias": (1152,),
        f"{siglip}norm.weight": (1152,), f"{siglip}norm.bias": (1152,),
        # the attention-pooling head the release holds and VisualRWKV never reads
        f"{siglip}attn_pool.latent": (1, 1, 1152),
        f"{siglip}attn_pool.q.weight": (1152, 1152), f"{siglip}attn_pool.q.bias": (1152,),
        f"{siglip}attn_pool.kv.weight": (2304, 1152), f"{siglip}attn_pool.kv.bias": (2304,),
        f"{siglip}attn_pool.proj.weight": (1152, 1152), f"{siglip}attn_pool.proj.bias": (1152,),
        f"{siglip}attn_pool.norm.weight": (1152,), f"{siglip}attn_pool.norm.bias": (1152,),
        f"{siglip}attn_pool.mlp.fc1.weight": (4304, 1152), f"{siglip}attn_pool.mlp.fc1.bias": (4304,),
        f"{siglip}attn_pool.mlp.fc2.weight": (1152, 4304), f"{siglip}attn_pool.mlp.fc2.bias": (1152,),
    }
    for i in range(27):
        shapes |= vit_block(f"{siglip}blocks.{i}.", 1152, 4304, layer_scale=False)
    sam = "vit.sam_featurizer."
    shapes |= {
        f"{sam}patch_embed.proj.weight": (768, 3, 16, 16), f"{sam}patch_embed.proj.bias": (768,),
        f"{sam}pos_embed": (1, 64, 64, 768),
        f"{sam}neck.0.weight": (256, 768, 1, 1), f"{sam}neck.1.weight": (256,), f"{sam}neck.1.bias": (256,),
        f"{sam}neck.2.weight": (256, 256, 3, 3), f"{sam}neck.3.weight": (256,), f"{sam}neck.3.bias": (256,),
    }
    for i in range(12):
        b = f"{sam}blocks.{i}."
        rel_pos = 127 if i in (2, 5, 8, 11) else 27  # global attention blocks see the whole 64 x 64 grid
        shapes |= {
            f"{b}norm1.weight": (768,), f"{b}norm1.bias": (768,),
            f"{b}attn.qkv.weight": (2304, 768), f"{b}attn.qkv.bias": (2304,),
            f"{b}attn.proj.weight": (768, 768), f"{b}attn.proj.bias": (768,),
            f"{b}attn.rel_pos_h": (rel_pos, 64), f"{b}attn.rel_pos_w": (rel_pos, 64),
            f"{b}norm2.weight": (768,), f"{b}norm2.bias": (768,),
            f"{b}mlp.lin1.weight": (3072, 768), f"{b}mlp.lin1.bias": (3072,),
            f"{b}mlp.lin2.weight": (768, 3072), f"{b}mlp.lin2.bias": (768,),
        }
    shapes |= {"proj.proj.weight": (2048, 3200), "proj.gate.weight": (2048, 2048), "proj.o_proj.weight": (2048, 2048)}
    return shapes


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Random bfloat16 tensors of these shapes saved with `torch.save` (zip format, as the released files); returns
    the file's size. Small values, so that no cast overflows."""
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        key: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        for key, shape in shapes.items()
    }
    torch.save(state_dict, path)
    del state_dict
    return path.stat().st_size


def memory_available() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _status_bytes(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = [line.split(":", 1) for line in status]
    except OSError:  # the child has exited
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in lines if k in ("RssAnon", "RssFile")}


def _last_resort_for_oom_killer() -> None:
    with open("/proc/self/oom_score_adj", "w") as adjust:
        adjust.write("1000")


def measure(command: list[str]) -> dict[str, float] | None:
    """Runs `command`, returning its wall time and its peak RSS, anonymous and file-backed resident bytes; None if
    the out-of-memory killer (or anyone) killed it."""
    start = time.perf_counter()
    child = subprocess.Popen(command, preexec_fn=_last_resort_for_oom_killer)
    peaks = {"RssAnon": 0, "RssFile": 0}
    finished = threading.Event()

    def sample() -> None:
        while not finished.is_set():
            for key, value in _status_bytes(child.pid).items():
                peaks[key] = max(peaks[key], value)
            finished.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    finished.set()
    sampler.join()
    if child.returncode == -signal.SIGKILL:
        return None
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {child.returncode}")
    return {
        "seconds": time.perf_counter() - start,
        "rss": usage.ru_maxrss * 1024,  # kilobytes on Linux
        "anon": peaks["RssAnon"],
        "file": peaks["RssFile"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=24, help="RWKV-6 blocks (24 = the release; fewer: quicker)")
    parser.add_argument(
        "--dtypes", nargs="+", default=["auto", "float32"], help="--dtype per run; auto keeps the file's bfloat16"
    )
    parser.add_argument("--ways", nargs="+", default=["streamed", "in memory"], choices=["streamed", "in memory"])
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the synthetic file and outputs go")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_conversion_memory-", dir=args.workdir))
    try:
        checkpoint = workdir / "VisualRWKV-v0612-synthetic.pth"
        shapes = hd_checkpoint_shapes(args.text_layers)
        started = time.perf_counter()
        size = write_checkpoint(checkpoint, shapes)
        parameters = sum(torch.Size(s).numel() for s in shapes.values())
        print(
            f"checkpoint: {len(shapes)} tensors, {parameters:,} parameters, {size / 1e9:.2f} GB "
            f"(written in {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        python = sys.executable
        rows = []
        for dtype in args.dtypes:
            output_bytes = size * (2 if dtype == "float32" else 1)
            for way in args.ways:
                output = workdir / f"out-{dtype}-{way.replace(' ', '-')}"
                if way == "streamed":
                    command = [python, "-m", "visualrwkv_hf.cli", "convert", "--checkpoint", str(checkpoint),
                               "--output", str(output), "--dtype", dtype, "--no-progress"]
                    need = output_bytes // 4  # a shard and its cast, at most
                else:
                    command = [python, "-c", IN_MEMORY, str(checkpoint), str(output), dtype]
                    need = size + (output_bytes if dtype == "float32" else 0)
                available = memory_available()
                if need + 2 * GIB > available:
                    print(f"{way}, dtype {dtype}: skipped (needs about {need / GIB:.1f} GiB, "
                          f"{available / GIB:.1f} GiB available)", flush=True)
                    continue
                result = measure(command)
                shutil.rmtree(output, ignore_errors=True)
                if result is None:
                    print(f"{way}, dtype {dtype}: killed (SIGKILL: out of memory, with what other processes held)")
                    continue
                rows.append((way, dtype, result))
                print(f"{way}, dtype {dtype}: {result}", flush=True)
        print()
        print("| way | --dtype | output | peak RSS | RSS / file | peak anonymous | peak file-backed | time |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for way, dtype, result in rows:
            output_bytes = size * (2 if dtype == "float32" else 1)
            print(
                f"| {way} | {dtype} | {output_bytes / 1e9:.1f} GB | {result['rss'] / 1e9:.2f} GB | "
                f"{result['rss'] / size:.2f} | {result['anon'] / 1e9:.2f} GB | {result['file'] / 1e9:.2f} GB | "
                f"{result['seconds']:.0f} s |"
            )
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
