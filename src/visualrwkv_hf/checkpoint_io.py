"""Checkpoint and output-folder I/O shared by the converters: reading a `.pth` safely, checking weights are finite,
choosing the output dtype, and writing an output folder that appears complete or not at all.

Nothing here knows a model's layout: `convert_rwkv6` and `convert_visualrwkv` map the tensors, this module reads and
writes them. Conversion streams: `load_checkpoint` memory-maps the `.pth` (tensors are read from the file when used),
the converters rename and reshape views of those tensors, `check_finite` casts and checks one tensor at a time, and
`save_safetensors_shards` casts and writes one shard at a time, so a conversion holds at most one shard of cast
tensors in memory (none when the dtype is kept), not copies of the whole file.

`atomic_output_dir` stages the output beside its destination (`.NAME.partial-HOST-PID-XXXXXXXX`) and renames it into
place; a later run removes what a killed one left (`remove_stale_staging`). Out-of-space failures, wherever they
surface (an OSError or safetensors' own error), become one `OutOfSpaceError` saying how much was needed and how much
is free.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import reduce
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm

# `--dtype` choices; "auto" keeps the checkpoint's own precision (see `resolve_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Largest weight file a conversion writes (bytes in the output dtype): writing holds one shard's cast tensors at a time.
MAX_SHARD_SIZE = "2GB"

# Problems listed per kind in one error message; the rest are counted.
MAX_LISTED_PROBLEMS = 8

logger = logging.getLogger(__name__)


def short_list(items: list[str], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """The first `limit` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def plural_count(items: list, noun: str) -> str:
    """"1 tensor", "3 tensors"."""
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


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


def _os_error(kind: type[OSError], code: int | None, message: str) -> OSError:
    """An OSError carrying `errno` whose text is `message` alone (the two-argument form prints "[Errno N] ...")."""
    error = kind(message)
    error.errno = code
    return error


def load_checkpoint(path: str | os.PathLike) -> object:
    """Unpickles a `.pth` with `weights_only=True` (tensors and plain containers only: nothing else executes).

    The file is memory-mapped: a tensor's bytes are read from the file when it is used, and the kernel can drop them
    again under memory pressure, so the loaded checkpoint holds no copy of the file in memory. A file in the legacy
    format of `torch.save` (PyTorch before 1.6, not a zip archive) cannot be mapped: it is read whole, with a warning.
    """
    path = Path(path)
    if path.is_dir():
        weights = sorted(p.name for p in path.glob("*.pth"))
        hint = f" (this folder holds {short_list(weights)})" if weights else ""
        if (path / "config.json").is_file():
            hint += "; a folder with config.json is already converted: load it with from_pretrained"
        raise _os_error(IsADirectoryError, errno.EISDIR, f"Checkpoint {path} is a folder: give the .pth file{hint}.")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist or is not a file.")
    mmap = zipfile.is_zipfile(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as error:  # unreadable (permissions, I/O error): say which file, without a traceback
        message = f"Cannot read the checkpoint {path}: {error.strerror or error}."
        raise _os_error(type(error), error.errno, message) from error
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise ValueError(
            f"{path} could not be read as a PyTorch weights file (loaded with weights_only=True, which refuses "
            f"anything but tensors and plain containers): {error}"
        ) from error
    if not mmap:
        logger.warning(
            f"{path} is in the legacy format of torch.save (PyTorch before 1.6, not a zip archive), which cannot be "
            "memory-mapped: it was read into memory whole. Saving it again with a current PyTorch "
            "(torch.save(torch.load(old, weights_only=True), new)) lets a conversion stream it."
        )
    return checkpoint


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype) -> None:
    """Raises one ValueError naming every tensor with NaN or infinite values after conversion to `dtype`.

    `tensors` holds the tensors as read, under the file's key names; each is cast and checked alone, so the check
    holds one cast tensor at a time. A non-finite value in the file makes the model compute NaN (a damaged download
    or a diverged training run); one that appears only after the cast overflowed in it (a narrower dtype).
    """
    in_file, overflowed = [], []
    for key, original in tensors.items():
        converted = original.to(dtype)
        if converted.is_meta or torch.isfinite(converted).all():  # meta tensors (shape checks) hold no values
            continue
        nan, inf = int(original.isnan().sum()), int(original.isinf().sum())
        if nan or inf:
            in_file.append(f"'{key}' ({nan} NaN, {inf} inf of {original.numel()} values)")
        else:
            overflowed.append(f"'{key}' ({int((~torch.isfinite(converted)).sum())} of {converted.numel()} values)")
    problems = []
    if in_file:
        problems.append(
            f"{source} holds NaN or infinite weights in {plural_count(in_file, 'tensor')}: {short_list(in_file)}; a "
            "model with them computes NaN (is the file damaged, or from a diverged training run?)"
        )
    if overflowed:
        limit = torch.finfo(dtype).max
        problems.append(
            f"converting {source} to {str(dtype).removeprefix('torch.')} overflows (beyond +-{limit:.6g}) in "
            f"{plural_count(overflowed, 'tensor')}: {short_list(overflowed)}; keep the checkpoint's dtype (dtype "
            "'auto') or use a wider one"
        )
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Pass allow_nonfinite=True (--allow-nonfinite on the command line) to convert "
            "it anyway."
        )


def output_size(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes `tensors` take once cast to `dtype` (what `save_safetensors_shards` writes, headers aside)."""
    return sum(t.numel() for t in tensors.values()) * dtype.itemsize


def save_safetensors_shards(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    progress: bool = False,
) -> None:
    """Writes `tensors`, cast to `dtype`, as transformers' `save_pretrained` names them: `model.safetensors`, or
    `model-0000i-of-0000N.safetensors` shards of at most `max_shard_size` (bytes, or a string such as "2GB") with
    `model.safetensors.index.json` when they do not fit in one.

    Tensors are cast one shard at a time and written from their memory (safetensors copies nothing), so writing
    holds at most one shard of cast tensors, and nothing when the tensors already have `dtype` (views of a
    memory-mapped checkpoint are then written straight from the file). `progress` shows a bar over the bytes written.
    """
    # Shards are planned on shapes alone, at the output dtype's size.
    planned = {k: torch.empty(t.shape, dtype=dtype, device="meta") for k, t in tensors.items()}
    split = split_torch_state_dict_into_shards(
        planned, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    total = split.metadata["total_size"]
    with tqdm(total=total, desc="Writing weights", unit="B", unit_scale=True, disable=not progress) as bar:
        for filename, keys in split.filename_to_tensors.items():
            shard = {key: tensors[key].to(dtype).contiguous() for key in keys}
            save_file(shard, directory / filename, metadata={"format": "pt"})
            del shard  # before the next shard is cast
            bar.update(sum(planned[key].nbytes for key in keys))
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": sum(t.numel() for t in planned.values()), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (directory / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
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


__all__ = [
    "DTYPES",
    "MAX_SHARD_SIZE",
    "OutOfSpaceError",
    "atomic_output_dir",
    "check_finite",
    "check_output_dir",
    "load_checkpoint",
    "no_space_errno",
    "output_size",
    "resolve_dtype",
    "save_safetensors_shards",
]
