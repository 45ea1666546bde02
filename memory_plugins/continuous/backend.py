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

Timing: a deferred update. The controller calls ``read(state, x, q)`` and then ``write(state, x, …)``
in the same attention call. The LTM update (gate, Eq. 18; contraction and refit, Eqs. 13–15; sticky
sampling with the *previous* read's histogram, Eqs. 16–17) runs at the start of ``read`` on the
vectors left pending by the previous ``write``, and the read then attends over the updated signal
(Eqs. 8–12). ``write`` only commits the updated coefficients (detached), stores this segment's
vectors (or what they evict from the STM) as the new pending set, and keeps this read's histogram.
Why: the gate's parameters then sit in the graph of the read that uses the update, so the task loss
trains them, while every state tensor stays detached (no past segment's graph is kept alive).
It reproduces the paper's timing exactly:

* ``stm_len = 0``: at segment s the LTM holds segments 0 … s−1 (everything before the current
  segment; segment s−1 was pending and enters at the start of read s). A read never sees its own
  segment.
* ``stm_len > 0``: the STM holds the last S vectors before segment s (the host attends over them
  with its own K/V, returned as ``kv_source``); the vectors the FIFO evicted at write s−1 enter the
  LTM at read s, exactly once. With S = n: STM = segment s−1, LTM = segments 0 … s−2.

The first update after a reset fits the new vectors alone over [0, 1]; later ones sample the old
signal at M locations (linear, or from the histogram), place them cell-centred in [0, τ], place the
P new vectors cell-centred in (τ, 1], and refit with the cached G (see :mod:`.basis`).
Inside ``memory_frozen()`` nothing is committed, so every read re-applies the same pending update:
it sees everything written so far. A ``write`` without a read applies the update itself (and, with
sticky memories, stores a uniform histogram: that step's memory received no attention).

Cost per segment and layer, whatever the number of tokens seen: the read O(b·h·n·N·d + b·N·e·h·d),
the update O(b·(P + M)·N·e) with sticky memories or O(b·(N + P)·N·e) with linear spacing (then the
old coefficients' share is one cached N×N matrix, B_new = T B_old + G_newᵀ X_new), the histogram
O(b·h·n·D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..interface import AttentionDims, HostAttention, MemoryRead, MemoryState
from ..xl.backend import fifo_push, fifo_reset
from .basis import BasisCache, basis_values, expected_basis_grid, get_cache
from .config import ContinuousConfig
from .sticky import attention_histogram, sample_locations, uniform_histogram


def stretch_valid(x: Tensor, valid: Tensor) -> Tensor:
    """Spread each sample's valid vectors over all P slots, keeping their order: (b, P, e).

    A sample with k of P valid vectors (only after a reset, when the STM's emptied slots are evicted
    in a chunk that also holds real vectors) gets slot j ← its ⌊j·k/P⌋-th valid vector, so its k
    vectors still fill (τ, 1] evenly and one G per P serves the whole batch without a per-sample
    solve. Identity when all P are valid; k = 0 is handled by the caller (no update).
    """
    b, p, e = x.shape
    k = valid.sum(dim=1)  # (b,)
    order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)  # (b, P) invalid first, then valid in order
    slot = torch.arange(p, device=x.device)  # (P,)
    src = ((p - k)[:, None] + (slot[None, :] * k[:, None]) // p).clamp(max=p - 1)  # (b, P)
    idx = order.gather(1, src)  # (b, P)
    return x.gather(1, idx[..., None].expand(b, p, e))  # (b, P, e)


class ContinuousMemory(nn.Module):
    """One layer's ∞-former memory (§3): parameters only, the state is passed in and out.

    Parameters: the gate (Conv1d e→e, kernel 3, Eq. 18), W_K and W_V (e → h·d, Eq. 8), the affine
    maps N → 1 for μ and σ² shared across heads (no bias, Eqs. 9–10) and W_O (h·d → e), zero at
    initialisation by default so a wrapped model starts as its base model.
    """

    def __init__(self, config: ContinuousConfig, dims: AttentionDims, shared: nn.ModuleDict) -> None:
        super().__init__()
        self.config = config
        self.dims = dims
        e, h, d, n_basis = dims.embed_dim, dims.num_heads, dims.head_dim, config.n_basis
        self.gate = nn.Conv1d(e, e, kernel_size=3, padding=1)
        self.to_k = nn.Linear(e, h * d, bias=False)
        self.to_v = nn.Linear(e, h * d, bias=False)
        self.to_out = nn.Linear(h * d, e, bias=False)
        self.mu_map = nn.Linear(n_basis, 1, bias=False)
        self.sigma_map = nn.Linear(n_basis, 1, bias=False)
        if config.zero_init_output:
            nn.init.zeros_(self.to_out.weight)
        cache = get_cache(shared, n_basis, config.basis_widths, config.ridge_lambda, config.tau, config.pad_fit)
        cache.check_stable(config.num_samples)  # a clear error now rather than an overflow later
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
        new["pending"] = torch.where(mask[:, None, None], torch.zeros_like(state["pending"]), state["pending"])  # (b, P, e)
        new["pending_valid"] = state["pending_valid"] & keep[:, None]  # (b, P)
        if "hist" in state:
            uniform = torch.full_like(state["hist"], 1.0 / state["hist"].shape[1])  # (b, D)
            new["hist"] = torch.where(mask[:, None], uniform, state["hist"])  # (b, D)
        if "stm" in state:
            new["stm"], new["stm_valid"] = fifo_reset(state["stm"], state["stm_valid"], mask)  # (b, S, e), (b, S)
        return new

    # -- the unbounded update (Eqs. 13–15, 18) ---------------------------------------------------------
    def gate_vectors(self, x: Tensor) -> Tensor:
        """X̃ = sigmoid(Conv1d(X)) ⊙ X over the pending vectors ``x`` (b, P, e) (Eq. 18)."""
        g = self.gate(x.transpose(1, 2).to(self.gate.weight.dtype)).transpose(1, 2)  # (b, P, e)
        return torch.sigmoid(g) * x  # (b, P, e)

    def update(self, state: MemoryState) -> tuple[Tensor, Tensor]:
        """The LTM after taking in the pending vectors: ``(coef (b, N, e), has_ltm (b,))``.

        The result carries the gate's graph (the pending vectors themselves are detached). Samples
        with nothing valid pending keep their coefficients; a sample without LTM fits the new vectors
        alone over [0, 1].
        """
        coef, has = state["coef"], state["has_ltm"]  # (b, N, e), (b,)
        pending, valid = state["pending"], state["pending_valid"]  # (b, P, e), (b, P)
        p = pending.shape[1]
        if p == 0:
            return coef, has
        cfg, m = self.config, self.config.num_samples
        x_new = stretch_valid(self.gate_vectors(pending), valid)  # (b, P, e)
        count = valid.sum(dim=1)  # (b,)
        with torch.autocast(device_type=coef.device.type, enabled=False):
            x_new = x_new.to(coef.dtype)  # (b, P, e)
            g = self.cache.regression(m, p, coef.device, coef.dtype)  # (M + P, N)
            g_first = self.cache.regression(0, p, coef.device, coef.dtype)  # (P, N)
            g_new = torch.where(has[:, None, None], g[m:], g_first)  # (b, P, N)
            fitted = g_new.transpose(1, 2) @ x_new  # (b, N, e) the new vectors' share
            if cfg.sticky:
                loc = sample_locations(state["hist"], m, cfg.sticky_sampling)  # (b, M) in [0, 1]
                centres, widths = self.cache.basis(coef.device)  # (N,), (N,)
                psi = basis_values(loc.to(coef.dtype), centres, widths)  # (b, M, N) ψ(t_m)
                x_past = psi @ coef  # (b, M, e) Eq. 14
                past = g[:m].T @ x_past  # (b, N, e)
            else:
                past = self.cache.transition(m, p, coef.device, coef.dtype) @ coef  # (b, N, e)
            fitted = fitted + torch.where(has[:, None, None], past, torch.zeros_like(past))  # (b, N, e)
            coef = torch.where((count > 0)[:, None, None], fitted, coef)  # (b, N, e)
        return coef, has | (count > 0)

    # -- read (Eqs. 8–12, 16, 20–21) -------------------------------------------------------------
    def read(self, state: MemoryState, x: Tensor, q: Tensor | None) -> MemoryRead:
        """Update the LTM with the pending vectors, then attend over it with the host's queries.

        ``q`` (b, h, n, d): the layer's content queries. Returns the LTM term Z_LTM (b, n, e) as
        ``output``, the STM (if any) as ``kv_source``, the weighted KL as ``aux_loss`` and, in
        ``info``, the updated LTM for :meth:`write` plus μ, σ² (b, h, n) for diagnostics.
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
        centres, widths = self.cache.grid(coef.device)  # (C,), (W,) with N = C·W
        with torch.autocast(device_type=q.device.type, enabled=False):
            # μ, σ² logits: w·(K_h q/√d) = q·(K_hᵀ w)/√d with K_hᵀ w = W_K,hᵀ (Bᵀ w): no (b, h, n, N) scores.
            maps = torch.cat([self.mu_map.weight, self.sigma_map.weight]).float()  # (2, N)
            bw = torch.einsum("kN,bNe->bke", maps, coef.float())  # (b, 2, e)
            kw = F.linear(bw, self.to_k.weight.float()).view(b, 2, h, d)  # (b, 2, h, d)
            logits = torch.einsum("bhnd,bkhd->kbhn", q.float(), kw) / math.sqrt(d)  # (2, b, h, n)
            mu = torch.sigmoid(logits[0])  # (b, h, n) Eq. 9
            sigma2 = F.softplus(logits[1]).clamp_min(cfg.sigma2_min)  # (b, h, n) Eq. 10
            e_psi = expected_basis_grid(mu, sigma2, centres, widths)  # (b, h, n, N) E_p[ψ], Eq. 11
        v = self.to_v(coef.to(self.to_v.weight.dtype)).view(b, -1, h, d).transpose(1, 2)  # (b, h, N, d)
        z = torch.matmul(e_psi.to(v.dtype), v)  # (b, h, n, d) z_{h,i} = V_hᵀ E_p[ψ]
        out = self.to_out(z.transpose(1, 2).reshape(b, n, h * d))  # (b, n, e) Z_LTM, added to Z_T (Eq. 12)
        info = {"ltm_coef": coef, "ltm_has": has, "mu": mu, "sigma2": sigma2}
        if cfg.sticky:
            with torch.no_grad():
                info["ltm_hist"] = attention_histogram(mu, sigma2, cfg.sticky_bins)  # (b, D)
        read = MemoryRead(output=out, aux_loss=self.kl_loss(mu, sigma2, has), info=info)
        if "stm" in state and state["stm"].shape[1] > 0:
            read.kv_source, read.kv_mask = state["stm"], state["stm_valid"]  # (b, S, e), (b, S)
        return read

    def kl_loss(self, mu: Tensor, sigma2: Tensor, has: Tensor) -> Tensor | None:
        """λ_KL · KL(𝒩(μ, σ²) ‖ 𝒩(μ₀, σ₀²)) (Eqs. 20–21), summed over heads, averaged over queries and
        over the samples that have an LTM (so the weight means the same as the paper's, whose NLL and
        KL are both summed over tokens). μ₀ = μ (no mean term) unless ``mu_prior`` is set.

        Training mode only (None in eval): it is a regulariser, and a loss tensor with a graph held
        by the controller after an eval forward would also make the wrapped model un-deep-copyable."""
        cfg = self.config
        if cfg.kl_weight == 0.0 or not self.training:
            return None
        ratio = sigma2 / cfg.sigma_0**2  # (b, h, n)
        kl = 0.5 * (ratio - torch.log(ratio) - 1.0)  # (b, h, n)
        if cfg.mu_prior is not None:
            kl = kl + 0.5 * (mu - cfg.mu_prior) ** 2 / cfg.sigma_0**2  # (b, h, n)
        per_sample = kl.sum(dim=1).mean(dim=-1)  # (b,)
        weight = has.to(per_sample.dtype)  # (b,)
        return cfg.kl_weight * (per_sample * weight).sum() / weight.sum().clamp_min(1.0)

    # -- write --------------------------------------------------------------------------------------
    def write(
        self, state: MemoryState, x: Tensor, host: HostAttention | None, read: MemoryRead | None
    ) -> tuple[MemoryState, Tensor | None]:
        """Commit the LTM updated by ``read`` and queue this segment's vectors ``x`` (b, n, e).

        With an STM, ``x`` enters the FIFO and what it evicts is queued for the LTM; without, ``x``
        itself is queued. Nothing heavy happens here (see the module docstring for why).
        """
        cfg = self.config
        info = read.info if read is not None else {}
        if "ltm_coef" in info:
            coef, has = info["ltm_coef"], info["ltm_has"]  # (b, N, e), (b,)
        else:
            coef, has = self.update(state)
        if cfg.detach:
            coef, x = coef.detach(), x.detach()
        new: MemoryState = {"coef": coef.to(state["coef"].dtype), "has_ltm": has}
        if cfg.stm_len:
            stm, stm_valid, evicted, evicted_valid = fifo_push(
                state["stm"], state["stm_valid"], x.to(state["stm"].dtype), cfg.stm_len
            )  # (b, S, e), (b, S), (b, P, e), (b, P)
            new["pending"], new["pending_valid"] = evicted, evicted_valid
            new["stm"], new["stm_valid"] = stm, stm_valid
        else:
            new["pending"] = x.to(state["pending"].dtype)  # (b, n, e)
            new["pending_valid"] = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (b, n)
        if cfg.sticky:
            hist = info.get("ltm_hist")
            new["hist"] = hist if hist is not None else uniform_histogram(x.shape[0], cfg.sticky_bins, x.device)
        return new, None

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"n_basis={cfg.n_basis}, tau={cfg.tau}, samples={cfg.num_samples}, sticky={cfg.sticky}, "
                f"stm_len={cfg.stm_len}")
