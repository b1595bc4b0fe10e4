"""vdm: continuous-time Variational Diffusion Models in JAX/Flax."""

from vdm import losses, model, networks, sampling, schedules
from vdm.pretrained import TrainedVDM, load

__all__ = ["losses", "model", "networks", "sampling", "schedules", "load", "TrainedVDM"]
__version__ = "0.1.0"
