"""What :class:`~qgalore_torch.QGaLoreAdamW` needs from ``torch.distributed``.

See docs/distributed_torch.md.

Three things, each small:

* the owner of each refresh in ``refresh_mode="owner"``: the matrices due on a step are
  dealt to the ranks by their SVD cost, largest first, each to the least loaded rank
  (:func:`assign_owners`), a rule every rank evaluates alike from the same schedule;
* the row range of a rank's shard of an FSDP2 (``fully_shard``) parameter, a DTensor
  sharded along dim 0 (:func:`local_rows`), and the checks that refuse the layouts the
  optimizer does not handle (:func:`check_dtensor_param`);
* whether layer-wise hooks would update before a data-parallel reduction
  (:func:`layerwise_refusal`);
* the broadcast of INT8 weights' codes that DDP's own initial broadcast cannot do
  (:func:`broadcast_int8_weights`).
"""

import torch

try:
  import torch.distributed as dist
  from torch.distributed.tensor import DTensor
  from torch.distributed.tensor import Replicate
  from torch.distributed.tensor import Shard
except ImportError:  # a torch build without distributed support
  dist, DTensor, Replicate, Shard = None, None, None, None

REFRESH_MODES = ("redundant", "owner")


def available() -> bool:
  """Whether this torch build has ``torch.distributed``."""
  return dist is not None and dist.is_available()


def is_dtensor(t) -> bool:
  """Whether ``t`` is a DTensor (an FSDP2 parameter or its gradient)."""
  return DTensor is not None and isinstance(t, DTensor)


def refresh_cost(shape: tuple[int, int]) -> int:
  """The cost of a thin SVD of an ``(m, n)`` matrix, up to a constant: ``m n min(m, n)``."""
  m, n = shape
  return m * n * min(m, n)


def assign_owners(costs: list[int], world_size: int) -> list[int]:
  """The rank that computes each refresh: largest cost first, to the least loaded rank.

  Greedy longest-processing-time scheduling; ties go to the earlier matrix and the lower
  rank, so every rank computes the same assignment from the same ``costs``.

  Args:
    costs: the cost of each refresh due on this step, in the optimizer's matrix order.
    world_size: ranks in the process group.

  Returns:
    The owner rank (within the group) of each refresh, in the order of ``costs``.

  Example:
    >>> assign_owners([1, 4, 4, 2], 2)  # 4 to rank 0, 4 to rank 1, 2 to rank 0, 1 to rank 1
    [1, 0, 1, 0]
  """
  load = [0] * world_size
  owners = [0] * len(costs)
  for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
    owner = min(range(world_size), key=lambda r: load[r])
    owners[i] = owner
    load[owner] += costs[i]
  return owners


def local_rows(p) -> tuple[int, int]:
  """``(start, stop)``: the rows of the global (out, in) matrix held by this rank's shard.

  A ``Shard(0)`` DTensor splits dim 0 as ``torch.chunk`` does: chunks of
  ``ceil(size / world)`` rows, the last ones shorter or empty.
  """
  mesh = p.device_mesh
  world, rank = mesh.size(), mesh.get_local_rank()
  size = p.shape[0]
  chunk = -(-size // world)
  start = min(rank * chunk, size)
  stop = min(start + chunk, size)
  if p.to_local().shape[0] != stop - start:
    raise ValueError(
      f"a DTensor of shape {tuple(p.shape)} holds {p.to_local().shape[0]} rows on rank {rank},"
      f" but torch.chunk's split gives rows {start}..{stop}; QGaLoreAdamW handles"
      " fully_shard's even split only"
    )
  return start, stop


def check_dtensor_param(p, where: str, group: dict, skip_nonfinite: bool) -> None:
  """Raises where QGaLoreAdamW cannot update the DTensor parameter ``p`` correctly.

  Handled: a DTensor on a 1-D mesh, sharded along dim 0 (``fully_shard``'s default) or
  replicated, holding a float tensor, with float32 moments. Refused, each with the way out:
  other placements (a 2-D HSDP mesh, ``shard_placement_fn``), INT8 weights, stacks of
  matrices (``batch_axes``), 8-bit moments and ``skip_nonfinite``.
  """
  placements = tuple(p.placements)
  if p.device_mesh.ndim != 1 or placements not in ((Shard(0),), (Replicate(),)):
    raise ValueError(
      f"{where} is a DTensor with placements {placements} on a {p.device_mesh.ndim}-D mesh;"
      " QGaLoreAdamW handles a 1-D mesh with Shard(0) (fully_shard's default) or Replicate()"
    )
  from qgalore_torch._src.int8 import Int8Weight

  if isinstance(p.to_local(), Int8Weight):
    raise TypeError(
      f"{where} is an INT8 weight sharded by FSDP2, which QGaLoreAdamW does not support:"
      " train INT8 weights under DistributedDataParallel, or keep float weights under FSDP2"
    )
  if group.get("batch_axes"):
    raise ValueError(
      f"{where} is a DTensor in a param group with `batch_axes`; stacks of matrices are not"
      " supported under FSDP2: give each matrix its own 2-D parameter, or use DDP"
    )
  if group["moment_bits"] is not None:
    raise ValueError(
      f"{where} is a DTensor and its param group has moment_bits={group['moment_bits']!r};"
      " 8-bit moments are not supported under FSDP2: use moment_bits=None, or DDP"
    )
  if skip_nonfinite:
    raise ValueError(
      f"{where} is a DTensor; `skip_nonfinite` is not supported under FSDP2: build the"
      " optimizer with skip_nonfinite=False (torch.amp.GradScaler skips such steps itself)"
    )


def wrap_like(local: torch.Tensor, p, shape: tuple[int, ...], sharded: bool):
  """``local`` as a DTensor on ``p``'s mesh, of global ``shape``: sharded like ``p`` or
  replicated."""
  placements = tuple(p.placements) if sharded else (Replicate(),)
  stride = torch.empty(shape, device="meta").stride()
  return DTensor.from_local(local, p.device_mesh, placements, shape=shape, stride=stride)


def world_size(process_group=None) -> int:
  """The size of ``process_group`` (the default group when ``None``); 1 when not initialised."""
  if not available() or not dist.is_initialized():
    return 1
  return dist.get_world_size(process_group)


def layerwise_refusal(params, local_gradients: bool) -> str | None:
  """Why layer-wise hooks would be wrong for ``params``, or ``None`` when they are not.

  A hook updates a parameter as soon as autograd has accumulated its gradient, which under
  DistributedDataParallel is before the all-reduce (each rank would step on its own
  gradient) and under FSDP2 on the unsharded parameter that is freed afterwards. DDP leaves
  no mark on the parameters it reduces, so any initialised process group of more than one
  rank is taken to reduce them, unless ``local_gradients`` says they are not.
  """
  if any(is_dtensor(p) for p in params):
    return (
      "FSDP2 (DTensor) parameters receive their gradient after the reduce-scatter, outside"
      " autograd's accumulation, so layer-wise hooks would never see it: use step()"
    )
  if local_gradients:
    return None
  size = world_size()
  if size > 1:
    return (
      f"torch.distributed is initialised with {size} processes: under DDP a layer-wise hook"
      " would update each parameter before its gradient is all-reduced, so the replicas would"
      " diverge (and DDP's buckets keep every gradient alive anyway, so the mode saves no"
      " memory): use step(); pass local_gradients=True only if no process reduces these"
      " gradients"
    )
  return None


@torch.no_grad()
def broadcast_int8_weights(module, src=0, process_group=None) -> int:
  """Copies every INT8 weight of ``module`` from process ``src`` to the others, in place.

  ``DistributedDataParallel`` broadcasts the parameters when it is built, by writing float
  values into them, which an :class:`~qgalore_torch.Int8Weight` refuses (its codes are not
  a float tensor). Build DDP with ``init_sync=False`` and call this first: it broadcasts the
  codes, scales and zeros themselves, so every process holds the same INT8 weights bit for
  bit. The other parameters and buffers still need syncing, as ``init_sync`` would have
  done: seed the model's initialisation alike on every process, load the same checkpoint,
  or broadcast them with ``torch.distributed.broadcast``.

  Args:
    module: the model (before wrapping it in DDP).
    src: the rank, in ``process_group``, whose weights the others take.
    process_group: the group (``None``: the default group).

  Returns:
    The number of INT8 weights broadcast (call it on every process: the order of
    ``module.parameters()`` must be the same everywhere).

  Example:
    >>> # model = quantize_linears(...); n = broadcast_int8_weights(model)
    >>> # ddp = DistributedDataParallel(model, init_sync=False)
  """
  from qgalore_torch._src.int8 import Int8Weight

  if process_group is not None:
    src = dist.get_global_rank(process_group, src)
  count = 0
  for p in module.parameters():
    if isinstance(p, Int8Weight):
      for t in p.quantized():
        dist.broadcast(t, src, group=process_group)
      count += 1
  return count
