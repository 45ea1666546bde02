"""Gaussian RBF basis, the ridge-regression matrix G (Eq. 5, App. A) and closed-form expectations.

Notation: b batch, h heads, n queries, N basis functions, M samples of the old signal, P new
vectors, L = M + P fitted positions, Z padding positions per side, e model dim.

The signal is X̄(t) = Bᵀ ψ(t) with ψ_j(t) = 𝒩(t; c_j, w_j²). Fitting B to vectors X (L, e) placed at
positions t_1..t_L gives Bᵀ = Xᵀ G with G = Fᵀ (F Fᵀ + λ I)⁻¹, F = [ψ(t_1) … ψ(t_L)] (N, L). With
``pad`` (``pad_fit``, the default) the fit also asks for zeros at 2Z points outside [0, 1], weighted
by α: G = Fᵀ (F Fᵀ + α F_z F_zᵀ + λ I)⁻¹. Why: the read integrates the signal over the real line, and
unpadded the signal just outside [0, 1] is an unconstrained extrapolation that a read near an edge
amplifies (docs/continuous.md). FFᵀ is badly conditioned (~1e6), so G is computed once per layout in
float64 with a Cholesky solve (never an explicit inverse) and then kept, in float32, in
:class:`BasisCache`: one copy shared by every layer.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .read import ReadConstants

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
PAD_EXTENT = 0.5  # with ``pad``: zero targets on [-0.5, 0) and (1, 1.5] at the fit's mean density ...
PAD_WEIGHT = 0.25  # ... each weighing this much against a real vector (measured: docs/continuous.md)


def rbf_basis(n_basis: int, widths: tuple[float, ...], dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Centres and widths of the N RBFs: N/len(widths) centres evenly spaced in [0, 1], each paired
    with every width. Width-major order (index j = width · C + centre), so that the read's
    :func:`expected_basis_grid` runs over contiguous centres. Returns ``(centres (N,), widths (N,))``."""
    n_centres = n_basis // len(widths)
    centres = torch.linspace(0.0, 1.0, n_centres, dtype=dtype)  # (C,) C = N/W
    w = torch.tensor(widths, dtype=dtype)  # (W,)
    return centres.repeat(len(widths)), w.repeat_interleave(n_centres)  # (N,), (N,)


def gaussian(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Density 𝒩(x; mean, var), broadcast over all arguments (computed through its log)."""
    return torch.exp(-0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(var) - _LOG_SQRT_2PI)


def basis_values(t: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """ψ(t): ``t`` (...,) → (..., N), in the dtype of ``t``."""
    c, w = centres.to(t.dtype), widths.to(t.dtype)  # (N,), (N,)
    return gaussian(t[..., None], c, w * w)  # (..., N)


def expected_basis(mu: Tensor, sigma2: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """E_{t∼𝒩(μ, σ²)}[ψ_j(t)] over the real line = 𝒩(μ; c_j, σ² + w_j²) (Eq. 11).

    ``mu``, ``sigma2`` (...,) → (..., N), in the dtype of ``mu`` (callers pass float32).
    """
    c, w = centres.to(mu.dtype), widths.to(mu.dtype)  # (N,), (N,)
    return gaussian(mu[..., None], c, sigma2[..., None] + w * w)  # (..., N)


def expected_basis_grid(mu: Tensor, sigma2: Tensor, centres: Tensor, widths: Tensor) -> Tensor:
    """:func:`expected_basis` for the basis of :func:`rbf_basis`, using its grid structure.

    ``centres`` (C,) are the distinct centres and ``widths`` (W,) the distinct widths (N = W·C,
    width-major). The variance σ² + w² takes only W values per query, so the normaliser and 1/var are
    computed on (..., W) and the N-sized work is one fused multiply-add and one exp: ~2.5× fewer
    passes over the (b, h, n, N) tensor than the generic formula. Returns (..., N).
    """
    var = sigma2[..., None] + (widths * widths).to(sigma2.dtype)  # (..., W)
    neg_half_inv = -0.5 / var  # (..., W)
    log_norm = -0.5 * torch.log(var) - _LOG_SQRT_2PI  # (..., W)
    d2 = (mu[..., None] - centres.to(mu.dtype)) ** 2  # (..., C)
    out = torch.addcmul(log_norm[..., :, None], neg_half_inv[..., :, None], d2[..., None, :])  # (..., W, C)
    return out.exp_().flatten(-2)  # (..., N)


# -- positions of the fitted vectors -----------------------------------------------------------------


def cell_centres(count: int, start: float, stop: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """``count`` points at the centres of equal cells of [start, stop]: (count,)."""
    return start + (stop - start) * (torch.arange(count, dtype=dtype) + 0.5) / max(count, 1)  # (count,)


def fit_positions(num_past: int, num_new: int, tau: float) -> Tensor:
    """Where the fitted vectors sit (float64, (M + P,)).

    ``num_past`` M > 0: the M samples of the old signal cell-centred in [0, τ] and the P new vectors
    cell-centred in (τ, 1] (Eq. 15). ``num_past`` = 0: the first fit after a reset, P vectors in [0, 1].
    """
    if num_past == 0:
        return cell_centres(num_new, 0.0, 1.0)  # (P,)
    return torch.cat([cell_centres(num_past, 0.0, tau), cell_centres(num_new, tau, 1.0)])  # (M + P,)


def padding_positions(num_points: int, extent: float = PAD_EXTENT, density: float = 1.0, gap: float = 0.0) -> Tensor:
    """Zero-target points for a fit of ``num_points`` vectors: Z = ⌈L·extent·density⌉ cell-centred in
    [-gap-extent, -gap) and as many in (1+gap, 1+gap+extent], ``density`` relative to the fit's mean
    density of L points per unit length. Returns (2Z,). (Only the benchmark varies the keywords.)"""
    z = max(1, math.ceil(num_points * extent * density - 1e-9))
    left, right = cell_centres(z, -gap - extent, -gap), cell_centres(z, 1.0 + gap, 1.0 + gap + extent)  # (Z,), (Z,)
    return torch.cat([left, right])  # (2Z,)


def regression_matrix(
    positions: Tensor, centres: Tensor, widths: Tensor, ridge: float, pad: bool | Tensor = False,
    pad_weight: float = PAD_WEIGHT,
) -> Tensor:
    """G = Fᵀ (F Fᵀ + α F_z F_zᵀ + λ I)⁻¹ for vectors at ``positions`` (L,), in float64: (L, N).

    ``pad`` (True: :func:`padding_positions`; or a tensor of positions (Z',)) adds zero targets at
    positions t_z outside [0, 1], each weighted by α = ``pad_weight``, with F_z = [ψ(t_z) …]: the fit
    then keeps the signal near zero there, so a read whose density reaches past an edge sees (almost)
    nothing instead of the fit's unconstrained extrapolation. Their targets are zero, so only FFᵀ
    changes and only the rows of the real positions are returned. Solved with a Cholesky
    factorisation of the SPD matrix (no explicit inverse).
    """
    dev = positions.device  # computed where the positions are
    c, w = centres.to(dev, torch.float64), widths.to(dev, torch.float64)  # (N,), (N,)
    f = basis_values(positions.to(torch.float64), c, w).T  # (N, L)
    a = f @ f.T + ridge * torch.eye(f.shape[0], dtype=torch.float64, device=dev)  # (N, N) SPD
    if isinstance(pad, Tensor) or pad:
        t_z = pad if isinstance(pad, Tensor) else padding_positions(positions.numel())  # (Z',)
        f_z = basis_values(t_z.to(dev, torch.float64), c, w).T  # (N, Z')
        a = a + pad_weight * (f_z @ f_z.T)  # (N, N)
    chol = torch.linalg.cholesky(a)  # (N, N) lower
    return torch.cholesky_solve(f, chol).T.contiguous()  # (L, N) = ((FFᵀ + …)⁻¹ F)ᵀ


# -- the shared cache --------------------------------------------------------------------------------

_LIVE: weakref.WeakValueDictionary[int, BasisCache] = weakref.WeakValueDictionary()  # uid → cache
_UIDS = itertools.count()


def live_cache(uid: int) -> BasisCache | None:
    """The :class:`BasisCache` with this ``uid`` if it still exists (for the compiled update's fit
    operator, whose arguments can only be plain values)."""
    return _LIVE.get(uid)


def _canonical(device: torch.device | str) -> torch.device:
    """``device`` as tensors report it: 'cuda' means the current CUDA device, 'cuda:0' say (a cached
    buffer on cuda:0 must count as being on 'cuda', or it would be rebuilt on every call)."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        return torch.empty(0, device=device).device
    return device


class BasisCache(nn.Module):
    """The basis and every regression matrix one model needs, shared by all its layers.

    Lives in the wrapper's ``shared`` ModuleDict. The basis (centres, widths) are non-persistent
    buffers; the matrices are built lazily on first use, one per layout (M, P): the number of new
    vectors varies (a short last segment, an STM that is still filling), so each count gets its own G.
    The matrices are kept in a plain dict, not as buffers: processes of one DDP job that read
    different padding build different sets of them, and DDP's broadcast of module buffers from rank 0
    would then fail (and would copy megabytes of constants every step). Never in ``state_dict()``.
    Everything follows the model's *device* on ``.to()`` but keeps its dtype (float32, or float64 for
    float64 states): G in bf16 would ruin the fit. The matrices take at most ``max_bytes`` together
    (``ContinuousConfig.fit_cache_mib``), least recently used out first: padding adds a layout per
    count of valid vectors, and a long padded stream would otherwise keep adding them.
    """

    def __init__(self, n_basis: int, widths: tuple[float, ...], ridge: float, tau: float, pad: bool,
                 max_bytes: int = 256 * 2**20) -> None:
        super().__init__()
        self.n_basis, self.widths, self.ridge, self.tau, self.pad = n_basis, tuple(widths), ridge, tau, pad
        self.max_bytes = max_bytes
        c64, w64 = rbf_basis(n_basis, self.widths)  # (N,), (N,)
        self.register_buffer("centres", c64.float(), persistent=False)  # (N,)
        self.register_buffer("scales", w64.float(), persistent=False)  # (N,) the widths w_j
        self.matrices: OrderedDict[str, Tensor] = OrderedDict()  # name → G, T or the read's constants, by last use
        self._last_solve: tuple[tuple[int, int, str], Tensor] | None = None  # G and T of a layout share one solve
        self._checked: set[int] = set()  # values of M whose update was found stable
        self._streams = 0  # layers that asked for a stream index (next_stream)
        self._register()

    def _register(self) -> None:
        """A uid of its own, by which the compiled update's fit operator finds this cache."""
        self.uid = next(_UIDS)
        _LIVE[self.uid] = self

    def __setstate__(self, state: dict) -> None:  # a copy (deepcopy, pickle) is a cache of its own
        super().__setstate__(state)
        self._register()

    def next_stream(self) -> int:
        """0, 1, 2, … for the layers sharing this cache, in construction order (distinct sticky RNG streams)."""
        self._streams += 1
        return self._streams - 1

    @staticmethod
    def key(n_basis: int, widths: tuple[float, ...], ridge: float, tau: float, pad: bool) -> str:
        """Name of the cache for these settings in the shared ModuleDict (no dots allowed)."""
        text = f"continuous_N{n_basis}_w{'_'.join(repr(w) for w in widths)}_l{ridge!r}_t{tau!r}_p{int(pad)}"
        return text.replace(".", "p").replace("-", "m")

    def key_of_settings(self) -> str:
        """:meth:`key` of this cache's own settings."""
        return self.key(self.n_basis, self.widths, self.ridge, self.tau, self.pad)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "BasisCache":
        # Move buffers and matrices to the device ``fn`` targets, keeping their dtype (see the class docstring).
        self._last_solve = None  # solved for the old device
        for store in (self._buffers, self.matrices):
            for name, buf in store.items():
                if buf is not None:
                    store[name] = buf.to(fn(buf.new_empty(0)).device)
        return self

    def _buffer(self, name: str, build: Callable[[], Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
        device = _canonical(device)
        buf = self.matrices.get(name)
        if buf is None or buf.device != device:
            return self._store(name, build, device, dtype)
        self.matrices.move_to_end(name)  # most recently used
        return buf

    @torch.compiler.disable
    def _store(self, name: str, build: Callable[[], Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
        """Build and keep a matrix, never inside a compiled graph (a float64 Cholesky solve per call
        there; Dynamo breaks the graph here once, and the recompile after it finds the matrix)."""
        with torch.no_grad():
            buf = build().to(device=device, dtype=dtype)
        self.matrices[name] = buf
        self.matrices.move_to_end(name)
        held = sum(t.numel() * t.element_size() for t in self.matrices.values())
        while held > self.max_bytes and len(self.matrices) > 1:  # the newest stays, even alone over the bound
            _, old = self.matrices.popitem(last=False)  # a caller still holding it keeps it alive until done
            held -= old.numel() * old.element_size()
        return buf

    def basis(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(centres (N,), widths (N,)) in float32 on ``device``."""
        device = _canonical(device)
        if self.centres.device != device:
            self.centres, self.scales = self.centres.to(device), self.scales.to(device)
        return self.centres, self.scales

    def grid(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(distinct centres (C,), distinct widths (W,)) in float32 on ``device``, for
        :func:`expected_basis_grid`."""
        centres, scales = self.basis(device)  # (N,), (N,) width-major
        c = self.n_basis // len(self.widths)
        return centres[:c], scales[::c]  # (C,), (W,)

    def _solve(self, num_past: int, num_new: int, device: torch.device) -> Tensor:
        """G (M + P, N) of a layout in float64, solved on ``device`` (on the CPU where the device has no
        float64). The last solve is kept: a layout's G and T are built one after the other from it."""
        key = (num_past, num_new, str(device))
        if self._last_solve is not None and self._last_solve[0] == key:
            return self._last_solve[1]
        c, w = rbf_basis(self.n_basis, self.widths)  # (N,), (N,) float64
        positions = fit_positions(num_past, num_new, self.tau)  # (M + P,)
        try:
            g = regression_matrix(positions.to(device), c, w, self.ridge, self.pad)  # (M + P, N)
        except (RuntimeError, TypeError):  # e.g. MPS, which has no float64
            g = regression_matrix(positions, c, w, self.ridge, self.pad)  # (M + P, N) on the CPU
        self._last_solve = (key, g)
        return g

    def regression(self, num_past: int, num_new: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """G (M + P, N) for M past samples and P new vectors (M = 0: a first fit over [0, 1])."""
        name = f"G_{num_past}_{num_new}_{str(dtype).split('.')[-1]}"
        return self._buffer(name, lambda: self._solve(num_past, num_new, _canonical(device)), device, dtype)

    def new_rows(self, num_past: int, num_new: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The rows of G for the P new vectors (P, N), kept alone: with linear spacing the update needs
        them and T, not G's M past rows (1 MiB less per layout at N = M = 512)."""
        if num_past == 0:
            return self.regression(0, num_new, device, dtype)  # (P, N) a first fit: G is all new rows
        name = f"Gnew_{num_past}_{num_new}_{str(dtype).split('.')[-1]}"
        return self._buffer(name, lambda: self._solve(num_past, num_new, _canonical(device))[num_past:], device, dtype)

    def fit(self, num_past: int, num_new: int, device: torch.device, dtype: torch.dtype,
            linear: bool) -> tuple[Tensor, Tensor]:
        """One layout's matrices as the update uses them: ``(G_new (P, N), T (N, N))`` with linear
        spacing, ``(G_new (P, N), G_past (M, N))`` with sticky memories (views of one G)."""
        if linear:
            return self.new_rows(num_past, num_new, device, dtype), self.transition(num_past, num_new, device, dtype)
        g = self.regression(num_past, num_new, device, dtype)  # (M + P, N)
        return g[num_past:], g[:num_past]  # (P, N), (M, N)

    def transition(self, num_past: int, num_new: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """T = G_pastᵀ Ψ (N, N) for linearly spaced samples: the old coefficients' share of the new
        ones, B_new = T B_old + G_newᵀ X_new (Eqs. 13–15 without sticky memories)."""
        name = f"T_{num_past}_{num_new}_{str(dtype).split('.')[-1]}"

        def build() -> Tensor:
            g = self._solve(num_past, num_new, _canonical(device))  # (L, N) float64
            c, w = (t.to(g.device) for t in rbf_basis(self.n_basis, self.widths))  # (N,), (N,) float64
            psi = basis_values(cell_centres(num_past, 0.0, 1.0).to(g.device), c, w)  # (M, N)
            return g[:num_past].T @ psi  # (N, N)

        return self._buffer(name, build, device, dtype)

    @torch.compiler.assume_constant_result  # compiled: built (once) while tracing, constants of the graph
    def read_constants(self, head_dim: int, device: torch.device, dtype: torch.dtype) -> ReadConstants:
        """The fused read's constants for ``head_dim`` in ``dtype`` (:func:`.read.sdpa_constants`): the
        keys (N + 1, D) and what the queries' features are built from, once instead of on every read."""
        from .read import ReadConstants, sdpa_constants  # read.py imports this module

        def build(part: int) -> Callable[[], Tensor]:
            def make() -> Tensor:
                centres, widths = self.grid(device)  # (C,), (W,)
                return sdpa_constants(centres.to(dtype), widths, head_dim, min(self.widths))[part]
            return make

        tag = f"{head_dim}_{str(dtype).split('.')[-1]}"
        return ReadConstants(*(self._buffer(f"read_{name}_{tag}", build(i), device, dtype)
                               for i, name in enumerate(ReadConstants._fields)))

    @torch.compiler.assume_constant_result  # compiled: built (once) while tracing, constants of the graph
    def layout(self, num_past: int, num_new: int, device: torch.device, dtype: torch.dtype,
               transition: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(G_newᵀ (N, P), a first fit's Gᵀ (N, P), T (N, N) or G_past (M, N))`` of one layout, as
        separate tensors (no views of one another), for a compiled update (:meth:`regression`,
        :meth:`transition`; a buffer built lazily inside the graph would break it)."""
        g_new, other = self.fit(num_past, num_new, device, dtype, transition)  # (P, N), (N, N) or (M, N)
        return g_new.T.contiguous(), self.regression(0, num_new, device, dtype).T.contiguous(), other.clone()

    def padded_fit(self, count: Tensor, has: Tensor, num_past: int, num_new: int, device: torch.device,
                   dtype: torch.dtype, transition: bool) -> tuple[Tensor, Tensor]:
        """Every sample's fit matrices from the cached per-count layouts (host syncs: eager code), for P
        right-aligned slots of which sample i's last k_i are valid (``count`` (b,)), as a past update
        (``has`` (b,) True) or a first fit over [0, 1]. Returns ``(g_new (b, N, P), other)``: G_newᵀ of
        each sample's layout (zero columns for invalid slots), and T (b, N, N) with ``transition``, else
        G_past (b, M, N). Samples with nothing valid get zeros (the update keeps their coefficients)."""
        m, p, b, n = num_past, num_new, count.shape[0], self.n_basis
        g_rows = torch.zeros(b, p, n, device=device, dtype=dtype)  # (b, P, N) zero rows: invalid slots
        other = torch.zeros(b, *((n, n) if transition else (m, n)), device=device, dtype=dtype)  # (b, N, N) | (b, M, N)
        firsts = not bool(has.all())  # some sample starts its LTM: first fits too (after a reset)
        for k in sorted(set(count.tolist()) - {0}):
            rows = count == k  # (b,) the samples with k valid vectors, in their last k slots
            gk_new, gk_other = self.fit(m, k, device, dtype, transition)  # (k, N), (N, N) | (M, N)
            g_rows[rows & has, p - k:] = gk_new  # (k, N) into each such sample's last k rows
            if firsts:
                g_rows[rows & ~has, p - k:] = self.regression(0, k, device, dtype)  # (k, N) a first fit
            other[rows] = gk_other  # (N, N) | (M, N)
        return g_rows.transpose(1, 2), other  # (b, N, P), (b, N, N) | (b, M, N)

    def check_stable(self, num_past: int) -> None:
        """Refuse settings whose unbounded update amplifies old content (it would overflow).

        The update with linear spacing is B ← T B + (new vectors' share). If the spectral radius of T
        is ≥ 1, a memory left alone grows without bound: that happens when the basis does not cover
        [0, 1] (widths much narrower than the centre spacing) or when M is well below the number of
        centres. Estimated as ‖T^256‖^(1/256) by repeated squaring (float64), once per M.
        """
        if num_past in self._checked:
            return
        c, w = rbf_basis(self.n_basis, self.widths)  # (N,), (N,) float64
        num_new = max(1, self.n_basis // 4)  # the radius barely depends on P
        g = regression_matrix(fit_positions(num_past, num_new, self.tau), c, w, self.ridge, self.pad)  # (L, N)
        t = g[:num_past].T @ basis_values(cell_centres(num_past, 0.0, 1.0), c, w)  # (N, N)
        log_scale, squarings = 0.0, 8
        for _ in range(squarings):
            norm = torch.linalg.matrix_norm(t).item()
            if norm == 0.0:
                break
            t = t / norm
            log_scale = 2.0 * (log_scale + math.log(norm))
            t = t @ t  # (N, N)
        else:
            log_scale += math.log(max(torch.linalg.matrix_norm(t).item(), 1e-300))
        radius = math.exp(log_scale / 2**squarings)
        if radius >= 1.0:
            spacing = 1.0 / max(self.n_basis // len(self.widths) - 1, 1)
            raise ValueError(
                f"continuous memory: with n_basis={self.n_basis}, basis_widths={self.widths}, n_samples={num_past}, "
                f"tau={self.tau}, ridge_lambda={self.ridge} the unbounded update amplifies old content (growth "
                f"≈{radius:.3g}x per update) and the memory would overflow. Use wider basis_widths (the widest one "
                f"comparable to the centre spacing {spacing:.3g}), more n_basis, or n_samples ≥ the number of centres."
            )
        self._checked.add(num_past)

    def extra_repr(self) -> str:
        cached = sorted(self.matrices)
        return (f"N={self.n_basis}, widths={self.widths}, ridge={self.ridge}, tau={self.tau}, pad={self.pad}, "
                f"cached={cached}")


def batched_fit(count: Tensor, has: Tensor, num_past: int, num_new: int, transition: bool, n_basis: int,
                widths: Sequence[float], ridge: float, tau: float, pad: bool) -> tuple[Tensor, Tensor]:
    """Every sample's own fit matrices at once, for P right-aligned slots of which sample i's last
    k_i are valid (``count`` (b,)), as a past update (``has`` (b,) True) or a first fit over [0, 1].

    Returns ``(g_new (b, N, P), other)`` in float64: g_new[i] is G_newᵀ of sample i's layout (zero
    columns for its invalid slots); ``other`` is the transition T (b, N, N) with ``transition``, else
    the past rows G_past (b, M, N). The same matrices as :meth:`BasisCache.regression` /
    :meth:`BasisCache.transition` per layout, solved here per sample (float64 Cholesky) without a host
    sync or a data-dependent branch: what a compiled update runs when some sample has padding
    (:func:`.backend.fit_matrices`).
    """
    dt, dev = torch.float64, count.device
    m, p, b = int(num_past), int(num_new), count.shape[0]
    c, w = (t.to(dev) for t in rbf_basis(n_basis, tuple(widths)))  # (N,), (N,) float64
    var = w * w  # (N,)
    k = count.to(dt)  # (b,)
    rank = torch.arange(p, device=dev, dtype=dt) - (p - k[:, None])  # (b, P) rank among the valid slots
    frac = (rank + 0.5) / k.clamp_min(1.0)[:, None]  # (b, P) cell centres of [0, 1]
    t_new = torch.where(has[:, None], tau + (1.0 - tau) * frac, frac)  # (b, P)
    f_new = gaussian(t_new[..., None], c, var) * (rank >= 0).to(dt)[..., None]  # (b, P, N) zero rows: invalid
    f_past = gaussian(cell_centres(m, 0.0, tau, dt).to(dev)[:, None], c, var)  # (M, N)
    a = f_new.transpose(1, 2) @ f_new  # (b, N, N)
    a = a + has.to(dt)[:, None, None] * (f_past.T @ f_past)  # (b, N, N) past samples, with an LTM only
    a = a + ridge * torch.eye(n_basis, device=dev, dtype=dt)  # (b, N, N)
    if pad:  # Z_i = ⌈L_i·extent⌉ zeros each side at sample i's density (padding_positions)
        points = k + m * has.to(dt)  # (b,) L_i
        z = torch.ceil(points * PAD_EXTENT - 1e-9).clamp_min(1.0)  # (b,)
        z_max = max(1, math.ceil((m + p) * PAD_EXTENT - 1e-9))
        i = torch.arange(z_max, device=dev, dtype=dt)  # (Z,)
        cell = PAD_EXTENT * (i + 0.5) / z[:, None]  # (b, Z)
        weight = PAD_WEIGHT * (i < z[:, None]).to(dt)  # (b, Z) the unused points weigh nothing
        for t_z in (cell - PAD_EXTENT, 1.0 + cell):  # left, right (b, Z)
            f_z = gaussian(t_z[..., None], c, var)  # (b, Z, N)
            a = a + f_z.transpose(1, 2) @ (weight[..., None] * f_z)  # (b, N, N)
    chol = torch.linalg.cholesky_ex(a)[0]  # (b, N, N) lower; SPD by construction (λ > 0)
    g_new = torch.cholesky_solve(f_new.transpose(1, 2), chol)  # (b, N, P) = ((A⁻¹ F_new)ᵀ)ᵀ
    if transition:
        psi = gaussian(cell_centres(m, 0.0, 1.0, dt).to(dev)[:, None], c, var)  # (M, N) where the old signal is read
        other = torch.cholesky_solve((f_past.T @ psi).expand(b, -1, -1), chol)  # (b, N, N) T = G_pastᵀ Ψ
    else:
        other = torch.cholesky_solve(f_past.T.expand(b, -1, -1), chol).transpose(1, 2)  # (b, M, N) G_past
    return g_new, other


def get_cache(
    shared: nn.ModuleDict, n_basis: int, widths: tuple[float, ...], ridge: float, tau: float, pad: bool,
    max_bytes: int = 256 * 2**20,
) -> BasisCache:
    """The model-wide :class:`BasisCache` for these settings, created on first request (with
    ``max_bytes`` for its matrices)."""
    name = BasisCache.key(n_basis, widths, ridge, tau, pad)
    if name not in shared:
        shared[name] = BasisCache(n_basis, widths, ridge, tau, pad, max_bytes)
    return shared[name]  # type: ignore[return-value]

