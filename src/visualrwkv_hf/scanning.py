"""Image scanning: the order in which each RWKV block reads the image patches (the paper's "2D image scanning").

A block reads the patch positions of each image in its own order (at the block input) and puts its outputs back in
row-major order (at the block output), so its token shifts and its WKV recurrence see the patches in that order. Only
the patches move: the cls token (last in an image span) and all text stay in place. With grid pooling, the grid is the
pooled one.

* unidirectional: every block reads row-major (the paper's RWKV-5 baseline).
* bidirectional (the released models): odd blocks read the patches in reverse.
* multidirectional: by block index mod 4, row-major, row-major reversed, column-major, column-major reversed.

`block_gather_indices` gives each block's reading order as a gather index; `run_block_in_order` runs a block's step
in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SCAN_MODES = ("unidirectional", "bidirectional", "multidirectional")

ROW_MAJOR = "row_major"
ROW_MAJOR_REVERSED = "row_major_reversed"
COLUMN_MAJOR = "column_major"
COLUMN_MAJOR_REVERSED = "column_major_reversed"

# Per scan mode, the directions that blocks 0, 1, 2, ... cycle through.
SCAN_CYCLES = {
    "unidirectional": (ROW_MAJOR,),
    "bidirectional": (ROW_MAJOR, ROW_MAJOR_REVERSED),
    "multidirectional": (ROW_MAJOR, ROW_MAJOR_REVERSED, COLUMN_MAJOR, COLUMN_MAJOR_REVERSED),
}


def block_direction(scan_mode: str, block_idx: int) -> str:
    """The direction in which block `block_idx` reads the patches."""
    if scan_mode not in SCAN_CYCLES:
        raise ValueError(f"Unknown scan mode {scan_mode!r}; expected one of {SCAN_MODES}.")
    cycle = SCAN_CYCLES[scan_mode]
    return cycle[block_idx % len(cycle)]


def patch_order(direction: str, grid: tuple[int, int]) -> torch.LongTensor:
    """Row-major patch indices in reading order: step j reads patch `order[j]` of the (rows, columns) grid."""
    rows, cols = grid
    row_major = torch.arange(rows * cols).view(rows, cols)
    if direction in (ROW_MAJOR, ROW_MAJOR_REVERSED):
        order = row_major.flatten()
    elif direction in (COLUMN_MAJOR, COLUMN_MAJOR_REVERSED):
        if rows != cols:
            raise ValueError(f"Column-major scanning needs a square patch grid, got {rows} x {cols}.")
        order = row_major.t().flatten()
    else:
        raise ValueError(f"Unknown scan direction {direction!r}; expected one of {SCAN_CYCLES['multidirectional']}.")
    return order.flip(0) if direction in (ROW_MAJOR_REVERSED, COLUMN_MAJOR_REVERSED) else order


def inverse_order(order: torch.LongTensor) -> torch.LongTensor:
    """The permutation that undoes `order` along its last dimension: `x[..., order][..., inverse_order(order)] == x`."""
    return torch.argsort(order, dim=-1)


def sequence_gather_index(
    order: torch.LongTensor, patch_starts: torch.LongTensor, seq_len: int
) -> torch.LongTensor:
    """
    The (batch, seq_len) index that gathers each row of a batch into reading order: in a row whose patches start at
    `patch_starts[b]` (-1: no image), step `start + j` reads position `start + order[j]`; every other position reads
    itself.
    """
    device = patch_starts.device
    num_patches = order.numel()
    positions = torch.arange(seq_len, device=device)
    index = positions.expand(patch_starts.shape[0], seq_len).clone()
    rows = torch.nonzero(patch_starts >= 0).flatten()
    if rows.numel() and num_patches:
        starts = patch_starts[rows, None]
        if bool((starts + num_patches > seq_len).any()):
            raise ValueError(f"An image span of {num_patches} patches runs past the end of the {seq_len} positions.")
        index[rows[:, None], starts + torch.arange(num_patches, device=device)] = starts + order.to(device)
    return index


def block_gather_indices(
    scan_mode: str, num_blocks: int, grid: tuple[int, int], patch_starts: torch.LongTensor, seq_len: int
) -> list[torch.LongTensor | None]:
    """
    Per block, the (batch, seq_len) gather index of its reading order, or None where the block reads the sequence as
    it is (row-major direction, or no row holds an image). Blocks with the same direction share one tensor.
    """
    has_patches = grid[0] * grid[1] > 0 and bool((patch_starts >= 0).any())
    index_by_direction = {ROW_MAJOR: None}
    indices = []
    for block_idx in range(num_blocks):
        direction = block_direction(scan_mode, block_idx)
        if direction not in index_by_direction:
            index_by_direction[direction] = (
                sequence_gather_index(patch_order(direction, grid), patch_starts, seq_len) if has_patches else None
            )
        indices.append(index_by_direction[direction])
    return indices


def run_block_in_order(
    block_step: Callable[..., torch.Tensor],
    hidden_states: torch.Tensor,
    padding_mask: torch.Tensor | None,
    gather_index: torch.LongTensor | None,
    *args,
) -> torch.Tensor:
    """
    Runs `block_step(hidden_states, padding_mask, *args)` reading the positions in the order `gather_index` (a
    (batch, seq) permutation, one of `block_gather_indices`: step t reads position `gather_index[b, t]`; None: as
    they are), so its token shifts and recurrence follow that order, and returns each output at its original position.
    """
    if gather_index is None:
        return block_step(hidden_states, padding_mask, *args)
    index = gather_index[:, :, None].expand_as(hidden_states)
    if padding_mask is not None:
        padding_mask = padding_mask.gather(1, gather_index)
    outputs = block_step(hidden_states.gather(1, index), padding_mask, *args)
    return torch.empty_like(outputs).scatter_(1, index, outputs)
