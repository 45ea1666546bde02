"""Fit fidelity of the continuous memory per fit variant: how much a read that reaches past an edge of
[0, 1] amplifies the fitted vectors, and what the variant costs in reconstruction error inside [0, 1].

Notation: N basis functions, L fitted vectors at t_1..t_L, M past samples in [0, τ], P new vectors in
(τ, 1], e vector dim, μ, σ the read's Gaussian density, k the age of a segment in updates.

Read weights. A read returns z = Bᵀ E_p[ψ] with Bᵀ = Xᵀ G, i.e. z = Xᵀ r with r = G E_p[ψ] (L,). An
ideal read weights vector i by w_i = ∫_{cell i} 𝒩(t; μ, σ²) dt (erf differences, float64). The figure
is ‖r‖₁ / ‖w‖₁ over μ ∈ {0.02, 0.5, 0.98} × σ ∈ {0.01, 0.1, 0.3}: "wide" is the worst with σ ∈ {0.1,
0.3} (all of them but μ = 0.5, σ = 0.1 put mass past an edge), "n.edge" the worst with σ = 0.01 at
μ ∈ {0.02, 0.98} and "n.mid" the ratio at μ = 0.5, σ = 0.01: no edge in reach, so what it shows is the
basis's own resolution limit for densities narrower than it resolves. Layouts: a
fresh fit of L = N vectors cell-centred in [0, 1], and updates with M = N past samples and P ∈ {N/4, N}
new vectors (τ = 0.75); each figure is the worst over layouts.

Reconstruction. AR(1) vectors (ρ = 0.9, e = 16, like neighbouring hidden states), n = N per segment,
4 seeds, λ as given: relative error of a fresh fit over [0, 1] ("fit") and over its first and last 5%
("edge5%"), and the recall error after 9 linear updates of the segments written k updates ago
(recent: k = 0, 1; mid: k = 2, 3; old: k = 4, 5). "radius": the spectral radius of the linear update's
transition matrix (M = N, P = N/4), < 1 for an update that lets old content fade.

Variants: "default" (what ContinuousConfig() builds), no padding (the default before issue 10), zero
targets on [-extent, 0) and (1, 1 + extent] at the fit's mean density, each weighted by α (extent
0.5, α = 1 is the authors' code), optionally sparser or after a gap; and the unpadded fit read with
the density restricted to [0, 1] (a change to the read, not the fit: its reconstruction is "nopad"'s).

    python -m benchmarks.continuous_fit                 # ~15 s on one core; table + JSON
    python -m benchmarks.continuous_fit --seeds 2 --out /tmp/fit.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import sys
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.bench_utils import write_result

from memory_plugins.continuous.basis import (
    PAD_EXTENT,
    PAD_WEIGHT,
    basis_values,
    cell_centres,
    expected_basis,
    fit_positions,
    padding_positions,
    rbf_basis,
    regression_matrix,
)
from memory_plugins.continuous.config import ContinuousConfig

F64 = torch.float64
MUS, SIGMAS, TAU = (0.02, 0.5, 0.98), (0.01, 0.1, 0.3), 0.75
# (N, widths): the default size, and N = 64 with the default widths, one width that resolves σ = 0.01,
# and the tests' WIDE widths.
CONFIGS = [(512, (0.01, 0.05)), (64, (0.01, 0.05)), (64, (0.02,)), (64, (0.05, 0.1))]
# name -> (padding (extent, density, gap as a multiple of the widest width, weight α) or None,
#          read restricted to [0, 1]); "default" is whatever ContinuousConfig() builds.
VARIANTS: dict[str, tuple[tuple[float, float, float, float] | None, bool]] = {
    "default": (None, False),
    "nopad": (None, False),
    "pad a=1": ((0.5, 1.0, 0.0, 1.0), False),
    "pad a=1 extent 0.25": ((0.25, 1.0, 0.0, 1.0), False),
    "pad a=1 gap w_max": ((0.5, 1.0, 1.0, 1.0), False),
    "pad a=1 density 1/10": ((0.5, 0.1, 0.0, 1.0), False),
    "pad a=1/2": ((0.5, 1.0, 0.0, 0.5), False),
    "pad a=1/4": ((0.5, 1.0, 0.0, 0.25), False),
    "pad a=1/10": ((0.5, 1.0, 0.0, 0.1), False),
    "nopad, read in [0,1]": (None, True),
}


def std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def cell_edges(num_past: int, num_new: int, tau: float) -> Tensor:
    """Edges of the cells the fitted vectors sit in (the cells of :func:`fit_positions`): (L + 1,)."""
    if num_past == 0:
        return torch.linspace(0.0, 1.0, num_new + 1, dtype=F64)  # (P + 1,)
    past = torch.linspace(0.0, tau, num_past + 1, dtype=F64)  # (M + 1,)
    return torch.cat([past, torch.linspace(tau, 1.0, num_new + 1, dtype=F64)[1:]])  # (M + P + 1,)


def expected_basis_in_unit(mu: float, sigma: float, centres: Tensor, widths: Tensor) -> Tensor:
    """∫_0^1 𝒩(t; μ, σ²) ψ_j(t) dt: the read restricted to [0, 1] (the product of the two Gaussians is
    𝒩(μ; c_j, σ² + w_j²) times a Gaussian in t with mean m_j and variance s_j²). (N,)."""
    s2, w2 = sigma * sigma, widths * widths  # (), (N,)
    var = s2 + w2  # (N,)
    scale = torch.exp(-0.5 * (mu - centres) ** 2 / var) / torch.sqrt(2 * math.pi * var)  # (N,)
    m, s = (mu * w2 + centres * s2) / var, torch.sqrt(s2 * w2 / var)  # (N,), (N,)
    return scale * (std_normal_cdf((1.0 - m) / s) - std_normal_cdf(-m / s))  # (N,)


def fit_matrix(variant: str, positions: Tensor, centres: Tensor, widths: Tensor, ridge: float) -> Tensor:
    """G (L, N) of ``variant`` for vectors at ``positions`` (L,), with the library's regression_matrix."""
    if variant == "default":
        return regression_matrix(positions, centres, widths, ridge, ContinuousConfig().pad_fit)  # (L, N)
    spec = VARIANTS[variant][0]
    if spec is None:
        return regression_matrix(positions, centres, widths, ridge, False)  # (L, N)
    extent, density, gap, weight = spec
    pad = padding_positions(positions.numel(), extent, density, gap * widths.max().item())  # (2Z,)
    return regression_matrix(positions, centres, widths, ridge, pad, weight)  # (L, N)


def read_ratios(variant: str, n_basis: int, widths: tuple[float, ...], ridge: float) -> dict[str, list[float]]:
    """‖r‖₁ / ‖w‖₁ per density (μ-major over MUS × SIGMAS), per layout."""
    c, w = rbf_basis(n_basis, widths)  # (N,), (N,)
    out = {}
    for num_past, num_new in [(0, n_basis), (n_basis, n_basis // 4), (n_basis, n_basis)]:
        g = fit_matrix(variant, fit_positions(num_past, num_new, TAU), c, w, ridge)  # (L, N)
        edges = cell_edges(num_past, num_new, TAU)  # (L + 1,)
        ratios = []
        for mu, sigma in itertools.product(MUS, SIGMAS):
            if VARIANTS[variant][1]:
                e_psi = expected_basis_in_unit(mu, sigma, c, w)  # (N,)
            else:
                e_psi = expected_basis(torch.tensor(mu, dtype=F64), torch.tensor(sigma**2, dtype=F64), c, w)  # (N,)
            r = g @ e_psi  # (L,)
            ideal = std_normal_cdf((edges - mu) / sigma).diff()  # (L,)
            ratios.append((r.abs().sum() / ideal.abs().sum()).item())
        out[f"M{num_past}_P{num_new}"] = ratios
    return out


def update_radius(variant: str, n_basis: int, widths: tuple[float, ...], ridge: float) -> float:
    """Spectral radius of the linear update's transition T = G_pastᵀ Ψ (M = N, P = N/4): below 1, an
    idle memory's old content fades (BasisCache.check_stable refuses ≥ 1)."""
    c, w = rbf_basis(n_basis, widths)  # (N,), (N,)
    g = fit_matrix(variant, fit_positions(n_basis, n_basis // 4, TAU), c, w, ridge)  # (L, N)
    t = g[:n_basis].T @ basis_values(cell_centres(n_basis, 0.0, 1.0), c, w)  # (N, N)
    return torch.linalg.eigvals(t).abs().max().item()


def worst_ratio(ratios: dict[str, list[float]], wide: bool, at_edge: bool | None = None) -> float:
    """The largest ratio over layouts among the wide (σ > 0.01) or narrow densities, at an edge or not."""
    return max(r for layout in ratios.values() for (mu, sigma), r in zip(itertools.product(MUS, SIGMAS), layout)
               if (sigma > min(SIGMAS)) == wide and (at_edge is None or (mu != 0.5) == at_edge))


def relative_error(estimate: Tensor, target: Tensor) -> float:
    return ((estimate - target).norm() / target.norm()).item()


def ar1(n: int, e: int, gen: torch.Generator, rho: float = 0.9) -> Tensor:
    """n AR(1) vectors x_i = ρ x_{i-1} + √(1-ρ²) z_i (unit variance): (n, e)."""
    z = torch.randn(n, e, dtype=F64, generator=gen)  # (n, e)
    lags = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0).to(F64)  # (n, n)
    return ((rho**lags).tril() @ z) * math.sqrt(1 - rho * rho)  # (n, e)


def reconstruction(variant: str, n_basis: int, widths: tuple[float, ...], ridge: float, seeds: int) -> dict[str, float]:
    """Fresh-fit, edge and recall errors (see the module docstring), averaged over seeds."""
    n, e, updates = n_basis, 16, 9
    c, w = rbf_basis(n_basis, widths)  # (N,), (N,)

    t0 = fit_positions(0, n, TAU)  # (n,)
    g0, gu = fit_matrix(variant, t0, c, w, ridge), fit_matrix(variant, fit_positions(n_basis, n, TAU), c, w, ridge)
    trans = gu[:n_basis].T @ basis_values(cell_centres(n_basis, 0.0, 1.0), c, w)  # (N, N)
    k = max(1, round(0.05 * n))
    edge = torch.cat([torch.arange(k), torch.arange(n - k, n)])  # (2k,)
    rows = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        segs = [ar1(n, e, gen) for _ in range(updates + 1)]  # (n, e) each
        fit = basis_values(t0, c, w) @ (g0.T @ segs[0])  # (n, e)
        coef = g0.T @ segs[0]  # (N, e)
        for x in segs[1:]:
            coef = trans @ coef + gu[n_basis:].T @ x  # (N, e)
        recall = []
        for age in range(6):  # written `age` updates ago: at the cell centres of (τ^(age+1), τ^age]
            where = cell_centres(n, TAU ** (age + 1), TAU**age)  # (n,)
            recall.append(relative_error(basis_values(where, c, w) @ coef, segs[-1 - age]))
        rows.append([relative_error(fit, segs[0]), relative_error(fit[edge], segs[0][edge]), *recall])
    m = torch.tensor(rows).mean(0).tolist()
    return {"fit": m[0], "edge5%": m[1], "recent": (m[2] + m[3]) / 2, "mid": (m[4] + m[5]) / 2,
            "old": (m[6] + m[7]) / 2, "recall_by_age": m[2:]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ridge", type=float, default=ContinuousConfig().ridge_lambda, help="λ of the fit")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "continuous_fit.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = ContinuousConfig()
    print(f"defaults: N={cfg.n_basis} widths={cfg.basis_widths} λ={cfg.ridge_lambda} pad_fit={cfg.pad_fit} "
          f"(zeros on [-{PAD_EXTENT}, 0) and (1, 1+{PAD_EXTENT}], weight α={PAD_WEIGHT}); this run λ={args.ridge}")
    print("read L1 ratio ‖G E_p[ψ]‖₁ / ‖ideal‖₁ (worst over layouts) | reconstruction error, AR(1) ρ=0.9")
    head = f"{'N':>4} {'widths':<12} {'variant':<21} {'wide':>6} {'n.edge':>6} {'n.mid':>6} | {'fit':>6} {'edge5%':>6} " \
           f"{'recent':>6} {'mid':>6} {'old':>6} | {'radius':>6}"
    print(head)
    rows = []
    for (n_basis, widths), variant in itertools.product(CONFIGS, VARIANTS):
        ratios = read_ratios(variant, n_basis, widths, args.ridge)
        worst = lambda wide, at_edge=None: worst_ratio(ratios, wide, at_edge)  # noqa: E731
        if VARIANTS[variant][1]:  # a read change: the fit, hence its reconstruction, is that of "nopad"
            recon = next(r["reconstruction"] for r in rows if r["n_basis"] == n_basis and r["widths"] == list(widths)
                         and r["variant"] == "nopad")
        else:
            recon = reconstruction(variant, n_basis, widths, args.ridge, args.seeds)
        spec = (PAD_EXTENT, 1.0, 0.0, PAD_WEIGHT) if variant == "default" and ContinuousConfig().pad_fit else VARIANTS[variant][0]
        row = {"n_basis": n_basis, "widths": list(widths), "variant": variant,
               "padding_extent_density_gap_weight": spec,
               "read_in_unit": VARIANTS[variant][1],
               "update_radius": update_radius(variant, n_basis, widths, args.ridge), "l1_wide": worst(True),
               "l1_narrow_edge": worst(False, True), "l1_narrow_mid": worst(False, False), "ratios": ratios, "reconstruction": recon}
        rows.append(row)
        print(f"{n_basis:>4} {str(widths):<12} {variant:<21} {row['l1_wide']:6.2f} {row['l1_narrow_edge']:6.2f} "
              f"{row['l1_narrow_mid']:6.2f} | "
              f"{recon['fit']:6.4f} {recon['edge5%']:6.4f} {recon['recent']:6.4f} {recon['mid']:6.4f} "
              f"{recon['old']:6.4f} | {row['update_radius']:6.3f}", flush=True)
    result = {"args": vars(args), "mus": MUS, "sigmas": SIGMAS, "tau": TAU, "torch": torch.__version__,
              "platform": platform.platform(), "python": sys.version.split()[0], "rows": rows}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
