"""Built-in models: importing this package registers each one (trainer/registry.py)."""

from trainer.models import fno  # noqa: F401
from trainer.diffusion import edm  # noqa: F401  (EDM over a registered operator backbone)
from trainer.density import model as density_model  # noqa: F401,E402  (diffusion samplers of densities)
