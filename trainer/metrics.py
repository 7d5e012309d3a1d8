"""The run's metrics: metrics.csv and TensorBoard scalars, written by rank 0."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

log = logging.getLogger("fieldtrain")


class MetricsLogger:
    """CSV and TensorBoard scalars, rank 0 only.

    A run resumed from step S continues the record of step S: rows after S (written between that checkpoint and a
    crash, and about to be written again) are dropped from metrics.csv, and TensorBoard purges them (`purge_step`).
    """

    COLUMNS = ("step", "epoch", "train_loss", "test_rel_l2", "lr", "step_time_s", "data_wait_s", "bytes_per_step",
               "compression_ratio", "skipped_steps", "exchange_s")

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0, extra_columns: tuple[str, ...] = ()):
        self.enabled = enabled
        self.COLUMNS = self.COLUMNS + tuple(extra_columns)
        self.rows: list[dict] = []
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.csv_path = run_dir / "metrics.csv"
            self._rewind(start_step)
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def _rewind(self, step: int) -> None:
        if not self.csv_path.exists():
            return
        with self.csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]
        if len(kept) == len(rows) and tuple(reader.fieldnames or ()) == self.COLUMNS:
            return   # (a file from a version with other columns is rewritten with today's header)
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.csv_path)
        log.info("metrics.csv: dropped %d row(s) after step %d, the step this run resumes from",
                 len(rows) - len(kept), step)

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, **scalars}
        self.rows.append(row)
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
