"""`add_remote_code`: a saved folder with the package's code in it loads with `trust_remote_code=True`, offline, in a
Python where `visualrwkv_hf` cannot be imported, and computes what the package classes compute."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from visualrwkv_hf import (
    Rwkv6Config,
    Rwkv6ForCausalLM,
    RwkvWorldTokenizer,
    VisualRWKVForConditionalGeneration,
)
from visualrwkv_hf import remote_code
from visualrwkv_hf.remote_code import add_remote_code, flat_name, flattened_source, needed_modules

from test_pipeline import IMAGE_SIZE, QUESTIONS, random_image, save_tiny_visualrwkv

MAX_NEW_TOKENS = 6
TEXT_PROMPT = "User: Why is the sky blue?\n\nAssistant:"

# Runs in `python -I` with every sys.path entry that holds the package removed (the editable install adds src/).
WITHOUT_PACKAGE = r"""
import importlib.util, json, os, sys
sys.path[:] = [entry for entry in sys.path if not os.path.isdir(os.path.join(entry, "visualrwkv_hf"))]
try:
    import visualrwkv_hf
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("visualrwkv_hf is still importable")

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline,
)

vlm_folder, text_folder, image_path, question, text_prompt, max_new_tokens, output_path = sys.argv[1:]
max_new_tokens = int(max_new_tokens)
model = AutoModelForImageTextToText.from_pretrained(vlm_folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(vlm_folder, trust_remote_code=True)
inputs = processor(images=Image.open(image_path), text=question, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
pipe = pipeline("image-text-to-text", model=vlm_folder, trust_remote_code=True)
(answer,) = pipe(images=image_path, text=question, max_new_tokens=max_new_tokens, return_full_text=False)

text_model = AutoModelForCausalLM.from_pretrained(text_folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(text_folder, trust_remote_code=True)
text_ids = tokenizer(text_prompt, return_tensors="pt")["input_ids"]
with torch.no_grad():
    text_logits = text_model(text_ids).logits

loaded = [model, processor, processor.tokenizer, pipe.model, text_model, tokenizer]
torch.save(
    {
        "classes": [type(obj).__module__ + "." + type(obj).__name__ for obj in loaded],
        "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits": logits,
        "answer": answer["generated_text"], "text_ids": text_ids, "text_logits": text_logits,
    },
    output_path,
)
"""


def save_tiny_text_model(folder: Path) -> Path:
    config = Rwkv6Config(
        hidden_size=32, num_hidden_layers=2, head_size=8, time_mix_extra_dim=4, time_decay_extra_dim=6,
        initializer_range=0.3,
    )
    torch.manual_seed(1)
    Rwkv6ForCausalLM(config).save_pretrained(folder)
    RwkvWorldTokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    vlm = save_tiny_visualrwkv(tmp_path_factory.mktemp("remote-vlm"))
    text = save_tiny_text_model(tmp_path_factory.mktemp("remote-text"))
    for folder in (vlm, text):
        add_remote_code(folder)
    return vlm, text


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_code_files_are_flat_and_import_each_other_by_file_name(folders):
    vlm, _ = folders
    code_files = sorted(path.name for path in vlm.glob("*.py"))
    assert {"configuration_visualrwkv.py", "configuration_rwkv6.py", "configuration_rwkv_common.py",
            "modeling_visualrwkv.py", "modeling_rwkv6.py", "modeling_rwkv_common.py", "scanning.py", "ops.py",
            "wkv6.py", "processing_visualrwkv.py", "tokenization_rwkv_world.py"} <= set(code_files)
    assert "cli.py" not in code_files and "remote_code.py" not in code_files
    for name in code_files:
        source = (vlm / name).read_text(encoding="utf-8")
        # transformers' loader resolves `from .name import` to name.py in the same folder, and nothing else.
        for imported in re.findall(r"^\s*from\s+(\.+[\w.]*)\s+import", source, flags=re.MULTILINE):
            assert re.fullmatch(r"\.\w+", imported), f"{name}: {imported}"
            assert (vlm / f"{imported[1:]}.py").is_file(), f"{name} imports {imported}, which was not copied"


def test_auto_map_names_each_auto_class(folders):
    vlm, text = folders
    assert read_json(vlm / "config.json")["auto_map"] == {
        "AutoConfig": "configuration_visualrwkv.VisualRWKVConfig",
        "AutoModel": "modeling_visualrwkv.VisualRWKVModel",
        "AutoModelForImageTextToText": "modeling_visualrwkv.VisualRWKVForConditionalGeneration",
    }
    assert read_json(vlm / "processor_config.json")["auto_map"] == {
        "AutoProcessor": "processing_visualrwkv.VisualRWKVProcessor"
    }
    assert read_json(vlm / "tokenizer_config.json")["auto_map"] == {
        "AutoTokenizer": ["tokenization_rwkv_world.RwkvWorldTokenizer", None],
        "AutoProcessor": "processing_visualrwkv.VisualRWKVProcessor",
    }
    assert read_json(text / "config.json")["auto_map"] == {
        "AutoConfig": "configuration_rwkv6.Rwkv6Config",
        "AutoModel": "modeling_rwkv6.Rwkv6Model",
        "AutoModelForCausalLM": "modeling_rwkv6.Rwkv6ForCausalLM",
    }
    assert read_json(text / "tokenizer_config.json")["auto_map"] == {
        "AutoTokenizer": ["tokenization_rwkv_world.RwkvWorldTokenizer", None]
    }
    # The text model needs neither the vision model nor the processor.
    assert not (text / "modeling_visualrwkv.py").exists() and not (text / "processing_visualrwkv.py").exists()


def test_adding_twice_changes_nothing(folders):
    vlm, _ = folders
    before = {path.name: path.read_bytes() for path in vlm.iterdir()}
    add_remote_code(vlm)
    assert {path.name: path.read_bytes() for path in vlm.iterdir()} == before


def test_loads_without_the_package_and_computes_the_same(folders, tmp_path, monkeypatch):
    vlm, text = folders
    image_path = tmp_path / "image.png"
    random_image(3, size=(IMAGE_SIZE + 9, IMAGE_SIZE + 3)).save(image_path)
    output_path = tmp_path / "remote.pt"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
    }
    arguments = [vlm, text, image_path, QUESTIONS[0], TEXT_PROMPT, MAX_NEW_TOKENS, output_path]
    run = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_PACKAGE, *map(str, arguments)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    remote = torch.load(output_path, weights_only=True)
    # Every object came from the folder's code, not from an installed package.
    assert all(name.startswith("transformers_modules.") for name in remote["classes"]), remote["classes"]

    # The folder carries no C++ sources, so its copy runs the torch WKV op: compare against the same op here
    # (the compiled kernel sums in another order, which moves fp32 logits by more than assert_close's tolerance).
    monkeypatch.setenv("VISUALRWKV_WKV_BACKEND", "torch")
    model = VisualRWKVForConditionalGeneration.from_pretrained(vlm).eval()
    processor = AutoProcessor.from_pretrained(vlm)
    inputs = processor(images=Image.open(image_path), text=QUESTIONS[0], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], remote["input_ids"])
    assert torch.equal(inputs["pixel_values"], remote["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, remote["logits"])
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    answer = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1]:])[0]
    assert remote["answer"] == answer

    text_model = Rwkv6ForCausalLM.from_pretrained(text).eval()
    text_ids = RwkvWorldTokenizer.from_pretrained(text)(TEXT_PROMPT, return_tensors="pt")["input_ids"]
    assert torch.equal(text_ids, remote["text_ids"])
    with torch.no_grad():
        torch.testing.assert_close(text_model(text_ids).logits, remote["text_logits"])


def test_refuses_folders_it_cannot_serve(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        add_remote_code(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type 'llava'"):
        add_remote_code(tmp_path)


def test_subpackage_modules_flatten_with_their_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "base.py").write_text("VALUE = 21\n")
    (package / "sub" / "__init__.py").write_text("from .leaf import double\n")
    (package / "sub" / "leaf.py").write_text("from ..base import VALUE\n\n\ndef double():\n    return 2 * VALUE\n")
    (package / "top.py").write_text("from .sub import double\n\nANSWER = double()\n")
    monkeypatch.setattr(remote_code, "PACKAGE_DIR", package)

    modules = needed_modules(["top"])
    assert modules == ["top", "sub", "sub.leaf", "base"]
    flat = tmp_path / "flat_package"
    flat.mkdir()
    (flat / "__init__.py").write_text("")
    for module_name in modules:
        (flat / f"{flat_name(module_name)}.py").write_text(flattened_source(module_name))
    assert (flat / "leaf.py").read_text().startswith("from .base import VALUE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.import_module("flat_package.top").ANSWER == 42
