"""Runs several training runs inside one set of ranks (torchrun or mpirun), for the exchange tests.

    torchrun --nproc-per-node 2 tests/comm_worker.py SPEC.json OUT_DIR
    mpirun -n 2 python tests/comm_worker.py SPEC.json OUT_DIR

SPEC: {"base": [overrides...], "runs": [{"name", "overrides", "stop_after", "resume", "poison_step"}]}.
Each rank saves its final flat parameters to OUT_DIR/<name>.rank<r>.pt; rank 0 writes OUT_DIR/<name>.json
(the run summary plus the compressor's state, checked finite).
"""

import json
import logging
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.run import set_deterministic  # noqa: E402
from launch.rendezvous import destroy_distributed, init_distributed  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.registry import get_model_spec  # noqa: E402
from trainer.train import Trainer  # noqa: E402


class PoisonedTrainer(Trainer):
    """Rank 1's loss becomes NaN at one step: its gradient is non-finite, the others' are not."""
    poison_step = 0

    def forward_backward(self, batch):
        if self.rank == 1 and self.state.step + 1 == self.poison_step:
            loss = (self.model(batch["x"]) * math.nan).mean()
            loss.backward()
            return loss
        return super().forward_backward(batch)


class WarningRecorder(logging.Handler):
    """Collects the warnings of the "fieldtrain" logger until closed (they go to the run's summary)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger("fieldtrain").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def close(self) -> None:
        logging.getLogger("fieldtrain").removeHandler(self)
        super().close()


def main(spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(out)
    torch.set_num_threads(1)
    set_deterministic(True)
    env = None
    for run in spec["runs"]:
        cfg = load_config(spec["config"], spec["base"] + run.get("overrides", []) + [f"run.name={run['name']}"])
        if env is None:
            env, device = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
        cls = PoisonedTrainer if run.get("poison_step") else (get_model_spec(cfg.model.name).trainer_class() or Trainer)
        cls.poison_step = run.get("poison_step", 0)
        warnings = WarningRecorder()   # this run's "fieldtrain" warnings, on this rank
        trainer = cls(cfg, device, resume=run.get("resume", False))
        summary = trainer.train(until_step=run.get("stop_after"))
        warnings.close()
        summary["warnings"] = warnings.messages
        flat = torch.cat([torch.view_as_real(p).flatten() if p.is_complex() else p.flatten()
                          for p in trainer.engine.full_parameters()])   # gathered in full under sharded engines
        if spec.get("save_params", True):
            torch.save(flat, out_dir / f"{run['name']}.rank{env.rank}.pt")
            if trainer.ema is not None:   # this rank's piece of the average (whole for DDP, its shard when sharded)
                torch.save({n: t.to_local() if hasattr(t, "to_local") else t for n, t in trainer.ema.shadow.items()},
                           out_dir / f"{run['name']}.ema.rank{env.rank}.pt")
        comp = getattr(trainer.engine.exchange, "compressor", None)
        state = comp.state_dict() if comp is not None else {"local": {}, "replicated": {}}
        summary["state_finite"] = all(bool(torch.isfinite(t).all()) for part in state.values() for t in part.values()
                                      if torch.is_tensor(t) and t.is_floating_point())
        summary["state_keys"] = sum(len(part) for part in state.values())
        summary["bucket_cap_mb"] = getattr(trainer.engine, "bucket_cap_mb", None)
        if env.rank == 0:
            (out_dir / f"{run['name']}.json").write_text(json.dumps(summary))
        del trainer, comp, state
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
