"""Configuration of the ∞-former's continuous long-term memory (Martins et al., 2022, §3)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..config import NOT_STATE, MemoryConfig, check_bool, check_choice, check_float, check_int


@dataclass
class ContinuousConfig(MemoryConfig):
    """∞-former long-term memory: past vectors as a signal B^T ψ(t) on [0, 1] with ``n_basis`` RBFs.

    Every layer keeps per sample N×e coefficients ``B``, whatever the number of tokens seen; a read
    attends over the signal with one Gaussian density per head and query, and adds the result to the
    attention output (Eq. 12). Options (paper values in brackets):

    * ``n_basis`` N [sorting 1024, WikiText 150, GPT-2 512] and ``basis_widths``: N/len(widths) centres
      evenly spaced in [0, 1], each paired with every width [(0.01, 0.05); GPT-2 (0.005, 0.01)].
    * ``ridge_lambda`` λ [authors' code: 1.0 and 0.5] and ``pad_fit``: the ridge penalty of the fit
      (Eq. 5) and whether the fit also asks for zeros outside [0, 1] (on [-0.5, 0) and (1, 1.5], at
      the fit's density, each zero weighing α = 1/4 of a real vector; the authors' code pads with
      α = 1). Why pad: a read integrates the signal over the real line, and unpadded the signal just
      outside [0, 1] is an unconstrained extrapolation: a read near an edge or with a wide σ then
      weighs the fitted vectors up to 17× more (L1 norm) than an ideal read of the same density at
      N = 512 (2.8–3.0× at N = 64); with the default padding ≤ 1.01× (≤ 1.10× at N = 64). It costs
      reconstruction error at the edges of a fresh fit (AR(1) vectors, ρ = 0.9, N = n = 512:
      first/last 5% 0.294 → 0.308, whole fit 0.295 → 0.297; recall after 9 updates 0.619 → 0.621
      for the last two segments, older ones unchanged to 3 digits); α = 1 costs more (0.317), a
      smaller α lets the edge amplification back in (1.15–1.17× at N = 64 for α = 1/10). λ = 0.5 beats 1.0 on every reconstruction figure, padded or not. Tables
      and the rerun command: docs/continuous.md (``benchmarks/continuous_fit.py``); the tests
      ``test_default_fit_is_the_measured_choice`` and ``tests/test_continuous_fit.py`` check them.
    * ``tau`` [0.75 sorting; 0.5 LM]: the old signal is contracted into [0, τ] on every update, the
      new vectors fill (τ, 1].
    * ``n_samples`` M: how many points of the old signal are re-fitted per update (None: M = N).
      Settings whose update would amplify old content (widths much narrower than the centre
      spacing, e.g. N = 16 with (0.01, 0.05), or M well below the number of centres) are refused
      when the memory is built, with the measured growth factor in the message.
    * ``sticky``, ``sticky_bins`` D, ``sticky_sampling``: sticky memories (§3.3) draw the M points
      from the attention histogram of the previous read instead of spacing them evenly (off by
      default, as the paper's main model; the sticky variant scored slightly better on WikiText).
      ``"quantile"`` inverts the histogram's CDF at M evenly spaced quantiles (deterministic),
      ``"random"`` at M sorted uniform draws. Those come from a per-sample counter-based generator
      held in the memory state (``rng``: seed and counter per sample), so saving and restoring a
      stream is bit-exact and two runs from one state draw the same; ``sticky_seed`` (an int in
      [0, 2³²)) seeds it: sample i of layer l starts from hash(sticky_seed, l, i), and a reset sample
      starts its stream again.
    * ``stm_len``: 0 (default) = LTM only, every segment enters the LTM after its own read (the
      paper's GPT-2 setup; with ``zero_init_output`` a wrapped model then starts as the identity).
      > 0 = the full ∞-former: a Transformer-XL short-term memory of ``stm_len`` vectors, whose
      evicted vectors enter the LTM exactly once (paper: sorting 1024, WikiText 150).
    * ``kl_weight`` λ_KL [1e-5; GPT-2 1e-6], ``sigma_0`` σ₀ [0.05; WikiText 0.1], ``mu_prior``:
      KL(N(μ, σ²) ‖ N(μ₀, σ₀²)) regulariser (Eqs. 20–21); ``mu_prior=None`` sets μ₀ = μ (the paper).
      Reported per layer as the read's aux loss in training mode, averaged over queries and over the
      samples that have an LTM; ``kl_reduction`` says what happens over the H heads: ``"paper"``
      (default) sums them, so that next to a per-token mean NLL λ_KL weighs as in the paper's Eq. 22
      (NLL and KL both summed over tokens); ``"mean"`` averages them, H times weaker (the authors'
      code averages over batch, heads and queries).
    * ``sigma2_min``: lower clamp of σ² (keeps log σ² and the histogram's erf finite).
    * ``zero_init_output``: W_O starts at zero, so the memory adds nothing until trained.
    * ``read_impl``: ``"sdpa"`` computes the Gaussian read as one fused attention over the N basis
      keys (never materialising the (b, h, n, N) densities, :mod:`.read`); ``"dense"`` materialises
      them (the reference; same values within float32 rounding); ``"triton"`` runs the read's own
      kernels (:mod:`.kernel`: one launch forward, two backward, exact float32 exponents) on CUDA
      devices where the ``triton`` package imports, and reads through SDPA elsewhere (CPU, float64).
    * ``fit_cache_mib``: the most memory (MiB, on the model's device) that the fit matrices G and T
      kept for reuse may take. Padding gives every count of valid vectors its own layout and
      matrices (a document's last segment; about 2 MiB each at N = 512, n = 1,024); without a bound
      a padded stream would keep adding them. Least recently used first out; an evicted layout is
      solved again when it recurs (one float64 solve on the model's device; on one CPU thread about
      0.1 s at N = 512). Not part of the state: changing it keeps states loadable.
    """

    name: ClassVar[str] = "continuous"
    SAMPLINGS: ClassVar[tuple[str, ...]] = ("quantile", "random")
    KL_REDUCTIONS: ClassVar[tuple[str, ...]] = ("paper", "mean")

    n_basis: int = 512
    basis_widths: tuple[float, ...] = (0.01, 0.05)
    ridge_lambda: float = 0.5
    pad_fit: bool = True
    tau: float = 0.75
    n_samples: int | None = None
    sticky: bool = False
    sticky_bins: int = 128
    sticky_sampling: str = "quantile"
    sticky_seed: int = field(default=0, metadata={"fingerprint_if_set": True})  # new in 0.3: old states load
    stm_len: int = 0
    kl_weight: float = field(default=1e-5, metadata=NOT_STATE)
    kl_reduction: str = field(default="paper", metadata=NOT_STATE)
    sigma_0: float = field(default=0.05, metadata=NOT_STATE)
    sigma2_min: float = 1e-6  # (moves μ, σ², so the sticky histogram)
    mu_prior: float | None = field(default=None, metadata=NOT_STATE)
    zero_init_output: bool = field(default=True, metadata=NOT_STATE)
    read_impl: str = field(default="sdpa", metadata=NOT_STATE)
    fit_cache_mib: float = field(default=256.0, metadata={"fingerprint": False})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n_basis", 1)
        widths = self.basis_widths
        if isinstance(widths, (int, float)) and not isinstance(widths, bool):
            widths = (widths,)
        if not isinstance(widths, (tuple, list)) or len(widths) == 0 or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in widths
        ):
            raise ValueError(
                f"ContinuousConfig.basis_widths must be a non-empty tuple of floats > 0, got {self.basis_widths!r}"
            )
        self.basis_widths = tuple(float(w) for w in widths)
        if self.n_basis % len(self.basis_widths):
            raise ValueError(
                f"ContinuousConfig.n_basis must be a multiple of len(basis_widths)={len(self.basis_widths)} "
                f"(each centre is paired with every width), got n_basis={self.n_basis}"
            )
        check_float(self, "ridge_lambda", 0.0, low_open=True)
        check_bool(self, "pad_fit")
        check_float(self, "tau", 0.0, 1.0, low_open=True, high_open=True)
        if self.n_samples is not None:
            check_int(self, "n_samples", 1)
        check_bool(self, "sticky")
        check_int(self, "sticky_bins", 1)
        check_choice(self, "sticky_sampling", self.SAMPLINGS)
        check_int(self, "sticky_seed", 0, 2**32 - 1)
        check_int(self, "stm_len", 0)
        check_float(self, "kl_weight", 0.0)
        check_choice(self, "kl_reduction", self.KL_REDUCTIONS)
        check_float(self, "sigma_0", 0.0, low_open=True)
        check_float(self, "sigma2_min", 0.0, low_open=True)
        if self.mu_prior is not None:
            check_float(self, "mu_prior", 0.0, 1.0)
        check_bool(self, "zero_init_output")
        check_choice(self, "read_impl", ("sdpa", "dense", "triton"))
        check_float(self, "fit_cache_mib", 0.0, low_open=True)

    @property
    def samples_per_update(self) -> int:
        """M: points of the old signal re-fitted per update (``n_samples``, or N when None)."""
        return self.n_samples if self.n_samples is not None else self.n_basis

    num_samples = samples_per_update  # name of 0.1, easily confused with the option n_samples
