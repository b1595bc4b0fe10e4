"""vdm: continuous-time Variational Diffusion Models in JAX/Flax."""

from vdm import losses, model, networks, sampling, schedules

__all__ = ["losses", "model", "networks", "sampling", "schedules"]
__version__ = "0.1.0"
