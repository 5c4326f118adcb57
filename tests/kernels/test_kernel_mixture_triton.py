"""The fused Triton weighted multi-LoRA kernel (mixture_triton) against the torch spec, in Triton's interpreter (CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module (and, ideally, triton) is imported

import kernel_cases as cases  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ariadne_hf.kernels import mixture_lora  # noqa: E402
from ariadne_hf.kernels.mixture_torch import mixture_lora_ref  # noqa: E402

pytest.importorskip("triton")

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.fixture(scope="module")
def kernels():
    """The Triton module, its kernel (and triton's standard library) created for the interpreter."""
    return cases.triton_interpreter_module("mixture_triton")


def _assert_close(got, ref):
    """Both accumulate in fp32 and round once to x's dtype: at most ~1 ulp of that dtype apart."""
    rtol, atol = TOL[ref.dtype]
    scale = max(1.0, float(ref.float().abs().max()))
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol * scale)


# (N, IN, OUT, A, R, k, dtype, ranks): odd shapes, k 1/2/4, effective ranks below the padded R.
MIX_CASES = [
    (1, 32, 16, 3, 16, 1, "fp32", None),
    (3, 70, 45, 5, 12, 2, "bf16", [12, 3, 7, 1, 12]),
    (33, 123, 61, 4, 8, 4, "fp16", [8, 8, 2, 5]),
    (37, 96, 130, 6, 20, 2, "fp32", [20, 1, 16, 9, 4, 20]),
    (70, 48, 33, 2, 4, 1, "bf16", None),
    (5, 200, 17, 9, 32, 4, "fp32", [32, 30, 1, 2, 3, 4, 5, 6, 7]),
]


@pytest.mark.parametrize("n, in_f, out_f, adapters, rank, k, dtype, ranks", MIX_CASES,
                         ids=[f"N{c[0]}-IN{c[1]}-OUT{c[2]}-A{c[3]}-R{c[4]}-k{c[5]}-{c[6]}" for c in MIX_CASES])
def test_mixture_kernel_matches_the_torch_reference(kernels, n, in_f, out_f, adapters, rank, k, dtype, ranks):
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(n, in_f, out_f, adapters, rank, k,
                                                               dtype=cases.DTYPES[dtype], seed=n * k, ranks=ranks)
    got = mixture_lora(x, lora_a, lora_b, scaling, idx, weights, backend="triton")
    ref = mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights)
    assert got.dtype == x.dtype and got.shape == (n, out_f)
    _assert_close(got, ref)
    assert (got[(idx < 0).all(dim=1)] == 0).all()  # rows without any adapter get exactly 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mixture_kernel_with_small_blocks_and_out_splits_matches_the_reference(kernels, dtype):
    """Small blocks force loops over IN and OUT tiles and several row tiles; out_splits=3 the strided OUT loop."""
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(41, 75, 90, 5, 10, 3, dtype=cases.DTYPES[dtype], seed=7)
    ref = mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights)
    blocks = {"BLOCK_N": 16, "BLOCK_IN": 16, "BLOCK_OUT": 16}
    for splits in (1, 3):
        got = kernels.mixture_lora_triton(x, lora_a, lora_b, scaling, idx, weights, block_sizes=blocks,
                                          out_splits=splits)
        _assert_close(got, ref)


def test_mixture_kernel_gives_zero_for_no_adapter_or_zero_weight_and_adds_duplicate_slots(kernels):
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(6, 32, 32, 3, 16, 2, seed=8, minus_one=0.0)
    idx[1] = -1
    weights[2] = 0.0
    idx[3] = torch.tensor([2, 2])  # the same adapter twice adds up
    got = mixture_lora(x, lora_a, lora_b, scaling, idx, weights, backend="triton")
    assert (got[1] == 0).all() and (got[2] == 0).all()
    _assert_close(got, mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights))
    none = mixture_lora(x, lora_a, lora_b, scaling, torch.full_like(idx, -1), weights, backend="triton")
    assert (none == 0).all()


def test_mixture_kernel_reads_strided_rows_and_rejects_column_major_x_and_bad_indices(kernels):
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(8, 32, 24, 3, 16, 2, seed=9)
    wide = torch.zeros(8, 64)
    wide[:, :32] = x
    got = mixture_lora(wide[:, :32], lora_a, lora_b, scaling, idx, weights, backend="triton")  # row stride 64
    _assert_close(got, mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights))
    with pytest.raises(ValueError, match="contiguous"):
        mixture_lora(x.T.contiguous().T, lora_a, lora_b, scaling, idx, weights, backend="triton")
    bad = idx.clone()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match=r"\[-1, A=3\)"):
        mixture_lora(x, lora_a, lora_b, scaling, bad, weights, backend="triton")


def test_mixture_kernel_rejects_unknown_and_non_power_of_two_block_sizes(kernels):
    """Block overrides go through triton_common.resolve_blocks: BLOCK_N and KP may be below 16, nothing unknown."""
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(5, 16, 16, 3, 16, 2, seed=10)

    def run(blocks):
        return kernels.mixture_lora_triton(x, lora_a, lora_b, scaling, idx, weights, block_sizes=blocks)

    with pytest.raises(ValueError, match="unknown block size 'BLOCK_M'"):
        run({"BLOCK_M": 16})
    with pytest.raises(ValueError, match="BLOCK_IN must be a power of two >= 16, got 24"):
        run({"BLOCK_IN": 24})
    with pytest.raises(ValueError, match="KP >= k=2"):
        run({"KP": 1})
    _assert_close(run({"BLOCK_N": 2, "KP": 2, "num_warps": 2}), mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights))
