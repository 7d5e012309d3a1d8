"""Diffusion samplers of unnormalised densities: |log Z_hat - log Z|, the importance-weighted gap and W2^2 for each
method on 25GMM, Funnel and Manywell, beside the published numbers (Sendera et al. 2024, Table 1).

    python bench/density.py --out bench/results/density                 # reduced budget (minutes; what CI can run)
    python bench/density.py --out DIR --full --nproc 2                   # the published budget (hours per run here)
    python bench/density.py --out DIR --combine SEED0_DIR SEED1_DIR ...   # mean +- std over seeds, beside the paper's

Each row is a real `fieldtrain sampler train` run (configs/gmm25_tb.toml with the target, method and budget set by
--set), then its summary's estimates. The reduced budget is NOT the published one (fewer steps, iterations and
trajectories): its errors are not comparable with the paper's and are printed beside them only to show where the
runs stand. Writes density_bench.json / .csv and prints a table, saying how many ranks shared how many cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "gmm25_tb.toml"
# Sendera et al. 2024, Table 1: |log Z_hat - log Z| (ELBO estimate), mean of 5 runs; 25GMM / Funnel / Manywell
PUBLISHED = {"pis": (1.769, 0.534, 3.85), "dds": (1.760, 0.424, 7.36), "tb": (1.176, 0.690, 4.01),
             "tb_expl": (0.560, 0.749, 4.01), "vargrad_expl": (0.615, 0.642, 4.01),
             "tb_expl_ls": (0.171, 0.653, 4.57)}
PUBLISHED["dds_cos"] = PUBLISHED["dds_cos_lp"] = PUBLISHED["dds"]     # DDS with its own code's schedule (+ Langevin)
PUBLISHED["tb_expl_paper"], PUBLISHED["vargrad_expl_paper"] = PUBLISHED["tb_expl"], PUBLISHED["vargrad_expl"]
# ... their spread over the 5 runs, where ../shared/DIFFUSION.md or the issue records it
SPREAD = {("gmm25", "tb_expl_ls"): 0.013, ("gmm25", "tb_expl"): 0.302, ("gmm25", "tb_expl_paper"): 0.302,
          ("funnel", "dds"): 0.049,
          ("funnel", "dds_cos"): 0.049, ("manywell", "pis"): 0.03}
BEST = {"gmm25": 0.171, "funnel": 0.424, "manywell": 3.85}
TARGETS = {"gmm25": 5.0 ** 0.5, "funnel": 1.0, "manywell": 1.0}     # target -> sigma (sigma^2 = 5, 1, 1)
# exploration_std is gfn-diffusion's --exploration_factor, the std added to each step (its add_log_var puts
# factor^2 / dt on the variance rate): 0.2 for TB/VarGrad + Expl., 0.1 for TB + Expl. + LS (Sendera et al. 2024,
# App. A's commands). Not sqrt(0.2): that explores with 5x (LS: 20x) the published variance.
EXPL = {"expl": "model.density_sampler.exploration_std=0.2", "expl_ls": "model.density_sampler.exploration_std=0.1"}
# The paper's text (App. D) says otherwise: exploration noise of *variance* 0.2, decayed linearly over the first *half*
# of training. The "_paper" rows run that reading; gfn-diffusion's own code, run here with each reading, agrees with
# ours on both (docs/density.md, session 14).
EXPL_PAPER = ["model.density_sampler.exploration_std=0.4472135954999579", "model.density_sampler.exploration_until=0.5"]
METHODS = {"pis": ["model.density_sampler.method=pis"], "dds": ["model.density_sampler.method=dds"],
           "tb": ["model.density_sampler.method=tb"],
           "tb_expl": ["model.density_sampler.method=tb", EXPL["expl"]],
           "vargrad_expl": ["model.density_sampler.method=vargrad", EXPL["expl"]],
           "tb_expl_paper": ["model.density_sampler.method=tb", *EXPL_PAPER],
           "vargrad_expl_paper": ["model.density_sampler.method=vargrad", *EXPL_PAPER],
           "tb_expl_ls": ["model.density_sampler.method=tb", EXPL["expl_ls"],
                          "model.density_sampler.local_search=true"],
           # DDS's code's settings for its Funnel runs (trainer/density/sde.py: cos_sq steps, alpha 0.6875, t_f 6.4)
           "dds_cos": ["model.density_sampler.method=dds", "model.density_sampler.ou_schedule=cos_sq"],
           "dds_cos_lp": ["model.density_sampler.method=dds", "model.density_sampler.ou_schedule=cos_sq",
                          "model.density_sampler.langevin=true"]}
REDUCED = {"T": 20, "steps": 300, "batch": 64, "eval_samples": 500, "every": 300}
FULL = {"T": 100, "steps": 25000, "batch": 300, "eval_samples": 2000, "every": 2500}   # evaluate + checkpoint every


def settings(target: str, method: str, budget: dict, out: Path, nproc: int = 1,
             extra: list[str] | None = None) -> list[str]:
    """The --set overrides of CONFIG for one row (configs/<target>_<method>.toml give the same runs: tested)."""
    return [f"run.out_dir={out / 'runs'}", f"run.name={target}_{method}", f"model.density_sampler.target={target}",
            f"model.density_sampler.sigma={TARGETS[target]}", f"model.density_sampler.T={budget['T']}",
            f"train.max_steps={budget['steps']}", f"data.batch_size={budget['batch'] // nproc}",
            f"model.density_sampler.eval_samples={budget['eval_samples']}", "train.progress=false",
            f"train.eval_every={budget['every']}", f"train.ckpt_every={budget['every']}",
            "model.density_sampler.exploration_std=0.0", "run.threads_per_rank=1", *METHODS[method], *(extra or [])]


def run(target: str, method: str, budget: dict, out: Path, nproc: int, resume: bool = False,
        extra: list[str] | None = None) -> dict:
    sets = settings(target, method, budget, out, nproc, extra)
    cmd = [sys.executable, "-m", "launch.cli", "sampler", "train", str(CONFIG),
           "--resume" if resume and (out / "runs" / f"{target}_{method}" / "checkpoints").is_dir() else "--overwrite",
           *(["--nproc", str(nproc)] if nproc > 1 else []), *[a for s in sets for a in ("--set", s)]]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"target": target, "method": method, "error": r.stderr[-600:], "wall_s": wall}
    s = json.loads((out / "runs" / f"{target}_{method}" / "summary.json").read_text())
    i = list(TARGETS).index(target)
    return {"target": target, "method": method, "ranks": nproc, "wall_s": wall, "log_z": s["log_z"],
            "elbo": s["elbo"], "elbo_se": s.get("elbo_se"), "eubo": s.get("eubo"), "log_z_error": s["log_z_error"],
            "iw_log_z_error": s["iw_log_z_error"], "w2_squared": s.get("w2_squared"), "ess": s["ess"],
            "published": PUBLISHED[method][i], "best_published": BEST[target]}


def combine(dirs: list[Path], out: Path) -> list[dict]:
    """Mean and sample standard deviation over seeds of each (target, method) in the density_bench.json of `dirs`
    (runs of one budget, none of them an ablation), beside the published mean and spread."""
    groups: dict[tuple[str, str], list[dict]] = {}
    budget = None
    for d in dirs:
        path = Path(d) / "density_bench.json"
        if not path.is_file():
            raise ValueError(f"--combine: {path} not found (give folders written by bench/density.py --out)")
        res = json.loads(path.read_text())
        sets = [x for x in res.get("sets", []) if not x.startswith("run.seed=")]   # early runs set the seed so
        seed = res.get("seed") or next((int(x.split("=")[1]) for x in res.get("sets", []) if x not in sets), 0)
        if sets:
            raise ValueError(f"--combine: {path} is an ablation (--set {sets}); combine seeds of one budget")
        if budget is not None and res["budget"] != budget:
            raise ValueError(f"--combine: {path} has budget {res['budget']}, the others {budget}")
        budget = res["budget"]
        for r in res["rows"]:
            if "error" not in r:
                groups.setdefault((r["target"], r["method"]), []).append({**r, "seed": seed})
    rows = []
    for (target, method), rs in sorted(groups.items()):
        errs = [r["log_z_error"] for r in rs]
        seeds = sorted(r["seed"] for r in rs)
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"--combine: {target} {method} has seed {seeds} more than once")
        mean, std = statistics.fmean(errs), (statistics.stdev(errs) if len(errs) > 1 else None)
        pub, spread = rs[0]["published"], SPREAD.get((target, method))
        rows.append({"target": target, "method": method, "seeds": seeds, "log_z_error": errs, "mean": mean,
                     "std": std, "iw_mean": statistics.fmean(r["iw_log_z_error"] for r in rs),
                     "published": pub, "published_spread": spread, "best_published": BEST[target],
                     "inside_published_spread": None if spread is None else abs(mean - pub) <= spread,
                     "every_seed_below_best": all(e < BEST[target] for e in errs)})
    print(f"budget {budget}; mean +- sample std over seeds of |ELBO - log Z| (published: mean +- spread of 5 runs)")
    for r in rows:
        sd = "" if r["std"] is None else f" +- {r['std']:.3f}"
        pub = f"{r['published']}" + ("" if r["published_spread"] is None else f" +- {r['published_spread']}")
        print(f"{r['target']:9s} {r['method']:13s} seeds {','.join(map(str, r['seeds'])):7s} "
              f"{r['mean']:8.3f}{sd:9s} ({', '.join(f'{e:.3f}' for e in r['log_z_error'])})  published {pub}  "
              f"inside spread: {r['inside_published_spread']}  every seed below best ({r['best_published']}): "
              f"{r['every_seed_below_best']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "density_seeds.json").write_text(json.dumps({"budget": budget, "dirs": [str(d) for d in dirs],
                                                         "rows": rows}, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--full", action="store_true", help="the published budget (T 100, 25k iterations, batch 300)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (the global batch is split over them)")
    p.add_argument("--resume", action="store_true", help="continue runs from their latest checkpoints")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="training steps (and evaluation interval, at most 2500) "
                   "instead of the budget's: an ablation, not the published budget")
    p.add_argument("--set", action="append", default=[], help="a config override for every run (KEY=VALUE)")
    p.add_argument("--seed", type=int, default=0, help="run.seed of every run (another seed of the same budget, "
                   "not an ablation: the published values are means over seeds)")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                   help="no runs: combine the density_bench.json of these folders (seeds) into --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.combine:
        try:
            combine([Path(d) for d in args.combine], out)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    out.mkdir(parents=True, exist_ok=True)
    budget = dict(FULL if args.full else REDUCED)
    if args.steps:
        budget.update(steps=args.steps, every=min(args.steps, budget["every"] if args.full else args.steps))
    kind = "published" if args.full else "REDUCED (not comparable with the paper)"
    if args.steps or args.set:
        kind = f"{kind}, changed by --steps/--set {args.set} (an ablation)"
    print(f"budget: {kind} {budget}; "
          f"{args.nproc} rank(s) per run sharing {os.cpu_count()} cores, 1 thread each")
    rows = []
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            row = run(target, method, budget, out, args.nproc, args.resume, [f"run.seed={args.seed}", *args.set])
            rows.append(row)
            print(json.dumps(row) if "error" in row else
                  f"{target:9s} {method:13s} |ELBO-logZ| {row['log_z_error']:8.3f} +- {row['elbo_se'] or float('nan'):.3f} "
                  f"(published {row['published']})  "
                  f"|IW-logZ| {row['iw_log_z_error']:8.3f}  W2^2 {row['w2_squared'] or float('nan'):9.3f}  "
                  f"ESS {row['ess']:.3f}  {row['wall_s']:.0f} s", flush=True)
    (out / "density_bench.json").write_text(json.dumps({"budget": budget, "seed": args.seed, "sets": args.set,
                                                         "nproc": args.nproc,
                                                         "cores": os.cpu_count(), "rows": rows}, indent=2))
    keys = sorted({k for r in rows for k in r})
    with (out / "density_bench.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'density_bench.json'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
