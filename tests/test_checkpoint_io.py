"""checkpoint_io: reading a checkpoint safely, output folders that appear complete or not at all (inputs protected,
symlinks followed), the staging folders a killed conversion leaves, and streaming (the checkpoint memory-mapped, the
converted tensors views of it, the output cast and written one shard at a time). Driven through
`convert_rwkv6_checkpoint`, the smallest real writer of a checkpoint folder."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile
from transformers import CLIPVisionConfig

import visualrwkv_hf
from visualrwkv_hf.checkpoint_io import load_checkpoint, save_safetensors_shards
from visualrwkv_hf.convert_rwkv6 import convert_blinkdl_to_hf, convert_rwkv6_checkpoint
from visualrwkv_hf.convert_visualrwkv import OriginalCheckpoint, convert_original_to_hf

from rwkv6_reference import random_blinkdl_rwkv6, save_checkpoint, tiny_checkpoint


# ----------------------------------------------------------------------------------------------- reading checkpoints

def test_unreadable_files_are_refused(tmp_path):
    not_a_pickle = tmp_path / "notes.pth"
    not_a_pickle.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a PyTorch weights file"):
        convert_rwkv6_checkpoint(not_a_pickle, tmp_path / "a", progress=False)
    unsafe_pickle = save_checkpoint({"emb.weight": Fraction(1, 3)}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_rwkv6_checkpoint(unsafe_pickle, tmp_path / "b", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_rwkv6_checkpoint(tmp_path / "absent.pth", tmp_path / "c", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["notes.pth", "unsafe.pth"]


def test_a_folder_given_as_the_checkpoint_is_refused_naming_its_weights(tmp_path):
    downloaded = tmp_path / "download"
    downloaded.mkdir()
    save_checkpoint(tiny_checkpoint(), downloaded / "RWKV-x060.pth")
    with pytest.raises(IsADirectoryError, match=r"download is a folder: give the .pth file \(this folder holds "
                                                r"RWKV-x060.pth\)\.$"):
        convert_rwkv6_checkpoint(downloaded, tmp_path / "hf", progress=False)
    converted = convert_rwkv6_checkpoint(downloaded / "RWKV-x060.pth", tmp_path / "hf", progress=False)
    with pytest.raises(IsADirectoryError, match="already converted: load it with from_pretrained"):
        convert_rwkv6_checkpoint(converted, tmp_path / "again", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["download", "hf"]


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc/self/mem")
def test_a_file_that_cannot_be_read_is_named():
    # /proc/self/mem is a regular file that fails to read at offset 0 (EIO), whatever the user's permissions.
    with pytest.raises(OSError, match=r"^Cannot read the checkpoint /proc/self/mem: Input/output error\.$"):
        convert_rwkv6_checkpoint("/proc/self/mem", "/nonexistent/hf", progress=False)


# ---------------------------------------------------------------------------------------------------- output folders

def test_non_empty_output_needs_overwrite(tmp_path):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    output = tmp_path / "hf"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite"):
        convert_rwkv6_checkpoint(checkpoint, output, progress=False)
    assert os.listdir(output) == ["keep.txt"]
    convert_rwkv6_checkpoint(checkpoint, output, overwrite=True, progress=False)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["hf", "model.pth"]
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a folder"):
        convert_rwkv6_checkpoint(checkpoint, tmp_path / "notes.txt", overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def output_forms(directory: Path, checkpoint: Path) -> dict[str, tuple[Path, Path]]:
    """(checkpoint as given, output) pairs where the output folder is, or holds, the checkpoint."""
    (directory / "link-to-folder").symlink_to(directory)
    (directory / "sub").mkdir()
    outside = directory.parent / f"{directory.name}-elsewhere"
    outside.mkdir()
    (outside / "link.pth").symlink_to(checkpoint)
    return {
        "its folder": (checkpoint, directory),
        "its folder's parent": (checkpoint, directory.parent),
        "the file itself": (checkpoint, checkpoint),
        "its folder through a symlink": (checkpoint, directory / "link-to-folder"),
        "its folder through ..": (checkpoint, directory / "sub" / ".."),
        "the folder a symlinked checkpoint points into": (outside / "link.pth", directory),
        "the folder of the symlink": (outside / "link.pth", outside),
    }


OUTPUT_FORMS = [
    "its folder", "its folder's parent", "the file itself", "its folder through a symlink", "its folder through ..",
    "the folder a symlinked checkpoint points into", "the folder of the symlink",
]


@pytest.mark.parametrize("form", OUTPUT_FORMS)
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
def test_an_output_holding_the_checkpoint_is_refused(form, overwrite, tmp_path):
    """Replacing such a folder would delete the input: refused with or without --overwrite, and nothing moves."""
    directory = tmp_path / "models"
    directory.mkdir()
    checkpoint = save_checkpoint(tiny_checkpoint(), directory / "model.pth")
    content = checkpoint.read_bytes()
    given, output = output_forms(directory, checkpoint)[form]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    link = f" (a link to {checkpoint})" if given.is_symlink() else ""
    with pytest.raises(ValueError, match=rf"The input {re.escape(f'{given}{link}')} (is|lies inside) the output .*: "
                                         r"writing there would delete it\. Choose an output folder that does not hold "
                                         rf"the input, for example {re.escape(str(given.parent / given.stem))}-hf\.$"):
        convert_rwkv6_checkpoint(given, output, overwrite=overwrite, progress=False)
    assert checkpoint.read_bytes() == content
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_empty_output_folder_is_used(tmp_path):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    (tmp_path / "hf").mkdir()
    output = convert_rwkv6_checkpoint(checkpoint, tmp_path / "hf", progress=False)
    assert (output / "config.json").is_file() and sorted(os.listdir(tmp_path)) == ["hf", "model.pth"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(visualrwkv_hf.convert_rwkv6.GenerationConfig, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_rwkv6_checkpoint(checkpoint, tmp_path / "hf", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["model.pth"]


def test_an_output_under_a_file_is_refused_before_reading(tmp_path):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    with pytest.raises(FileExistsError, match=re.escape(
        f"Output path {checkpoint / 'models' / 'hf'} lies under {checkpoint}, which is a file, not a folder."
    )):
        convert_rwkv6_checkpoint(checkpoint, checkpoint / "models" / "hf", progress=False)
    assert os.listdir(tmp_path) == ["model.pth"]


def test_symlinked_output_folder_is_replaced_through_the_link(tmp_path):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    convert_rwkv6_checkpoint(checkpoint, tmp_path / "link", overwrite=True, progress=False)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == tmp_path / "real"
    assert not (tmp_path / "real" / "old.txt").exists() and (tmp_path / "real" / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["link", "model.pth", "real"]


# ------------------------------------------------------------------------------------------- interrupted conversions

# Enters the converter's atomic output folder, writes the model into the staging folder, says where, and waits to be
# killed: a conversion interrupted while writing.
WRITE_AND_WAIT = """
import sys, time
from visualrwkv_hf.checkpoint_io import atomic_output_dir, load_checkpoint
from visualrwkv_hf.convert_rwkv6 import convert_blinkdl_to_hf, save_hf_text_model
config, state_dict = convert_blinkdl_to_hf(load_checkpoint(sys.argv[1]))
with atomic_output_dir(sys.argv[2]) as staging:
    save_hf_text_model(staging, config, state_dict)
    print(staging, flush=True)
    time.sleep(600)
"""


def test_staging_folders_of_killed_conversions_are_cleaned_and_live_ones_kept(tmp_path, caplog):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    output = tmp_path / "hf"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITE_AND_WAIT, str(checkpoint), str(output)], stdout=subprocess.PIPE, text=True
    )
    try:
        staging = Path(writer.stdout.readline().strip())
        assert staging.parent == tmp_path and staging.name.startswith(".hf.partial-")
        assert (staging / "model.safetensors").is_file()
        # While its process runs, another conversion into the same folder leaves it alone (and says so, in case the
        # process id was reused).
        with caplog.at_level("WARNING"):
            convert_rwkv6_checkpoint(checkpoint, output, progress=False)
        assert (staging / "model.safetensors").is_file()
        assert caplog.messages == [
            f"{staging} is the staging folder of process {writer.pid}, which is running: another conversion into "
            f"{output}? If that process is not a conversion, remove the folder: rm -r '{staging}'"
        ]
        caplog.clear()
    finally:
        writer.kill()
        writer.wait()
    # What a conversion killed while replacing an old folder leaves: that folder moved aside, under its process id.
    previous = staging.with_name(staging.name.replace(".partial-", ".previous-"))
    shutil.copytree(output, previous)
    # A staging folder in the form older versions used (no process id), or of another machine: reported, never deleted.
    old_form, other_host = tmp_path / ".hf.partial-k3j2h1g0", tmp_path / ".hf.partial-otherhost-12-abcd1234"
    old_form.mkdir(), other_host.mkdir()
    with caplog.at_level("WARNING"):
        convert_rwkv6_checkpoint(checkpoint, output, overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path)) == [old_form.name, other_host.name, "hf", "model.pth"]
    pid = staging.name.split("-")[-2]
    assert f"Removed {staging}, left by a conversion killed midway (process {pid})." in caplog.messages
    assert f"Removed {previous}, left by a conversion killed midway (process {pid})." in caplog.messages
    for kept in (old_form, other_host):
        assert (
            f"{kept} looks like the staging folder of an interrupted conversion into {output} (from another machine "
            f"or an older version); it may hold a copy of the weights. If no conversion into {output} is running, "
            f"remove it: rm -r '{kept}'"
        ) in caplog.messages
    # Killed between moving the old folder aside and moving the new one in: the old folder is the only copy left.
    shutil.rmtree(output)
    previous.mkdir()
    caplog.clear()
    with caplog.at_level("WARNING"):
        convert_rwkv6_checkpoint(checkpoint, output, progress=False)
    assert previous.is_dir() and (output / "model.safetensors").is_file()
    assert any(f"mv '{previous}' '{output}'" in message for message in caplog.messages)


# --------------------------------------------------------------------------------------------------------- streaming

needs_proc_maps = pytest.mark.skipif(
    not Path("/proc/self/maps").exists(), reason="reads the process's memory mappings from Linux's /proc/self/maps"
)


def file_mapped(tensor: torch.Tensor, path: Path) -> bool:
    """Whether `tensor`'s memory lies in a memory mapping of the file `path`."""
    with open("/proc/self/maps") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    regions = [
        [int(address, 16) for address in field[0].split("-")]
        for field in fields
        if len(field) == 6 and field[5].strip() == str(path.resolve())
    ]
    return any(start <= tensor.data_ptr() < end for start, end in regions)


@needs_proc_maps
def test_checkpoints_are_memory_mapped_and_legacy_files_read_whole(tmp_path, caplog):
    state_dict = tiny_checkpoint()
    checkpoint = save_checkpoint(state_dict, tmp_path / "model.pth")
    loaded = load_checkpoint(checkpoint)
    assert loaded.keys() == state_dict.keys() and all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    assert all(file_mapped(tensor, checkpoint) for tensor in loaded.values())
    assert not caplog.records

    legacy = tmp_path / "legacy.pth"  # torch.save's format before PyTorch 1.6: no zip archive, no mapping
    torch.save(state_dict, legacy, _use_new_zipfile_serialization=False)
    with caplog.at_level(logging.WARNING, logger="visualrwkv_hf.checkpoint_io"):
        loaded = load_checkpoint(legacy)
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    assert not any(file_mapped(tensor, legacy) for tensor in loaded.values())
    assert caplog.messages == [
        f"{legacy} is in the legacy format of torch.save (PyTorch before 1.6, not a zip archive), which cannot be "
        "memory-mapped: it was read into memory whole. Saving it again with a current PyTorch "
        "(torch.save(torch.load(old, weights_only=True), new)) lets a conversion stream it."
    ]


@needs_proc_maps
def test_converters_map_views_of_the_file_and_leave_the_cast_to_the_writer(tmp_path):
    from test_convert_visualrwkv import TINY_CLIP, original_state_dict

    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    config, converted = convert_blinkdl_to_hf(load_checkpoint(checkpoint), "float16", cast=False)
    assert config.dtype == torch.float16
    assert all(t.dtype == torch.float32 and file_mapped(t, checkpoint) for t in converted.values())
    # The default casts, as the in-memory API always did; the values are those the writer casts to.
    _, cast = convert_blinkdl_to_hf(load_checkpoint(checkpoint), "float16")
    assert all(torch.equal(cast[k], v.half()) for k, v in converted.items())

    full = save_checkpoint(original_state_dict(), tmp_path / "full.pth")  # VisualRWKV-6.0: RWKV-6 + CLIP + linear
    original = OriginalCheckpoint.from_full(load_checkpoint(full), str(full))
    config, converted = convert_original_to_hf(original, CLIPVisionConfig(**TINY_CLIP), "bfloat16", cast=False)
    assert config.dtype == torch.bfloat16 and all(file_mapped(t, full) for t in converted.values())


@needs_proc_maps
def test_three_encoder_tensors_are_views_of_the_file_but_the_two_made_ones(tmp_path):
    from sam_dino_siglip_reference import import_original_libraries

    if import_original_libraries() is None:
        pytest.skip("timm and segment-anything (the `test` extra) are not installed")
    from test_convert_sam_dino_siglip import TINY_VISION_CONFIG
    from test_convert_sam_dino_siglip import original_state_dict as hd_state_dict

    checkpoint = save_checkpoint(hd_state_dict(uhd=False), tmp_path / "hd.pth")
    original = OriginalCheckpoint.from_full(load_checkpoint(checkpoint), str(checkpoint))
    _, converted = convert_original_to_hf(original, TINY_VISION_CONFIG, cast=False)
    made = {k for k, t in converted.items() if not file_mapped(t, checkpoint)}
    # DINOv2's position table with its zero class row, and the unused mask token (zeros): both new tensors.
    dino = "model.vision_tower.dino.embeddings."
    assert made == {dino + "position_embeddings", dino + "mask_token"}


def peak_allocated_bytes(function) -> int:
    """The most CPU memory that torch's allocator held at once while `function` ran, from the profiler's allocation
    and free events (a memory-mapped file counts as one allocation of its size)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = sorted(
        (event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def test_writing_casts_one_shard_at_a_time(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(256, 256, dtype=torch.bfloat16) for i in range(16)}  # 128 KiB each
    shard = 4 * 256 * 256 * 4  # four float32 tensors: 1 MiB
    peak = peak_allocated_bytes(lambda: save_safetensors_shards(tmp_path, tensors, torch.float32, shard))
    assert peak < 1.5 * shard  # one shard cast at a time; the whole output cast at once would be 4 MiB
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(set(index["weight_map"].values())) == files and index["metadata"]["total_size"] == 4 * shard
    written = {k: v for name in files for k, v in load_file(tmp_path / name).items()}
    assert written.keys() == tensors.keys() and all(torch.equal(written[k], v.float()) for k, v in tensors.items())


def test_conversion_to_another_dtype_holds_one_shard_of_cast_tensors(tmp_path):
    state_dict = random_blinkdl_rwkv6(hidden_size=128, head_size=16, num_layers=8, vocab_size=512, mix_rank=8,
                                      decay_rank=16)
    checkpoint = save_checkpoint({k: v.bfloat16() for k, v in state_dict.items()}, tmp_path / "model.pth")
    file_size, output_size = checkpoint.stat().st_size, sum(4 * t.numel() for t in state_dict.values())  # 3.9, 7.9 MB
    peak = peak_allocated_bytes(
        lambda: convert_rwkv6_checkpoint(checkpoint, tmp_path / "hf", "float32", progress=False, max_shard_size=10**6)
    )
    # The mapped file, one 1 MB shard and one tensor's check; casting everything before writing holds the whole output.
    assert peak < file_size + output_size / 2
    _, expected = convert_blinkdl_to_hf(load_checkpoint(checkpoint), "float32")  # the in-memory API
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    written = {k: v for name in set(index["weight_map"].values()) for k, v in load_file(tmp_path / "hf" / name).items()}
    assert written.keys() == expected.keys() and all(torch.equal(written[k], v) for k, v in expected.items())
