"""Why does (or doesn't) a trained ∞-former use its long-term memory on the sorting task?

    python -m examples.sorting.diagnose runs/sorting/cpu/continuous_T1024 runs/sorting/cpu/continuous_sticky_T1024

For each finished continuous run of ``examples/sorting/benchmark.py`` (its ``model.pt``), on the first
``--n`` test sequences:

1. LTM ablation: token accuracy as trained, and with every layer's LTM term Z_LTM set to zero at test
   time (the short-term memory stays). If the LTM carries information, accuracy drops.
2. Where the ranking queries look: the mass of their Gaussians 𝒩(μ, σ²) over [0, 1] (the LTM's time
   axis: older is further left), summed over heads and layers, in 10 bins; and the median σ.
3. Reconstruction error of the signal by age (linear sampling only, where a vector's position is known
   exactly: a chunk that entered k updates ago sits in (τ^{k+1}, τ^k]): ‖ψ(t)ᵀB − x̃‖ / ‖x̃‖ for the
   gated vectors x̃ that entered the LTM, and the same for the chunk's mean vector (what counting
   needs: the basis keeps a chunk's average, not every token).

Prints a table per run and writes ``diagnose.json`` beside the run's ``result.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memory_plugins.continuous.basis import basis_values

from .benchmark import PRESETS, build, run_segments
from .task import NUM_SYMBOLS, generate, score


def diagnose(run: Path, n: int) -> dict:
    result = json.loads((run / "result.json").read_text())
    preset, memory, length = PRESETS[result["preset"]], result["memory"], result["length"]
    if result["memory_kind"] != "continuous":
        raise ValueError(f"diagnose: {run} is a {result['memory_kind']!r} run; only continuous runs are diagnosed")
    model = build(preset, memory, length)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    model.eval()
    data = generate(preset.n_test, length, seed=30_000 + length)
    data.tokens, data.counts = data.tokens[:n], data.counts[:n]
    target = data.tokens[:, -NUM_SYMBOLS:]  # (B, S)
    backends = list(model.memory.backends)
    tau = backends[0].config.tau

    # 1. LTM ablation ---------------------------------------------------------------------------
    def accuracy() -> float:
        out = run_segments(model, memory, data, preset.segment, train=False)
        return score(out.predictions[:, -NUM_SYMBOLS:], target).accuracy

    as_trained = accuracy()
    hooks = [b.to_out.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out)) for b in backends]
    ablated = accuracy()
    for h in hooks:
        h.remove()

    # 2. and 3.: record every read's μ, σ² and every update's entering vectors and new coefficients
    reads: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in backends]
    updates: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in backends]
    for i, b in enumerate(backends):
        def step(state, x, q, valid, _orig=b.step, _i=i):
            r, new = _orig(state, x, q, valid)
            reads[_i].append((r.info["mu"], r.info["sigma2"]))  # (B, h, n) each
            return r, new

        def update(state, _orig=b.update, _b=b, _i=i):
            coef, has = _orig(state)
            if state["pending"].shape[1]:
                x = _b.gate_vectors(state["pending"])  # (B, P, e) what entered, before the fit
                updates[_i].append((x, state["pending_valid"], state["has_ltm"], coef))
            return coef, has

        b.step, b.update = step, update  # instance attributes shadow the methods for this run only
    accuracy()

    edges = torch.linspace(0, 1, 11)  # (11,)
    mass = torch.zeros(10)  # (10,)
    sigmas = []
    for layer in reads:
        mu, s2 = (t[..., -NUM_SYMBOLS:].double() for t in layer[-1])  # (B, h, S): the ranking queries
        sd = s2.sqrt()[..., None]  # (B, h, S, 1)
        cdf = 0.5 * (1 + torch.erf((edges.double() - mu[..., None]) / (sd * 2**0.5)))  # (B, h, S, 11)
        mass += (cdf[..., 1:] - cdf[..., :-1]).sum(dim=(0, 1, 2)).float()  # (10,)
        sigmas.append(sd.flatten())
    mass = mass / mass.sum()
    sigma_median = float(torch.cat(sigmas).median())

    recon: dict[int, list[float]] = {}
    recon_mean_of_chunk: dict[int, list[float]] = {}  # what counting needs: the chunk's average
    if not backends[0].config.sticky:
        for b, layer in zip(backends, updates):
            centres, widths = b.cache.basis(torch.device("cpu"))  # (N,), (N,)
            coef = layer[-1][3]  # (B, N, e) the signal the last read attended to
            for k, (x, valid, has, _) in enumerate(reversed(layer)):  # k = updates since it entered
                if not bool(valid.all()) or not bool(has.all()):
                    continue  # partial or first chunks: positions differ (each sample's own layout)
                p = x.shape[1]
                t = tau + (1 - tau) * (torch.arange(p, dtype=torch.float64) + 0.5) / p  # (P,)
                t = t * tau**k  # (P,) contracted once per later update
                fit = basis_values(t, centres.double(), widths.double()).float() @ coef  # (B, P, e)
                err = (fit - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)  # (B, P) per vector
                mean_err = (fit - x).mean(1).norm(dim=-1) / x.mean(1).norm(dim=-1).clamp_min(1e-12)  # (B,) chunk mean
                recon.setdefault(k, []).append(float(err.mean()))
                recon_mean_of_chunk.setdefault(k, []).append(float(mean_err.mean()))
    recon_mean = {k: sum(v) / len(v) for k, v in sorted(recon.items())}
    chunk_mean = {k: sum(v) / len(v) for k, v in sorted(recon_mean_of_chunk.items())}
    return {"run": str(run), "memory": memory, "length": length, "n": n, "accuracy": as_trained,
            "accuracy_ltm_ablated": ablated, "mu_mass_by_decile": mass.tolist(), "sigma_median": sigma_median,
            "recon_error_by_age": recon_mean, "chunk_mean_error_by_age": chunk_mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=200, help="test sequences")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for run in args.runs:
        d = diagnose(run, args.n)
        (run / "diagnose.json").write_text(json.dumps(d, indent=1))
        print(f"\n{run}: accuracy {100 * d['accuracy']:.1f}%, LTM ablated {100 * d['accuracy_ltm_ablated']:.1f}%")
        print("ranking queries' attention mass over the LTM's [0, 1] (old → new): "
              + " ".join(f"{100 * m:.0f}" for m in d["mu_mass_by_decile"]) + f" %; median σ {d['sigma_median']:.3f}")
        if d["recon_error_by_age"]:
            print("relative reconstruction error by age (updates), per vector: "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in d["recon_error_by_age"].items()))
            print("                                       of the chunk's mean: "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in d["chunk_mean_error_by_age"].items()))


if __name__ == "__main__":
    main()
