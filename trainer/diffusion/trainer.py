"""The diffusion trainer: `Trainer` with one method overridden, `evaluate`.

A conditional model is evaluated as users would use it: for each of the first `model.edm.eval_conditions` held-out
conditions, an ensemble of `eval_members` samples in `eval_steps` steps of `eval_sampler` (under the EMA weights,
which `Trainer` swaps in), scored against the truth: the relative L2 of the ensemble mean (reported as
test_rel_l2, the operator models' number), CRPS, the spread-skill ratio and the energy-spectrum error (logged
beside it). At the last step the figures (samples, ensemble mean/std, spectra) go to the run directory's
figures/. An unconditional model reports its denoising error at fixed noise levels (edm.EVAL_SIGMAS).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from data.loader import evaluation_batches
from trainer.compress.base import mixed_seed
from trainer.diffusion.edm import eval_step, model_pairs, to_physical, unwrap_edm
from trainer.diffusion.metrics import (crps_ensemble, energy_spectrum, ensemble_mean_rel_l2, spectrum_error,
                                       spread_skill_ratio)
from trainer.diffusion.sampling import sample_ensemble, sigmas_for
from trainer.train import Trainer


class DiffusionTrainer(Trainer):
    metric_columns = ("test_crps", "test_spread_skill", "test_spectrum_error")

    @torch.no_grad()
    def evaluate(self) -> float:
        core = unwrap_edm(self.model)
        cfg = core.cfg
        if not cfg.conditional:
            return super().evaluate()
        ds = self.dataset
        n = min(cfg.eval_conditions, ds.num_samples - self.train_stop)
        lo = self.train_stop + self.rank * n // self.world_size
        hi = self.train_stop + (self.rank + 1) * n // self.world_size
        x, y = (next(evaluation_batches(ds, lo, hi, hi - lo)) if hi > lo else
                (self._example["x"][:0], self._example["y"][:0]))
        cond, truth = model_pairs(core, {"x": x.to(self.device), "y": y.to(self.device)}, self.data,
                                  k=eval_step(y.shape[1]))
        example_cond = model_pairs(core, self._example, self.data, k=eval_step(y.shape[1]))[0]
        sigmas = sigmas_for(core, "edm", cfg.eval_steps)
        seeds = [mixed_seed(self.cfg.run.seed, i) for i in range(lo, hi)]
        was_training = self.model.training
        self.model.eval()
        # Sharded engines gather parameters inside forward: every rank samples as many rows as the largest share
        # (a shorter share is padded with copies of its first row, or of the example batch, and the pad dropped).
        rows = -(-n // self.world_size)
        pad_c = cond[:1] if len(cond) else example_cond
        cond_p = torch.cat([cond, pad_c.expand(rows - len(cond), *pad_c.shape[1:])]) if self.engine.sharded else cond
        seeds_p = seeds + [0] * (len(cond_p) - len(seeds))
        ens = (sample_ensemble(self.model, cond_p, cfg.eval_members, cfg.eval_sampler, sigmas.to(self.device),
                               seeds_p, tuple(truth.shape[1:]))[:len(cond)]
               if len(cond_p) else truth.new_zeros(0, cfg.eval_members, *truth.shape[1:]))
        self.model.train(was_training)
        ens_phys = to_physical(core, self.data, ens.flatten(0, 1)).reshape(ens.shape).transpose(0, 1).cpu()
        truth_phys = to_physical(core, self.data, truth).cpu()   # ensembles (M, B, C, *grid), truth (B, C, *grid)
        sums = torch.zeros(4, dtype=torch.float64)
        if len(truth):
            sums += torch.tensor([ensemble_mean_rel_l2(ens_phys, truth_phys).sum().item(),
                                  crps_ensemble(ens_phys, truth_phys, fair=True).sum().item(),
                                  float(len(truth)), 0.0], dtype=torch.float64)
        gathered = self._gather_eval(ens_phys, truth_phys)
        if dist.is_initialized():
            dist.all_reduce(sums)
        rel_l2, crps = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        if self.rank == 0:
            ens_all, truth_all = gathered
            extra = {"test_crps": crps, "test_spread_skill": spread_skill_ratio(ens_all, truth_all).item(),
                     "test_spectrum_error": spectrum_error(ens_all, truth_all).item()}
            if self.metrics is not None:
                self.metrics.log(self.state.step, **extra)
            self.eval_extra = {"test_ens_mean_rel_l2": rel_l2, **extra, "eval_conditions": n,
                               "eval_members": cfg.eval_members, "eval_sampler": cfg.eval_sampler,
                               "eval_steps": cfg.eval_steps}
            if self.state.step >= self.total_steps:
                self._figures(ens_all, truth_all)
        return rel_l2

    def _gather_eval(self, ens: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's ensembles and truths on rank 0, in condition order (small: a few fields per rank)."""
        if not dist.is_initialized() or self.world_size == 1:
            return ens, truth
        parts = [None] * self.world_size
        dist.all_gather_object(parts, (ens, truth))
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts])

    def _figures(self, ens: torch.Tensor, truth: torch.Tensor) -> None:
        from trainer.diffusion.figures import plot_samples, plot_spectra
        out = self.cfg.run_dir / "figures"
        paths = [plot_samples(out / "samples.png", None, truth[0], ens[:, 0],
                              title=f"step {self.state.step}: held-out condition 0, {ens.shape[0]} members")]
        k, e_true = energy_spectrum(truth)
        _, e_ens = energy_spectrum(ens.flatten(0, 1))
        _, e_mean = energy_spectrum(ens.mean(0))
        paths.append(plot_spectra(out / "spectra.png", k, {"truth": e_true.mean((0, 1)), "samples": e_ens.mean((0, 1)),
                                                          "ensemble mean": e_mean.mean((0, 1))}))
        (out / "eval.json").write_text(json.dumps(self.eval_extra, indent=2))
        self.figure_paths = [str(p) for p in paths]
