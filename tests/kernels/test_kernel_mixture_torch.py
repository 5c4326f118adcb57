"""The torch multi-LoRA specification against a float64 per-row loop; dense_to_topk. (The routed LoRA layers'
torch strategies are tested against this specification in test_routed_lora.py.)"""

from __future__ import annotations

import kernel_cases as cases
import pytest
import torch

from ariadne_hf.kernels.mixture_torch import dense_to_topk, mixture_lora_ref

MIX_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.parametrize(
    "n, k, dtype",
    [(1, 1, "fp32"), (5, 2, "fp32"), (37, 4, "fp32"), (33, 1, "bf16"), (9, 2, "fp16"), (70, 2, "bf16")],
)
def test_the_specification_matches_a_float64_row_loop(n, k, dtype):
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(n, 24, 19, 5, 8, k, dtype=cases.DTYPES[dtype], seed=n + k)
    delta = mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights)
    assert delta.dtype == x.dtype and delta.shape == (n, 19)
    expected = cases.oracle_mixture(x, lora_a, lora_b, scaling, idx, weights)
    rtol, atol = MIX_TOL[x.dtype]
    torch.testing.assert_close(delta.double(), expected, rtol=rtol, atol=atol)


def test_rows_without_adapters_or_with_zero_weights_get_a_zero_delta():
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(6, 16, 16, 3, 4, 2, seed=3)
    idx[2] = -1
    weights[4] = 0.0
    delta = mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights)
    assert (delta[2] == 0).all() and (delta[4] == 0).all()
    assert (delta != 0).any()  # the other rows do get a delta


def test_mixture_rejects_indices_outside_minus_one_to_a_and_mismatched_ranks():
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(4, 16, 16, 3, 4, 2, seed=4)
    idx[1, 0] = 3
    with pytest.raises(ValueError, match=r"\[-1, A=3\)"):
        mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights)
    with pytest.raises(ValueError, match="lora_B"):
        mixture_lora_ref(x, lora_a, lora_b[:, :, :2], scaling, idx.clamp(max=2), weights)


DENSE_WEIGHTS = [[0.1, 0.6, 0.3, 0.0], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]]


def test_dense_to_topk_keeps_the_k_largest_weights_unrenormalised_with_zeros_as_minus_one():
    """Row 0 keeps 0.6 + 0.3 (not rescaled to 1), row 1's zero second slot gets index -1, row 2's tie the lowest."""
    idx, values = dense_to_topk(torch.tensor(DENSE_WEIGHTS), 2)
    assert idx.tolist() == [[1, 2], [2, -1], [0, 1]]
    torch.testing.assert_close(values, torch.tensor([[0.6, 0.3], [1.0, 0.0], [0.25, 0.25]]))


def test_dense_weights_through_dense_to_topk_give_the_row_loop_mixture():
    x, lora_a, lora_b, scaling, _, _ = cases.make_lora(3, 8, 8, 4, 4, 1, seed=5)
    dense_idx, dense_w = dense_to_topk(torch.tensor(DENSE_WEIGHTS), 4)
    torch.testing.assert_close(mixture_lora_ref(x, lora_a, lora_b, scaling, dense_idx, dense_w),
                               cases.oracle_mixture(x, lora_a, lora_b, scaling, dense_idx, dense_w).float(),
                               rtol=1e-5, atol=1e-5)


def test_duplicate_slots_add_up():
    """The same adapter twice in a row's top-k contributes twice (the delta is linear in the weights)."""
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(4, 16, 12, 3, 4, 2, seed=6, minus_one=0.0)
    idx[0] = torch.tensor([1, 1])
    expected = cases.oracle_mixture(x, lora_a, lora_b, scaling, idx, weights)
    delta = mixture_lora_ref(x, lora_a, lora_b, scaling, idx, weights)
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-5)

