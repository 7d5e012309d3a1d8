"""Sampler accuracy against denoiser calls (NFE) on an analytic Gaussian mixture, every sampler x schedule.

The data: a 2-D mixture of 4 anisotropic Gaussians (weights 0.1..0.4, means 2.8..4.5 apart, stds 0.24..0.71),
whose denoiser is exact (trainer/diffusion/analytic.py), so the only error is the sampler's. Schedules: 'edm'
(80 -> sigma_min, rho 7, then 0), 'ays' (the SVD table, EDM-preconditioned, which starts at 700 and ends in its own
levels, so it has no sigma_min), 'ays_gaussian' (AYS's Gaussian optimum with c = the data's overall std, 80 ->
sigma_min, then 0) and 'logsnr' (uniform in log sigma, 80 -> sigma_min, then 0), each schedule that takes one at
every --sigma-min (default 0.002; a row is labelled schedule/sigma_min). Every schedule ends in 0: the last step is
the denoiser's output at the schedule's sigma_min, and the error is always measured there, at sigma = 0.

Deterministic samplers: error = mean over 256 fixed starting noises of |x_sampler - x_ref| (Euclidean), x_ref the
probability-flow solution from the same noise (RK4 in log sigma, 1500 steps, to sigma = 1e-5, then D; its own
error is printed), one per starting level (80; AYS's 700), shared by every row that starts there whatever its
sigma_min. Stochastic samplers (10..100 NFE): sliced W2 (256 directions) between 4000 samples and 4000
exact mixture samples, and the total-variation error of the component weights (each sample assigned to its most
probable component; the targets are the assigned fractions of 2e5 exact samples, so overlap between components
cancels), each with its Monte-Carlo floor (an exact set of the same size). Target: the smallest NFE from which
DPM-Solver++(2M), (3M) and UniPC stay at or below the reference error, Euler's at 200 NFE on the EDM schedule with
sigma_min 0.002 (fixed: the same threshold for every schedule and --sigma-min), <= 20 NFE each and <= 10 for the
best, per schedule; the summary also lists every sampler x schedule reaching it within 20 and within 10 NFE.
The multistep samplers run without lower_order_final (their default); --lower-order-final takes a first-order last
step into sigma > 0 below 15 steps (it changes only those rows).

    .venv/bin/python bench/samplers.py --out bench/results/samplers --sigma-min 0.002 0.02
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # `python bench/samplers.py` from anywhere

import torch

from trainer.diffusion import analytic
from trainer.diffusion.samplers import SAMPLERS, STOCHASTIC, nfe
from trainer.diffusion.schedules import get_sigmas

F64 = torch.float64
WEIGHTS = [0.1, 0.2, 0.3, 0.4]
MUS = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.0]], dtype=F64)
COVS = torch.tensor([[[0.30, 0.10], [0.10, 0.10]], [[0.06, -0.02], [-0.02, 0.25]],
                     [[0.50, 0.00], [0.00, 0.08]], [[0.20, 0.15], [0.15, 0.30]]], dtype=F64)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0   # SIGMA_MIN: the reference's (Euler, 200 NFE, EDM) and --sigma-min's default
SCHEDULE_NAMES = ("edm", "ays", "ays_gaussian", "logsnr")
NO_SIGMA_MIN = frozenset({"ays"})    # tabulated levels: --sigma-min does not apply
NFE_GRID = (3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50, 70, 100, 140, 200)
STOCHASTIC_NFE = (10, 20, 50, 100)
STOCHASTIC_RUNS = {"dpmpp_2m_sde": ("dpmpp_2m_sde", {}), "euler_ancestral": ("euler_ancestral", {}),
                   "heun_churn": ("heun", {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0})}
DETERMINISTIC = [n for n in SAMPLERS if n not in STOCHASTIC]
TARGET_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "unipc")
BASELINE_NFE = 200
TARGET_EACH, TARGET_BEST = 20, 10
TINY = 1e-5   # the reference stops here and takes x(0) = D(x; TINY), error O(TINY^2 / var) ~ 1e-9


def takes_lower_order_final(name: str) -> bool:
    return "lower_order_final" in inspect.signature(SAMPLERS[name]).parameters


def data_std() -> float:
    w = torch.tensor(WEIGHTS, dtype=F64)
    mean = (w[:, None] * MUS).sum(0)
    second = (w[:, None, None] * (COVS + MUS[:, :, None] * MUS[:, None, :])).sum(0)
    return math.sqrt(torch.trace(second - torch.outer(mean, mean)).item() / MUS.shape[1])


def sigmas_for(schedule: str, steps: int, c: float, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    return get_sigmas(schedule, steps, sigma_min=sigma_min, sigma_max=SIGMA_MAX, table="svd", c=c)


def configs(sigma_mins) -> list[tuple[str, str, float | None]]:
    """(label, schedule, sigma_min) for every schedule x --sigma-min (once for a schedule without sigma_min)."""
    out = []
    for schedule in SCHEDULE_NAMES:
        for lo in ([None] if schedule in NO_SIGMA_MIN else sigma_mins):
            out.append((schedule if lo is None else f"{schedule}/{lo:g}", schedule, lo))
    return out


def first_reaching(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """The first NFE from which the error stays at or below `threshold` (None: not within the grid)."""
    above = [n for n, e in curve if e > threshold]
    return next((n for n, _ in curve if not above or n > max(above)), None)


def steps_for(name: str, target_nfe: int) -> int:
    return (target_nfe + 1) // 2 if name == "heun" else target_nfe   # Heun: 2 steps - 1 calls (Euler into 0)


def reference(den, x0: torch.Tensor, sigma_start: float, steps: int) -> torch.Tensor:
    x = analytic.reference_pf_ode(den, x0, sigma_start, TINY, steps=steps)
    return den(x, torch.full((len(x),), TINY, dtype=F64))


def sliced_w2(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, directions: int = 256) -> float:
    theta = torch.randn(a.shape[1], directions, generator=generator, dtype=F64)
    theta = theta / theta.norm(dim=0)
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values
    return (pa - pb).pow(2).mean().sqrt().item()


def assigned_fractions(x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose most probable component (w_k N(x; mu_k, S_k)) is k."""
    log_p = torch.stack([torch.distributions.MultivariateNormal(m, cov).log_prob(x) for m, cov in zip(MUS, COVS)], 1)
    k = (log_p + torch.tensor(WEIGHTS, dtype=F64).log()).argmax(1)
    return torch.bincount(k, minlength=len(WEIGHTS)).double() / len(x)


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).norm(dim=1).mean().item()


def run(args) -> dict:
    den = analytic.mixture_denoiser(WEIGHTS, MUS, COVS)
    c = data_std()
    eps = torch.randn(args.batch, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    runs = configs(args.sigma_min)
    refs, ref_errors = {}, {}
    for _, schedule, lo in runs:
        start = float(sigmas_for(schedule, 10, c, lo or SIGMA_MIN)[0])
        if start not in refs:
            refs[start] = reference(den, start * eps, start, args.ref_steps)
            ref_errors[start] = mean_distance(refs[start], reference(den, start * eps, start, args.ref_steps // 2))
    # The reference error: Euler, 200 NFE, EDM schedule with sigma_min 0.002, from SIGMA_MAX * eps, whatever the
    # --sigma-min list is. It is the threshold for every row.
    base_sigmas = sigmas_for("edm", BASELINE_NFE, c, SIGMA_MIN)
    base = mean_distance(SAMPLERS["euler"](den, SIGMA_MAX * eps, base_sigmas), refs[SIGMA_MAX])

    rows = []
    for label, schedule, lo in runs:
        for name in DETERMINISTIC:
            grid = sorted(set(NFE_GRID) | (set(range(3, 41)) if name in TARGET_SAMPLERS else set()))
            for target in grid:
                sigmas = sigmas_for(schedule, steps_for(name, target), c, lo or SIGMA_MIN)
                start = float(sigmas[0])
                lof = {"lower_order_final": args.lower_order_final} if takes_lower_order_final(name) else {}
                out = SAMPLERS[name](den, start * eps, sigmas, **lof)
                rows.append({"sampler": name, "schedule": label, "sigma_min": lo, "steps": len(sigmas) - 1,
                             "nfe": nfe(name, sigmas), "metric": "mean_l2_to_pf_ode",
                             "error": mean_distance(out, refs[start])})

    g = torch.Generator().manual_seed(1)
    exact_a, _ = analytic.sample_mixture(WEIGHTS, MUS, COVS, args.samples, generator=g)
    exact_b, _ = analytic.sample_mixture(WEIGHTS, MUS, COVS, args.samples, generator=g)
    floor = sliced_w2(exact_a, exact_b, torch.Generator().manual_seed(2))
    weights = assigned_fractions(analytic.sample_mixture(WEIGHTS, MUS, COVS, 200_000, generator=g)[0])
    tv_floor = 0.5 * (assigned_fractions(exact_b) - weights).abs().sum().item()
    for label, schedule, lo in runs:
        for run_name, (name, options) in STOCHASTIC_RUNS.items():
            for target in STOCHASTIC_NFE:
                sigmas = sigmas_for(schedule, steps_for(name, target), c, lo or SIGMA_MIN)
                x0 = sigmas[0].item() * torch.randn(args.samples, 2, generator=g, dtype=F64)
                lof = {"lower_order_final": args.lower_order_final} if takes_lower_order_final(name) else {}
                out = SAMPLERS[name](den, x0, sigmas, generator=g, **options, **lof)
                row = {"sampler": run_name, "schedule": label, "sigma_min": lo, "steps": len(sigmas) - 1,
                       "nfe": nfe(name, sigmas)}
                rows.append({**row, "metric": "sliced_w2_to_exact",
                             "error": sliced_w2(out, exact_a, torch.Generator().manual_seed(2))})
                rows.append({**row, "metric": "weight_tv",
                             "error": 0.5 * (assigned_fractions(out) - weights).abs().sum().item()})

    targets = {}
    for label, schedule, lo in runs:
        own = next(r["error"] for r in rows if r["sampler"] == "euler" and r["schedule"] == label
                   and r["nfe"] == BASELINE_NFE)
        reach = {}
        for name in TARGET_SAMPLERS:
            reach[name] = first_reaching(sorted((r["nfe"], r["error"]) for r in rows if r["sampler"] == name
                                                and r["schedule"] == label), base)
        got = [v for v in reach.values() if v is not None]
        targets[label] = {"schedule": schedule, "sigma_min": lo, "own_euler_error_at_200": own,
                          "nfe_to_reach": reach,
                          "met": len(got) == len(reach) and max(got) <= TARGET_EACH and min(got) <= TARGET_BEST}
    within = {limit: sorted((v, name, label) for label, t in targets.items() for name, v in t["nfe_to_reach"].items()
                            if v is not None and v <= limit) for limit in (TARGET_EACH, TARGET_BEST)}
    summary = {"reference": f"euler, {BASELINE_NFE} NFE, edm, sigma_min {SIGMA_MIN}", "reference_error_value": base,
               "met_by": [label for label, t in targets.items() if t["met"]],
               "within_20": [{"nfe": v, "sampler": s, "schedule": lb} for v, s, lb in within[TARGET_EACH]],
               "within_10": [{"nfe": v, "sampler": s, "schedule": lb} for v, s, lb in within[TARGET_BEST]]}
    return {"rows": rows, "targets": targets, "summary": summary,
            "reference_error": {str(k): v for k, v in ref_errors.items()},
            "sliced_w2_floor": floor, "weight_tv_floor": tv_floor, "data_std": c,
            "lower_order_final": args.lower_order_final}


def print_table(result: dict) -> None:
    shown = (5, 10, 20, 50, 100, 200)
    print(f"\n{'sampler':16s} {'schedule':18s} {'metric':18s} " + " ".join(f"{'NFE ' + str(n):>9s}" for n in shown))
    keyed = {}
    for r in result["rows"]:
        keyed.setdefault((r["sampler"], r["schedule"], r["metric"]), {})[r["nfe"]] = r["error"]
    for (sampler, schedule, metric), errs in keyed.items():
        cells = []
        for n in shown:   # Heun's NFE are odd: show n - 1 when n is missing
            near = max((k for k in errs if n - 1 <= k <= n), default=None)
            cells.append(f"{errs[near]:9.2e}" if near is not None else f"{'-':>9s}")
        print(f"{sampler:16s} {schedule:18s} {metric:18s} " + " ".join(cells))
    print(f"\nfloors (an exact sample set of the same size): sliced W2 {result['sliced_w2_floor']:.2e}, "
          f"weight TV {result['weight_tv_floor']:.2e}; reference error "
          + ", ".join(f"from sigma {k}: {v:.1e}" for k, v in result["reference_error"].items()))
    s = result["summary"]
    print(f"\nreference: {s['reference']}: error {s['reference_error_value']:.3e} (the threshold for every row)")
    print(f"{'schedule':18s} {'own Euler@200':>13s} " + " ".join(f"{n:>9s}" for n in TARGET_SAMPLERS)
          + f"   target (each <= {TARGET_EACH}, best <= {TARGET_BEST})")
    for label, t in result["targets"].items():
        cells = " ".join(f"{v if v is not None else '>200':>9}" for v in t["nfe_to_reach"].values())
        print(f"{label:18s} {t['own_euler_error_at_200']:13.3e} {cells}   {'MET' if t['met'] else 'MISSED'}")
    for key, limit in (("within_20", TARGET_EACH), ("within_10", TARGET_BEST)):
        hits = ", ".join(f"{h['sampler']} on {h['schedule']} ({h['nfe']})" for h in s[key]) or "none"
        print(f"reach the reference within {limit} NFE: {hits}")
    print(f"target met (every one of {', '.join(TARGET_SAMPLERS)} <= {TARGET_EACH}, best <= {TARGET_BEST}) by: "
          + (", ".join(s["met_by"]) or "no schedule"))


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(result["targets"])
    fig, axes = plt.subplots(2, len(labels), figsize=(5 * len(labels), 8.5), squeeze=False)
    for col, schedule in enumerate(labels):
        for row, metric in enumerate(("mean_l2_to_pf_ode", "weight_tv")):
            ax = axes[row][col]
            for sampler in dict.fromkeys(r["sampler"] for r in result["rows"] if r["metric"] == metric):
                pts = sorted((r["nfe"], r["error"]) for r in result["rows"]
                             if r["sampler"] == sampler and r["schedule"] == schedule and r["metric"] == metric)
                ax.loglog(*zip(*pts), marker=".", label=sampler)
            if row == 0:
                ax.axhline(result["summary"]["reference_error_value"], color="grey", ls=":",
                           label=f"reference: Euler @ {BASELINE_NFE} NFE, edm/{SIGMA_MIN:g}")
            else:
                ax.axhline(result["weight_tv_floor"], color="grey", ls=":", label="Monte-Carlo floor")
            ax.set_title(f"{schedule}: {'mean |x - x_ODE|' if row == 0 else 'TV of component weights'}")
            ax.set_xlabel("NFE")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="directory for samplers.json, .csv and .png")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small tensors: 1 is fastest)")
    p.add_argument("--batch", type=int, default=256, help="starting noises for the deterministic samplers")
    p.add_argument("--samples", type=int, default=4000, help="samples per stochastic run and exact set")
    p.add_argument("--ref-steps", type=int, default=1500, help="RK4 steps of the reference solution")
    p.add_argument("--sigma-min", type=float, nargs="+", default=[SIGMA_MIN],
                   help="sigma_min values for the schedules that take one (edm, ays_gaussian, logsnr); the reference "
                        f"is always Euler at {BASELINE_NFE} NFE on edm with sigma_min {SIGMA_MIN}")
    p.add_argument("--lower-order-final", action="store_true",
                   help="run 2M, 2M SDE, 3M and UniPC with a first-order last step below 15 steps (default: without)")
    args = p.parse_args(argv)
    if not all(0 < lo < SIGMA_MAX for lo in args.sigma_min):
        p.error(f"--sigma-min {args.sigma_min}: each must be in (0, {SIGMA_MAX})")
    args.sigma_min = list(dict.fromkeys(args.sigma_min))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"bench/samplers.py: {len(WEIGHTS)}-component 2-D mixture, sigma {SIGMA_MAX} -> "
          f"{'/'.join(f'{lo:g}' for lo in args.sigma_min)} -> 0, "
          f"float64, lower_order_final {args.lower_order_final}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s) of {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - t0
    result["threads"] = torch.get_num_threads()
    (args.out / "samplers.json").write_text(json.dumps(result, indent=1))
    with open(args.out / "samplers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sampler", "schedule", "sigma_min", "steps", "nfe", "metric", "error"])
        w.writeheader()
        w.writerows(result["rows"])
    plot(result, args.out / "samplers.png")
    print_table(result)
    print(f"\nwrote {args.out}/samplers.{{json,csv,png}} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
