"""Built-in models: importing this package registers each one (trainer/registry.py)."""

from trainer.models import fno  # noqa: F401
