"""The `fieldtrain` command: a thin entry point that parses arguments, builds, runs and tears down.

    fieldtrain train CONFIG [--set section.key=value ...] [--nproc N] [--resume | --overwrite]
    fieldtrain study STUDY.toml [--backend local] [--resume] [--force] [--out DIR]
    fieldtrain demo [diffusion] [--out runs/demo] [--nproc 2]
    fieldtrain sampler train CONFIG [--nproc N] [--set ...];  fieldtrain sampler eval RUN
    fieldtrain sample RUN_OR_CHECKPOINT --n N --out URL [--cond URL] [--sampler S] [--steps K] [--workers W] [...]
    fieldtrain data generate darcy --n N --res R --out URL [--seed S] [--chunk-size C] [--workers W]
    fieldtrain data inspect URL
    fieldtrain data verify URL [--storage-options JSON]
    fieldtrain launch slurm CONFIG --nodes N --tasks-per-node M [--time T] [--gpus-per-node G] [--dry-run] [...]
    fieldtrain launch ray CONFIG --address ADDR --workers MIN[..MAX] [--storage-path URL] [--max-failures K] [...]

Exit codes: 0 done; 2 a user error (bad config, store or run directory: one line naming it); 74 a checkpoint did not
fit on its disk (the previous one is intact); 75 stopped by SIGTERM/SIGINT/SIGUSR1 after a checkpoint (--resume goes
on); 128+N killed by signal N; anything else, a rank's failure.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

from launch.run import EXIT_PREEMPTED  # noqa: F401  (the exit code of a preempted run, for launchers)

EXIT_NO_SPACE = 74   # EX_IOERR: a checkpoint did not fit; the previous one is intact, --resume once there is room
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("fieldtrain")


def _setup_logging() -> None:
    from launch import env_rank
    rank = env_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")


def cmd_train(args: argparse.Namespace) -> int:
    if not args.nproc or "WORLD_SIZE" in os.environ:   # a rank (torchrun, mpirun, srun, or alone): before torch loads
        from trainer.signals import install_stop_handlers
        install_stop_handlers()
    from launch.run import preflight, run_training
    from trainer.config import load_config

    cfg = load_config(args.config, args.set)
    if args.nproc and "WORLD_SIZE" not in os.environ:
        from launch.local import spawn_local
        preflight(cfg, args.nproc, args.resume, args.overwrite)
        argv = ["train", args.config, *sum((["--set", s] for s in args.set), [])]
        argv += ["--resume"] if args.resume else []
        argv += ["--overwrite"] if args.overwrite else []
        argv += ["--stop-after-step", str(args.stop_after_step)] if args.stop_after_step else []
        return spawn_local(args.nproc, argv)
    summary = run_training(cfg, resume=args.resume, overwrite=args.overwrite, until_step=args.stop_after_step or None)
    return EXIT_PREEMPTED if summary["preempted"] else 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Samples of a trained diffusion model into a Zarr store, chunk by chunk (resumable: rerun the same command)."""
    from launch.sample import run_sampling
    from trainer.diffusion.sampling import SampleJob, evaluate_samples, find_checkpoint
    storage_options = _json_arg(args.storage_options, "--storage-options") or {}
    if args.n < 1:
        raise ValueError(f"--n = {args.n}; must be >= 1")
    if args.observe and not 0 < args.observe <= 1:
        raise ValueError(f"--observe = {args.observe}; the observed fraction of grid points must be in (0, 1]")
    sigma_list = None
    if args.sigmas:
        try:
            sigma_list = [float(v) for v in args.sigmas.split(",")]
        except ValueError:
            raise ValueError(f"--sigmas = {args.sigmas!r}; give decreasing numbers separated by commas, e.g. "
                             "80,10,1,0.1,0") from None
        args.schedule, args.steps = "list", len(sigma_list) - 1
    ckpt = find_checkpoint(args.run)
    rows = args.conditions if args.cond else args.n
    if args.cond and not rows:
        from data.store import FieldDataset
        rows = FieldDataset(args.cond, storage_options).num_samples - args.cond_start
    job = SampleJob(str(ckpt), num_rows=rows, chunk_size=args.chunk_size, members=args.n if args.cond else 1,
                    sampler=args.sampler, schedule=args.schedule, steps=args.steps, seed=args.seed, sigma_list=sigma_list,
                    cond_url=args.cond, cond_start=args.cond_start, storage_options=storage_options,
                    weights=args.weights, observe_fraction=args.observe, zeta=args.zeta, rollout=args.rollout,
                    rollout_from=args.rollout_from)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        from launch.rendezvous import destroy_distributed, init_distributed
        init_distributed("gloo", 1800)
    try:
        summary = run_sampling(job, args.out, workers=args.workers, storage_options=storage_options,
                               ray_address=args.ray_address or None, progress=not args.no_progress)
    finally:
        if distributed:
            destroy_distributed()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if not rank0:
        return 0
    table = [("store", args.out), ("mode", f"{summary['mode']} x {summary['workers']}"),
             ("rows (chunks sampled / already there)", f"{summary['rows']} ({summary['done']} / {summary['skipped']})"),
             ("sampler", f"{args.sampler}, {args.schedule} schedule, {args.steps} steps, {job.meta['nfe']} NFE"),
             ("weights", f"{job.meta['weights']} (step {job.meta['step']})"),
             ("samples / s", f"{summary['samples_per_s'] * job.sample_shape[0] if args.cond else summary['samples_per_s']:.2f}")]
    if args.cond:
        report = Path(args.report) if args.report else (ckpt.parents[1] if ckpt.parent.name == "checkpoints"
                                                        else ckpt.parent) / "samples" / Path(args.out).stem
        result = evaluate_samples(args.out, report, storage_options)
        table += [("conditions x members", f"{result['conditions']} x {result['members']}"),
                  ("ensemble-mean relative L2", f"{result['ens_mean_rel_l2']:.4f}"),
                  ("CRPS", f"{result['crps']:.4g}"), ("spread-skill ratio", f"{result['spread_skill']:.3f}"),
                  ("energy-spectrum error", f"{result['spectrum_error']:.3f}")]
        if job.trajectory:
            table.append(("rollout", f"{job.rollout} steps from state {args.rollout_from}; scores at the last step"))
        if args.observe:
            table.append(("observed (DPS)", f"{args.observe:.1%} of grid points, zeta {args.zeta}"))
        table += [("figures", ", ".join(result["figures"])), ("report", str(report / "eval.json"))]
    print_table(table)
    return 0


def cmd_sampler_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    name = load_config(args.config, args.set).model.name
    if name != "density_sampler":
        raise ValueError(f"{args.config}: model.name = {name!r}; `fieldtrain sampler train` trains density samplers "
                         "(model.name = 'density_sampler'); `fieldtrain train` trains the rest")
    return cmd_train(args)


def cmd_sampler_eval(args: argparse.Namespace) -> int:
    """The estimates of a finished (or stopped) run from its latest checkpoint, in one process."""
    from trainer.config import config_from_dict, migrate_config_dict
    from trainer.density.trainer import DensityTrainer
    run = Path(args.run)
    if not (run / "config.json").is_file():
        raise ValueError(f"{run}: not a run directory (no config.json)")
    cfg = config_from_dict(migrate_config_dict(json.loads((run / "config.json").read_text())))
    if cfg.model.name != "density_sampler":
        raise ValueError(f"{run}: model.name = {cfg.model.name!r}; not a density sampler")
    cfg.run.out_dir, cfg.run.name = str(run.parent), run.name
    trainer = DensityTrainer(cfg, resume=True)
    try:
        if trainer.restore() is None:
            raise ValueError(f"{run}: no checkpoint to evaluate")
        trainer.total_steps = trainer.state.step   # the figure is drawn for the checkpoint's step
        trainer.evaluate()
    finally:
        trainer.close()
    r = trainer.eval_extra
    rows = [("target", f"{cfg.model.params.target} (d = {trainer.data.input_shape[0]}, log Z = {r['log_z']})"),
            ("method", cfg.model.params.method), ("step", str(trainer.state.step)),
            ("ELBO", f"{r['elbo']:.4f} +- {r['elbo_se']:.4f} (standard error)"),
            ("importance-weighted log Z", f"{r['iw_log_z']:.4f}")]
    rows += [("EUBO", f"{r['eubo']:.4f}"), ("W2^2 to exact samples", f"{r['w2_squared']:.4f}")] if "eubo" in r else []
    rows += [("|ELBO - log Z|", f"{r['log_z_error']:.4f}"),
             ("|IW log Z - log Z|", f"{r['iw_log_z_error']:.4f}")] if "log_z_error" in r else []
    rows += [("ESS", f"{r['ess']:.4f}"), ("samples", str(r["eval_samples"])),
             ("figure", str(run / "figures" / "samples.png"))]
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, str]]) -> None:
    kw, vw = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
    line = f"+{'-' * (kw + 2)}+{'-' * (vw + 2)}+"
    print(line)
    for k, v in rows:
        print(f"| {k:<{kw}} | {v:>{vw}} |")
    print(line)


def _demo_data(args: argparse.Namespace) -> Path:
    """The demos' Darcy store (generated once, reused while its parameters match)."""
    from data.darcy import write_darcy_dataset
    from data.store import FieldDataset
    out = Path(args.out)
    store = out / "darcy.zarr"
    want = {"n": args.samples, "res": args.res, "seed": 0}
    try:
        ds = FieldDataset(str(store))
        fresh = all(ds.attrs["params"].get(k) == v for k, v in want.items())
    except ValueError:
        fresh = False
    if not fresh:
        print(f"generating {args.samples} Darcy samples at {args.res}x{args.res} into {store}")
        write_darcy_dataset(str(store), args.samples, args.res, seed=0, chunk_size=50,
                            workers=args.nproc, overwrite=True, progress=True)
    else:
        print(f"reusing {store}")
    return store


def cmd_demo(args: argparse.Namespace) -> int:
    if args.kind == "diffusion":
        return cmd_demo_diffusion(args)
    out = Path(args.out)
    store = _demo_data(args)
    overrides = [f"data.path={store}", f"run.out_dir={out}", "run.name=fno"]
    argv = ["train", str(REPO_CONFIGS / "demo.toml"), *sum((["--set", s] for s in overrides), []), "--overwrite"]
    from launch.local import spawn_local
    rc = spawn_local(args.nproc, argv)
    if rc == EXIT_PREEMPTED:
        print(f"training stopped by a signal after a checkpoint in {out / 'fno'} (exit code {rc}); `fieldtrain train "
              f"{REPO_CONFIGS / 'demo.toml'} --nproc {args.nproc} --resume` with the same --set values continues it",
              file=sys.stderr)
        return rc
    if rc != 0:
        print(f"training failed (exit code {rc})", file=sys.stderr)
        return rc
    s = json.loads((out / "fno" / "summary.json").read_text())
    summary = {"samples (train/test)": f"{s['train_samples']}/{s['test_samples']}", "ranks": s["world_size"],
               "epochs": f"{s['epochs']:.1f}", "steps": s["steps"], "train loss (rel L2)": f"{s['train_loss']:.4f}",
               "test relative L2": f"{s['test_rel_l2']:.4f}", "wall time": f"{s['wall_time_s']:.1f} s",
               "compressor": s["compressor"],
               "grad bytes / step / rank": f"{s['grad_bytes_per_step'] / 1e6:.3f} MB",
               "fp32 allreduce would send": f"{s['grad_bytes_per_step'] * s['compression_ratio'] / 1e6:.3f} MB",
               "bytes saved": f"{1 - 1 / s['compression_ratio']:.1%} ({s['compression_ratio']:.1f}x less)",
               "replicas identical": "yes" if s["replica_max_abs_diff"] == 0 else f"NO ({s['replica_max_abs_diff']:.2e})"}
    print_table([(k, str(v)) for k, v in summary.items()])
    (out / "summary.json").write_text(json.dumps({**s, "table": summary}, indent=2))
    print(f"wrote {out / 'summary.json'}; metrics in {out / 'fno' / 'metrics.csv'}, TensorBoard in {out / 'fno' / 'tb'}")
    return 0


def cmd_demo_diffusion(args: argparse.Namespace) -> int:
    """Train a small conditional EDM-FNO on the demo's Darcy data (2 ranks), then sample an ensemble for held-out
    permeabilities in 10 steps of DPM-Solver++(2M) and score it against the true pressure."""
    from launch.local import spawn_local
    from launch.sample import run_sampling
    from trainer.diffusion.sampling import SampleJob, evaluate_samples, find_checkpoint
    out = Path(args.out)
    store = _demo_data(args)
    run_dir = out / "edm"
    overrides = [f"data.path={store}", f"run.out_dir={out}", "run.name=edm"]
    argv = ["train", str(REPO_CONFIGS / "demo_diffusion.toml"), *sum((["--set", s] for s in overrides), []),
            "--overwrite"]
    rc = spawn_local(args.nproc, argv)
    if rc != 0:
        print(f"training failed (exit code {rc})", file=sys.stderr)
        return rc
    s = json.loads((run_dir / "summary.json").read_text())
    n_test, conditions, members = s["test_samples"], 12, 8
    job = SampleJob(str(find_checkpoint(run_dir)), num_rows=min(conditions, n_test), chunk_size=4, members=members,
                    sampler="dpmpp_2m", steps=10, cond_url=str(store), cond_start=s["train_samples"])
    samples = run_dir / "samples.zarr"
    print(f"sampling {job.num_rows} held-out conditions x {members} members into {samples}")
    sampled = run_sampling(job, str(samples), overwrite=True)
    result = evaluate_samples(str(samples), run_dir / "samples")
    table = [("data", f"{store} ({s['train_samples']} train / {s['test_samples']} test)"),
             ("training", f"{s['steps']} steps on {s['world_size']} ranks, {s['wall_time_s']:.0f} s, "
                          f"{s['compressor']} ({s['compression_ratio']:.1f}x fewer bytes)"),
             ("EDM loss (last steps)", f"{s['train_loss']:.4f}"),
             ("weights sampled", f"{job.meta['weights']} (EDM2 power profile)"),
             ("sampler", f"DPM-Solver++(2M), EDM schedule, {job.meta['nfe']} NFE"),
             ("held-out conditions x members", f"{result['conditions']} x {result['members']}"),
             ("ensemble-mean relative L2", f"{result['ens_mean_rel_l2']:.4f}"),
             ("CRPS", f"{result['crps']:.4g}"), ("spread-skill ratio", f"{result['spread_skill']:.3f}"),
             ("energy-spectrum error", f"{result['spectrum_error']:.3f}"),
             ("samples / s (1 process)", f"{sampled['samples_per_s'] * members:.1f}")]
    print_table(table)
    figures = [str(p) for p in sorted((run_dir / "figures").glob("*.png"))] + result["figures"]
    print("figures:\n  " + "\n  ".join(figures))
    (out / "summary_diffusion.json").write_text(json.dumps({"train": s, "samples": result,
                                                              "table": dict(table)}, indent=2))
    return 0


def _json_arg(text: str, flag: str) -> dict | None:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be JSON, e.g. '{{\"anon\": false}}' ({e})") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import tomllib
    from data.generate import generate_dataset
    params = {}
    for item in args.param:
        key, _, value = item.partition("=")
        try:
            params[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            params[key] = value
    report = generate_dataset(args.problem, args.out, args.n, args.res, seed=args.seed, chunk_size=args.chunk_size,
                              params=params, storage_options=_json_arg(args.storage_options, "--storage-options"),
                              codec=args.codec, overwrite=args.overwrite, ray_address=args.ray_address,
                              task_cpus=args.task_cpus, workers=args.workers)
    print(f"{args.out}: {report['chunks']} chunks, {report['written']} written now, {report['skipped']} already "
          f"complete ({report['seconds']:.1f} s)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np
    from data.store import FieldDataset
    ds = FieldDataset(args.url, _json_arg(args.storage_options, "--storage-options"))
    print(f"{ds.url}: {ds.num_samples} samples in {ds.num_chunks} chunks of {ds.chunk_size}")
    for name, arr in (("inputs", ds.inputs), ("targets", ds.targets)):
        print(f"  {name}: shape {arr.shape} dtype {arr.dtype} chunks {arr.chunks} codecs {arr.compressors}")
    print("  checksummed: " + ("yes (crc32c on every chunk)" if ds.checksummed else
                               "NO (chunks carry no checksum: a changed byte can go unnoticed; regenerate to protect)"))
    print("  attributes:")
    for k, v in ds.attrs.items():
        print(f"    {k}: {json.dumps(v)}")
    x, y = ds.read(0, min(ds.num_samples, ds.chunk_size))
    for name, a in (("inputs", x), ("targets", y)):
        print(f"  {name} (first chunk): min {a.min():.4g} max {a.max():.4g} mean {a.mean():.4g} "
              f"std {a.std():.4g} finite {bool(np.isfinite(a).all())}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from data.store import FieldDataset, format_bad_chunks
    ds = FieldDataset(args.url, _json_arg(args.storage_options, "--storage-options"))
    bad = ds.verify(progress=args.progress)
    checksum = "crc32c-checked" if ds.checksummed else "NOT checksummed: only missing, undecodable or non-finite found"
    if bad:
        print(format_bad_chunks(ds.url, bad))
        return 1
    print(f"{ds.url}: all {ds.num_chunks} chunks of 'inputs' and 'targets' read back intact ({checksum})")
    return 0


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    from launch.slurm import SlurmJob, launch_slurm
    job = SlurmJob(args.config, args.nodes, args.tasks_per_node, time=args.time, partition=args.partition,
                   gpus_per_node=args.gpus_per_node, array=args.array, sweep=args.sweep, overrides=args.set,
                   job_name=args.job_name, output=args.output, sbatch_args=args.sbatch_arg, script=args.script)
    print(launch_slurm(job, dry_run=args.dry_run), end="" if args.dry_run else "\n")
    return 0


def cmd_launch_ray(args: argparse.Namespace) -> int:
    from launch.ray_train import launch_ray
    return launch_ray(args.config, args.set, args.address, args.workers, storage_path=args.storage_path,
                      max_failures=args.max_failures, cpus_per_worker=args.cpus_per_worker,
                      gpus_per_worker=args.gpus_per_worker, resize_interval_s=args.resize_interval)


def cmd_study(args: argparse.Namespace) -> int:
    if args.study == "predict":
        return cmd_study_predict(args)
    if args.study == "report":
        from launch.study import rewrite_report
        if not args.dir:
            raise ValueError("fieldtrain study report STUDY_DIR: the study directory is missing")
        print(rewrite_report(args.dir))
        return 0
    from launch.study import run_study
    records = run_study(args.study, args.backend, resume=args.resume, force=args.force, out=args.out,
                        ray_address=args.ray_address)
    failed = [r for r in records if r["status"] != "ok"]
    for r in records:
        print(f"{r['cell']:60s} r{r['repeat']}  {r['status']:6s}  "
              + (f"{r['step_s_median']:.4f} s/step  {r['samples_per_s']:.1f} samples/s  test L2 {r['test_rel_l2']}"
                 if r["status"] == "ok" else r["error"][:120]))
    return 1 if failed else 0


def cmd_study_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launch.study import read_records
    from launch.study_model import fit, predict_table
    if not args.dir:
        raise ValueError("fieldtrain study predict STUDY_DIR: the study directory is missing")
    records = read_records(Path(args.dir) / "results.jsonl")
    if not records:
        raise ValueError(f"study directory {args.dir!r} has no results.jsonl records (run the study first)")
    model = fit(records)
    print(f"fit: {model.describe()}")
    if args.alpha_us is not None:
        model.alpha = args.alpha_us * 1e-6
        print(f"alpha set to {args.alpha_us:g} us per message (--alpha-us)")
    for caveat in model.caveats:
        print(f"caveat: {caveat}")
    nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
    rows = predict_table(model, nodes, [b.strip() for b in args.bandwidth.split(",") if b.strip()], args.compute_s,
                         args.ranks_per_node)
    print(f"{'series':50s} {'ranks':>6s} {'link':>9s} {'step s':>9s} {'exchange s':>10s} {'efficiency':>10s}")
    for r in rows:
        print(f"{r['series'][:50]:50s} {r['world_size']:6d} {r['bandwidth']:>9s} {r['step_s']:9.4f} "
              f"{r['exchange_s']:10.4f} {r['efficiency']:10.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fieldtrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def train_arguments(t: argparse.ArgumentParser) -> None:
        t.add_argument("config")
        t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-3")
        t.add_argument("--nproc", type=int, default=0, help="spawn this many local ranks (torchrun)")
        t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
        t.add_argument("--overwrite", action="store_true",
                       help="replace a previous run in the same run directory (its checkpoints, metrics and logs)")
        t.add_argument("--stop-after-step", type=int, default=0, metavar="N",
                       help="checkpoint and stop after step N (a staged run; --resume continues it)")

    t = sub.add_parser("train", help="train from a TOML config")
    train_arguments(t)
    t.set_defaults(func=cmd_train)

    st = sub.add_parser("study", help="a scaling study: one run per cell of a grid of config values (launch/study.py); "
                                      "`study predict DIR`: the fitted cost model's step times past the cluster; "
                                      "`study report DIR`: its CSV, figures and report.md again from results.jsonl")
    st.add_argument("study", help="the study file (TOML: [study] config, steps, repeats; [axes] key = [values]), "
                                  "or `predict` or `report`")
    st.add_argument("dir", nargs="?", help="with `predict` or `report`: the study directory")
    st.add_argument("--nodes", default="8,64,512,1024", help="predict: node counts, comma-separated")
    st.add_argument("--ranks-per-node", type=int, default=1, help="predict: ranks on each node")
    st.add_argument("--alpha-us", type=float, default=None,
                    help="predict: the target network's latency per message (us), instead of the fitted alpha")
    st.add_argument("--bandwidth", default="10gbit,100gbit,400gbit",
                    help="predict: links (tc rates, or `measured`: the study's loopback/unshaped link)")
    st.add_argument("--compute-s", type=float, default=None,
                    help="predict: a step's compute seconds on the target machine (e.g. a GPU's), instead of measured")
    st.add_argument("--backend", default="local", choices=("local", "slurm", "ray"),
                    help="where cells run: local (this machine: loopback, or emulated nodes with a nodes axis), "
                         "slurm (one job per cell) or ray (one Ray Train job per cell on --ray-address)")
    st.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                    help="with --backend ray: the cluster's head (HOST:PORT, ray://HOST:PORT or auto)")
    st.add_argument("--resume", action="store_true", help="run only the cells not recorded in the study directory")
    st.add_argument("--force", action="store_true", help="start the study directory over (even another study's)")
    st.add_argument("--out", default=None, help="study directory (default: study.out_dir, else runs/studies/NAME)")
    st.set_defaults(func=cmd_study)

    sampler = sub.add_parser("sampler", help="diffusion samplers of unnormalised densities (PIS, DDS, TB, VarGrad)"
                             ).add_subparsers(dest="sampler_command", required=True)
    st = sampler.add_parser("train", help="train a sampler from a TOML config (model.name = 'density_sampler')")
    train_arguments(st)
    st.set_defaults(func=cmd_sampler_train)
    se = sampler.add_parser("eval", help="estimate log Z (ELBO, importance-weighted, EUBO), ESS and W2 of a run")
    se.add_argument("run", help="the run directory")
    se.set_defaults(func=cmd_sampler_eval)

    d = sub.add_parser("demo", help="generate Darcy data and train an FNO (or, `demo diffusion`, an EDM) on 2 ranks")
    d.add_argument("kind", nargs="?", default="fno", choices=["fno", "diffusion"])
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--nproc", type=int, default=2)
    d.add_argument("--samples", type=int, default=1000)
    d.add_argument("--res", type=int, default=33)
    d.set_defaults(func=cmd_demo)

    sp = sub.add_parser("sample", help="sample a trained diffusion model into a Zarr store (resumable, fanned out)")
    sp.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory (its latest checkpoint) or a checkpoint")
    sp.add_argument("--n", type=int, required=True,
                    help="samples; with --cond, ensemble members per condition")
    sp.add_argument("--out", required=True, help="the sample store (path or fsspec URL)")
    sp.add_argument("--cond", default=None, metavar="URL",
                    help="a dataset store: its inputs condition the samples, its targets are kept as the truth")
    sp.add_argument("--conditions", type=int, default=0, help="with --cond: how many (0: all from --cond-start)")
    sp.add_argument("--cond-start", type=int, default=0, help="with --cond: the first sample index used")
    sp.add_argument("--sampler", default="dpmpp_2m")
    sp.add_argument("--schedule", default="edm")
    sp.add_argument("--steps", type=int, default=10)
    sp.add_argument("--sigmas", default="", help="your own schedule: decreasing noise levels, e.g. 80,10,1,0.1,0 "
                                                 "(replaces --schedule and --steps)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--weights", default="ema", help="ema (the run's average, when kept) or raw")
    sp.add_argument("--observe", type=float, default=0.0, metavar="FRACTION",
                    help="inverse problem: observe --cond's targets at this fraction of grid points, sample the "
                         "posterior with DPS guidance")
    sp.add_argument("--zeta", type=float, default=1.0, help="DPS step size (with --observe)")
    sp.add_argument("--rollout", type=int, default=0,
                    help="trajectory models: autoregressive steps from --rollout-from (0: to the stored end)")
    sp.add_argument("--rollout-from", type=int, default=0, help="trajectory models: the stored state to start from")
    sp.add_argument("--chunk-size", type=int, default=8, help="rows per chunk (the unit of work and of resuming)")
    sp.add_argument("--workers", type=int, default=1, help="1: in this process; N: up to N Ray tasks at once")
    sp.add_argument("--ray-address", default="")
    sp.add_argument("--storage-options", default="", help="fsspec options as JSON, for --out and --cond")
    sp.add_argument("--report", default="", help="where figures and eval.json go (default: RUN/samples/<out name>)")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_sample)

    data = sub.add_parser("data", help="dataset generation and inspection").add_subparsers(dest="data_command", required=True)
    g = data.add_parser("generate", help="generate a PDE dataset into a Zarr store, one Ray task per chunk")
    g.add_argument("problem", choices=["darcy", "burgers", "navier_stokes"])
    g.add_argument("--n", type=int, required=True, help="number of samples")
    g.add_argument("--res", type=int, required=True, help="grid points per dimension")
    g.add_argument("--out", required=True, help="store URL: a path, file://, s3://, memory://")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chunk-size", type=int, default=64)
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="generator parameter, e.g. fine_factor=2 (darcy), nu=0.01 (burgers), dt=1e-3 (navier_stokes)")
    g.add_argument("--codec", default="blosc-lz4", choices=["blosc-lz4", "zstd", "none"])
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    g.add_argument("--task-cpus", type=float, default=0.5, help="CPUs per generation task")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="1: generate in this process, without Ray; N > 1: Ray tasks, at most N at once "
                   "(default: as many Ray tasks as the cluster's CPUs allow)")
    g.add_argument("--storage-options", default="", help="JSON, e.g. '{\"anon\": false}'")
    g.set_defaults(func=cmd_generate)
    i = data.add_parser("inspect", help="print arrays, chunks, codecs, checksum, attributes and statistics")
    i.add_argument("url")
    i.add_argument("--storage-options", default="")
    i.set_defaults(func=cmd_inspect)
    v = data.add_parser("verify", help="read and decode every chunk; list missing or corrupt ones (exit 1 if any)")
    v.add_argument("url")
    v.add_argument("--storage-options", default="")
    v.add_argument("--progress", action="store_true", help="show a progress bar")
    v.set_defaults(func=cmd_verify)

    launch = sub.add_parser("launch", help="submit training to a cluster").add_subparsers(dest="launcher", required=True)
    s = launch.add_parser("slurm", help="render a batch script from slurm/ and submit it with sbatch")
    s.add_argument("config")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--tasks-per-node", type=int, required=True, help="ranks per node (one per GPU with GPUs)")
    s.add_argument("--time", default=None, help="wall-clock limit, HH:MM:SS (default: the template's)")
    s.add_argument("--partition", default=None)
    s.add_argument("--gpus-per-node", type=int, default=0, help="use slurm/multinode_gpu.sbatch (NCCL)")
    s.add_argument("--array", default=None, metavar="SPEC", help="job array indices, e.g. 0-3%%2 (sweep template)")
    s.add_argument("--sweep", action="append", default=[], metavar="'KEY=VALUE ...'",
                   help="one array task per --sweep, with these overrides (slurm/sweep_array.sbatch)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    s.add_argument("--job-name", default=None)
    s.add_argument("--output", default=None, help="log file pattern, e.g. logs/%%x-%%j.out")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="--OPTION=VALUE",
                   help="another #SBATCH line, e.g. --sbatch-arg=--mail-type=END")
    s.add_argument("--script", default=None, help="a batch script template of your own (default: from slurm/)")
    s.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    s.set_defaults(func=cmd_launch_slurm)
    r = launch.add_parser("ray", help="train in Ray Train (TorchTrainer) on a Ray cluster, with restarts")
    r.add_argument("config")
    r.add_argument("--address", required=True, help="the cluster's head, HOST:PORT (or ray://HOST:PORT, auto)")
    r.add_argument("--workers", required=True, metavar="MIN[..MAX]", help="ranks: N, or an elastic range 2..4")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-3")
    r.add_argument("--storage-path", default=None, help="where Ray keeps checkpoints: a directory or s3://... "
                   "(default: run.out_dir/ray)")
    r.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up (-1: no limit)")
    r.add_argument("--cpus-per-worker", type=float, default=None, help="default 0.5 (CPU workers), 1 (GPU workers)")
    r.add_argument("--gpus-per-worker", type=float, nargs="?", const=1.0, default=0.0, help="GPUs per worker (1 if given alone)")
    r.add_argument("--resize-interval", type=float, default=60.0, metavar="S",
                   help="with a MIN..MAX range: how often Ray considers resizing the worker group")
    r.set_defaults(func=cmd_launch_ray)
    return p


MALLOC_TUNABLES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(2**34)}
HUGEPAGE_TUNABLE = ":".join(f"{k}={v}" for k, v in MALLOC_TUNABLES.items())


def hugepage_malloc_env(env: dict[str, str]) -> dict[str, str] | None:
    """`env` plus glibc malloc tunables that keep a training step from faulting in fresh pages, or None where there is
    nothing to add (all set already, any of them set by the user, FIELDTRAIN_HUGEPAGES=0, or not Linux with glibc).

    glibc hands each large torch allocation (posix_memalign) fresh pages above the last or a fresh mmap, and gives
    them back when freed, so every step's activations and gradient-sized buffers fault in and zero-fill again.
    glibc.malloc.hugetlb=1 asks for 2 MiB pages (madvise): 512x fewer faults (comm.py's FNO step 0.54 -> 0.43 s).
    mmap_max=0 and a 16 GiB trim_threshold then keep freed memory in the heap for the next step, so a steady-state step
    faults nothing (comm.py's FNO, one thread: ~200 huge-page faults and 24 ms of system time per step -> 0, step
    0.218/0.222 -> 0.195/0.193 s in two interleaved runs; bench/README.md, `step.py`). The price: the process keeps
    its peak heap, as torch's CUDA caching allocator does. glibc reads tunables only at process start, hence the
    re-exec in `main`."""
    import platform
    if sys.platform != "linux" or env.get("FIELDTRAIN_HUGEPAGES", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if any(k in tunables for k in MALLOC_TUNABLES):
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE}


def reexec_with_hugepage_malloc() -> None:
    """Re-run this process's own command line (same PID) with `hugepage_malloc_env`, unless there is nothing to add.
    For entry points only: call it before any work."""
    if (env := hugepage_malloc_env(dict(os.environ))) is not None:
        os.execve(sys.executable, sys.orig_argv, env)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        reexec_with_hugepage_malloc()
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:   # a full disk (trainer.checkpoint.CheckpointNoSpaceError says where and how much)
            raise
        log.error("%s", e)
        return EXIT_NO_SPACE


if __name__ == "__main__":
    sys.exit(main())
