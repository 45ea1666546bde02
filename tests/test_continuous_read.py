"""The continuous memory's read through SDPA (memory_plugins/continuous/read.py).

Notation: b batch, h heads, n queries, d head dim, e model dim, N = W·C basis functions (W widths,
C centres), D the attention's padded last dim.

The reference here is written independently of the module: it follows the paper literally, in float64,
materialising the keys K = B W_K, the scores q·K_h/√d (b, h, n, N), μ and σ² from them (Eqs. 9–10),
and E_p[ψ_j] = 𝒩(μ; c_j, σ² + w_j²) (Eq. 11) for every basis function.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from memory_plugins.continuous.read import (
    CHUNK_HALF_WIDTH,
    expected_values_sdpa,
    extra_logit,
    feature_layout,
    gaussian_read,
)

from .conftest import DEVICE, make_generator

SIGMA2_MIN = 1e-6
TOL = 1e-4  # max |error| / max |reference|, values and gradients, float32 against float64


def rel_err(x: Tensor, ref: Tensor) -> float:
    """max |x − ref| / max |ref| (a scale-aware error that tiny entries cannot blow up)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def grid(num_centres: int, widths: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Distinct centres (C,) evenly spaced in [0, 1] and widths (W,), float32 on the test device."""
    return (torch.linspace(0.0, 1.0, num_centres, device=DEVICE),  # (C,)
            torch.tensor(widths, device=DEVICE))  # (W,)


def reference_read(q: Tensor, coef: Tensor, w_k: Tensor, w_v: Tensor, w_mu: Tensor, w_sigma: Tensor,
                   centres: Tensor, widths: Tensor, sigma2_min: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eqs. 8–11 literally, in the inputs' dtype: (z (b, h, n, d), μ (b, h, n), σ² (b, h, n))."""
    b, h, n, d = q.shape
    n_basis = coef.shape[1]
    keys = (coef @ w_k.T).view(b, n_basis, h, d).transpose(1, 2)  # (b, h, N, d) K = B W_K
    values = (coef @ w_v.T).view(b, n_basis, h, d).transpose(1, 2)  # (b, h, N, d) V = B W_V
    scores = q @ keys.transpose(-1, -2) / math.sqrt(d)  # (b, h, n, N)
    mu = torch.sigmoid(scores @ w_mu)  # (b, h, n)
    sigma2 = F.softplus(scores @ w_sigma).clamp_min(sigma2_min)  # (b, h, n)
    c = centres.repeat(widths.numel())  # (N,) width-major
    w = widths.repeat_interleave(centres.numel())  # (N,)
    return reference_values(mu, sigma2, values, c, w), mu, sigma2


def reference_values(mu: Tensor, sigma2: Tensor, values: Tensor, c: Tensor, w: Tensor) -> Tensor:
    """Σ_j 𝒩(μ; c_j, σ² + w_j²) V_j with the density written out: (b, h, n, d)."""
    var = sigma2[..., None] + w * w  # (b, h, n, N)
    density = torch.exp(-((mu[..., None] - c) ** 2) / (2.0 * var)) / torch.sqrt(2.0 * math.pi * var)  # (b, h, n, N)
    return density @ values  # (b, h, n, d)


def make_case(seed: int, b: int, h: int, n: int, d: int, num_centres: int, widths: tuple[float, ...],
              mu_std: float = 6.0, sigma_std: float = 10.0) -> dict:
    """Random float32 leaves whose μ and σ² logits have std ``mu_std`` and ``sigma_std``: μ reaches
    near 0 and 1, σ² spans the clamp (softplus < 1e-6 below −13.8) up to ~30."""
    gen = make_generator(seed)
    e, n_basis = h * d, num_centres * len(widths)

    def rand(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, device=DEVICE)

    x = {"q": rand(b, h, n, d), "coef": rand(b, n_basis, e) * 0.3, "w_k": rand(h * d, e) / math.sqrt(e),
         "w_v": rand(h * d, e) / math.sqrt(e), "w_mu": rand(n_basis), "w_sigma": rand(n_basis)}
    centres, w = grid(num_centres, widths)
    with torch.no_grad():  # rescale the maps N → 1 so the logits have the wanted spread
        keys = (x["coef"] @ x["w_k"].T).view(b, n_basis, h, d).transpose(1, 2)  # (b, h, N, d)
        scores = x["q"] @ keys.transpose(-1, -2) / math.sqrt(d)  # (b, h, n, N)
        x["w_mu"] *= mu_std / (scores @ x["w_mu"]).std()
        x["w_sigma"] *= sigma_std / (scores @ x["w_sigma"]).std()
    x = {k: t.requires_grad_() for k, t in x.items()}
    return {"x": x, "centres": centres, "widths": w, "min_width": min(widths)}


def run(case: dict, impl: str, dtype: torch.dtype = torch.float32) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """(z, μ, σ²) of :func:`gaussian_read` and the gradients of a fixed random functional of all three."""
    x = {k: t.detach().to(dtype).requires_grad_() for k, t in case["x"].items()}
    out = gaussian_read(x["q"], x["coef"], x["w_k"], x["w_v"], x["w_mu"], x["w_sigma"], case["centres"].to(dtype),
                        case["widths"].to(dtype), SIGMA2_MIN, impl=impl, min_width=case["min_width"])
    return out, grads(out, x)


def run_reference(case: dict) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    x = {k: t.detach().double().requires_grad_() for k, t in case["x"].items()}
    out = reference_read(x["q"], x["coef"], x["w_k"], x["w_v"], x["w_mu"], x["w_sigma"], case["centres"].double(),
                         case["widths"].double(), SIGMA2_MIN)
    return out, grads(out, x)


def grads(out: tuple[Tensor, ...], x: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gradients w.r.t. every input of L = Σ z·G_z + Σ μ·G_μ + Σ σ²·G_σ (seeded G's, on the test device)."""
    gen = make_generator(123)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, device=DEVICE, dtype=torch.float64)).sum() for o in out)
    return dict(zip(x, torch.autograd.grad(loss, list(x.values()))))


CASES = {  # b, h, n, d, C, widths
    "paper widths": (2, 3, 40, 8, 32, (0.01, 0.05)),
    "one narrow width": (2, 2, 40, 16, 48, (0.01,)),
    "three widths, gpt-2 narrow": (3, 2, 32, 12, 24, (0.005, 0.01, 0.05)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sdpa_read_matches_float64_reference(name: str) -> None:
    b, h, n, d, c, widths = CASES[name]
    case = make_case(0, b, h, n, d, c, widths)
    (z_ref, mu_ref, s2_ref), g_ref = run_reference(case)
    # the inputs reach the regimes that matter: μ near both ends, σ² at the clamp and well above it
    assert (mu_ref < 0.01).any() and (mu_ref > 0.99).any()
    assert (s2_ref == SIGMA2_MIN).any() and (s2_ref > 1e-2).any()
    (z, mu, s2), g = run(case, "sdpa")
    assert z.dtype == torch.float32 and z.shape == (b, h, n, d) and mu.shape == s2.shape == (b, h, n)
    assert rel_err(z, z_ref) < TOL
    assert rel_err(mu, mu_ref) < TOL and rel_err(s2, s2_ref) < TOL
    for key in ("q", "coef", "w_k", "w_v", "w_mu", "w_sigma"):
        assert rel_err(g[key], g_ref[key]) < TOL, key


def test_sdpa_read_at_extreme_mu_and_sigma() -> None:
    """Hand-set μ (0, 1e-4, …, 1) × σ² (the clamp … 100) with the narrowest widths: values and gradients
    w.r.t. μ, σ² and V match float64 (the cancelling features are the hard part)."""
    centres, widths = grid(64, (0.005, 0.01, 0.05))
    mus = torch.tensor([0.0, 1e-4, 1e-3, 0.013, 0.5, 0.77, 0.999, 0.9999, 1.0], device=DEVICE)  # (9,)
    s2s = torch.tensor([SIGMA2_MIN, 1e-5, 1e-4, 1e-2, 1.0, 100.0], device=DEVICE)  # (6,)
    mu = mus[:, None].expand(9, 6).reshape(1, 2, 27)  # (b, h, n)
    sigma2 = s2s[None, :].expand(9, 6).reshape(1, 2, 27)  # (b, h, n)
    v = torch.randn(1, 2, 3 * 64, 8, generator=make_generator(1), device=DEVICE)  # (b, h, N, d)
    g_out = torch.randn(1, 2, 27, 8, generator=make_generator(2), device=DEVICE)  # (b, h, n, d)

    def values_and_grads(fn, dtype):  # type: ignore[no-untyped-def]
        args = [t.to(dtype).requires_grad_() for t in (mu, sigma2, v)]
        z = fn(*args, centres.to(dtype), widths.to(dtype))
        return z, torch.autograd.grad((z * g_out.to(dtype)).sum(), args)

    z_ref, g_ref = values_and_grads(reference_sum, torch.float64)
    z, g = values_and_grads(expected_values_sdpa, torch.float32)
    assert rel_err(z, z_ref) < TOL
    for name, a, r in zip(("mu", "sigma2", "v"), g, g_ref):
        assert rel_err(a, r) < TOL, name
    # per query too: a query with small z must not hide behind the others' scale
    per_query = (z.double() - z_ref).abs().amax(-1) / z_ref.abs().amax(-1)  # (b, h, n)
    assert per_query.max() < TOL


def reference_sum(mu: Tensor, sigma2: Tensor, v: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """:func:`reference_values` on the (C,), (W,) grid."""
    c, w = centres.repeat(widths.numel()), widths.repeat_interleave(centres.numel())  # (N,), (N,)
    return reference_values(mu, sigma2, v, c, w)


def test_sdpa_and_dense_paths_agree() -> None:
    case = make_case(3, 2, 2, 24, 8, 40, (0.01, 0.05))
    (z_s, mu_s, s2_s), g_s = run(case, "sdpa")
    (z_d, mu_d, s2_d), g_d = run(case, "dense")
    assert torch.equal(mu_s, mu_d) and torch.equal(s2_s, s2_d)  # the same μ, σ² code
    assert rel_err(z_s, z_d) < TOL
    for key in g_s:
        assert rel_err(g_s[key], g_d[key]) < TOL, key
    # the maps as nn.Linear(N, 1) weights (1, N), as the backend holds them, read the same
    x = case["x"]
    z_lin, _, _ = gaussian_read(x["q"], x["coef"], x["w_k"], x["w_v"], x["w_mu"][None], x["w_sigma"][None],
                                case["centres"], case["widths"], SIGMA2_MIN)
    assert torch.equal(z_lin, z_s)


def test_hand_written_backwards_pass_gradcheck() -> None:
    """The features' and the rescaling's hand-written backwards against finite differences (float64)."""
    gen = make_generator(9)
    centres, widths = grid(12, (0.05, 0.2))
    mu = torch.rand(2, 2, 5, generator=gen, device=DEVICE, dtype=torch.float64).requires_grad_()  # (b, h, n)
    sigma2 = (0.001 + 0.01 * torch.rand(2, 2, 5, generator=gen, device=DEVICE, dtype=torch.float64)).requires_grad_()
    v = torch.randn(2, 2, 24, 4, generator=gen, device=DEVICE, dtype=torch.float64, requires_grad=True)  # (b, h, N, d)

    def read(m: Tensor, s: Tensor, val: Tensor) -> Tensor:
        return expected_values_sdpa(m, s, val, centres.double(), widths.double())  # (b, h, n, d)

    assert torch.autograd.gradcheck(read, (mu, sigma2, v), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_float64_inputs_stay_float64() -> None:
    """Float64 models read in float64 end to end (errors ≪ float32 tolerances)."""
    case = make_case(4, 2, 2, 16, 8, 32, (0.01, 0.05))
    (z, mu, s2), g = run(case, "sdpa", torch.float64)
    (z_ref, _, _), g_ref = run_reference(case)
    assert z.dtype == mu.dtype == s2.dtype == torch.float64
    assert rel_err(z, z_ref) < 1e-9
    assert rel_err(g["q"], g_ref["q"]) < 1e-9


BF16_TOL = 1.5e-2  # bf16 keeps 8 significant bits (rounding 2⁻⁹ ≈ 2e-3): a few roundings of V and of W_V's grads


@pytest.mark.parametrize("impl", ["sdpa", "dense"])
def test_bf16_autocast_is_finite_and_close_to_float32(impl: str) -> None:
    """Under bf16 autocast only the value projection runs in bf16 (μ, σ² and the SDPA in float32)."""
    case = make_case(5, 2, 3, 32, 16, 32, (0.01, 0.05))
    (z32, mu32, s232), g32 = run(case, impl)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        (z, mu, s2), g = run(case, impl)
    assert z.dtype == torch.bfloat16 and mu.dtype == s2.dtype == torch.float32
    assert torch.equal(mu, mu32) and torch.equal(s2, s232)  # autocast does not touch μ, σ²
    assert torch.isfinite(z).all() and all(torch.isfinite(t).all() for t in g.values())
    assert rel_err(z, z32) < BF16_TOL
    for key in g:
        assert rel_err(g[key], g32[key]) < BF16_TOL, key


def test_a_fused_kernel_runs_forward_and_backward() -> None:
    """The padded shapes are accepted by the fused kernel of the device (CPU: the flash kernel, which
    needs one last dim for q, k and v; CUDA, float32: the memory-efficient kernel, last dims % 4)."""
    backend = SDPBackend.FLASH_ATTENTION if DEVICE.type == "cpu" else SDPBackend.EFFICIENT_ATTENTION
    case = make_case(6, 2, 2, 16, 10, 24, (0.01, 0.05))
    with sdpa_kernel([backend]):
        (z, _, _), g = run(case, "sdpa")
    assert torch.isfinite(z).all() and all(torch.isfinite(t).all() for t in g.values())


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returned inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("impl", ["sdpa", "dense"])
def test_sdpa_read_never_materialises_queries_by_basis(impl: str) -> None:
    """No (b, h, n, N) tensor in forward or backward with the SDPA read (the dense one has them)."""
    b, h, n, d, c = 2, 2, 128, 8, 64
    case = make_case(7, b, h, n, d, c, (0.01, 0.05))
    with LargestTensor() as probe:
        run(case, impl)
    big = b * h * n * 2 * c
    assert (probe.numel < big // 4) == (impl == "sdpa"), probe.numel


@pytest.mark.parametrize("d, widths, c", [(8, (0.01, 0.05), 32), (32, (0.01, 0.05), 128), (50, (0.01, 0.05), 256),
                                          (64, (0.005, 0.01), 256), (4, (0.5,), 3)])
def test_feature_layout(d: int, widths: tuple[float, ...], c: int) -> None:
    """D holds the features, the extra key's logit column and the d value columns, is a multiple of 4
    (CUDA's fp32 kernels), and the chunks are narrow enough for the accuracy bound."""
    dim, k = feature_layout(d, len(widths), c, min(widths))
    assert dim % 4 == 0 and dim >= d and dim >= len(widths) * (2 * k + 2)
    assert 1 <= k <= c
    assert k == c or 1.0 / k <= 2 * CHUNK_HALF_WIDTH * min(widths)


def test_bad_arguments_are_refused() -> None:
    case = make_case(8, 1, 1, 4, 4, 8, (0.05,))
    with pytest.raises(ValueError, match="impl"):
        run(case, "flash")
    v = torch.zeros(1, 1, 9, 4, device=DEVICE)  # (b, h, N, d) with N ≠ W·C
    with pytest.raises(ValueError, match="centres"):
        expected_values_sdpa(torch.rand(1, 1, 2, device=DEVICE), torch.rand(1, 1, 2, device=DEVICE), v, *grid(8, (0.05,)))


@pytest.mark.parametrize("num_centres, widths", [(256, (0.01, 0.05)), (512, (0.005, 0.01)), (8, (0.5,))])
def test_extra_key_logit_dwarfs_every_normaliser(num_centres: int, widths: tuple[float, ...]) -> None:
    """z = e^L · o is the plain sum up to the factor 1 + Σ_j exp(ℓ_j − L): below 1e-9 for every query,
    the densest included (μ on a centre, σ² at the clamp, the narrowest width)."""
    centres, w = grid(num_centres, widths)
    logit = extra_logit(num_centres * len(widths), min(widths))
    mu = torch.linspace(-0.05, 1.05, 2001, device=DEVICE, dtype=torch.float64)  # (Q,) μ ∈ [0, 1], and past it
    var = SIGMA2_MIN + w.double() ** 2  # (W,) the narrowest variance each width allows
    dens = torch.exp(-((mu[:, None, None] - centres.double()[None, None, :]) ** 2) / (2 * var[None, :, None]))
    dens = dens / torch.sqrt(2 * math.pi * var)[None, :, None]  # (Q, W, C) every key's density
    assert (dens.sum(dim=(1, 2)) * math.exp(-logit)).max() < 1e-9
