"""Conversion between BlinkDL's RWKV-6 ("Finch", x060) `.pth` layout and this package's Hugging Face layout.

One table, `rwkv6_parameters(config)`, lists every parameter with its name and shape on both sides; key mapping,
validation and both conversion directions are read off it, so they cannot drift apart. BlinkDL checkpoints ship no
config: `rwkv6_config_from_state_dict` derives every size from tensor shapes and checks the whole file against it.

State-dict functions take a `prefix` so a full VisualRWKV checkpoint can reuse them for its `rwkv.` keys: only keys
starting with the prefix are read (others are the caller's business) and error messages name keys as in the file.

`convert_rwkv6_checkpoint` writes a complete folder (config, safetensors weights, generation config, tokenizer)
that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load after `import visualrwkv_hf`.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .configuration_visualrwkv import VisualRWKVTextConfig
from .modeling_rwkv6 import TIME_MIX_SLOTS
from .tokenization_rwkv_world import RwkvWorldTokenizer

# Generation stops on "\n\n" (the chat turn terminator); id 0 pads.
EOS_TOKEN_ID = 261
PAD_TOKEN_ID = 0

# `--dtype` choices; "auto" keeps the checkpoint's own precision (see `resolve_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Keys whose presence identifies an RWKV-6 file (time_maa_w1 is the x060 data-dependent token shift).
RWKV6_MARKER_KEYS = ("emb.weight", "blocks.0.att.time_maa_w1")

# Problems listed per kind in one error message; the rest are counted.
MAX_LISTED_PROBLEMS = 8

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rwkv6Parameter:
    """One parameter: its BlinkDL key and shape, and its key and shape in `VisualRWKVForCausalLM`."""

    blinkdl_key: str
    hf_key: str
    blinkdl_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]


def rwkv6_parameters(config: VisualRWKVTextConfig) -> list[Rwkv6Parameter]:
    """Every parameter of an RWKV-6 model of this config, in BlinkDL file order."""
    V, C, F = config.vocab_size, config.hidden_size, config.intermediate_size
    R, D, H, N = config.time_mix_extra_dim, config.time_decay_extra_dim, config.num_heads, config.head_size

    def same(blinkdl_key, hf_key, shape):
        return Rwkv6Parameter(blinkdl_key, hf_key, shape, shape)

    def channel_vector(blinkdl_key, hf_key):
        # BlinkDL keeps per-channel mixing and decay vectors broadcast-ready as (1, 1, C).
        return Rwkv6Parameter(blinkdl_key, hf_key, (1, 1, C), (C,))

    def layer_norm(blinkdl_name, hf_name):
        return [same(f"{blinkdl_name}.{p}", f"{hf_name}.{p}", (C,)) for p in ("weight", "bias")]

    params = [same("emb.weight", "model.embeddings.weight", (V, C))]
    for i in range(config.num_hidden_layers):
        b, h = f"blocks.{i}.", f"model.blocks.{i}."
        att, tm, ffn, cm = f"{b}att.", f"{h}attention.", f"{b}ffn.", f"{h}feed_forward."
        if i == 0:
            params += layer_norm(f"{b}ln0", f"{h}pre_norm")
        params += layer_norm(f"{b}ln1", f"{h}attn_norm")
        params += layer_norm(f"{b}ln2", f"{h}ffn_norm")
        for slot in ("x", *TIME_MIX_SLOTS):
            params.append(channel_vector(f"{att}time_maa_{slot}", f"{tm}time_maa_{slot}"))
        params += [
            same(f"{att}time_maa_w1", f"{tm}time_maa_w1", (C, len(TIME_MIX_SLOTS) * R)),
            same(f"{att}time_maa_w2", f"{tm}time_maa_w2", (len(TIME_MIX_SLOTS), R, C)),
            channel_vector(f"{att}time_decay", f"{tm}time_decay"),
            same(f"{att}time_decay_w1", f"{tm}time_decay_w1", (C, D)),
            same(f"{att}time_decay_w2", f"{tm}time_decay_w2", (D, C)),
            same(f"{att}time_faaaa", f"{tm}time_faaaa", (H, N)),
        ]
        for name in ("receptance", "key", "value", "gate", "output"):
            params.append(same(f"{att}{name}.weight", f"{tm}att_{name}.weight", (C, C)))
        params += layer_norm(f"{att}ln_x", f"{tm}ln_x")
        params += [
            channel_vector(f"{ffn}time_maa_k", f"{cm}time_maa_k"),
            channel_vector(f"{ffn}time_maa_r", f"{cm}time_maa_r"),
            same(f"{ffn}key.weight", f"{cm}ffn_key.weight", (F, C)),
            same(f"{ffn}receptance.weight", f"{cm}ffn_receptance.weight", (C, C)),
            same(f"{ffn}value.weight", f"{cm}ffn_value.weight", (C, F)),
        ]
    params += layer_norm("ln_out", "model.norm_out")
    params.append(same("head.weight", "lm_head.weight", (V, C)))
    return params


def blinkdl_to_hf_keys(config: VisualRWKVTextConfig) -> dict[str, str]:
    return {p.blinkdl_key: p.hf_key for p in rwkv6_parameters(config)}


def hf_to_blinkdl_keys(config: VisualRWKVTextConfig) -> dict[str, str]:
    return {p.hf_key: p.blinkdl_key for p in rwkv6_parameters(config)}


def _list(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_PROBLEMS])
    more = len(items) - MAX_LISTED_PROBLEMS
    return shown + (f" and {more} more" if more > 0 else "")


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _sizes(config: VisualRWKVTextConfig) -> str:
    return (
        f"vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
        f"num_hidden_layers={config.num_hidden_layers}, head_size={config.head_size}, "
        f"intermediate_size={config.intermediate_size}, time_mix_extra_dim={config.time_mix_extra_dim}, "
        f"time_decay_extra_dim={config.time_decay_extra_dim}"
    )


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected_shapes: Mapping[str, tuple[int, ...]],
    what: str,
    prefix: str = "",
) -> None:
    """Raises one ValueError listing every missing, unexpected, mis-shaped or non-float tensor.

    `state_dict` and `expected_shapes` use keys without `prefix`; messages name them with it, as in the file.
    """
    problems = []
    missing = [f"'{prefix}{k}' {expected_shapes[k]}" for k in expected_shapes if k not in state_dict]
    if missing:
        problems.append(f"missing tensors (name and expected shape): {_list(missing)}")
    unexpected = [f"'{prefix}{k}'" for k in state_dict if k not in expected_shapes]
    if unexpected:
        problems.append(f"unexpected tensors, not part of such a model: {_list(unexpected)}")
    mis_shaped = [
        f"'{prefix}{k}' is {tuple(state_dict[k].shape)}, expected {expected_shapes[k]}"
        for k in expected_shapes
        if k in state_dict and tuple(state_dict[k].shape) != expected_shapes[k]
    ]
    if mis_shaped:
        problems.append(f"tensors with inconsistent shapes: {_list(mis_shaped)}")
    not_float = [f"'{prefix}{k}' ({t.dtype})" for k, t in state_dict.items() if not t.is_floating_point()]
    if not_float:
        problems.append(f"tensors that are not floating point: {_list(not_float)}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems) + ".")


def select_prefix(state_dict: object, prefix: str, source: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed, after checking that they are named tensors."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(
            f"{source} is not a state dict: expected a dict of tensor names to tensors, got {type(state_dict).__name__}"
            + ("" if not isinstance(state_dict, Mapping) else " with keys that are not strings")
            + "."
        )
    selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    not_tensors = [f"'{prefix}{k}'" for k, v in selected.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{source} is not a plain state dict: expected only tensors, but these entries are not: "
            f"{_list(not_tensors)}." + _not_rwkv6_hint(set(selected))
        )
    return selected


def _not_rwkv6_hint(keys: set[str]) -> str:
    """What a state dict without the x060 markers looks like instead, to make the error actionable."""
    if "_strategy" in keys:
        return " It was already converted by the `rwkv` package for one inference strategy; convert the original .pth."
    if any(k.startswith("rwkv.") for k in keys):
        return (
            " It looks like a full VisualRWKV checkpoint (keys start with 'rwkv.'); convert it with "
            "`visualrwkv convert --checkpoint`."
        )
    if "blocks.0.att.time_mix_k" in keys:
        return " It looks like an RWKV-4 or RWKV-5 checkpoint (att.time_mix_* instead of att.time_maa_*)."
    if "blocks.0.att.x_r" in keys or "blocks.0.att.w0" in keys:
        return " It looks like an RWKV-7 (x070) checkpoint."
    return ""


def rwkv6_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "", source: str = "the checkpoint"
) -> VisualRWKVTextConfig:
    """Derives the config of a BlinkDL RWKV-6 state dict from its shapes, and checks every tensor against it.

    Sizes come from: vocab and width from `emb.weight` (V, C); layers from the block indices; heads from
    `time_faaaa` (H, N); `intermediate_size` from `ffn.key.weight`; LoRA ranks from `time_maa_w2` (5, R, C) and
    `time_decay_w1` (C, D). Raises ValueError saying what is wrong and what was expected.
    """
    tensors = select_prefix(state_dict, prefix, source)
    if not all(k in tensors for k in RWKV6_MARKER_KEYS):
        markers = ", ".join(f"'{prefix}{k}'" for k in RWKV6_MARKER_KEYS)
        raise ValueError(
            f"{source} is not an RWKV-6 (x060) checkpoint in BlinkDL's layout: expected keys such as {markers}."
            + _not_rwkv6_hint(set(tensors))
        )
    num_layers = 1 + max(int(m.group(1)) for k in tensors if (m := _BLOCK_KEY.match(k)))
    if num_layers > len(tensors):  # every block has dozens of tensors: this file cannot be complete
        raise ValueError(
            f"{source} has block indices up to {num_layers - 1} but only {len(tensors)} tensors: blocks are missing."
        )

    def anchor(key: str, dims: int) -> tuple[int, ...]:
        if key not in tensors:
            raise ValueError(f"{source} lacks '{prefix}{key}', which RWKV-6 needs (and which gives the model's sizes).")
        shape = tuple(tensors[key].shape)
        if len(shape) != dims:
            raise ValueError(f"'{prefix}{key}' in {source} has shape {shape}; RWKV-6 has {dims} dims there.")
        return shape

    vocab_size, hidden_size = anchor("emb.weight", 2)
    num_heads, head_size = anchor("blocks.0.att.time_faaaa", 2)
    if num_heads * head_size != hidden_size:
        raise ValueError(
            f"'{prefix}blocks.0.att.time_faaaa' in {source} is ({num_heads}, {head_size}) = (heads, head_size), "
            f"expected heads x head_size = hidden_size {hidden_size} (from '{prefix}emb.weight')."
        )
    config = VisualRWKVTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        head_size=head_size,
        intermediate_size=anchor("blocks.0.ffn.key.weight", 2)[0],
        time_mix_extra_dim=anchor("blocks.0.att.time_maa_w2", 3)[1],
        time_decay_extra_dim=anchor("blocks.0.att.time_decay_w1", 2)[1],
    )
    expected = {p.blinkdl_key: p.blinkdl_shape for p in rwkv6_parameters(config)}
    check_state_dict(tensors, expected, f"{source} does not match an RWKV-6 model of {_sizes(config)}", prefix)
    return config


def resolve_dtype(dtype: str | torch.dtype | None, tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The output dtype: the one asked for, or ("auto"/None) the checkpoint's own.

    Auto keeps every value exact and never grows a file needlessly: a checkpoint in one dtype (BlinkDL ships bf16,
    the original's export fp16) keeps it; a mixed one gets the smallest dtype holding all of them (bf16 + fp32 ->
    fp32, bf16 + fp16 -> fp32). Upcasting a bf16 checkpoint to fp32 by default would double its size for nothing;
    ask for `float32` explicitly for fp32 inference or training.
    """
    if dtype is None or dtype == "auto":
        return reduce(torch.promote_types, {t.dtype for t in tensors.values()})
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}: expected 'auto' or one of {', '.join(DTYPES)}.")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"Unsupported dtype {dtype}: expected one of {', '.join(DTYPES)}.")
    return dtype


def convert_blinkdl_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    dtype: str | torch.dtype | None = None,
    prefix: str = "",
    source: str = "the checkpoint",
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> tuple[VisualRWKVTextConfig, dict[str, torch.Tensor]]:
    """Validates a BlinkDL RWKV-6 state dict and returns its config (with `dtype` set) and the HF state dict.

    NaN or infinite weights (in the file, or from overflow in the cast to `dtype`) are refused unless
    `allow_nonfinite`.
    """
    config = rwkv6_config_from_state_dict(state_dict, prefix, source)
    tensors = select_prefix(state_dict, prefix, source)
    config.dtype = resolve_dtype(dtype, tensors)
    params = rwkv6_parameters(config)
    hf_state_dict = {
        p.hf_key: tensors[p.blinkdl_key].to(config.dtype).reshape(p.hf_shape).contiguous()
        for p in tqdm(params, desc="Converting tensors", unit="tensor", disable=not progress)
    }
    if not allow_nonfinite:
        check_finite(
            {prefix + p.blinkdl_key: tensors[p.blinkdl_key] for p in params},
            {prefix + p.blinkdl_key: hf_state_dict[p.hf_key] for p in params},
            source,
            config.dtype,
        )
    return config, hf_state_dict


def convert_hf_to_blinkdl(
    hf_state_dict: Mapping[str, torch.Tensor], config: VisualRWKVTextConfig, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Exports a `VisualRWKVForCausalLM` state dict back to BlinkDL's layout (keys prefixed with `prefix`)."""
    params = rwkv6_parameters(config)
    check_state_dict(
        hf_state_dict, {p.hf_key: p.hf_shape for p in params}, f"The state dict does not match {_sizes(config)}"
    )
    return {prefix + p.blinkdl_key: hf_state_dict[p.hf_key].reshape(p.blinkdl_shape).contiguous() for p in params}


def _os_error(kind: type[OSError], code: int | None, message: str) -> OSError:
    """An OSError carrying `errno` whose text is `message` alone (the two-argument form prints "[Errno N] ...")."""
    error = kind(message)
    error.errno = code
    return error


def load_checkpoint(path: str | os.PathLike) -> object:
    """Unpickles a `.pth` with `weights_only=True` (tensors and plain containers only: nothing else executes)."""
    path = Path(path)
    if path.is_dir():
        weights = sorted(p.name for p in path.glob("*.pth"))
        hint = f" (this folder holds {_list(weights)})" if weights else ""
        if (path / "config.json").is_file():
            hint += "; a folder with config.json is already converted: load it with from_pretrained"
        raise _os_error(IsADirectoryError, errno.EISDIR, f"Checkpoint {path} is a folder: give the .pth file{hint}.")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist or is not a file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:  # unreadable (permissions, I/O error): say which file, without a traceback
        message = f"Cannot read the checkpoint {path}: {error.strerror or error}."
        raise _os_error(type(error), error.errno, message) from error
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(
            f"{path} could not be read as a PyTorch weights file (loaded with weights_only=True, which refuses "
            f"anything but tensors and plain containers): {error}"
        ) from error


def check_finite(
    originals: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype
) -> None:
    """Raises one ValueError naming every tensor with NaN or infinite values after conversion to `dtype`.

    Both mappings use the file's key names; `converted` holds the tensors as written. A non-finite value in the
    file makes the model compute NaN (a damaged download or a diverged training run); one that appears only in
    `converted` overflowed in the cast to a narrower dtype.
    """
    in_file, overflowed = [], []
    for key, tensor in converted.items():
        if tensor.is_meta or torch.isfinite(tensor).all():  # meta tensors (shape checks) hold no values
            continue
        original = originals[key]
        nan, inf = int(original.isnan().sum()), int(original.isinf().sum())
        if nan or inf:
            in_file.append(f"'{key}' ({nan} NaN, {inf} inf of {original.numel()} values)")
        else:
            overflowed.append(f"'{key}' ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)")
    problems = []
    if in_file:
        problems.append(
            f"{source} holds NaN or infinite weights in {_count(in_file, 'tensor')}: {_list(in_file)}; a model with "
            "them computes NaN (is the file damaged, or from a diverged training run?)"
        )
    if overflowed:
        limit = torch.finfo(dtype).max
        problems.append(
            f"converting {source} to {str(dtype).removeprefix('torch.')} overflows (beyond +-{limit:.6g}) in "
            f"{_count(overflowed, 'tensor')}: {_list(overflowed)}; keep the checkpoint's dtype (dtype 'auto') or use a "
            "wider one"
        )
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Pass allow_nonfinite=True (--allow-nonfinite on the command line) to convert "
            "it anyway."
        )


def _format_bytes(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024


def _place_in(path: Path, folder_stat: os.stat_result) -> str | None:
    """"is" when the resolved `path` is the file or folder of `folder_stat`, "lies inside" when it is below it."""
    for candidate in (path, *path.parents):
        try:
            if os.path.samestat(candidate.stat(), folder_stat):
                return "is" if candidate == path else "lies inside"
        except OSError:
            continue
    return None


def check_output_dir(output_dir: Path, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuses an output path that would destroy an input or that is in the way; writes nothing.

    An output folder that is, or holds, one of `inputs` is refused whatever `overwrite` says: replacing it would
    delete the input. Symbolic links and relative paths are resolved (the input's own path and the file it links to
    are both protected). Otherwise an output path that is a file or lies under one is refused, and a non-empty folder
    unless `overwrite`.
    """
    if output_dir.exists():
        folder_stat = output_dir.stat()
        for source in inputs:
            given = Path(source).absolute()
            if not os.path.lexists(given):
                continue  # reading it will fail, with its own message
            resolved = given.resolve()
            places = {_place_in(path, folder_stat) for path in (given.parent.resolve() / given.name, resolved)}
            if places != {None}:
                what = "is" if "is" in places else "lies inside"
                link = f" (a link to {resolved})" if given.is_symlink() else ""
                instead = given.parent / f"{given.stem}-hf"
                raise ValueError(
                    f"The input {source}{link} {what} the output {output_dir}: writing there would delete it. Choose "
                    f"an output folder that does not hold the input, for example {instead}."
                )
    existing = next(path for path in (output_dir, *output_dir.parents) if path.exists() or path.is_symlink())
    if existing != output_dir and not existing.is_dir():
        raise FileExistsError(f"Output path {output_dir} lies under {existing}, which is a file, not a folder.")
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir():
            raise FileExistsError(f"Output path {output_dir} exists and is not a folder.")
        if not overwrite and any(output_dir.iterdir()):
            raise FileExistsError(
                f"Output folder {output_dir} is not empty; pass overwrite=True (--overwrite on the command line) "
                "to replace it."
            )


# Staging folders are named `.NAME.partial-HOST-PID-XXXXXXXX` (the output under construction) and
# `.NAME.previous-HOST-PID-XXXXXXXX` (the folder it replaces, until deleted): the host and process id tell a later
# run whether the process that made one is gone, so that its (model-sized) leftovers can be removed safely.
STAGING_KINDS = ("partial", "previous")
_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
_STAGING_SUFFIX = re.compile(r"(?:(?P<host>.+)-(?P<pid>\d+)-)?[a-z0-9_]+")


def _staging_prefix(output_dir: Path, kind: str) -> str:
    return f".{output_dir.name}.{kind}-{_HOST}-{os.getpid()}-"


def _process_is_running(pid: int) -> bool:
    """Whether process `pid` of this machine exists (POSIX only: on Windows `os.kill` terminates it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's process, alive
        return True
    return True


def remove_stale_staging(output_dir: Path) -> None:
    """Removes the staging folders of `output_dir` that a killed conversion left behind on this machine.

    Only folders named as `atomic_output_dir` names them, made by a process of this host that no longer runs, are
    deleted: a `partial` one, and a `previous` one (the folder being replaced) when `output_dir` exists again. A
    `previous` one without `output_dir` (killed between the two renames) is the only copy of the old folder, and
    folders of a running process (a concurrent conversion, or a reused process id), of another host or in the older
    unnamed form may be in use: these are reported with the command that moves or removes them, never deleted.
    """
    if not output_dir.parent.is_dir():
        return
    for kind in STAGING_KINDS:
        prefix = f".{output_dir.name}.{kind}-"
        for path in sorted(p for p in output_dir.parent.iterdir() if p.name.startswith(prefix)):
            match = _STAGING_SUFFIX.fullmatch(path.name.removeprefix(prefix))
            if match is None or path.is_symlink() or not path.is_dir():
                continue
            pid = int(match["pid"]) if match["pid"] else None
            knowable = pid is not None and match["host"] == _HOST and os.name == "posix"
            if knowable and _process_is_running(pid):
                # Most likely a conversion into the same folder running now; said, in case the id was reused.
                logger.warning(
                    f"{path} is the staging folder of process {pid}, which is running: another conversion into "
                    f"{output_dir}? If that process is not a conversion, remove the folder: rm -r '{path}'"
                )
            elif not knowable:
                logger.warning(
                    f"{path} looks like the staging folder of an interrupted conversion into {output_dir} (from "
                    f"another machine or an older version); it may hold a copy of the weights. If no conversion "
                    f"into {output_dir} is running, remove it: rm -r '{path}'"
                )
            elif kind == "previous" and not output_dir.exists():
                logger.warning(
                    f"{path} holds what {output_dir} held before a conversion replacing it was killed (process "
                    f"{pid}), and {output_dir} is missing: to get it back, mv '{path}' '{output_dir}'"
                )
            else:
                shutil.rmtree(path)
                logger.warning(f"Removed {path}, left by a conversion killed midway (process {pid}).")


# Errors that mean the data did not fit: a full disk, a quota, a file-size limit (`ulimit -f`, a FAT32 drive).
NO_SPACE_ERRORS = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
# safetensors reports an I/O failure as SafetensorError("... I/O error: ... (os error 28)"), not as an OSError.
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


class OutOfSpaceError(OSError):
    """A write that failed for want of space, whose message already says what, where and how much."""


def no_space_errno(error: BaseException) -> int | None:
    """The errno of an out-of-space failure among `error` and its causes, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else None
        if code is None and (match := _OS_ERROR_CODE.search(str(error))):
            code = int(match[1])
        if code in NO_SPACE_ERRORS:
            return code
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def atomic_output_dir(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    needed_bytes: int | None = None,
) -> Iterator[Path]:
    """Yields a temporary folder next to `output_dir` that becomes `output_dir` only if the block succeeds.

    On any failure the temporary folder is removed and an existing `output_dir` is left as it was; with `overwrite`
    a previous folder is moved aside, replaced and only then deleted. An output holding one of `inputs` is refused
    (see `check_output_dir`); staging folders left by a killed conversion are cleaned first (see
    `remove_stale_staging`). A write that fails for lack of space raises one OSError saying so, with `needed_bytes`
    (the size of the output, when known) and the space free there.
    """
    output_dir = Path(output_dir).resolve()  # a symlinked output folder: its target is replaced, the link kept
    inputs = list(inputs)
    check_output_dir(output_dir, overwrite, inputs)
    remove_stale_staging(output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(output_dir, "partial"), dir=output_dir.parent))
    except OSError as error:  # read-only, no permission: name the folder the user asked for, not the hidden one
        where = f" in {Path(error.filename).parent}" if error.filename else ""
        message = f"Cannot create the output folder {output_dir}: {error.strerror or error}{where}."
        raise _os_error(type(error), error.errno, message) from error
    try:
        try:
            yield staging
        except Exception as error:
            code = no_space_errno(error)
            if code is None:
                raise
            shutil.rmtree(staging)  # first, so that the space reported free is what the user has
            needed = f"about {_format_bytes(needed_bytes)} are needed, " if needed_bytes is not None else ""
            free = _format_bytes(shutil.disk_usage(output_dir.parent).free)
            raise _os_error(
                OutOfSpaceError,
                code,
                f"Could not write {output_dir}: {os.strerror(code)} ({needed}{free} free in {output_dir.parent}). "
                "Nothing was written; free some space or choose another output folder.",
            ) from error
        # mkdtemp makes the folder private (0700) and safetensors its file (0600): give the result the usual
        # permissions of new files, so a converted model on a shared machine is readable like any other.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        for path in staging.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        check_output_dir(output_dir, overwrite, inputs)  # again: something may have appeared while writing
        previous = None
        if output_dir.exists():
            previous = Path(tempfile.mkdtemp(prefix=_staging_prefix(output_dir, "previous"), dir=output_dir.parent))
            os.replace(output_dir, previous)
        try:
            os.replace(staging, output_dir)
        except BaseException:
            if previous is not None:
                os.replace(previous, output_dir)
            raise
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_hf_text_model(
    directory: Path, config: VisualRWKVTextConfig, hf_state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Writes config, weights, generation config and tokenizer: a folder the Auto classes load."""
    config.architectures = ["VisualRWKVForCausalLM"]
    config.save_pretrained(directory)
    save_file(dict(hf_state_dict), directory / "model.safetensors", metadata={"format": "pt"})
    GenerationConfig(eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID).save_pretrained(directory)
    RwkvWorldTokenizer().save_pretrained(directory)


def convert_rwkv6_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> Path:
    """Converts a BlinkDL RWKV-6 `.pth` into a Hugging Face folder; returns the folder.

    Everything is validated before anything is written, and the folder appears complete or not at all; an output
    folder holding the checkpoint is refused, even with `overwrite`. NaN or infinite weights are refused unless
    `allow_nonfinite`. Raises ValueError (not an RWKV-6 checkpoint, an inconsistent one, non-finite weights, an
    output that would delete the input), FileNotFoundError, FileExistsError or OSError (unreadable, out of space).
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir.absolute(), overwrite, [checkpoint])  # fail before reading a multi-GB file
    config, hf_state_dict = convert_blinkdl_to_hf(
        load_checkpoint(checkpoint), dtype, source=str(checkpoint), progress=progress, allow_nonfinite=allow_nonfinite
    )
    size = sum(t.nbytes for t in hf_state_dict.values())
    with atomic_output_dir(output_dir, overwrite, [checkpoint], size) as staging:
        save_hf_text_model(staging, config, hf_state_dict)
    return output_dir


__all__ = [
    "Rwkv6Parameter",
    "atomic_output_dir",
    "blinkdl_to_hf_keys",
    "check_finite",
    "check_output_dir",
    "check_state_dict",
    "convert_blinkdl_to_hf",
    "convert_hf_to_blinkdl",
    "convert_rwkv6_checkpoint",
    "hf_to_blinkdl_keys",
    "load_checkpoint",
    "remove_stale_staging",
    "resolve_dtype",
    "rwkv6_config_from_state_dict",
    "rwkv6_parameters",
    "save_hf_text_model",
    "select_prefix",
]
