"""Engines: how a model is spread over ranks and how its gradients cross them (`parallel.engine`).

A new engine is one file here plus one line in ENGINES; `Trainer` never changes for it. Engine modules import
their heavy dependencies (DeepSpeed) lazily, so this registry is cheap to import for config validation.
"""

from trainer.parallel.ddp import DDPEngine
from trainer.parallel.deepspeed import DeepSpeedEngine
from trainer.parallel.fsdp2 import FSDP2Engine

ENGINES = {
    "ddp": DDPEngine,
    "fsdp2": FSDP2Engine,
    "deepspeed": DeepSpeedEngine,
}
