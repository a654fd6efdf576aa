"""QGaLoreAdamW under DDP and FSDP2: 2 gloo processes on the CPU against 1-process references.

One ``torch.multiprocessing.spawn`` of 2 processes (a module fixture) runs every
distributed scenario and saves its weights and state; each test then compares them with a
run of the same model in this process (the reference) or with another scenario. Spawning
costs most of the time (each process imports torch), so the scenarios share one spawn.

What is compared, and how exactly:

* DDP with the same batch on both processes: all-reducing two equal gradients and halving
  is exact, so the weights must equal the 1-process run bit for bit.
* DDP with the batch split between the processes: the gradient is summed in another order,
  so the weights differ from the 1-process run by rounding, amplified by the SVDs; the
  error must stay within a few times the chaos floor, the difference the same 1-process run
  shows when its input is moved by one ulp.
* ``refresh_mode="owner"`` against ``"redundant"``: bit for bit (the owner computes the same
  SVD of the same all-reduced gradient).
* FSDP2 with the same batch on both processes: the gradients are those of 1 process, the
  sharded arithmetic sums ``P^T G`` in another order, so relative Frobenius error <= 1e-5;
  a ``state_dict`` loaded into a new optimizer resumes bit for bit.
* INT8 layers under DDP (``init_sync=False`` after ``broadcast_int8_weights``), the same
  batch on both processes: the codes of the 1-process run, bit for bit.
* The refusals (layer-wise hooks under DDP and FSDP2, INT8 weights and other layouts under
  FSDP2) raise errors that name the way out.
"""

import os
import pathlib
import sys
import tempfile
import traceback

import pytest
import torch
from torch import nn

from qgalore_torch import Int8Linear
from qgalore_torch import Int8Weight
from qgalore_torch import QGaLoreAdamW
from qgalore_torch import broadcast_int8_weights
from qgalore_torch._src import distributed

WORLD = 2
STEPS = 5
BATCH = 8  # global batch; each process takes BATCH // WORLD rows when the batch is split
OPT = dict(lr=1e-2, weight_decay=0.01, update_proj_gap=2, gamma_proj=1, seed=0)

pytestmark = pytest.mark.skipif(
  not distributed.available() or not torch.distributed.is_gloo_available(),
  reason="torch.distributed with the gloo backend is not available in this torch build",
)


class Net(nn.Module):
  """Two linears, ``(hidden, 16)`` (side right) and ``(12, hidden)`` (side left), and
  optionally a stack of two ``(12, 12)`` matrices. FSDP2 runs take ``hidden=25``: shards of
  13 and 12 rows."""

  def __init__(self, stack=True, hidden=24, linear=nn.Linear):
    super().__init__()
    self.l1 = linear(16, hidden)
    self.l2 = linear(hidden, 12)
    self.stack = nn.Parameter(0.3 * torch.randn(2, 12, 12)) if stack else None

  def forward(self, x):
    h = self.l2(torch.tanh(self.l1(x)))
    if self.stack is not None:
      h = h + torch.tanh(h @ self.stack[0].T) @ self.stack[1].T
    return h


def _model(stack=True, hidden=24, linear=nn.Linear, seed=0):
  torch.manual_seed(seed)
  return Net(stack, hidden, linear)


def _data(nudge=False):
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(STEPS, BATCH, 16, generator=gen)
  y = torch.randn(STEPS, BATCH, 12, generator=gen)
  if nudge:
    x = torch.nextafter(x, torch.tensor(float("inf")))
  return x, y


def _optimizer(model, **kwargs):
  matrices = [model.l1.weight, model.l2.weight]
  groups = [{"params": matrices, "rank": 4}, {"params": [model.l1.bias, model.l2.bias]}]
  if model.stack is not None:
    groups.append({"params": [model.stack], "rank": 3, "batch_axes": (0,)})
  return QGaLoreAdamW(groups, **OPT, **kwargs)


def _train(model, opt, rows=slice(None), nudge=False, steps=range(STEPS)):
  x, y = _data(nudge)
  for t in steps:
    loss = ((model(x[t, rows]) - y[t, rows]) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _weights(module):
  def full(t):
    if distributed.is_dtensor(t):
      return t.full_tensor()
    return t.codes if isinstance(t, Int8Weight) else t  # the codes of INT8 weights

  return {k: full(v.detach()).clone() for k, v in module.named_parameters()}


def _reference(nudge=False, **model):
  net = _model(**model)
  _train(net, _optimizer(net), nudge=nudge)
  return _weights(net)


# ---- what each of the 2 processes runs ---------------------------------------------------


def _ddp_run(rank, split, **kwargs):
  from torch.nn.parallel import DistributedDataParallel

  from qgalore_torch import compute_projector

  model = _model()
  ddp = DistributedDataParallel(model)
  svds = []

  def counting_svd(grad_MxN, rank):
    svds.append(tuple(grad_MxN.shape))
    return compute_projector(grad_MxN, rank)

  opt = _optimizer(model, projector_fn=counting_svd, **kwargs)
  rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD) if split else slice(None)
  _train(ddp, opt, rows)
  return {"weights": _weights(model), "stats": opt.projection_stats(), "svds": svds}


def _int8_ddp_run(rank, **kwargs):
  """DDP of INT8 layers built from a different seed on each process, synced by
  broadcast_int8_weights (the biases by hand), the same batch on both processes."""
  from torch.nn.parallel import DistributedDataParallel

  model = _model(stack=False, linear=Int8Linear, seed=rank)
  assert broadcast_int8_weights(model) == 2
  for b in (model.l1.bias, model.l2.bias):
    torch.distributed.broadcast(b.data, 0)
  ddp = DistributedDataParallel(model, init_sync=False)
  opt = _optimizer(model, **kwargs)
  _train(ddp, opt)
  return {"weights": _weights(model)}


def _fsdp_run(resume=False, **kwargs):
  from torch.distributed.fsdp import fully_shard

  model = _model(stack=False, hidden=25)
  fully_shard(model.l1)
  fully_shard(model.l2)
  fully_shard(model)
  opt = _optimizer(model, **kwargs)
  if resume:  # a state_dict after 3 steps, loaded into a new optimizer
    _train(model, opt, steps=range(3))
    saved = opt.state_dict()
    opt = _optimizer(model, **kwargs)
    opt.load_state_dict(saved)
    _train(model, opt, steps=range(3, STEPS))
  else:
    _train(model, opt)
  state = {
    name: {k: (type(v).__name__, tuple(getattr(v, "placements", ())), tuple(v.shape))}
    for name, p in model.named_parameters()
    for k, v in opt.state[p].items()
    if k == "exp_avg"
  }
  return {"weights": _weights(model), "stats": opt.projection_stats(), "state": state}


def _errors(fn):
  """The message of the exception ``fn()`` raises (``None`` if it returns)."""
  try:
    fn()
  except (ValueError, TypeError, RuntimeError) as e:
    return f"{type(e).__name__}: {e}"
  return None


def _refusals():
  from torch.distributed.fsdp import fully_shard
  from torch.nn.parallel import DistributedDataParallel

  out = {}
  model = _model()
  DistributedDataParallel(model)
  out["layerwise_ddp"] = _errors(lambda: _optimizer(model).register_layerwise_hooks())
  out["layerwise_local"] = _errors(
    lambda: _optimizer(model).register_layerwise_hooks(local_gradients=True)
  )
  sharded = _model(stack=False)
  fully_shard(sharded)
  opt = _optimizer(sharded)
  out["layerwise_fsdp"] = _errors(lambda: opt.register_layerwise_hooks(local_gradients=True))

  torch.manual_seed(0)
  int8 = nn.Sequential(Int8Linear(16, 24), nn.Tanh(), Int8Linear(24, 12))

  def int8_fsdp():
    fully_shard(int8)
    int8_opt = QGaLoreAdamW([{"params": [m.weight for m in int8[::2]], "rank": 4}])
    int8(torch.ones(2, 16)).sum().backward()
    int8_opt.step()

  out["int8_fsdp"] = _errors(int8_fsdp)

  int8 = _model(stack=False, linear=Int8Linear)
  out["int8_ddp_init_sync"] = _errors(lambda: DistributedDataParallel(int8))

  for name, placement, kwargs in [
    ("columns", torch.distributed.tensor.Shard(1), {}),
    ("moment_bits", torch.distributed.tensor.Shard(0), {"moment_bits": 8}),
  ]:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (WORLD,))
    w = torch.distributed.tensor.distribute_tensor(torch.ones(8, 6), mesh, [placement])
    w = nn.Parameter(w)
    w.grad = torch.distributed.tensor.distribute_tensor(torch.ones(8, 6), mesh, [placement])
    out[name] = _errors(QGaLoreAdamW([{"params": [w], "rank": 2}], **kwargs).step)
  return out


def _worker(rank, init_file, out_dir):
  early = _model(stack=False)  # layer-wise hooks registered before the process group exists
  _optimizer(early).register_layerwise_hooks()
  torch.distributed.init_process_group(
    "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
  )
  torch.set_num_threads(1)
  try:
    late_refusal = _errors(lambda: early(torch.ones(2, 16)).sum().backward())
    results = {
      "ddp_same": _ddp_run(rank, split=False),
      "ddp_same_owner": _ddp_run(rank, split=False, refresh_mode="owner"),
      "ddp_split": _ddp_run(rank, split=True),
      "ddp_split_owner": _ddp_run(rank, split=True, refresh_mode="owner"),
      "fsdp": _fsdp_run(),
      "fsdp_owner": _fsdp_run(refresh_mode="owner"),
      "fsdp_resumed": _fsdp_run(resume=True),
      "int8_ddp": _int8_ddp_run(rank),
      "int8_ddp_owner": _int8_ddp_run(rank, refresh_mode="owner"),
      "refusals": {**_refusals(), "layerwise_registered_early": late_refusal},
    }
    torch.save(results, pathlib.Path(out_dir, f"rank{rank}.pt"))
  except Exception:
    pathlib.Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
    raise
  finally:
    torch.distributed.destroy_process_group()


def _spawn(out_dir):
  """Runs :func:`_worker` on 2 processes; each saves its results into ``out_dir``."""
  init_file = os.path.join(out_dir, f"init_{os.getpid()}")  # fresh for each attempt
  try:
    torch.multiprocessing.spawn(_worker, args=(init_file, out_dir), nprocs=WORLD)
  except Exception as e:
    errors = sorted(pathlib.Path(out_dir).glob("*.err"))
    detail = "\n".join(f.read_text() for f in errors)
    raise AssertionError(f"a process failed:\n{detail}") from e


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """``[results of rank 0, results of rank 1]``, from one spawn of 2 gloo processes.

  Under pytest-xdist the tests of this module may run on several workers: the first one to
  get here spawns, the others wait on a lock and read its results (the session's shared
  temporary directory), so the processes are spawned once per session.
  """
  load = lambda d: [torch.load(pathlib.Path(d, f"rank{r}.pt")) for r in range(WORLD)]
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    with tempfile.TemporaryDirectory() as out_dir:
      _spawn(out_dir)
      return load(out_dir)
  from filelock import FileLock

  shared = tmp_path_factory.getbasetemp().parent / "qgalore_torch_distributed_test"
  with FileLock(str(shared) + ".lock"):
    if not (shared / "done").exists():
      shared.mkdir(exist_ok=True)
      _spawn(str(shared))
      (shared / "done").touch()
  return load(shared)


def _assert_equal(got, want):
  assert got.keys() == want.keys()
  for name in want:
    torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def _relative_error(got, want):
  """The largest relative Frobenius error over the parameters."""
  return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


def test_ddp_same_batch_equals_one_process_bit_for_bit(runs):
  want = _reference()
  for rank in range(WORLD):
    _assert_equal(runs[rank]["ddp_same"]["weights"], want)


def test_owner_refresh_equals_redundant_bit_for_bit(runs):
  want = _reference()
  for rank in range(WORLD):
    _assert_equal(runs[rank]["ddp_same_owner"]["weights"], want)
    got, redundant = runs[rank]["ddp_split_owner"], runs[rank]["ddp_split"]
    _assert_equal(got["weights"], redundant["weights"])
    assert got["stats"] == redundant["stats"]
  assert runs[0]["ddp_split_owner"]["stats"][0]["svd_count"] == 3  # steps 0, 2, 4


def test_owner_refresh_computes_each_svd_once(runs):
  # 4 matrices (l1, l2, 2 slices of the stack) refresh on steps 0, 2 and 4: 12 SVDs, all of
  # them on each process in redundant mode, dealt out in owner mode. By cost m n min(m, n),
  # l1 (6144) goes to rank 0, l2 (3456) and both (12, 12) slices (1728 each) to rank 1.
  for rank in range(WORLD):
    assert len(runs[rank]["ddp_split"]["svds"]) == 12
  assert runs[0]["ddp_split_owner"]["svds"] == [(24, 16)] * 3
  assert sorted(runs[1]["ddp_split_owner"]["svds"]) == [(12, 12)] * 6 + [(12, 24)] * 3


def test_assign_owners_deals_largest_first_to_the_least_loaded():
  assert distributed.assign_owners([], 2) == []
  assert distributed.assign_owners([6144, 3456, 1728, 1728], 2) == [0, 1, 1, 1]
  assert distributed.assign_owners([5, 5, 5], 3) == [0, 1, 2]
  assert distributed.assign_owners([1, 2, 3, 4], 2) == [0, 1, 1, 0]  # 4+1 against 3+2


def test_ddp_split_batch_equals_one_process_to_the_chaos_floor(runs):
  want = _reference()
  floor = _relative_error(_reference(nudge=True), want)
  _assert_equal(runs[1]["ddp_split"]["weights"], runs[0]["ddp_split"]["weights"])
  error = _relative_error(runs[0]["ddp_split"]["weights"], want)
  print(f"DDP split batch: relative error {error:.2e}, chaos floor {floor:.2e}")
  assert error <= max(10 * floor, 1e-6), (error, floor)


def test_fsdp2_equals_one_process_to_summation_order(runs):
  want = _reference(stack=False, hidden=25)
  for rank in range(WORLD):
    got = runs[rank]["fsdp"]
    error = _relative_error(got["weights"], want)
    print(f"FSDP2 rank {rank}: relative error {error:.2e}")
    assert error <= 1e-5, error
    _assert_equal(runs[rank]["fsdp_owner"]["weights"], got["weights"])
    _assert_equal(runs[rank]["fsdp_resumed"]["weights"], got["weights"])


def test_fsdp2_state_is_sharded_like_its_param(runs):
  state = runs[0]["fsdp"]["state"]
  placements = {name: (s["exp_avg"][0], s["exp_avg"][2]) for name, s in state.items()}
  assert placements == {
    "l1.weight": ("DTensor", (25, 4)),  # m x r, split by rows
    "l1.bias": ("DTensor", (25,)),
    "l2.weight": ("DTensor", (4, 25)),  # r x n, replicated
    "l2.bias": ("DTensor", (12,)),
  }
  shards = {name: str(s["exp_avg"][1]) for name, s in state.items()}
  assert "Shard" in shards["l1.weight"] and "Replicate" in shards["l2.weight"], shards


def test_refusals_name_the_way_out(runs):
  refusals = runs[0]["refusals"]
  assert "DDP" in refusals["layerwise_ddp"] and "local_gradients" in refusals["layerwise_ddp"]
  assert refusals["layerwise_local"] is None
  assert "FSDP2" in refusals["layerwise_fsdp"]
  assert "DDP" in refusals["layerwise_registered_early"]
  assert refusals["int8_fsdp"] is not None and "DistributedDataParallel" in refusals["int8_fsdp"]
  assert "init_sync=False" in refusals["int8_ddp_init_sync"]
  assert "Shard(dim=1)" in refusals["columns"] and "moment_bits=8" in refusals["moment_bits"]


def test_int8_weights_under_ddp_equal_one_process_bit_for_bit(runs):
  want = _reference(stack=False, linear=Int8Linear)
  for rank in range(WORLD):
    _assert_equal(runs[rank]["int8_ddp"]["weights"], want)
    _assert_equal(runs[rank]["int8_ddp_owner"]["weights"], want)


def test_refresh_mode_is_checked_and_owner_needs_a_process_group():
  model = _model(stack=False)
  with pytest.raises(ValueError, match="refresh_mode"):
    _optimizer(model, refresh_mode="everyone")
  opt = _optimizer(model, refresh_mode="owner")
  model(torch.ones(2, 16)).sum().backward()
  assert not torch.distributed.is_initialized()
  with pytest.raises(RuntimeError, match="init_process_group"):
    opt.step()


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-p", "no:cacheprovider", "-s"]))
