"""How low-rank is the benchmark FNO's gradient in each of PowerSGD's matrix views, per byte on the wire?

    .venv/bin/python bench/lowrank.py --out bench/results/lowrank            # 200 Adam steps, ~1 min

PowerSGD sends r (n + m) floats for an n x m matrix at rank r (twice that for complex ones) and, with error
feedback, converges towards the best rank-r approximation; so the truncated SVD's relative error
||M - M_r||_F / ||M||_F against those floats says what each view (`comm.powersgd.view`, `matrix_axes`) can carry.
The model is bench/comm.py's (width 32, 12 x 12 modes, 4 layers, 64 x 64 Darcy, padding 0), trained here by Adam
(lr 3e-3, batch 16, relative L2 on standardised fields) on one thread; at the chosen steps every spectral weight's
gradient is measured in both views. Writes lowrank.json and lowrank.csv, prints the table (median over the 4
weights) and plots error against bytes (lowrank.png). Not a test: nothing here is timed.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VIEWS = ("first", "balanced")


def view_errors(grad, ranks: list[int]) -> list[dict]:
    """For one (complex or real) gradient tensor: per view and rank, the truncated SVD's relative error and the
    float32 values PowerSGD would send (P and Q, r (n + m), doubled for complex)."""
    import math

    import torch

    from trainer.compress.powersgd import matrix_axes
    rows = []
    for view in VIEWS:
        perm, k = matrix_axes(tuple(grad.shape), view)
        M = grad.permute(perm).reshape(math.prod(grad.shape[a] for a in perm[:k]), -1)
        s = torch.linalg.svdvals(M.to(torch.complex128 if M.is_complex() else torch.float64))
        total = s.square().sum()
        for r in ranks:
            if r > min(M.shape):
                continue
            rows.append({"view": view, "n": M.shape[0], "m": M.shape[1], "rank": r,
                         "floats": r * (M.shape[0] + M.shape[1]) * (2 if M.is_complex() else 1),
                         "rel_error": float((s[r:].square().sum() / total).sqrt()) if total > 0 else 0.0})
    return rows


def measure(x, y, steps: int, at: list[int], ranks: list[int], seed: int = 0) -> list[dict]:
    import torch

    from trainer.models.fno import FNO
    from trainer.models.losses import relative_l2
    torch.manual_seed(seed)
    x, y = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
    model = FNO(x.shape[1], y.shape[1], (12, 12), width=32, n_layers=4, padding=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    out = []
    for step in range(steps + 1):
        idx = torch.randint(0, x.shape[0], (16,))
        loss = relative_l2(model(x[idx]), y[idx]).mean()
        opt.zero_grad()
        loss.backward()
        if step in at:
            for name, p in model.named_parameters():
                if p.grad is not None and p.grad.is_complex():
                    out += [{"step": step, "param": name, "loss": loss.item(), **r} for r in view_errors(p.grad, ranks)]
        opt.step()
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Median over parameters of each (step, view, rank)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["step"], r["view"], r["rank"]), []).append(r)
    return [{"step": s, "view": v, "rank": k, "n": g[0]["n"], "m": g[0]["m"], "floats": g[0]["floats"],
             "rel_error": statistics.median(r["rel_error"] for r in g), "params": len(g)}
            for (s, v, k), g in sorted(groups.items(), key=lambda kv: (kv[0][0], VIEWS.index(kv[0][1]), kv[0][2]))]


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, step in enumerate(sorted({r["step"] for r in summary})):
        for view, style in zip(VIEWS, ("o-", "s--")):
            pts = [(r["floats"] * 4 / 1e3, r["rel_error"]) for r in summary
                   if r["step"] == step and r["view"] == view and r["rel_error"] > 0]     # full rank: exact
            ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{view}, step {step}")
    ax.set(xscale="log", yscale="log", xlabel="kB per spectral weight per step (fp32 P and Q)",
           ylabel="best rank-r relative error", title="FNO spectral-weight gradients: PowerSGD views")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--at", default="10,50,200", help="steps at which the gradients are measured")
    p.add_argument("--ranks", default="1,2,4,8,16,32")
    args = p.parse_args()
    import torch
    import zarr

    from bench.comm import DATA, ensure_data
    from bench.table import print_table
    torch.set_num_threads(1)
    ensure_data()
    g = zarr.open_group(str(DATA), mode="r")
    x, y = torch.tensor(g["inputs"][:]), torch.tensor(g["targets"][:])
    at = [int(s) for s in args.at.split(",")]
    rows = measure(x, y, args.steps, at, [int(r) for r in args.ranks.split(",")])
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowrank.json").write_text(json.dumps({"per_param": rows, "median": summary}, indent=2))
    with open(out / "lowrank.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    plot(summary, out / "lowrank.png")
    print("1 rank, 1 thread; median over the 4 spectral weights of the truncated SVD's relative error")
    print_table(["step", "view", "matrix", "rank", "kB/weight", "rel. error"],
                [[str(r["step"]), r["view"], f"{r['n']}x{r['m']}", str(r["rank"]), f"{r['floats'] * 4 / 1e3:.1f}",
                  f"{r['rel_error']:.4f}"] for r in summary])
    print(f"wrote {out / 'lowrank.json'}, lowrank.csv, lowrank.png")


if __name__ == "__main__":
    main()
