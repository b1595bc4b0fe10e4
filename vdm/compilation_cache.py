"""Compiled programs kept on disk between runs: JAX's persistent compilation cache, in a folder per device kind.

``train.py`` and ``sample.py`` turn it on (``--compilation_cache``); in a
notebook or script, ``vdm.enable_compilation_cache()`` before the first
compilation does the same. A later run of the same programs on the same
kind of device (a resumed training run, sampling again) loads them instead
of compiling; the results are the same bit for bit.
"""

import hashlib
import os
import platform
import re
from typing import Optional

import jax


def enable(path: str = "auto") -> Optional[str]:
  """Keeps compiled programs in ``path`` from here on; returns the folder, or None when off.

  ``"auto"``: JAX's own ``JAX_COMPILATION_CACHE_DIR`` if set (left as it is),
  else ``~/.cache/vdm/xla/<device kind>`` (``$XDG_CACHE_HOME`` honoured).
  ``"none"``: off, JAX's environment variable too. Raises OSError when the
  folder cannot be made. After ``jax.distributed.initialize``, if used.
  """
  jax.config.update("jax_enable_compilation_cache", path != "none")
  if path == "none":
    return None
  if path == "auto" and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if path == "auto":
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(home, "vdm", "xla", device_kind())
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def device_kind() -> str:
  """The kind of device programs are compiled for, as a folder name: ``gpu-NVIDIA_H200``, or for a CPU
  its architecture and a hash of its instruction-set flags (``cpu-x86_64-1a2b3c4d``: XLA will not load a
  program compiled for another CPU's instructions)."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    name = f"{device.platform}-{device.device_kind}"
  else:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
      with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    name = f"cpu-{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:8]}"
  return re.sub(r"[^\w.-]+", "_", name)
