"""checkpoint_io: reading a checkpoint safely, output folders that appear complete or not at all (inputs protected,
symlinks followed), and the staging folders a killed conversion leaves. Driven through `convert_rwkv6_checkpoint`,
the smallest real writer of a checkpoint folder."""

import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

import visualrwkv_hf
from visualrwkv_hf.convert_rwkv6 import convert_rwkv6_checkpoint

from rwkv6_reference import save_checkpoint, tiny_checkpoint


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
