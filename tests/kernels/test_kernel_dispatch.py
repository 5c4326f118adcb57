"""Backend dispatch: explicit argument > env ARIADNE_KERNEL > auto; explicit choices that cannot run raise."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules (and, ideally, triton) are imported

import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import kernel_cases as cases  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import ariadne_hf.kernels as kernels  # noqa: E402
from ariadne_hf.constants import ENV_KERNEL  # noqa: E402
from ariadne_hf.kernels import embed_pool_distance, incremental_pool_distance, mixture_lora  # noqa: E402

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_KERNEL, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "_logged", set())


def test_auto_picks_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    assert kernels.resolve_backend(CPU) == "torch"
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.resolve_backend(CUDA) == "triton"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.resolve_backend(CUDA) == "torch"
    monkeypatch.setenv(ENV_KERNEL, "auto")
    assert kernels.resolve_backend(CPU) == "torch"


def test_argument_overrides_env_and_env_overrides_auto(monkeypatch):
    monkeypatch.setenv(ENV_KERNEL, "triton")
    assert kernels.resolve_backend(CPU) == "triton"  # interpreter is on
    assert kernels.resolve_backend(CPU, "torch") == "torch"
    monkeypatch.setenv(ENV_KERNEL, "torch")
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.resolve_backend(CUDA) == "torch"
    assert kernels.resolve_backend(CPU, "triton") == "triton"


def test_unknown_backend_names_raise_value_error(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        kernels.resolve_backend(CPU, "cuda")
    monkeypatch.setenv(ENV_KERNEL, "fast")
    with pytest.raises(ValueError, match=ENV_KERNEL):
        kernels.resolve_backend(CPU)


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*backend='torch'"):
        kernels.resolve_backend(CPU, "triton")
    monkeypatch.setenv(ENV_KERNEL, "triton")
    with pytest.raises(RuntimeError, match=f"env {ENV_KERNEL}"):
        kernels.resolve_backend(CPU)
    case = cases.make_case(2, 4, 20, 32, 3, 2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cases.call(embed_pool_distance, case)


def test_explicit_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    for device in (CPU, CUDA):
        with pytest.raises(RuntimeError, match=r"triton is not installed.*ariadne_hf\[triton\]"):
            kernels.resolve_backend(device, "triton")


def test_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="ariadne_hf.kernels"):
        for _ in range(3):
            kernels.resolve_backend(CPU, op="embed_pool_distance")
        kernels.resolve_backend(CPU, "triton", op="embed_pool_distance")
    messages = [r.getMessage() for r in caplog.records if r.name == "ariadne_hf.kernels"]
    assert len(messages) == 2
    assert "torch backend (auto, cpu" in messages[0] and "triton backend (argument" in messages[1]


def test_public_functions_run_on_both_backends_and_agree():
    cases.triton_interpreter_module("pool_distance_triton")
    cases.triton_interpreter_module("mixture_triton")
    case = cases.make_case(3, 5, 20, 32, 6, 3, center=True, seed=1)
    by_torch = cases.call(embed_pool_distance, case, backend="torch", return_pooled=True)
    by_triton = cases.call(embed_pool_distance, case, backend="triton", return_pooled=True)
    assert len(by_torch) == len(by_triton) == 3
    assert torch.equal(by_torch[1], by_triton[1])
    state = (torch.zeros(3, 32), torch.zeros(3))
    scores, best = incremental_pool_distance(case["input_ids"][:, 0], *state, case["embed_weight"], case["centroids"],
                                             case["centroid_adapter"], 3, backend="triton")
    assert scores.shape == (3, 3) and best.shape == (3,)
    x, lora_a, lora_b, scaling, idx, weights = cases.make_lora(4, 16, 16, 3, 16, 2)
    torch.testing.assert_close(mixture_lora(x, lora_a, lora_b, scaling, idx, weights, backend="triton"),
                               mixture_lora(x, lora_a, lora_b, scaling, idx, weights, backend="torch"))


def test_public_names_stay_the_dispatchers_after_importing_every_kernels_submodule():
    """No kernels submodule shares a name with a package attribute: importing them all rebinds nothing."""
    import importlib
    import pkgutil

    before = {name: getattr(kernels, name) for name in kernels.__all__}
    submodules = [info.name for info in pkgutil.iter_modules(kernels.__path__)]
    assert {"pool_distance_triton", "mixture_triton"} <= set(submodules)
    for name in submodules:
        importlib.import_module(f"ariadne_hf.kernels.{name}")
    assert not set(submodules) & set(kernels.__all__)
    assert all(getattr(kernels, name) is value for name, value in before.items())
    from ariadne_hf.kernels import embed_pool_distance as again

    assert again is embed_pool_distance and callable(kernels.mixture_lora)


def test_torch_path_works_without_triton():
    """triton is an optional extra: with it unimportable, the package and the torch path still work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "import ariadne_hf.kernels as k\n"
        "s, b = k.embed_pool_distance(torch.tensor([[1, 2]]), torch.ones(1, 2), torch.randn(5, 8), torch.randn(3, 8),"
        " torch.tensor([0, 1, 1]), 2)\n"
        "assert b.shape == (1,) and not k.triton_available()\n"
        "try:\n"
        "    k.embed_pool_distance(torch.tensor([[1]]), torch.ones(1, 1), torch.randn(5, 8), torch.randn(3, 8),"
        " torch.tensor([0, 1, 1]), 2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_KERNEL}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


CUDA_COMPILE_SCRIPT = r'''
import importlib, os
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_kernel(fn, ptr_types, constexprs, num_warps=4):
    names = fn.arg_names
    sig = {n: ptr_types.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), "no cubin"


epd = importlib.import_module("ariadne_hf.kernels.pool_distance_triton")
mix = importlib.import_module("ariadne_hf.kernels.mixture_triton")
assert not epd.INTERPRETED and not mix.INTERPRETED
from ariadne_hf.kernels.distances import REGISTRY
codes = [d.code for d in REGISTRY.values()]
for i, (table, ids, flag) in enumerate([("bf16", "i64", True), ("fp32", "i32", False), ("fp16", "i64", True)]):
    code, other = codes[i % len(codes)], codes[(i + 1) % len(codes)]  # every distance, in both kernels
    ptrs = dict(ids_ptr=f"*{ids}", mask_ptr="*u8", emb_ptr=f"*{table}", tokw_ptr="*fp32", center_ptr="*fp32",
                transform_ptr="*fp32", cent_ptr="*fp32", c2a_ptr="*i32", pooled_ptr="*fp32", whitened_ptr="*fp32",
                wsum_ptr="*fp32", scores_ptr="*fp32", best_ptr="*i64", sync_ptr="*i32")
    compile_kernel(epd._embed_pool_distance_kernel, ptrs,
                   dict(HAS_TOKW=flag, HAS_CENTER=flag, HAS_TRANSFORM=not flag, DISTANCE=code, **epd.GPU_BLOCKS))
    blocks = {k: v for k, v in epd.GPU_BLOCKS.items() if k != "BLOCK_T"}
    ptrs = dict(new_ids_ptr=f"*{ids}", new_mask_ptr="*u8", emb_ptr=f"*{table}", tokw_ptr="*fp32",
                center_ptr="*fp32", transform_ptr="*fp32", cent_ptr="*fp32", c2a_ptr="*i32", sum_ptr="*fp32",
                wsum_ptr="*fp32", pooled_ptr="*fp32", whitened_ptr="*fp32", scores_ptr="*fp32", best_ptr="*i64",
                sync_ptr="*i32")
    compile_kernel(epd._incremental_pool_distance_kernel, ptrs,
                   dict(HAS_MASK=flag, HAS_TOKW=flag, HAS_CENTER=flag, HAS_TRANSFORM=flag, DISTANCE=other,
                        **blocks))
for dtype, n, k in [("bf16", 1, 2), ("fp32", 256, 1), ("fp16", 8, 4)]:
    blocks = mix.mixture_lora_blocks(n, 2048, 2048, 16, k, torch.device("cuda"))
    num_warps = blocks.pop("num_warps")
    ptrs = dict(x_ptr=f"*{dtype}", a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", scaling_ptr="*fp32", idx_ptr="*i64",
                w_ptr="*fp32", out_ptr=f"*{dtype}")
    compile_kernel(mix._mixture_lora_kernel, ptrs, blocks, num_warps=num_warps)
print("compiled")
'''


def test_kernels_compile_for_cuda_sm80(tmp_path):
    """Without a GPU, compile every kernel variant ahead of time for sm_80 down to a cubin (triton's ptxas).

    Catches what the interpreter accepts but a GPU rejects (block shapes, types, unsupported ops).
    """
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton ships no ptxas here")
    script = tmp_path / "compile_kernels.py"
    script.write_text(CUDA_COMPILE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
