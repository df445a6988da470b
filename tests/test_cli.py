import errno
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

try:
    import resource
except ImportError:  # Windows
    resource = None
from transformers import AutoModelForImageTextToText, AutoProcessor

from visualrwkv_hf import VisualRWKVForConditionalGeneration
from visualrwkv_hf.cli import is_full_disk, main

from test_convert_visualrwkv import test_image, write_original_files

CONVERT_SCRIPT = Path(__file__).resolve().parents[1] / "conversion" / "convert_visualrwkv_to_hf.py"
QUESTION = "What is in the picture?"


def test_lm_demo_builds_saves_and_generates(tmp_path, capsys):
    output = tmp_path / "tiny"
    assert main(["lm-demo", "--output", str(output), "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "Full recompute without cache gives the same tokens: True" in printed
    assert "Generated 6 tokens" in printed
    assert json.loads((output / "config.json").read_text())["model_type"] == "visualrwkv_rwkv6"
    assert (output / "tokenizer_config.json").exists()


def test_lm_demo_rewrites_its_own_folder_but_refuses_a_foreign_one(tmp_path, capsys):
    output = tmp_path / "tiny"
    assert main(["lm-demo", "--output", str(output), "--max-new-tokens", "1"]) == 0
    assert main(["lm-demo", "--output", str(output), "--max-new-tokens", "1"]) == 0  # an earlier lm-demo's folder
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["lm-demo", "--output", str(foreign), "--max-new-tokens", "1"]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]
    assert main(["lm-demo", "--output", str(foreign), "--max-new-tokens", "1", "--overwrite"]) == 0
    assert (foreign / "config.json").is_file()


# ------------------------------------------------------------------------------------ convert and chat (VisualRWKV)


@pytest.fixture(scope="module")
def converted_folder(tmp_path_factory) -> Path:
    """A tiny random VisualRWKV converted from the exported pair with `visualrwkv convert`."""
    directory = tmp_path_factory.mktemp("cli")
    files = write_original_files(directory)
    output = directory / "hf"
    arguments = ["convert", "--rwkv", str(files.rwkv), "--visual", str(files.visual), "--output", str(output),
                 "--vision-config", str(files.vision_config), "--no-progress"]
    assert main(arguments) == 0
    return output


def test_convert_writes_a_folder_with_the_released_defaults(converted_folder, capsys):
    config = json.loads((converted_folder / "config.json").read_text())
    assert (config["scan_mode"], config["image_position"], config["grid_size"]) == ("bidirectional", "middle", -1)
    assert config["dtype"] == "float16"  # auto keeps the exported pair's dtype
    assert (converted_folder / "README.md").is_file() and (converted_folder / "chat_template.jinja").is_file()


def test_convert_flags(tmp_path, capsys):
    files = write_original_files(tmp_path)
    output = tmp_path / "hf"
    arguments = ["convert", "--checkpoint", str(files.full), "--output", str(output), "--vision-config",
                 str(files.vision_config), "--scan-mode", "unidirectional", "--image-position", "first",
                 "--grid-size", "0", "--dtype", "float32", "--no-progress"]
    assert main(arguments) == 0
    assert capsys.readouterr().out == f"Wrote {output}\n"
    config = json.loads((output / "config.json").read_text())
    assert (config["scan_mode"], config["image_position"], config["grid_size"], config["dtype"]) == (
        "unidirectional", "first", 0, "float32"
    )
    assert json.loads((output / "processor_config.json").read_text())["num_image_tokens"] == 1  # cls only
    assert main(arguments) == 1  # the folder is not empty now
    assert "not empty; pass overwrite=True (--overwrite" in capsys.readouterr().err
    assert main([*arguments, "--overwrite"]) == 0


def test_convert_with_remote_code_writes_auto_map_and_code(tmp_path):
    files = write_original_files(tmp_path)
    output = tmp_path / "hf"
    arguments = ["convert", "--checkpoint", str(files.full), "--output", str(output), "--vision-config",
                 str(files.vision_config), "--remote-code", "--no-progress"]
    assert main(arguments) == 0
    auto_map = json.loads((output / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"].endswith("VisualRWKVForConditionalGeneration")
    module = auto_map["AutoModelForImageTextToText"].split(".")[0]
    assert (output / f"{module}.py").is_file()
    assert "AutoProcessor" in json.loads((output / "processor_config.json").read_text())["auto_map"]


def test_convert_script_reports_user_errors_without_traceback(tmp_path):
    files = write_original_files(tmp_path)
    run = [sys.executable, str(CONVERT_SCRIPT), "--checkpoint", str(files.full), "--output", str(tmp_path / "hf"),
           "--no-progress"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: The vision tower in ") and "--vision-config" in result.stderr
    result = subprocess.run([*run, "--rwkv", str(files.rwkv)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_convert_refuses_an_output_holding_the_checkpoint(tmp_path, monkeypatch, capsys):
    files = write_original_files(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)
    arguments = ["convert", "--checkpoint", "full.pth", "--vision-config", "clip", "--output", ".", "--overwrite",
                 "--no-progress"]
    assert main(arguments) == 1
    assert capsys.readouterr().err == (
        f"error: The input full.pth lies inside the output {tmp_path}: writing there would delete it. Choose an "
        f"output folder that does not hold the input, for example {tmp_path / 'full-hf'}.\n"
    )
    assert sorted(tmp_path.rglob("*")) == before and files.full.is_file()


def test_convert_allow_nonfinite(tmp_path, capsys):
    files = write_original_files(tmp_path)
    visual = torch.load(files.visual)
    visual["proj.weight"][0, 0] = float("nan")
    torch.save(visual, files.visual)
    arguments = ["convert", "--rwkv", str(files.rwkv), "--visual", str(files.visual), "--output",
                 str(tmp_path / "hf"), "--vision-config", str(files.vision_config), "--no-progress"]
    assert main(arguments) == 1
    assert capsys.readouterr().err == (
        f"error: {files.visual} holds NaN or infinite weights in 1 tensor: 'proj.weight' (1 NaN, 0 inf of 2048 "
        "values); a model with them computes NaN (is the file damaged, or from a diverged training run?). Pass "
        "allow_nonfinite=True (--allow-nonfinite on the command line) to convert it anyway.\n"
    )
    assert main([*arguments, "--allow-nonfinite"]) == 0


@pytest.mark.skipif(resource is None, reason="needs POSIX resource limits")
def test_convert_out_of_space_gives_one_line_and_leaves_nothing(tmp_path):
    files = write_original_files(tmp_path)
    before = sorted(tmp_path.rglob("*"))

    def limit_file_size():  # writing beyond 64 KiB fails with EFBIG, as on a drive whose file-size limit is reached
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    run = [sys.executable, str(CONVERT_SCRIPT), "--rwkv", str(files.rwkv), "--visual", str(files.visual),
           "--vision-config", str(files.vision_config), "--output", str(tmp_path / "hf"), "--no-progress"]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(
        rf"error: Could not write {re.escape(str(tmp_path / 'hf'))}: File too large \(about 1\d\.\d MiB are needed, "
        r".*\)\. Nothing was written; free some space or choose another output folder\.\n",
        result.stderr,
    ), result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_convert_pushes_to_the_hub(tmp_path, monkeypatch, capsys):
    files = write_original_files(tmp_path)
    pushed = []
    monkeypatch.setattr(
        "visualrwkv_hf.convert_visualrwkv.push_folder_to_hub", lambda folder, repo_id: pushed.append((folder, repo_id))
    )
    output = tmp_path / "hf"
    arguments = ["convert", "--checkpoint", str(files.full), "--output", str(output), "--vision-config",
                 str(files.vision_config), "--push-to-hub", "someone/tiny", "--no-progress"]
    assert main(arguments) == 0
    assert pushed == [(output, "someone/tiny")]
    assert capsys.readouterr().out == f"Wrote {output} and uploaded it to someone/tiny\n"


def expected_answer(folder: Path, image_position: str | None, max_new_tokens: int) -> str:
    """What greedy generation gives for the question, decoded the way the streamer prints it."""
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, image_position=image_position)
    inputs = processor(images=test_image(), text=prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=261)
    return processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("image_position", [None, "last"])
def test_chat_streams_the_greedy_answer(converted_folder, tmp_path, capsys, image_position):
    image = tmp_path / "picture.png"
    test_image().save(image)
    arguments = ["chat", "--model", str(converted_folder), "--image", str(image), "--max-new-tokens", "5", QUESTION]
    if image_position:
        arguments += ["--image-position", image_position]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert printed == expected_answer(converted_folder, image_position, 5) + "\n"


def test_chat_samples_with_a_temperature(converted_folder, tmp_path, capsys):
    image = tmp_path / "picture.png"
    test_image().save(image)
    torch.manual_seed(0)
    arguments = ["chat", "--model", str(converted_folder), "--image", str(image), "--max-new-tokens", "3",
                 "--do-sample", "--temperature", "0.7", QUESTION]
    assert main(arguments) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_chat_reports_user_errors_without_traceback(converted_folder, tmp_path, capsys):
    image = tmp_path / "picture.png"
    test_image().save(image)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    cases = [
        (["--model", str(tmp_path / "absent"), "--image", str(image)], "is not a model folder (no config.json)"),
        (["--model", str(converted_folder), "--image", str(tmp_path / "absent.png")], "it does not exist"),
        (["--model", str(converted_folder), "--image", str(not_an_image)], "not an image format Pillow recognises"),
    ]
    for arguments, message in cases:
        assert main(["chat", *arguments, QUESTION]) == 1
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and message in captured.err and not captured.out


# ------------------------------------------------------------------------------------------------- user errors


def one_line_error(capsys) -> str:
    """The command's stderr, checked to be one `error:` line and nothing on stdout."""
    captured = capsys.readouterr()
    assert not captured.out and captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured
    assert "error: " in captured.err
    return captured.err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["chat", "--model", "m", "--image", "i.png", "--max-new-tokens", "0", QUESTION],
         "argument --max-new-tokens: must be a positive integer, got 0"),
        (["chat", "--model", "m", "--image", "i.png", "--max-new-tokens", "-3", QUESTION],
         "must be a positive integer, got -3"),
        (["chat", "--model", "m", "--image", "i.png", "--do-sample", "--temperature", "0", QUESTION],
         "argument --temperature: must be a positive number, got 0"),
        (["chat", "--model", "m", "--image", "i.png", "--do-sample", "--temperature", "nan", QUESTION],
         "must be a positive number, got nan"),
        (["lm-demo", "--max-new-tokens", "0"], "argument --max-new-tokens: must be a positive integer, got 0"),
        (["demo", "--num-test", "0"], "argument --num-test: must be a positive integer, got 0"),
        (["demo", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["demo", "--learning-rate=-1e-3"], "argument --learning-rate: must be a positive number, got -1e-3"),
    ],
)
def test_bad_argument_values_are_refused_by_the_parser_in_one_line(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert message in err and f"(see `visualrwkv {arguments[0]} --help`)" in err


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "--device 'gpu' is not a torch device: expected cpu, cuda, cuda:N, mps"),
        ("cuda:99", "--device cuda:99: this machine has "),
        pytest.param(
            "cuda", "--device cuda: this machine has no cuda device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_loading(converted_folder, tmp_path, capsys, device, message):
    image = tmp_path / "picture.png"
    test_image().save(image)
    assert main(["chat", "--model", str(converted_folder), "--image", str(image), "--device", device, QUESTION]) == 1
    assert message in one_line_error(capsys)


def test_temperature_without_sampling_is_refused(converted_folder, capsys):
    arguments = ["chat", "--model", str(converted_folder), "--image", "i.png", "--temperature", "0.7", QUESTION]
    assert main(arguments) == 1
    assert "--temperature only applies with --do-sample" in one_line_error(capsys)


def test_chat_refuses_a_folder_of_another_model(converted_folder, tmp_path, capsys):
    image = tmp_path / "picture.png"
    test_image().save(image)
    assert main(["lm-demo", "--output", str(tmp_path / "text"), "--max-new-tokens", "1"]) == 0
    capsys.readouterr()
    assert main(["chat", "--model", str(tmp_path / "text"), "--image", str(image), QUESTION]) == 1
    assert "config.json is a `visualrwkv_rwkv6` configuration, not a `visualrwkv` one" in one_line_error(capsys)
    for name, edit in [("llava", {"model_type": "llava"}), ("more", {"text_config": {"num_hidden_layers": 9}})]:
        folder = tmp_path / name
        shutil.copytree(converted_folder, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update({**edit, "text_config": {**config["text_config"], **edit.get("text_config", {})}})
        (folder / "config.json").write_text(json.dumps(config))
        assert main(["chat", "--model", str(folder), "--image", str(image), QUESTION]) == 1
        err = capsys.readouterr().err  # after transformers' loading table for the weights
        assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
        assert ("`llava` configuration" if name == "llava" else "missing from the weights") in err


def test_an_image_folder_is_refused(converted_folder, tmp_path, capsys):
    assert main(["chat", "--model", str(converted_folder), "--image", str(tmp_path), QUESTION]) == 1
    assert f"Cannot read image file '{tmp_path}'" in one_line_error(capsys)


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EFBIG, "File too large"), True),
        (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
        (OSError(errno.ENOENT, "No such file or directory"), False),
        (SafetensorError("Error while deserializing header: HeaderTooLarge"), False),
    ],
)
def test_full_disk_errors_are_recognised_from_python_and_safetensors(error, full):
    assert is_full_disk(error) is full


def test_a_full_disk_while_saving_is_one_line(tmp_path):
    """The real command in a process whose file-size limit is 100 kB: writes fail with EFBIG, as on a full disk."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    output = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, "-m", "visualrwkv_hf.cli", "lm-demo", "--output", str(output)],
        preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: no space left to write in {output} (") and "(os error 27)" in last_line
    assert last_line.endswith("free some disk space (or raise the file size limit) or write elsewhere, then run again.")



def test_corrupt_weights_are_one_line(converted_folder, tmp_path, capsys):
    image = tmp_path / "picture.png"
    test_image().save(image)
    folder = tmp_path / "corrupt"
    shutil.copytree(converted_folder, folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    assert main(["chat", "--model", str(folder), "--image", str(image), QUESTION]) == 1
    assert "cannot read or write a .safetensors file: Error while deserializing header" in one_line_error(capsys)


def test_convert_max_shard_size_splits_the_weights_and_the_folder_loads(tmp_path, capsys):
    files = write_original_files(tmp_path)
    arguments = ["convert", "--checkpoint", str(files.full), "--vision-config", str(files.vision_config), "--no-progress"]
    assert main([*arguments, "--output", str(tmp_path / "whole")]) == 0
    assert main([*arguments, "--output", str(tmp_path / "sharded"), "--max-shard-size", "100KB"]) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "whole" / "model.safetensors.index.json").exists()
    sharded = VisualRWKVForConditionalGeneration.from_pretrained(tmp_path / "sharded").state_dict()
    whole = VisualRWKVForConditionalGeneration.from_pretrained(tmp_path / "whole").state_dict()
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*arguments, "--output", str(tmp_path / "bad"), "--max-shard-size", "2 parsecs"])
    assert "is not a shard size" in capsys.readouterr().err
