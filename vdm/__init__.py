"""vdm: continuous-time Variational Diffusion Models in JAX/Flax."""

from vdm import losses, model, networks, sampling, schedules
from vdm.compilation_cache import enable as enable_compilation_cache
from vdm.pretrained import TrainedVDM, load

__all__ = ["losses", "model", "networks", "sampling", "schedules", "load", "TrainedVDM", "enable_compilation_cache"]
__version__ = "0.1.0"
