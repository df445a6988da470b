"""Ship this package's source inside a saved checkpoint, so that the folder loads with `trust_remote_code=True` in an
environment where `visualrwkv_hf` is not installed.

transformers' dynamic-module loader copies a folder's code file and, recursively, the files it imports relatively, but
only as flat sibling modules: `from .name import x` must find `name.py` next to the importer. This package keeps its
WKV ops in a subpackage, so every needed module is copied under a flat name (`ops/__init__.py` -> `ops.py`,
`ops/wkv6.py` -> `wkv6.py`, top-level modules keep theirs) and its relative imports are rewritten to those names. The
modules to copy are found by following the relative imports of the modules that define the Auto classes, so a new
module of the package travels as soon as one of them imports it.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

from .configuration_rwkv6 import Rwkv6Config
from .configuration_visualrwkv import VisualRWKVConfig
from .modeling_rwkv6 import Rwkv6ForCausalLM, Rwkv6Model
from .modeling_visualrwkv import VisualRWKVForConditionalGeneration, VisualRWKVModel
from .processing_visualrwkv import VisualRWKVProcessor
from .tokenization_rwkv_world import RwkvWorldTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent

# The Auto classes a folder's config.json maps, by the config's model_type.
MODEL_AUTO_CLASSES = {
    VisualRWKVConfig.model_type: {
        "AutoConfig": VisualRWKVConfig,
        "AutoModel": VisualRWKVModel,
        "AutoModelForImageTextToText": VisualRWKVForConditionalGeneration,
    },
    **{
        model_type: {"AutoConfig": Rwkv6Config, "AutoModel": Rwkv6Model, "AutoModelForCausalLM": Rwkv6ForCausalLM}
        for model_type in (Rwkv6Config.model_type, *Rwkv6Config.legacy_model_types)
    },
}
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)(\.+[\w.]*)(\s+import\b)")


def source_file(module_name: str) -> Path:
    """The source file of a module of this package, from its dotted name relative to the package (`"ops.wkv6"`)."""
    path = PACKAGE_DIR.joinpath(*module_name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def module_name_of(path: Path) -> str:
    """The dotted name, relative to the package, of one of its source files (`ops/__init__.py` -> `"ops"`)."""
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def relative_imports(path: Path) -> dict[int, str]:
    """Line number -> dotted name (relative to the package) of each relative `from ... import` in a source file."""
    module_name = module_name_of(path)
    package = module_name.split(".") if path.name == "__init__.py" else module_name.split(".")[:-1]
    imports = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        if node.module is None:
            raise ValueError(
                f"{path}:{node.lineno}: `from . import ...` cannot be flattened for remote code; import from the "
                "module by name (`from .module import name`)."
            )
        base = package[: len(package) - (node.level - 1)]
        imports[node.lineno] = ".".join([*base, node.module])
    return imports


def needed_modules(entry_modules: list[str]) -> list[str]:
    """The entry modules and every package module they import relatively, directly or not, in discovery order."""
    found, pending = [], list(entry_modules)
    while pending:
        module_name = pending.pop(0)
        if module_name in found:
            continue
        found.append(module_name)
        path = source_file(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"Module {module_name!r} of visualrwkv_hf has no source file {path}.")
        pending.extend(relative_imports(path).values())
    return found


def flat_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def flattened_source(module_name: str) -> str:
    """A module's source with each relative import rewritten to `from .<flat name> import ...`."""
    path = source_file(module_name)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for line_number, imported in relative_imports(path).items():
        line = lines[line_number - 1]
        if not RELATIVE_IMPORT.match(line):
            raise ValueError(f"{path}:{line_number}: put a relative import on a line of its own, `from .x import ...`.")
        lines[line_number - 1] = RELATIVE_IMPORT.sub(rf"\g<1>.{flat_name(imported)}\g<3>", line, count=1)
    return "".join(lines)


def class_reference(cls: type) -> str:
    """`"<flat module>.<class>"`, the form `auto_map` takes."""
    return f"{flat_name(cls.__module__)}.{cls.__name__}"


def add_auto_map(json_path: Path, auto_map: dict) -> None:
    config = json.loads(json_path.read_text(encoding="utf-8"))
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map}
    json_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def add_remote_code(folder: str | os.PathLike) -> list[str]:
    """
    Makes a saved VisualRWKV (or RWKV-6 text) folder loadable with `trust_remote_code=True` without this package:
    copies the package modules its classes need, flattened, into `folder` and writes `auto_map` into `config.json`
    (AutoConfig, AutoModel and AutoModelForImageTextToText, or AutoModelForCausalLM for a text model) and, when they
    are present, `processor_config.json` (AutoProcessor) and `tokenizer_config.json` (AutoTokenizer, and
    AutoProcessor for loaders that look there). The tokenizer's vocabulary file is the one `save_pretrained` wrote.

    Returns the names of the code files written.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: save the model there first.")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_AUTO_CLASSES:
        raise ValueError(
            f"{config_path} has model_type {model_type!r}; remote code covers {sorted(MODEL_AUTO_CLASSES)}."
        )

    auto_maps = {config_path: MODEL_AUTO_CLASSES[model_type]}
    processor_path, tokenizer_path = folder / PROCESSOR_CONFIG, folder / TOKENIZER_CONFIG
    if processor_path.is_file():
        auto_maps[processor_path] = {"AutoProcessor": VisualRWKVProcessor}
    if tokenizer_path.is_file():
        auto_maps[tokenizer_path] = {"AutoTokenizer": RwkvWorldTokenizer}
        if processor_path.is_file():
            auto_maps[tokenizer_path]["AutoProcessor"] = VisualRWKVProcessor

    entry_modules = {cls.__module__.split(".", 1)[1] for classes in auto_maps.values() for cls in classes.values()}
    modules = needed_modules(sorted(entry_modules))
    flat_names = [flat_name(module_name) for module_name in modules]
    if len(set(flat_names)) != len(flat_names):
        raise ValueError(f"Modules {modules} do not flatten to distinct file names; rename one of them.")
    for module_name in modules:
        (folder / f"{flat_name(module_name)}.py").write_text(flattened_source(module_name), encoding="utf-8")

    for json_path, classes in auto_maps.items():
        add_auto_map(
            json_path,
            {
                # AutoTokenizer takes a (slow, fast) pair; this tokenizer is a single Python class.
                auto_class: [class_reference(cls), None] if auto_class == "AutoTokenizer" else class_reference(cls)
                for auto_class, cls in classes.items()
            },
        )
    return [f"{name}.py" for name in flat_names]


__all__ = ["add_remote_code"]
