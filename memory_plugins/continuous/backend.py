"""The ∞-former's continuous long-term memory (LTM), with optional short-term memory and sticky memories.

Notation: b batch, n segment length, h heads, d head dim, e model dim (need not equal h·d),
N basis functions, M samples of the old signal, P vectors waiting to enter the LTM, D histogram bins,
S short-term memory length.

State (one dict per layer, batch-first, detached when ``config.detach``):

* ``coef`` (b, N, e): the LTM signal's coefficients B, X̄(t) = Bᵀ ψ(t) on [0, 1] (float32, or float64
  for float64 models). Zero for a sample without LTM.
* ``has_ltm`` (b,) bool: whether the sample's LTM holds anything (False after init / reset).
* ``pending`` (b, P, e), ``pending_valid`` (b, P): the vectors that enter the LTM at the next read.
* ``hist`` (b, D), only with ``sticky``: the attention histogram of the last read (Eq. 16).
* ``stm`` (b, S, e), ``stm_valid`` (b, S), only with ``stm_len > 0``: the short-term FIFO.

Timing: a deferred update, in one ``step(state, x, q, valid)`` per segment. The LTM update (gate,
Eq. 18; contraction and refit, Eqs. 13–15; sticky sampling with the *previous* read's histogram,
Eqs. 16–17) runs first, on the vectors left pending by the previous step; the read then attends over
the updated signal (Eqs. 8–12); last, the updated coefficients (detached) become the new state and
this segment's valid vectors (or what they evict from the STM) the new pending set, with this read's
histogram. Why: the gate's parameters then sit in the graph of the read that uses the update, so the
task loss trains them, while every state tensor stays detached (no past segment's graph is kept
alive). It reproduces the paper's timing exactly:

* ``stm_len = 0``: at segment s the LTM holds segments 0 … s−1 (everything before the current
  segment; segment s−1 was pending and enters at the start of step s). A read never sees its own
  segment.
* ``stm_len > 0``: the STM holds the last S vectors before segment s (the host attends over them
  with its own K/V, returned as ``kv_source``); the vectors the FIFO evicted at step s−1 enter the
  LTM at step s, exactly once. With S = n: STM = segment s−1, LTM = segments 0 … s−2.

Padding: only valid positions are stored (right-aligned, :mod:`memory_plugins.fifo`). A sample with
k of the P pending slots valid is fitted exactly as an unpadded stream of it would be: its k vectors
at k cell-centred positions of (τ, 1] with the G of that layout (one cached G per distinct k in the
batch). Padded queries take no part in the sticky histogram or the KL term.

The first update after a reset fits the new vectors alone over [0, 1]; later ones sample the old
signal at M locations (linear, or from the histogram), place them cell-centred in [0, τ], place the
P new vectors cell-centred in (τ, 1], and refit with the cached G (see :mod:`.basis`).
Inside ``memory_frozen()`` the new state is discarded, so every read re-applies the same pending
update: it sees everything written so far.

Cost per segment and layer, whatever the number of tokens seen: the read O(b·h·n·N·d + b·N·e·h·d),
the update O(b·(P + M)·N·e) with sticky memories or O(b·(N + P)·N·e) with linear spacing (then the
old coefficients' share is one cached N×N matrix, B_new = T B_old + G_newᵀ X_new), the histogram
O(b·h·n·D).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from typing import Any, ClassVar

from .. import fifo
from ..distributed import refuse_sharded_step
from ..graph_ops import graph_op
from ..interface import HostAttention, MemoryRead, MemoryState
from ..registry import register_memory
from .basis import BasisCache, basis_values, batched_fit, get_cache, live_cache
from .config import ContinuousConfig
from .read import compute_dtype, gaussian_read
from .sticky import advance_rng, attention_histogram, initial_rng, sample_locations, uniform_histogram


def _fit_matrices_fake(valid: Tensor, has: Tensor, g_new: Tensor, first: Tensor, other: Tensor, *args: Any,
                       ) -> tuple[Tensor, Tensor]:
    b = valid.shape[0]
    return g_new.new_empty(b, *g_new.shape), other.new_empty(b, *other.shape)  # (b, N, P), (b, N, N) | (b, M, N)


@graph_op("continuous_fit_matrices", fake=_fit_matrices_fake)
def fit_matrices(valid: Tensor, has: Tensor, g_new: Tensor, first: Tensor, other: Tensor, num_past: int,
                 cache_uid: int, n_basis: int, widths: list[float], ridge: float, tau: float, pad: bool,
                 linear: bool) -> tuple[Tensor, Tensor]:
    """Each sample's fit matrices for the update of a compiled step: ``(G_newᵀ (b, N, P), T (b, N, N)
    or G_past (b, M, N))``, fresh tensors.

    ``valid`` (b, P) the pending slots, ``has`` (b,) which samples have an LTM; ``g_new``, ``first``
    (N, P) and ``other`` (N, N) or (M, N) the one layout's cached matrices (:meth:`BasisCache.layout`).
    Every slot valid (the steady state): those, with a first fit's G for samples without LTM.
    Otherwise each sample's own layout, from the per-count matrices of the model's cache
    (``cache_uid``, :meth:`BasisCache.padded_fit`), as the eager update does. If no cache of these
    settings has that uid, solved here (:func:`.basis.batched_fit`, float64): a graph that inductor
    stored on disk may run in another process, where the uid names another cache or none. The
    choice reads ``valid`` on the host, which is why this is one operator that a compiled graph
    calls eagerly (:mod:`memory_plugins.graph_ops`). The matrices are constants of the loss: no
    gradient.
    """
    b, p = valid.shape
    if bool(valid.all()):
        return (torch.where(has[:, None, None], g_new, first),  # (b, N, P)
                other.expand(b, -1, -1).clone())  # (b, N, N) or (b, M, N)
    count, cache = valid.sum(dim=1), live_cache(cache_uid)  # (b,)
    if cache is not None and cache.key_of_settings() == BasisCache.key(n_basis, tuple(widths), ridge, tau, pad):
        fit_new, fit_other = cache.padded_fit(count, has, num_past, p, valid.device, g_new.dtype, linear)
    else:
        fit_new, fit_other = batched_fit(count, has, num_past, p, linear, n_basis, widths, ridge, tau, pad)  # float64
    return fit_new.to(g_new.dtype).contiguous(), fit_other.to(other.dtype).contiguous()  # (b, N, P), (b, ·, N)


@register_memory("continuous", ContinuousConfig)
class ContinuousMemory(nn.Module):
    """One layer's ∞-former memory (§3): parameters only, the state is passed in and out.

    Parameters: the gate (Conv1d e→e, kernel 3, Eq. 18), W_K and W_V (e → h·d, Eq. 8), the affine
    maps N → 1 for μ and σ² shared across heads (no bias, Eqs. 9–10) and W_O (h·d → e), zero at
    initialisation by default so a wrapped model starts as its base model.
    """

    uses_queries: ClassVar[bool] = True

    def __init__(self, config: ContinuousConfig, host: HostAttention, shared: nn.ModuleDict) -> None:
        super().__init__()
        self.config = config
        self.dims = dims = host.dims if isinstance(host, HostAttention) else host
        object.__setattr__(self, "host", host)  # not a submodule: the host layer belongs to the model
        e, h, d, n_basis = dims.embed_dim, dims.num_heads, dims.head_dim, config.n_basis
        self.gate = nn.Conv1d(e, e, kernel_size=3, padding=1)
        self.to_k = nn.Linear(e, h * d, bias=False)
        self.to_v = nn.Linear(e, h * d, bias=False)
        self.to_out = nn.Linear(h * d, e, bias=False)
        self.mu_map = nn.Linear(n_basis, 1, bias=False)
        self.sigma_map = nn.Linear(n_basis, 1, bias=False)
        if config.zero_init_output:
            nn.init.zeros_(self.to_out.weight)
        cache = get_cache(shared, n_basis, config.basis_widths, config.ridge_lambda, config.tau, config.pad_fit,
                          max_bytes=int(config.fit_cache_mib * 2**20))
        cache.check_stable(config.samples_per_update)  # a clear error now rather than an overflow later
        self.rng_stream = cache.next_stream()  # this layer's index among the cache's users: its sticky RNG stream
        object.__setattr__(self, "cache", cache)  # shared by all layers; registered once, in ``shared``

    cache: BasisCache

    # -- state ---------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        """An empty memory: zero coefficients, nothing pending, an empty STM, a uniform histogram."""
        cfg, b, e = self.config, batch_size, self.dims.embed_dim
        coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = {
            "coef": torch.zeros(b, cfg.n_basis, e, device=device, dtype=coef_dtype),  # (b, N, e)
            "has_ltm": torch.zeros(b, dtype=torch.bool, device=device),  # (b,)
            "pending": torch.zeros(b, 0, e, device=device, dtype=dtype),  # (b, 0, e)
            "pending_valid": torch.zeros(b, 0, dtype=torch.bool, device=device),  # (b, 0)
        }
        if cfg.sticky:
            state["hist"] = uniform_histogram(b, cfg.sticky_bins, device)  # (b, D)
        if self.random_sticky:
            state["rng"] = initial_rng(cfg.sticky_seed, self.rng_stream, b, device)  # (b, 2) seed, counter
        if cfg.stm_len:
            state["stm"] = torch.zeros(b, 0, e, device=device, dtype=dtype)  # (b, 0, e)
            state["stm_valid"] = torch.zeros(b, 0, dtype=torch.bool, device=device)  # (b, 0)
        return state

    def reset(self, state: MemoryState, mask: Tensor) -> MemoryState:
        """Empty the samples where ``mask`` (b,) is True; the others stay bit-identical."""
        mask = mask.to(torch.bool)  # (b,)
        keep = ~mask  # (b,)
        new = dict(state)
        new["coef"] = torch.where(mask[:, None, None], torch.zeros_like(state["coef"]), state["coef"])  # (b, N, e)
        new["has_ltm"] = state["has_ltm"] & keep  # (b,)
        new["pending"], new["pending_valid"] = fifo.reset(state["pending"], state["pending_valid"], mask)  # (b, P, e), (b, P)
        if "hist" in state:
            uniform = torch.full_like(state["hist"], 1.0 / state["hist"].shape[1])  # (b, D)
            new["hist"] = torch.where(mask[:, None], uniform, state["hist"])  # (b, D)
        if "rng" in state:  # a reset sample draws its stream again from the start, as a fresh one
            fresh = initial_rng(self.config.sticky_seed, self.rng_stream, mask.shape[0], mask.device)  # (b, 2)
            new["rng"] = torch.where(mask[:, None], fresh, state["rng"])  # (b, 2)
        if "stm" in state:
            new["stm"], new["stm_valid"] = fifo.reset(state["stm"], state["stm_valid"], mask)  # (b, S, e), (b, S)
        return new

    # -- the unbounded update (Eqs. 13–15, 18) ---------------------------------------------------------
    def gate_vectors(self, x: Tensor) -> Tensor:
        """X̃ = sigmoid(Conv1d(X)) ⊙ X over the pending vectors ``x`` (b, P, e) (Eq. 18); P may be 0."""
        w = self.gate.weight  # (e, e, 3) Conv1d(e → e, kernel 3, padding 1), applied along P as one matmul
        padded = F.pad(x.to(w.dtype), (0, 0, 1, 1))  # (b, P + 2, e)
        windows = padded.unfold(1, 3, 1) if x.shape[1] else padded[:, :0, :, None].expand(-1, -1, -1, 3)  # (b, P, e, 3) x_{t-1}, x_t, x_{t+1}
        g = F.linear(windows.flatten(2), w.flatten(1), self.gate.bias)  # (b, P, e), no transposed copies
        return torch.sigmoid(g) * x  # (b, P, e)

    def update(self, state: MemoryState) -> tuple[Tensor, Tensor]:
        """The LTM after taking in the pending vectors: ``(coef (b, N, e), has_ltm (b,))``.

        The result carries the gate's graph (the pending vectors themselves are detached). Samples
        with nothing valid pending keep their coefficients; a sample without LTM fits the new vectors
        alone over [0, 1]. Pending vectors are right-aligned: sample i's k_i valid ones are its last
        k_i slots, and the invalid slots before them are zero (what the gate's convolution sees at
        the border of an unpadded stream too).
        """
        refuse_sharded_step(self)  # FSDP2 on this backend alone: a clear error, not a DTensor mix-up
        coef, has = state["coef"], state["has_ltm"]  # (b, N, e), (b,)
        pending, valid = state["pending"], state["pending_valid"]  # (b, P, e), (b, P)
        b, p, _ = pending.shape
        if p == 0:  # nothing to take in; the gate still runs, on no vectors, so that its parameters take
            # part in the backward with zero gradient (DDP's default find_unused_parameters=False needs it)
            nothing = self.gate_vectors(pending).sum(dim=1, keepdim=True)  # (b, 1, e) exact zeros
            return coef + nothing.to(coef.dtype), has
        cfg, m = self.config, self.config.samples_per_update
        x_new = self.gate_vectors(pending)  # (b, P, e)
        with torch.autocast(device_type=coef.device.type, enabled=False):
            x_new = x_new.to(coef.dtype)  # (b, P, e)
            dev, dt = coef.device, coef.dtype
            if torch.compiler.is_compiling():  # one operator picks the fit: no graph break, CUDA graphs around it
                g_new, other = self.compiled_fit(valid, has, m, p, dev, dt)  # (b, N, P), (b, N, N) | (b, M, N)
            elif bool(valid.all()):  # one layout for the whole batch: shared matrices, no per-sample copies
                g_rows, other = self.cache.fit(m, p, dev, dt, not cfg.sticky)  # (P, N), (N, N) | (M, N)
                g_new = g_rows.T.expand(b, -1, -1)  # (b, N, P) stride 0 over b
                if bool(has.all()):  # the steady state: every sample has an LTM and takes in P vectors,
                    # so B_new = past + G_newᵀ X̃ is one fused op
                    past = self.past_share(state, coef, other)  # (b, N, e)
                    return torch.baddbmm(past, g_new, x_new), has  # (b, N, e)
                first = self.cache.regression(0, p, dev, dt).T  # (N, P) a first fit over [0, 1]
                g_new = torch.where(has[:, None, None], g_new, first)  # (b, N, P)
            else:  # padding or a reset left k_i < P valid: each sample's own layout, G per distinct k
                count = valid.sum(dim=1)  # (b,) valid vectors pending per sample
                g_new, other = self.cache.padded_fit(count, has, m, p, dev, dt, not cfg.sticky)  # (b, N, P), (b, ·, N)
            # every path computes B_new as the steady state's one op, so that a sample's result does not
            # depend on which path its batch took (a reset of another sample changes nothing in it)
            past = torch.where(has[:, None, None], self.past_share(state, coef, other),
                               torch.zeros((), device=dev, dtype=dt))  # (b, N, e)
            fitted = torch.baddbmm(past, g_new, x_new)  # (b, N, e)
            took = valid.any(dim=1)  # (b,) samples with a valid vector pending
            coef = torch.where(took[:, None, None], fitted, coef)  # (b, N, e)
        return coef, has | took

    def compiled_fit(self, valid: Tensor, has: Tensor, m: int, p: int, dev: torch.device,
                     dt: torch.dtype) -> tuple[Tensor, Tensor]:
        """The update's fit matrices under ``torch.compile``: ``(G_newᵀ (b, N, P), T (b, N, N) or G_past
        (b, M, N))`` per sample, from :func:`fit_matrices` (one opaque operator in the graph, no
        ``torch.cond``: see :mod:`memory_plugins.graph_ops`)."""
        cache, linear = self.cache, not self.config.sticky
        g_new, first, other = cache.layout(m, p, dev, dt, linear)  # (N, P), (N, P), (N, N) or (M, N)
        return fit_matrices(valid, has, g_new, first, other, m, cache.uid, cache.n_basis, list(cache.widths),
                            cache.ridge, cache.tau, cache.pad, linear)

    def past_share(self, state: MemoryState, coef: Tensor, other: Tensor) -> Tensor:
        """The old signal's share of the refit (b, N, e). ``other`` is what :meth:`BasisCache.fit` pairs
        with G_new: with linear spacing the transition T (N, N) or (b, N, N), and the share is T B (one
        N×N matrix); with sticky memories G_past (M, N) or (b, M, N), and the share is G_pastᵀ X_past
        with X_past = B ψ(t_m) sampled at the sticky locations (Eq. 14)."""
        cfg = self.config
        if not cfg.sticky:
            return other @ coef  # (b, N, e)
        loc = sample_locations(state["hist"], cfg.samples_per_update, cfg.sticky_sampling, rng=state.get("rng"))  # (b, M)
        centres, widths = self.cache.basis(coef.device)  # (N,), (N,)
        psi = basis_values(loc.to(coef.dtype), centres, widths)  # (b, M, N) ψ(t_m)
        x_past = psi @ coef  # (b, M, e) Eq. 14
        return other.transpose(-1, -2) @ x_past  # (b, N, e) G_pastᵀ X_past

    # -- read (Eqs. 8–12, 16, 20–21) -------------------------------------------------------------
    def read_ltm(self, coef: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attend over the LTM with the host's content queries ``q`` (b, h, n, d).

        Returns Z_LTM (b, n, e) (added to the attention output, Eq. 12), μ and σ² (b, h, n).
        """
        cfg = self.config
        b, h, n, d = q.shape
        centres, widths = self.cache.grid(coef.device)  # (C,), (W,) with N = C·W
        constants = self.cache.read_constants(d, coef.device, compute_dtype(q.dtype))  # keys (N + 1, D), ...
        z, mu, sigma2 = gaussian_read(q, coef, self.to_k.weight, self.to_v.weight, self.mu_map.weight,
                                      self.sigma_map.weight, centres, widths, cfg.sigma2_min, impl=cfg.read_impl,
                                      min_width=min(cfg.basis_widths), constants=constants)  # (b, h, n, d), (b, h, n), (b, h, n)
        out = self.to_out(z.transpose(1, 2).reshape(b, n, h * d).to(self.to_out.weight.dtype))  # (b, n, e) Z_LTM
        return out, mu, sigma2

    def step(self, state: MemoryState, x: Tensor, q: Tensor | None,
             valid: Tensor | None) -> tuple[MemoryRead, MemoryState]:
        """Update the LTM with the pending vectors, attend over it with the host's queries, then store
        this segment's valid vectors ``x`` (b, n, e) (in the STM, whose evicted vectors wait for the
        next update, or directly as the next pending set).

        Returns the LTM term as ``output``, the STM (if any) as ``kv_source``, the weighted KL as
        ``aux_loss`` and μ, σ² (b, h, n) in ``info`` for diagnostics.
        """
        cfg, dims = self.config, self.dims
        if q is None:
            raise ValueError(
                "the continuous memory needs the host layer's queries: the attention module must call "
                "memory_hook(x, q) with q = project_q(x) of shape (batch, heads, n, head_dim)"
            )
        b, h, n, d = q.shape
        if h != dims.num_heads or d != dims.head_dim:
            raise ValueError(f"continuous memory: queries of shape {tuple(q.shape)} do not match "
                             f"{dims.num_heads} heads of dim {dims.head_dim}")
        coef, has = self.update(state)  # (b, N, e), (b,)
        out, mu, sigma2 = self.read_ltm(coef, q)  # (b, n, e), (b, h, n), (b, h, n)
        read = MemoryRead(output=out, aux_loss=self.kl_loss(mu, sigma2, has, valid), info={"mu": mu, "sigma2": sigma2})
        if "stm" in state and state["stm"].shape[1] > 0:
            read.kv_source, read.kv_mask = state["stm"], state["stm_valid"]  # (b, S, e), (b, S)
        if cfg.detach:
            coef, x = coef.detach(), x.detach()
        new: MemoryState = {"coef": coef.to(state["coef"].dtype), "has_ltm": has}
        if cfg.stm_len:
            new["stm"], new["stm_valid"], new["pending"], new["pending_valid"] = fifo.push(
                state["stm"], state["stm_valid"], x.to(state["stm"].dtype), cfg.stm_len, valid
            )  # (b, S, e), (b, S), (b, P, e), (b, P)
        elif valid is None:
            new["pending"] = x.to(state["pending"].dtype)  # (b, n, e)
            new["pending_valid"] = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (b, n)
        else:
            new["pending"], new["pending_valid"] = fifo.compact(x.to(state["pending"].dtype), valid)  # (b, n, e), (b, n)
        if cfg.sticky:
            with torch.no_grad():
                new["hist"] = attention_histogram(mu, sigma2, cfg.sticky_bins, valid)  # (b, D)
        if "rng" in state:  # the samples that drew (took in vectors) move their counter on
            new["rng"] = advance_rng(state["rng"], state["pending_valid"].any(dim=1))  # (b, 2)
        return read, new

    def kl_loss(self, mu: Tensor, sigma2: Tensor, has: Tensor, valid: Tensor | None = None) -> Tensor | None:
        """λ_KL · KL(𝒩(μ, σ²) ‖ 𝒩(μ₀, σ₀²)) (Eqs. 20–21) over heads (``kl_reduction``: "paper" sums
        them, "mean" averages them), averaged over the (valid) queries and over the samples that have
        an LTM. Next to a per-token mean NLL, "paper" weighs λ_KL as Eq. 22 (NLL and KL both summed
        over tokens); "mean" is H times weaker (the authors' code). μ₀ = μ (no mean term) unless
        ``mu_prior`` is set.

        Training mode only (None in eval): it is a regulariser, and a loss tensor with a graph held
        by the controller after an eval forward would also make the wrapped model un-deep-copyable."""
        cfg = self.config
        if cfg.kl_weight == 0.0 or not self.training:
            return None
        b, h, n = sigma2.shape
        with torch.autocast(device_type=sigma2.device.type, enabled=False):  # float32 sums, whatever the host
            ratio = sigma2 * (1.0 / cfg.sigma_0**2)  # (b, h, n)
            t = ratio - torch.log(ratio)  # (b, h, n) 2·KL + 1 per head and query
            if cfg.mu_prior is not None:
                t = t + (mu - cfg.mu_prior) ** 2 * (1.0 / cfg.sigma_0**2)  # (b, h, n)
            # a query's KL is c·(Σ_h t − h)/2, c = 1 ("paper") or 1/h ("mean"); λ_KL·c/2 is folded in here, once
            scale = cfg.kl_weight * (1.0 if cfg.kl_reduction == "paper" else 1.0 / h) / 2.0
            if valid is None:
                per_sample = t.sum(dim=(1, 2)).mul(scale / n).sub_(scale * h)  # (b,) λ_KL · mean KL over queries
            else:  # padded queries are not part of the stream (selected, not multiplied: a NaN there stays out)
                count = valid.sum(dim=-1).to(t.dtype)  # (b,)
                total = torch.where(valid[:, None, :], t, 0.0).sum(dim=(1, 2))  # (b,) Σ_valid Σ_h t
                per_sample = torch.add(total, count, alpha=-h).mul_(scale) / count.clamp_min(1.0)  # (b,)
            weight = has.to(per_sample.dtype)  # (b,)
            return torch.dot(per_sample, weight) / weight.sum().clamp_min(1.0)

    @property
    def random_sticky(self) -> bool:
        """Whether the state holds the sticky sampler's generator (``sticky_sampling="random"``)."""
        return self.config.sticky and self.config.sticky_sampling == "random"

    optional_state_keys: ClassVar[tuple[str, ...]] = ("rng",)  # absent from states saved before 0.3: fresh

    def check_state(self, state: MemoryState) -> str | None:
        """Why a restored state cannot be this memory's (None if it can)."""
        if "rng" in state and bool(((state["rng"] < 0) | (state["rng"] > 0xFFFFFFFF)).any()):
            return "rng (sticky sampler seed, counter) must hold values in [0, 2**32 - 1]"
        pairs = [("pending", "pending_valid", None)] + ([("stm", "stm_valid", self.config.stm_len)] if self.config.stm_len else [])
        for vec, val, cap in pairs:
            if state[vec].shape[1] != state[val].shape[1] or (cap is not None and state[vec].shape[1] > cap):
                return f"{vec} holds {state[vec].shape[1]} slots and {val} {state[val].shape[1]}" + (
                    f"; both must be ≤ {cap}" if cap is not None else "; they must match")
        return None

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"n_basis={cfg.n_basis}, tau={cfg.tau}, samples={cfg.samples_per_update}, sticky={cfg.sticky}, "
                f"stm_len={cfg.stm_len}")
