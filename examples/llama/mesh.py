"""FSDP sharding of the LLaMA example over a one-axis device mesh (``--mesh fsdp=8``).

Every array is split along one axis over the mesh's devices, or replicated where none
splits evenly:

* a weight along its largest axis whose size the device count divides (a scanned stack's
  leading layer axis is never the one split: the scan reads one layer at a time); INT8
  weights (``qgalore_jax.QuantizedWeight``) split their codes, scales and zeros the same
  way, each along its per-layer axis;
* the optimizer state after its weight, as ``qgalore_jax.state_shardings`` places it
  (docs/distributed.md);
* a batch along its batch axis.

The mesh's axis is Auto (``jax.sharding.AxisType.Auto``): XLA partitions the model, the
optimizer and the INT8 weights' quantisers. On a CPU the devices are simulated:
``XLA_FLAGS`` must hold ``--xla_force_host_platform_device_count=N`` before JAX starts its
backend, which :func:`request_host_devices` arranges when it can.
"""

import os
import re

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
_SPEC = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=([0-9]+)")


def parse(spec: str) -> tuple[str, int]:
  """``(axis_name, size)`` of a ``--mesh`` value ``NAME=N`` (one axis, N >= 1).

  Raises:
    ValueError: for anything else, e.g. ``fsdp``, ``fsdp=0`` or ``data=2,fsdp=4``.
  """
  match = _SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
  if match is None or int(match[2]) < 1:
    raise ValueError(
      f"--mesh takes one axis as NAME=N with N a positive device count, e.g. --mesh fsdp=8;"
      f" got {spec!r}"
    )
  return match[1], int(match[2])


def _backends_initialized() -> bool | None:
  """Whether JAX has started its backends; None where this JAX does not say."""
  try:
    from jax._src import xla_bridge
  except ImportError:
    return None
  check = getattr(xla_bridge, "backends_are_initialized", None)
  return None if check is None else bool(check())


def request_host_devices(count: int) -> bool:
  """Adds ``--xla_force_host_platform_device_count=count`` to ``XLA_FLAGS`` where that can
  still take effect: JAX has not started its backends, and ``XLA_FLAGS`` names no count.

  Returns whether it did. Where it did not, a count set by the user stands, and
  :func:`make_mesh` says if there are too few devices.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if HOST_DEVICES_FLAG in flags or _backends_initialized() is not False:
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={count}".strip()
  return True


def make_mesh(spec: str) -> jax.sharding.Mesh:
  """The one-axis Auto mesh of ``spec`` (``NAME=N``) over JAX's first N devices.

  Raises:
    ValueError: for a bad ``spec``, or fewer devices than N (naming the flag that makes a
      CPU simulate N devices).
  """
  name, count = parse(spec)
  devices = jax.devices()
  if len(devices) < count:
    raise ValueError(
      f"--mesh {spec} needs {count} devices, but JAX sees {len(devices)}"
      f" ({devices[0].platform}). On a CPU, simulate them by starting Python with"
      f" XLA_FLAGS={HOST_DEVICES_FLAG}={count} (and JAX_PLATFORMS=cpu on a machine with an"
      f" accelerator); XLA_FLAGS is now {os.environ.get('XLA_FLAGS', '')!r}"
    )
  return jax.make_mesh(
    (count,),
    (name,),
    axis_types=(jax.sharding.AxisType.Auto,),
    devices=devices[:count],
  )


def fsdp_spec(shape: tuple[int, ...], mesh: jax.sharding.Mesh, skip: int = 0) -> PartitionSpec:
  """The spec splitting ``shape`` along its largest axis (the first of equal ones) that the
  mesh's device count divides, leaving the first ``skip`` axes whole; replicated (``P()``)
  where no axis splits evenly."""
  (name,) = mesh.axis_names
  ways = mesh.shape[name]
  axes = [a for a in range(skip, len(shape)) if shape[a] % ways == 0]
  if ways == 1 or not axes:
    return PartitionSpec()
  axis = max(axes, key=lambda a: (shape[a], -a))
  return PartitionSpec(*([None] * axis), name)


def param_shardings(params, mesh: jax.sharding.Mesh, scanned: bool):
  """A ``NamedSharding`` per array of ``params`` (float or INT8 weights): :func:`fsdp_spec`,
  with a scanned model's layer axis (``layers/...`` leading axis) kept whole."""

  def sharding(path, x):
    top = getattr(path[0], "key", None) if path else None
    skip = 1 if scanned and top == "layers" and x.ndim > 1 else 0
    return NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh, skip))

  return jax.tree_util.tree_map_with_path(sharding, params)


def batch_sharding(batch_size: int, mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of a ``(batch, time)`` token array: split along the batch where the
  device count divides ``batch_size``, else replicated."""
  (name,) = mesh.axis_names
  if batch_size % mesh.shape[name]:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(name))
