import pytest
import torch

from visualrwkv_hf.scanning import (
    SCAN_MODES,
    block_direction,
    block_gather_indices,
    inverse_order,
    patch_order,
    sequence_gather_index,
)

# A 3 x 3 grid, row-major indices:
#   0 1 2
#   3 4 5
#   6 7 8
GRID = (3, 3)
ROW_MAJOR = [0, 1, 2, 3, 4, 5, 6, 7, 8]
COLUMN_MAJOR = [0, 3, 6, 1, 4, 7, 2, 5, 8]


def documented_order(scan_mode, block_idx):
    """The paper's per-block reading order, written out for the 3 x 3 grid."""
    if scan_mode == "unidirectional":
        return ROW_MAJOR
    if scan_mode == "bidirectional":
        return ROW_MAJOR if block_idx % 2 == 0 else ROW_MAJOR[::-1]
    return [ROW_MAJOR, ROW_MAJOR[::-1], COLUMN_MAJOR, COLUMN_MAJOR[::-1]][block_idx % 4]


@pytest.mark.parametrize("scan_mode", SCAN_MODES)
@pytest.mark.parametrize("block_idx", range(8))
def test_each_mode_reads_the_documented_order(scan_mode, block_idx):
    order = patch_order(block_direction(scan_mode, block_idx), GRID)
    assert order.tolist() == documented_order(scan_mode, block_idx)


@pytest.mark.parametrize("scan_mode", SCAN_MODES)
@pytest.mark.parametrize("block_idx", range(4))
def test_inverse_restores_row_major(scan_mode, block_idx):
    values = torch.randn(5, 9)
    order = patch_order(block_direction(scan_mode, block_idx), GRID)
    assert torch.equal(values[:, order][:, inverse_order(order)], values)


def test_rectangular_grid_row_major_only():
    assert patch_order("row_major_reversed", (2, 3)).tolist() == [5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="square"):
        patch_order("column_major", (2, 3))
    with pytest.raises(ValueError, match="square"):
        block_gather_indices("multidirectional", 4, (2, 3), torch.tensor([0]), 7)


def test_unknown_mode_and_direction_are_refused():
    with pytest.raises(ValueError, match="Unknown scan mode"):
        block_direction("diagonal", 0)
    with pytest.raises(ValueError, match="Unknown scan direction"):
        patch_order("diagonal", GRID)


def test_gather_index_moves_only_each_rows_own_patch_span():
    # Row 0: patches at 2..10 then cls at 11; row 1: no image; row 2: patches at 0..8, cls at 9.
    starts = torch.tensor([2, -1, 0])
    order = patch_order("column_major", GRID)
    index = sequence_gather_index(order, starts, seq_len=13)
    identity = list(range(13))
    assert index[0].tolist() == [0, 1] + [2 + p for p in COLUMN_MAJOR] + [11, 12]
    assert index[1].tolist() == identity
    assert index[2].tolist() == COLUMN_MAJOR + [9, 10, 11, 12]
    # Applying the index then its inverse gives the sequence back.
    values = torch.randn(3, 13, 4)
    reordered = values.gather(1, index[:, :, None].expand_as(values))
    restored = reordered.gather(1, inverse_order(index)[:, :, None].expand_as(values))
    assert torch.equal(restored, values)


def test_gather_index_refuses_a_span_past_the_end():
    with pytest.raises(ValueError, match="past the end"):
        sequence_gather_index(patch_order("row_major", GRID), torch.tensor([6]), seq_len=10)


def test_block_indices_share_tensors_and_skip_row_major_blocks():
    starts = torch.tensor([1, -1])
    indices = block_gather_indices("multidirectional", 8, GRID, starts, 12)
    assert indices[0] is None and indices[4] is None
    for block_idx in (1, 2, 3):
        assert indices[block_idx] is indices[block_idx + 4]
        assert indices[block_idx][0, 1:10].tolist() == [1 + p for p in documented_order("multidirectional", block_idx)]
    assert block_gather_indices("unidirectional", 4, GRID, starts, 12) == [None] * 4
    bidirectional = block_gather_indices("bidirectional", 4, GRID, starts, 12)
    assert bidirectional[0] is None and bidirectional[2] is None and bidirectional[1] is bidirectional[3]


def test_no_image_or_no_patches_means_no_reordering():
    assert block_gather_indices("bidirectional", 4, GRID, torch.tensor([-1, -1]), 12) == [None] * 4
    assert block_gather_indices("multidirectional", 4, (0, 0), torch.tensor([3]), 12) == [None] * 4
