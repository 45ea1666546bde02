"""The continuous memory's read as Triton kernels (memory_plugins/continuous/kernel.py, ``read_impl="triton"``).

Notation: b batch, h heads, n queries, d head dim, N = W·C basis functions.

On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py before
triton is imported); with ``MEMORY_PLUGINS_TEST_DEVICE=cuda`` they are compiled for the GPU. The
reference is the float64 read of tests/test_continuous_read.py, written out from the paper.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memory_plugins as mp
from memory_plugins.continuous.kernel import MAX_HEAD_DIM, expected_values_triton, kernel_available
from memory_plugins.models import ReferenceDecoder

from .conftest import DEVICE, INTERPRETER_RUNS_THE_KERNELS, make_generator, needs_kernel_read
from .test_continuous_read import SIGMA2_MIN, grid, make_case, reference_sum, rel_err, run, run_reference

pytest.importorskip("triton", reason="read_impl='triton' needs the triton package (a dev dependency on Linux x86-64)")

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TOL = 2e-5  # exact exponents in float32 (measured ≲ 1e-6); the SDPA read's bound is 1e-4


def test_the_kernel_runs_wherever_it_can() -> None:
    """On CUDA, and on the CPU with an interpreter that runs the kernels (CI: triton 3.9). Elsewhere
    the kernel tests are skipped with their reason (``needs_kernel_read``)."""
    assert kernel_available(DEVICE, torch.float32) == (DEVICE.type == "cuda" or INTERPRETER_RUNS_THE_KERNELS)
    assert not kernel_available(DEVICE, torch.float64)  # float64 reads go through SDPA
    assert not kernel_available(DEVICE, torch.float32, head_dim=MAX_HEAD_DIM + 1)  # so do heads wider than 512
    assert not kernel_available(DEVICE, torch.float32, elements=2**31)  # and tensors past 32-bit offsets


# b, h, n, d, C, widths: ragged last tiles (64 × 64 queries × keys up to d = 128, 32 × 32 up to 256, then 16 × 16);
# d below, at and above 16, and each head-dim tile's own tile sizes
SHAPES = [(2, 3, 70, 20, 40, (0.01, 0.05)), (1, 2, 64, 16, 32, (0.01,)), (2, 1, 9, 50, 24, (0.005, 0.01, 0.05)),
          (1, 1, 130, 4, 70, (0.05,)), (1, 2, 70, 100, 36, (0.05,)), (1, 1, 40, 130, 24, (0.01, 0.05)),
          (1, 1, 20, 300, 20, (0.05,))]


@needs_kernel_read
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}n{}d{}C{}W{}".format(*s[:5], len(s[5])))
def test_kernel_read_and_its_gradients_match_float64(shape: tuple) -> None:
    b, h, n, d, c, widths = shape
    gen = make_generator(0)
    centres, w = grid(c, widths)  # (C,), (W,)
    mu = torch.rand(b, h, n, generator=gen, device=DEVICE, dtype=torch.float64) * 1.2 - 0.1  # (b, h, n) past both ends
    sigma2 = 10 ** (-6 + 5 * torch.rand(b, h, n, generator=gen, device=DEVICE, dtype=torch.float64))  # (b, h, n) 1e-6 … 0.1
    v = torch.randn(b, h, c * len(widths), d, generator=gen, device=DEVICE, dtype=torch.float64)  # (b, h, N, d)
    leaves64 = [t.requires_grad_() for t in (mu, sigma2, v)]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    dz = torch.randn(b, h, n, d, generator=gen, device=DEVICE, dtype=torch.float64)  # (b, h, n, d)

    z = expected_values_triton(*leaves32, centres, w)  # (b, h, n, d)
    z.backward(dz.float())
    ref = reference_sum(mu, sigma2, v, centres.double(), w.double())  # (b, h, n, d)
    ref.backward(dz)
    assert z.dtype == torch.float32 and z.shape == (b, h, n, d)
    assert rel_err(z, ref) < KERNEL_TOL
    for name, got, want in zip(("mu", "sigma2", "v"), leaves32, leaves64):
        assert rel_err(got.grad, want.grad) < KERNEL_TOL, name


@needs_kernel_read
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_values_are_read_in_their_own_layout_and_dtype(dtype: torch.dtype) -> None:
    """V as the value projection leaves it, heads split out of a (b, N, h·d) buffer (strided, no copy), in
    float32, bf16 or fp16 (autocast's dtypes, no cast): the read and its gradients match float64 on the same
    values; z and ∂V come back in V's dtype, ∂V in V's layout."""
    b, h, n, d, c, widths = 2, 3, 70, 20, 40, (0.01, 0.05)
    gen = make_generator(1)
    centres, w = grid(c, widths)  # (C,), (W,)
    n_basis = c * len(widths)
    mu = torch.rand(b, h, n, generator=gen, device=DEVICE) * 1.2 - 0.1  # (b, h, n)
    sigma2 = 10 ** (-5 + 4 * torch.rand(b, h, n, generator=gen, device=DEVICE))  # (b, h, n)
    flat = torch.randn(b, n_basis, h * d, generator=gen, device=DEVICE).to(dtype)  # (b, N, h·d) as F.linear gives it
    v = flat.view(b, n_basis, h, d).transpose(1, 2).requires_grad_()  # (b, h, N, d) strided
    dz = torch.randn(b, h, n, d, generator=gen, device=DEVICE).to(dtype)  # (b, h, n, d)
    leaves32 = [t.clone().requires_grad_() for t in (mu, sigma2)]
    z = expected_values_triton(*leaves32, v, centres, w)  # (b, h, n, d)
    z.backward(dz)
    leaves64 = [t.detach().double().requires_grad_() for t in (mu, sigma2, v)]
    ref = reference_sum(*leaves64, centres.double(), w.double())  # (b, h, n, d)
    ref.backward(dz.double())
    # z and ∂V are rounded once to V's dtype: within one ulp (to nearest on a GPU; the interpreter truncates bf16)
    stored = {torch.float32: KERNEL_TOL, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    assert z.dtype == dtype and v.grad.dtype == dtype and v.grad.stride() == v.stride()
    assert rel_err(z.double(), ref) < stored
    assert rel_err(v.grad.double(), leaves64[2].grad) < stored
    for name, got, want in zip(("mu", "sigma2"), leaves32, leaves64):
        assert rel_err(got.grad.double(), want.grad) < KERNEL_TOL, name  # summed in float32


@needs_kernel_read
def test_the_operators_take_any_layout() -> None:
    """``gauss_read`` and its backward called directly (as a compiled graph may call them) with μ, σ²
    transposed out of (b, n, h) buffers, V with no unit stride along d, the widths as every C-th of the
    per-key widths (``BasisCache.grid``'s layout) and strided centres: the same numbers as with
    contiguous inputs, bit for bit."""
    from memory_plugins.continuous.kernel import gauss_read, gauss_read_backward

    b, h, n, d, c, widths = 2, 3, 70, 20, 40, (0.01, 0.05)
    gen = make_generator(2)
    centres, w = grid(c, widths)  # (C,), (W,)
    mu = (torch.rand(b, n, h, generator=gen, device=DEVICE) * 1.2 - 0.1).transpose(1, 2)  # (b, h, n) strided
    sigma2 = (10 ** (-5 + 4 * torch.rand(b, n, h, generator=gen, device=DEVICE))).transpose(1, 2)  # (b, h, n)
    v = torch.randn(b, h, d, c * len(widths), generator=gen, device=DEVICE).transpose(2, 3)  # (b, h, N, d) stride N along d
    dz = torch.randn(b, h, n, d, generator=gen, device=DEVICE).permute(0, 2, 1, 3)  # (b, n, h, d) strided
    grid_w = w.repeat_interleave(c)[::c]  # (W,) stride C
    grid_c = torch.stack([centres, centres], dim=1)[:, 0]  # (C,) stride 2
    odd = [gauss_read(mu, sigma2, v, grid_c, grid_w), *gauss_read_backward(dz, mu, sigma2, v, grid_c, grid_w)]
    plain = [t.contiguous() for t in (mu, sigma2, v)]
    even = [gauss_read(*plain, centres, w), *gauss_read_backward(dz.contiguous(), *plain, centres, w)]
    for name, got, want in zip(("z", "d_mu", "d_sigma2", "d_v"), odd, even):
        assert torch.equal(got, want), name


@needs_kernel_read
def test_kernel_gaussian_read_matches_the_paper_end_to_end() -> None:
    """The whole read (μ, σ² from the queries, V = W_V B, the kernel) against the float64 reference, with
    μ near both ends and σ² at the clamp: every input's gradient."""
    case = make_case(0, 2, 3, 40, 8, 32, (0.01, 0.05))
    (z_ref, _, _), g_ref = run_reference(case)
    (z, _, _), g = run(case, "triton")
    assert rel_err(z, z_ref) < KERNEL_TOL
    for key in ("q", "coef", "w_k", "w_v", "w_mu", "w_sigma"):
        assert rel_err(g[key], g_ref[key]) < 1e-4, key  # μ/σ² through their logits: float32 matmuls


def _stream(impl: str, dtype: torch.dtype = torch.float32, autocast: bool = False,
            ) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    """Four padded training segments of a wrapped reference decoder: losses, gradients, final state."""
    torch.manual_seed(0)
    base = ReferenceDecoder(vocab_size=40, dim=24, depth=2, heads=3)
    model = mp.wrap(base, "continuous", n_basis=32, basis_widths=(0.01, 0.05), stm_len=8, zero_init_output=False,
                    read_impl=impl).to(dtype).train()
    gen = make_generator(3)
    losses = []
    for s in range(4):
        tokens = torch.randint(0, 40, (2, 12), generator=gen, device=DEVICE)  # (b, n)
        mask = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)  # (b, n)
        mask[1, : 2 * s] = False  # left padding, another count each segment
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens, mask=mask)  # (b, n, V)
            loss = logits.float().logsumexp(-1).mean() + model.memory_aux_loss()
        loss.backward()
        losses.append(loss.item())
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return losses, grads, copy.deepcopy(model.memory_state())


@needs_kernel_read
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_model_reading_through_the_kernel_trains_as_through_sdpa(autocast: bool) -> None:
    losses_k, grads_k, state_k = _stream("triton", autocast=autocast)
    losses_s, grads_s, state_s = _stream("sdpa", autocast=autocast)
    tol = 2e-2 if autocast else 1e-4  # bf16 autocast: the host's own matmuls round differently
    for a, b in zip(losses_k, losses_s):
        assert abs(a - b) <= tol * max(1.0, abs(b))
    for key in grads_s:
        assert rel_err(grads_k[key], grads_s[key]) < (5e-2 if autocast else 1e-3), key
    coef_k = torch.stack([layer["coef"] for layer in state_k["layers"].values()])
    coef_s = torch.stack([layer["coef"] for layer in state_s["layers"].values()])
    assert rel_err(coef_k, coef_s) < (5e-2 if autocast else 1e-3)


def test_where_the_kernel_does_not_run_the_read_is_sdpa_exactly() -> None:
    """Float64 models: ``read_impl="triton"`` reads through SDPA, bit for bit."""
    losses_k, grads_k, _ = _stream("triton", torch.float64)
    losses_s, grads_s, _ = _stream("sdpa", torch.float64)
    assert losses_k == losses_s
    assert all(torch.equal(grads_k[k], grads_s[k]) for k in grads_s)


def test_a_missing_triton_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from memory_plugins.continuous import kernel

    real_import = builtins.__import__

    def no_triton(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    with pytest.raises(ImportError, match=r"read_impl='triton' needs the triton package"):
        kernel._build()


@needs_kernel_read
def test_sigma2_min_keeps_the_kernel_finite() -> None:
    """σ² at the clamp with the narrowest width: the densest keys, 1/√(2π w²), stay finite in float32."""
    centres, w = grid(256, (0.005,))
    mu = centres[None, None, :].clone()  # (1, 1, 256) every query on a centre
    sigma2 = torch.full_like(mu, SIGMA2_MIN)  # (1, 1, 256)
    v = torch.ones(1, 1, 256, 4, device=DEVICE)  # (1, 1, N, d)
    z = expected_values_triton(mu, sigma2, v, centres, w)  # (1, 1, 256, 4)
    assert torch.isfinite(z).all() and z.min() > 1.0


_COMPILE = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from memory_plugins.continuous import _triton_read as kernels
out = {}
from memory_plugins.continuous.kernel import tiles
VALUES = ("v_ptr", "z_ptr", "dz_ptr", "dv_ptr")  # V's dtype (bf16 under autocast); μ, σ², grid: fp32
for arch, block_d, values in [(90, 16, "fp32"), (90, 64, "fp32"), (90, 64, "bf16"), (90, 128, "fp32"),
                              (80, 256, "fp32"), (90, 512, "fp32")]:  # sm_90: H100/H200; sm_80: A100
    bm, bn, _, stages = tiles(block_d)
    for name in ("forward_kernel", "query_grad_kernel", "value_grad_kernel"):
        fn = getattr(kernels, name)
        signature = {a: "constexpr" if a in ("BM", "BN", "BD") else f"*{values}" if a in VALUES
                     else "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs={"BM": bm, "BN": bn, "BD": block_d}),
                           target=GPUTarget("cuda", arch, 32), options={"num_stages": stages})
        out[f"sm{arch} {name} BD {block_d} {values}"] = [len(k.asm["cubin"]), k.metadata.shared]
print(json.dumps(out))
"""


def test_the_kernels_compile_for_gpus() -> None:
    """Triton compiles each kernel to a cubin for Hopper (H100/H200) and Ampere (A100), no GPU needed:
    what the interpreter cannot check (types, layouts, shared memory), at every head-dim tile's own
    tile sizes (``tiles``) up to d = 512. Shared memory stays within 64 KiB a block, which every GPU
    since Turing has. In a process of its own: triton's own library is interpreted, not compiled, in
    a process that imported it under ``TRITON_INTERPRET=1``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(sizes) == 18
    for what, (cubin, shared) in sizes.items():
        assert cubin > 0 and shared <= 64 * 1024, (what, shared)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (Triton launches on the current one)")
def test_a_read_on_another_gpu_than_the_current_one_launches_there() -> None:
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 and match float64."""
    case = make_case(0, 2, 3, 40, 8, 32, (0.01, 0.05))
    case = {**case, "x": {k: t.to("cuda:1") for k, t in case["x"].items()},
            "centres": case["centres"].to("cuda:1"), "widths": case["widths"].to("cuda:1")}
    with torch.cuda.device(0):
        (z, _, _), g = run(case, "triton")
        (z_ref, _, _), g_ref = run_reference(case)
    assert z.device == torch.device("cuda:1") and rel_err(z, z_ref) < KERNEL_TOL
    assert all(rel_err(g[k], g_ref[k]) < 1e-4 for k in g_ref)


def test_heads_wider_than_the_kernels_take_read_through_sdpa() -> None:
    """d > MAX_HEAD_DIM: ``read_impl="triton"`` reads through SDPA, bit for bit; a direct kernel call is
    refused with the limit in the message, as is one with more elements than 32-bit offsets reach."""
    case = make_case(0, 1, 1, 6, MAX_HEAD_DIM + 4, 32, (0.05,))
    (out_k, grads_k), (out_s, grads_s) = run(case, "triton"), run(case, "sdpa")
    assert all(torch.equal(a, b) for a, b in zip(out_k, out_s))
    assert all(torch.equal(grads_k[k], grads_s[k]) for k in grads_s)
    centres, w = grid(8, (0.05,))
    mu = torch.full((1, 1, 3), 0.5, device=DEVICE)  # (b, h, n)
    with pytest.raises(ValueError, match=rf"head dims up to {MAX_HEAD_DIM}, got {MAX_HEAD_DIM + 1}"):
        expected_values_triton(mu, mu, torch.zeros(1, 1, 8, MAX_HEAD_DIM + 1, device=DEVICE), centres, w)
    huge = torch.zeros(1, 1, 8, 1, device=DEVICE).expand(2**16, 2**8, 8, 2**7)  # (b, h, N, d) 2³⁴ elements, no memory
    with pytest.raises(ValueError, match=r"fewer than 2\*\*31 elements"):
        expected_values_triton(mu.expand(2**16, 2**8, 3), mu.expand(2**16, 2**8, 3), huge, centres, w)


def test_mismatched_shapes_are_refused_before_any_kernel_runs() -> None:
    centres, w = grid(8, (0.05,))
    v = torch.zeros(2, 3, 8, 4, device=DEVICE)  # (b, h, N, d)
    good = torch.full((2, 3, 5), 0.5, device=DEVICE)  # (b, h, n)
    with pytest.raises(ValueError, match=r"mu \(2, 2, 5\) and sigma2 \(2, 3, 5\) must both be"):
        expected_values_triton(good[:, :2], good, v, centres, w)
    with pytest.raises(ValueError, match=r"1 widths × 8 centres ≠ 9 value rows"):
        expected_values_triton(good, good, torch.zeros(2, 3, 9, 4, device=DEVICE), centres, w)
