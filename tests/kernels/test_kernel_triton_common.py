"""triton_common: the one power-of-two helper and block-override resolution of both Triton files, the device check."""

import pytest
import torch

from ariadne_hf.kernels.triton_common import check_triton_device, next_pow2, pow2_floor, resolve_blocks


def test_next_pow2_is_tritons_next_power_of_2_clamped_to_floor_and_cap():
    triton = pytest.importorskip("triton")
    for n in range(0, 2100):
        p = triton.next_power_of_2(max(n, 1))
        assert next_pow2(n) == max(16, p)
        assert next_pow2(n, floor=1) == p
        assert next_pow2(n, cap=256) == max(16, min(256, p))


def test_pow2_floor_is_the_largest_power_of_two_not_above_n():
    assert [pow2_floor(n) for n in (0, 1, 2, 3, 4, 5, 1023, 1024, 1025)] == [1, 1, 2, 2, 4, 4, 512, 1024, 1024]


def test_resolve_blocks_applies_overrides_and_rejects_unknown_names_and_bad_sizes():
    defaults = {"BLOCK_N": 4, "BLOCK_IN": 64, "num_warps": 4}
    floors = {"BLOCK_N": 1}
    resolved = resolve_blocks(defaults, {"BLOCK_IN": 32, "num_warps": 8}, floors)
    assert resolved == {"BLOCK_N": 4, "BLOCK_IN": 32, "num_warps": 8} and defaults["BLOCK_IN"] == 64
    assert resolve_blocks(defaults, None, floors) == defaults
    with pytest.raises(ValueError, match=r"unknown block size 'BLOCK_K'; known: \['BLOCK_IN', 'BLOCK_N', 'num_warps'\]"):
        resolve_blocks(defaults, {"BLOCK_K": 16}, floors)
    with pytest.raises(ValueError, match="BLOCK_IN must be a power of two >= 16, got 48"):
        resolve_blocks(defaults, {"BLOCK_IN": 48}, floors)
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two >= 16, got 4"):
        resolve_blocks(defaults, None)  # without the floor of 1, BLOCK_N = 4 is too small


def test_cpu_tensors_need_kernels_created_for_the_interpreter():
    check_triton_device(True, torch.zeros(1), None)
    check_triton_device(False, None)
    with pytest.raises(RuntimeError, match="interpreter is off: set TRITON_INTERPRET=1.*backend='torch'"):
        check_triton_device(False, None, torch.zeros(1))
