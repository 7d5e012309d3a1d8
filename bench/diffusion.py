"""Benchmark a conditional EDM-FNO (Darcy pressure given permeability): sample error against NFE, and sampling
throughput through `launch.sample.run_sampling` in-process and as Ray tasks.

    .venv/bin/python bench/diffusion.py --out bench/results/diffusion           # data + training + everything
    .venv/bin/python bench/diffusion.py --out /tmp/db --run runs/darcy_edm      # an existing run (its store)
    .venv/bin/python bench/diffusion.py --out /tmp/db --run R --data URL --conditions 8 --members 8

1. Without --run: a Darcy store (600 samples at 33x33 into OUT/darcy.zarr, or --data) and a run of
   configs/darcy_edm.toml on 2 ranks for --steps-train steps into OUT/darcy_edm.
2. Error against NFE on the held-out conditions (the first K of the test split, the trailing chunks
   trainer.train.check_inputs holds out): every sampler of SAMPLERS x schedules "edm" and "ays" (AYS table "svd")
   x --steps-list, M members each, the same seeds (initial noise and sampler noise) for every sampler. Scores, in
   physical units: CRPS (fair), relative L2 of the ensemble mean, energy-spectrum error, spread-skill, and the
   members' relative distance to the reference's (same noise: the discretisation error for the ODE samplers).
3. A reference at high NFE (Heun, EDM schedule, --ref-steps): per sampler x schedule, the NFE from which the CRPS
   stays within 5% of the reference's, and from which it stays at most 5% above it (a lower CRPS counts: the
   stochastic samplers beat an ODE reference of an imperfect model).
4. Samples/s of one SampleJob through run_sampling with 1 worker (in-process) and 2 Ray tasks (0.5 CPU each on a
   loopback Ray node), and whether the two stores are identical.

The cost of one denoiser call is measured first; unless --conditions/--members/--steps-list are given, the sizes
are shrunk (SIZE_PLANS, in order) until the projected sweep fits --budget-s. The sizes used, the timings and the
load average go into the output. Output: OUT/diffusion_bench.{json,csv}, OUT/diffusion_throughput.csv,
OUT/{crps,ens_mean_l2,ref_dev}_vs_nfe.png; tables are printed. Nothing asserts on time.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # `python bench/diffusion.py` from anywhere

import numpy as np
import torch

from bench.table import _fmt, print_table  # the benchmarks' one table format
from trainer.compress.base import mixed_seed
from trainer.diffusion.metrics import crps_ensemble, ensemble_mean_rel_l2, spectrum_error, spread_skill_ratio
from trainer.diffusion.samplers import SAMPLERS, STOCHASTIC, nfe
from trainer.diffusion.sampling import sample_ensemble, sigmas_for

CONFIG = ROOT / "configs" / "darcy_edm.toml"
SCHEDULES = ("edm", "ays")
STEPS = (2, 3, 5, 10, 20, 40)
REFERENCE = ("heun", "edm", 100)
TOLERANCE = 0.05
# (conditions, members, step counts), tried in order until the projected sweep fits the budget
SIZE_PLANS = [(8, 8, STEPS), (8, 8, STEPS[:-1]), (8, 4, STEPS[:-1]), (4, 4, STEPS[:-1]), (4, 4, STEPS[:-2])]
CSV_COLUMNS = ["sampler", "schedule", "steps", "nfe", "stochastic", "crps", "crps_se", "crps_vs_ref",
               "ens_mean_rel_l2", "spectrum_error", "spread_skill", "ref_dev", "seconds"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- data and model ------------------------------------------------------------------------------------------
def ensure_data(url: str, n: int, res: int) -> None:
    from data.darcy import write_darcy_dataset
    from data.store import FieldDataset
    try:
        FieldDataset(url)
        log(f"reusing {url}")
        return
    except ValueError:
        pass
    log(f"generating {n} Darcy samples at {res}x{res} into {url} ...")
    t0 = time.perf_counter()
    write_darcy_dataset(url, n, res, seed=0, chunk_size=50, workers=1, overwrite=True)
    log(f"data written in {time.perf_counter() - t0:.0f} s")


def train(out: Path, data_url: str, steps: int, nproc: int) -> Path:
    """A darcy_edm run of `steps` steps on `nproc` local ranks into out/darcy_edm; its log in out/train.log."""
    sets = [f"data.path={data_url}", f"run.out_dir={out}", "run.name=darcy_edm", f"train.max_steps={steps}",
            f"train.eval_every={steps}", "train.log_every=20", "train.progress=false"]
    cmd = [sys.executable, "-m", "launch.cli", "train", str(CONFIG), "--nproc", str(nproc), "--overwrite",
           *sum((["--set", s] for s in sets), [])]
    log(f"training {steps} steps on {nproc} ranks: {' '.join(cmd[1:])}")
    with (out / "train.log").open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = (out / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training failed (exit code {rc}); the end of {out / 'train.log'}:\n{tail}")
    return out / "darcy_edm"


def held_out(meta: dict, data_url: str):
    """(dataset, first test index, identical-to-training) for `data_url` under the run's config: the test split is
    trainer.train.check_inputs's (the trailing round(num_chunks * test_fraction) chunks, at least one)."""
    from trainer.config import config_from_dict, migrate_config_dict
    from trainer.train import check_inputs, dataset_identity
    cfg = config_from_dict(migrate_config_dict(meta["config"]))
    cfg.data.path = data_url
    ds, train_stop = check_inputs(cfg, 1)
    return ds, train_stop, dataset_identity(ds) == meta["dataset"]


# ---- error against NFE -----------------------------------------------------------------------------------------
def scores(ens, truth, ref=None) -> dict:
    """ens (M, B, C, *grid) and truth (B, C, *grid) in physical units; ref: the reference's ensemble."""
    crps = crps_ensemble(ens, truth, fair=True)
    out = {"crps": crps.mean().item(),
           "crps_se": (crps.std().item() / len(crps) ** 0.5) if len(crps) > 1 else float("nan"),
           "ens_mean_rel_l2": ensemble_mean_rel_l2(ens, truth).mean().item(),
           "spectrum_error": spectrum_error(ens, truth).item(),
           "spread_skill": spread_skill_ratio(ens, truth).item()}
    if ref is not None:
        out["ref_dev"] = ((ens - ref).flatten(2).norm(dim=2) / ref.flatten(2).norm(dim=2)).mean().item()
    return out


def sample_physical(model, cond, members: int, sampler: str, sigmas, seeds: list[int], target_norm):
    """An ensemble (M, B, C, *grid) decoded to physical units; cond (B, C_in, *grid) in the model's space."""
    shape = (target_norm.num_channels, *cond.shape[2:])
    ens = sample_ensemble(model, cond, members, sampler, sigmas, seeds, shape)     # (B, M, C, *grid)
    return target_norm.decode(ens.flatten(0, 1)).reshape(ens.shape).transpose(0, 1)


def error_vs_nfe(model, cond, truth, target_norm, *, members: int, seeds: list[int], samplers=tuple(SAMPLERS),
                 schedules=SCHEDULES, steps_list=STEPS, reference=REFERENCE) -> tuple[list[dict], dict]:
    """Rows {sampler, schedule, steps, nfe, scores...} for every sampler x schedule x steps, and the reference row.
    cond (B, C_in, *grid) in the model's space, truth (B, C, *grid) physical; seeds[b] seeds condition b."""
    r_sampler, r_schedule, r_steps = reference
    t0 = time.perf_counter()
    r_sigmas = sigmas_for(model, r_schedule, r_steps)
    ref_ens = sample_physical(model, cond, members, r_sampler, r_sigmas, seeds, target_norm)
    ref_row = {"sampler": r_sampler, "schedule": r_schedule, "steps": r_steps, "nfe": nfe(r_sampler, r_sigmas),
               "stochastic": r_sampler in STOCHASTIC, **scores(ref_ens, truth, ref_ens),
               "seconds": time.perf_counter() - t0}
    log(f"reference {r_sampler}/{r_schedule} {r_steps} steps ({ref_row['nfe']} NFE): CRPS {ref_row['crps']:.4g}, "
        f"{ref_row['seconds']:.0f} s")
    rows = []
    for sampler in samplers:
        for schedule in schedules:
            for steps in steps_list:
                t0 = time.perf_counter()
                sigmas = sigmas_for(model, schedule, steps)
                ens = sample_physical(model, cond, members, sampler, sigmas, seeds, target_norm)
                row = {"sampler": sampler, "schedule": schedule, "steps": steps, "nfe": nfe(sampler, sigmas),
                       "stochastic": sampler in STOCHASTIC, **scores(ens, truth, ref_ens),
                       "seconds": time.perf_counter() - t0}
                row["crps_vs_ref"] = row["crps"] / ref_row["crps"] - 1
                rows.append(row)
                log(f"{sampler:>16}/{schedule:<3} {steps:>3} steps {row['nfe']:>3} NFE: CRPS {row['crps']:.4g} "
                    f"({row['crps_vs_ref']:+.1%}), ens-mean L2 {row['ens_mean_rel_l2']:.4f}, {row['seconds']:.1f} s")
    return rows, ref_row


def nfe_to_within(rows: list[dict], ref_crps: float, tolerance: float = TOLERANCE,
                  one_sided: bool = False) -> dict[str, int | None]:
    """Per "sampler/schedule": the smallest measured NFE from which on (every larger NFE too) the CRPS is within
    `tolerance` of the reference's (one_sided: at most `tolerance` above it, so a better CRPS counts); None when the
    largest measured NFE is not."""
    def ok(crps: float) -> bool:
        return crps / ref_crps - 1 <= tolerance if one_sided else abs(crps / ref_crps - 1) <= tolerance

    out = {}
    for method in dict.fromkeys(f"{r['sampler']}/{r['schedule']}" for r in rows):
        points = sorted((r["nfe"], ok(r["crps"])) for r in rows if f"{r['sampler']}/{r['schedule']}" == method)
        best = None
        for n, good in reversed(points):
            if not good:
                break
            best = n
        out[method] = best
    return out


def sweep_nfe(samplers, schedules, steps_list, reference=REFERENCE) -> int:
    """Denoiser calls of one sweep, reference included (every schedule here ends in 0, which Heun's count needs)."""
    total = nfe(reference[0], torch.linspace(1, 0, reference[2] + 1))
    for sampler in samplers:
        for steps in steps_list:
            total += len(schedules) * nfe(sampler, torch.linspace(1, 0, steps + 1))
    return total


def choose_sizes(plans, per_row_s: float, n_test: int, reference, budget_s: float):
    """The first (conditions, members, steps) of `plans` whose projected sweep fits `budget_s` (else the last), and
    its projection: per_row_s (one denoiser call on one row) x rows x the sweep's denoiser calls."""
    for k, m, steps in plans:
        k = min(k, n_test)
        projected = per_row_s * k * m * sweep_nfe(SAMPLERS, SCHEDULES, steps, reference)
        log(f"plan {k} conditions x {m} members, steps {steps}: projected {projected:.0f} s")
        if projected <= budget_s:
            break
    return k, m, steps, projected


def time_one_nfe(model, cond, members: int, channels: int, reps: int = 3) -> float:
    """Median seconds of one denoiser call on len(cond) * members rows (after a warm-up call)."""
    x = torch.randn(len(cond) * members, channels, *cond.shape[2:])
    c = cond.repeat_interleave(members, dim=0)
    sigma = torch.ones(len(x))
    times = []
    with torch.no_grad():
        model(x, sigma, c)
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x, sigma, c)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- throughput through run_sampling ------------------------------------------------------------------------------
def sampling_throughput(ckpt: str, data_url: str, cond_start: int, out: Path, rows: int, chunk: int,
                        members: int) -> tuple[list[dict], dict]:
    """One SampleJob (dpmpp_2m, EDM, 10 steps) through run_sampling in-process and as 2 Ray tasks (after a warm-up
    run that starts the Ray worker processes); both stores compared."""
    import ray

    from data.samples import open_samples
    from launch.sample import run_sampling
    from trainer.diffusion.sampling import SampleJob
    kwargs = dict(num_rows=rows, chunk_size=chunk, members=members, sampler="dpmpp_2m", schedule="edm", steps=10,
                  seed=0, cond_url=data_url, cond_start=cond_start)
    job = SampleJob(ckpt, **kwargs)
    results, same = [], {}
    url1, url2 = str(out / "samples_1worker.zarr"), str(out / "samples_2workers.zarr")
    log(f"throughput: {rows} rows x {members} members, chunks of {chunk}, in-process ...")
    s = run_sampling(job, url1, workers=1, overwrite=True, progress=False)
    results.append({**s, "task_cpus": None, "threads": torch.get_num_threads(), "note": "model already loaded"})
    log("starting a loopback Ray node (2 CPUs) ...")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=200 * 2**20,
             _system_config={"worker_niceness": 0}, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    try:
        warm = SampleJob(ckpt, **{**kwargs, "num_rows": 2, "chunk_size": 1, "members": 1, "sampler": "euler",
                                  "steps": 1})
        w = run_sampling(warm, str(out / "samples_warmup.zarr"), workers=2, overwrite=True, progress=False)
        log(f"Ray up in {ray_init_s:.1f} s, warm-up (worker start + model load) {w['seconds']:.1f} s; 2 Ray tasks ...")
        note = "each Ray worker loads the model once (in the timed run)"
        s = run_sampling(job, url2, workers=2, task_cpus=0.5, overwrite=True, progress=False)
        results.append({**s, "task_cpus": 0.5, "threads": 1, "ray_init_s": ray_init_s, "warmup_s": w["seconds"],
                        "note": note})
    finally:
        ray.shutdown()
    for r in results:
        r["members"] = members
        r["member_samples_per_s"] = r["samples_per_s"] * members
    a, b = open_samples(url1), open_samples(url2)
    xa, xb = a.read(), b.read()
    same.update({"samples_identical": bool(np.array_equal(xa, xb)),
                 "truth_identical": bool(np.array_equal(a.read(name="truth"), b.read(name="truth"))),
                 "max_abs_diff": float(np.abs(xa - xb).max()), "meta_identical": a.meta == b.meta})
    return results, same


# ---- output ----------------------------------------------------------------------------------------------------
def _row_cells(r: dict) -> list[str]:
    return [r["sampler"] + (" (sde)" if r["stochastic"] else ""), r["schedule"], str(r["steps"]), str(r["nfe"]),
            _fmt(r["crps"], ".4e"), _fmt(r.get("crps_vs_ref"), "+.1%"), _fmt(r["ens_mean_rel_l2"], ".4f"),
            _fmt(r["spectrum_error"], ".3f"), _fmt(r["spread_skill"], ".2f"), _fmt(r.get("ref_dev"), ".2e"),
            _fmt(r["seconds"], ".1f")]


def plot_metric(path: Path, rows: list[dict], ref: dict, key: str, ylabel: str, title: str) -> Path:
    """Log-log `key` against NFE, one line per sampler x schedule (colour: sampler, solid: edm, dashed: ays);
    the reference as a horizontal line (with the 5% band for CRPS), the y axis clipped at 30x it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    colours = {s: f"C{i}" for i, s in enumerate(dict.fromkeys(r["sampler"] for r in rows))}
    for method in dict.fromkeys((r["sampler"], r["schedule"]) for r in rows):
        pts = sorted((r["nfe"], r[key]) for r in rows if (r["sampler"], r["schedule"]) == method and r[key] > 0)
        if pts:
            ax.loglog(*zip(*pts), "o-" if method[1] == "edm" else "s--", ms=3, lw=1, color=colours[method[0]],
                      label=f"{method[0]}/{method[1]}")
    if key != "ref_dev":
        top = 30 * ref[key]   # the diverging few-step Heun runs would squeeze every other line flat
        if max(r[key] for r in rows) > top:
            ax.set_ylim(top=top)
            title += " (clipped at 30x the reference)"
        ax.axhline(ref[key], color="k", lw=0.8, label=f"reference ({ref['sampler']} {ref['nfe']} NFE)")
        if key == "crps":
            ax.axhspan(ref[key] * (1 - TOLERANCE), ref[key] * (1 + TOLERANCE), color="k", alpha=0.1, lw=0)
    ax.set_xlabel("NFE (denoiser calls)"), ax.set_ylabel(ylabel), ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=90)
    return path


def write_outputs(out: Path, result: dict) -> None:
    (out / "diffusion_bench.json").write_text(json.dumps(result, indent=2))
    with (out / "diffusion_bench.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows([{**result["reference"], "sampler": "reference:" + result["reference"]["sampler"]},
                     *result["rows"]])
    if result.get("throughput"):
        cols = ["mode", "workers", "task_cpus", "threads", "rows", "members", "chunks", "seconds", "samples_per_s",
                "member_samples_per_s", "note"]
        with (out / "diffusion_throughput.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(result["throughput"])


def report(result: dict) -> None:
    m = result["meta"]
    print(f"\nerror vs NFE: {m['conditions']} held-out conditions (rows {m['cond_start']}..) x {m['members']} "
          f"members, 1 process x {m['threads']} thread(s) on {m['cpus']} cores (load avg at start "
          f"{m['loadavg_start'][0]:.1f}); one NFE on {m['nfe_rows']} rows: {m['nfe_seconds']:.2f} s")
    headers = ["sampler", "sched", "steps", "NFE", "CRPS", "vs ref", "ens-mean L2", "spec err", "spr/skl",
               "dev vs ref", "s"]
    print_table(headers, [_row_cells({**result["reference"], "sampler": "REF " + result["reference"]["sampler"]})]
                + [_row_cells(r) for r in result["rows"]])
    print(f"\nNFE from which the CRPS stays within {TOLERANCE:.0%} of the reference's "
          f"({result['reference']['crps']:.4e}); '<=': at most {TOLERANCE:.0%} above it (lower CRPS counts):")
    samplers = list(dict.fromkeys(r["sampler"] for r in result["rows"]))
    schedules = list(dict.fromkeys(r["schedule"] for r in result["rows"]))
    within, below = result["nfe_to_within_5pct"], result["nfe_to_at_most_5pct_above"]
    cell = lambda v: "never" if v is None else str(v)   # noqa: E731
    print_table(["sampler", *(f"{sc} |d|<=5%" for sc in schedules), *(f"{sc} <=+5%" for sc in schedules)],
                [[s, *(cell(within[f"{s}/{sc}"]) for sc in schedules), *(cell(below[f"{s}/{sc}"]) for sc in schedules)]
                 for s in samplers])
    if result.get("throughput"):
        print("\nsampling throughput (run_sampling, same job; samples = ensemble members):")
        print_table(["mode", "workers", "cpus/task", "rows", "s", "rows/s", "samples/s"],
                    [[t["mode"], str(t["workers"]), _fmt(t["task_cpus"], ".1f"), str(t["rows"]),
                      _fmt(t["seconds"], ".1f"), _fmt(t["samples_per_s"], ".2f"),
                      _fmt(t["member_samples_per_s"], ".1f")]
                     for t in result["throughput"]])
        s = result["stores"]
        same = s["samples_identical"] and s["truth_identical"]
        print(f"stores identical (1 worker vs 2 Ray tasks): {'YES' if same else 'NO'}"
              f" (max |diff| {s['max_abs_diff']:.3g}, meta identical: {s['meta_identical']})")
    if "training" in m:
        t = m["training"]
        print(f"\ntraining: {t['steps']} steps on {t['ranks']} ranks sharing {m['cpus']} cores, {t['wall_s']:.0f} s; "
              f"its own eval (dpmpp_2m, 10 steps): CRPS {_fmt(t['test_crps'], '.4e')}, ens-mean L2 "
              f"{_fmt(t['test_ens_mean_rel_l2'], '.4f')}")


# ---- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (data, run, results)")
    p.add_argument("--run", default="", help="a trained darcy_edm run (else one is trained into OUT)")
    p.add_argument("--data", default="", help="the Darcy store (default: the run's, or 600 samples made in OUT)")
    p.add_argument("--steps-train", type=int, default=200, help="training steps when training (default 200)")
    p.add_argument("--nproc", type=int, default=2, help="training ranks")
    p.add_argument("--samples", type=int, default=600, help="samples of a generated store")
    p.add_argument("--res", type=int, default=33)
    p.add_argument("--conditions", type=int, default=0, help="held-out conditions (default: sized, up to 8)")
    p.add_argument("--members", type=int, default=0, help="ensemble members (default: sized, up to 8)")
    p.add_argument("--steps-list", default="", help=f"step counts, comma-separated (default: sized, up to {STEPS})")
    p.add_argument("--ref-steps", type=int, default=REFERENCE[2], help="Heun steps of the reference")
    p.add_argument("--budget-s", type=float, default=300.0, help="projected sweep time to size for")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the sweep (1: best on busy cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput-rows", type=int, default=16)
    p.add_argument("--throughput-members", type=int, default=4)
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    meta = {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "threads": args.threads}

    from data.loader import ChannelNormalizer
    from trainer.diffusion.sampling import find_checkpoint, load_edm
    if args.run:
        run_dir = Path(args.run)
    else:
        data_url = args.data or str(out / "darcy.zarr")
        ensure_data(data_url, args.samples, args.res)
        t0 = time.perf_counter()
        run_dir = train(out, data_url, args.steps_train, args.nproc)
        summary = json.loads((run_dir / "summary.json").read_text())
        meta["training"] = {"steps": summary["steps"], "ranks": summary["world_size"],
                            "wall_s": time.perf_counter() - t0,
                            "train_wall_time_s": summary["wall_time_s"], "test_crps": summary.get("test_crps"),
                            "test_ens_mean_rel_l2": summary.get("test_ens_mean_rel_l2"),
                            "note": f"{args.nproc} ranks shared {os.cpu_count()} cores"}
        log(f"trained {summary['steps']} steps in {meta['training']['wall_s']:.0f} s")
    model, run_meta = load_edm(run_dir)
    ckpt = str(find_checkpoint(run_dir))
    data_url = args.data or run_meta["config"]["data"]["path"]
    ds, cond_start, same_store = held_out(run_meta, data_url)
    if not same_store:
        log(f"WARNING: {data_url} is not the store the run trained on: its 'test split' may hold training samples")
    inorm = ChannelNormalizer.from_stats(run_meta["input_norm"])
    tnorm = ChannelNormalizer.from_stats(run_meta["target_norm"])
    n_test = ds.num_samples - cond_start

    # Size the sweep from the cost of one denoiser call.
    explicit = bool(args.conditions or args.members or args.steps_list)
    steps_list = tuple(int(s) for s in args.steps_list.split(",")) if args.steps_list else None
    reference = (REFERENCE[0], REFERENCE[1], args.ref_steps)
    plans = ([(args.conditions or 8, args.members or 8, steps_list or STEPS)] if explicit else SIZE_PLANS)
    probe_m = plans[0][1]
    cond_probe = inorm.encode(torch.from_numpy(ds.read(cond_start, cond_start + min(n_test, plans[0][0]))[0]))
    t_nfe = time_one_nfe(model, cond_probe, probe_m, tnorm.num_channels)
    per_row = t_nfe / (len(cond_probe) * probe_m)
    k, m, steps_list, projected = choose_sizes(plans, per_row, n_test, reference, args.budget_s)
    meta.update({"run": str(run_dir), "checkpoint": ckpt, "train_step": run_meta["step"],
                 "weights": run_meta["weights"],
                 "data": data_url, "data_is_training_store": same_store, "num_samples": ds.num_samples,
                 "cond_start": cond_start, "test_samples": n_test, "conditions": k, "members": m,
                 "steps_list": list(steps_list), "schedules": list(SCHEDULES), "samplers": list(SAMPLERS),
                 "ays_table": "svd", "reference": list(reference), "seed": args.seed,
                 "seeds": f"mixed_seed({args.seed}, i) for condition i (as SampleJob): the same for every sampler",
                 "nfe_seconds": t_nfe, "nfe_rows": len(cond_probe) * probe_m,
                 "budget_s": args.budget_s, "projected_sweep_s": projected,
                 "sizing": "explicit" if explicit else f"first of SIZE_PLANS projected <= {args.budget_s:.0f} s"})
    log(f"one NFE on {len(cond_probe) * probe_m} rows: {t_nfe:.2f} s; sweep: {k} conditions x {m} members, steps "
        f"{steps_list}, projected {projected:.0f} s")

    x, y = ds.read(cond_start, cond_start + k)
    cond, truth = inorm.encode(torch.from_numpy(x)), torch.from_numpy(y)
    seeds = [mixed_seed(args.seed, i) for i in range(k)]
    t0 = time.perf_counter()
    rows, ref_row = error_vs_nfe(model, cond, truth, tnorm, members=m, seeds=seeds, steps_list=steps_list,
                                 reference=reference)
    meta["sweep_s"] = time.perf_counter() - t0
    result = {"meta": meta, "reference": ref_row, "rows": rows,
              "nfe_to_within_5pct": nfe_to_within(rows, ref_row["crps"]),
              "nfe_to_at_most_5pct_above": nfe_to_within(rows, ref_row["crps"], one_sided=True)}
    worse = [f"{r['sampler']}/{r['schedule']}@{r['steps']}" for r in rows
             if r["sampler"] != "euler" and any(e["sampler"] == "euler" and e["schedule"] == r["schedule"]
                                                and e["nfe"] <= r["nfe"] and 1.01 * e["crps"] < r["crps"] for e in rows)]
    result["worse_than_euler_at_no_more_nfe"] = worse
    write_outputs(out, result)

    if not args.skip_throughput:
        rows_t = min(args.throughput_rows, n_test)
        try:
            result["throughput"], result["stores"] = sampling_throughput(ckpt, data_url, cond_start, out, rows_t,
                                                                         chunk=2, members=args.throughput_members)
        except Exception as e:   # keep the sweep's results; the error goes into the JSON
            result["throughput_error"] = f"{type(e).__name__}: {e}"[:3000]
            log(f"throughput FAILED: {result['throughput_error'][:1500]}")
        result["meta"]["throughput_note"] = ("in-process: 1 process x {} thread(s); ray: 2 tasks x 0.5 CPU (1 thread "
                                             "each) on a 2-CPU loopback Ray node; {} cores, shared with other "
                                             "jobs").format(args.threads, os.cpu_count())
    figures = [plot_metric(out / "crps_vs_nfe.png", rows, ref_row, "crps", "CRPS (fair)",
                           f"CRPS vs NFE, {k} held-out conditions x {m} members"),
               plot_metric(out / "ens_mean_l2_vs_nfe.png", rows, ref_row, "ens_mean_rel_l2",
                           "relative L2 of the ensemble mean", "ensemble-mean error vs NFE"),
               plot_metric(out / "ref_dev_vs_nfe.png", rows, ref_row, "ref_dev",
                           "mean ||x - x_ref|| / ||x_ref|| (same noise)", "distance to the reference's samples")]
    result["figures"] = [str(f) for f in figures]
    result["meta"]["total_s"] = time.perf_counter() - t_start
    result["meta"]["loadavg_end"] = list(os.getloadavg())
    write_outputs(out, result)
    report(result)
    if result.get("throughput_error"):
        print(f"\nthroughput FAILED: {result['throughput_error'].splitlines()[0]}")
    if worse:
        print(f"\nCRPS over 1% worse than Euler at no more NFE (same schedule): {', '.join(worse)}")
    print(f"\nresults: {out / 'diffusion_bench.json'} (+ .csv, diffusion_throughput.csv, "
          f"{', '.join(Path(f).name for f in figures)}); total {result['meta']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
