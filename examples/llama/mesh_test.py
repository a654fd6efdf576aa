"""Tests of ``--mesh``: the flag's parsing and errors, the FSDP placement, and a sharded run
on 8 simulated CPU devices that follows the one-device run."""

import os
import pathlib

import jax
import pytest
from jax.sharding import PartitionSpec as P

from examples.llama import mesh as mesh_lib
from examples.llama import train
from qgalore_jax._src.integration_test import run_on_8_cpu_devices

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", ["fsdp", "fsdp=0", "fsdp=-2", "=8", "data=2,fsdp=4", "fsdp=x"])
def test_parse_refuses_anything_but_one_axis(spec):
  with pytest.raises(ValueError, match="NAME=N"):
    mesh_lib.parse(spec)


def test_parse_reads_name_and_size():
  assert mesh_lib.parse("fsdp=8") == ("fsdp", 8)


def test_command_line_refuses_a_bad_mesh(capsys):
  with pytest.raises(SystemExit):
    train.parse_args(["--mesh", "fsdp"])
  assert "NAME=N" in capsys.readouterr().err


def test_too_few_devices_names_the_flag():
  count = jax.device_count() + 1
  with pytest.raises(ValueError, match=f"xla_force_host_platform_device_count={count}"):
    mesh_lib.make_mesh(f"fsdp={count}")


def test_host_devices_are_not_requested_once_jax_has_started(monkeypatch):
  jax.devices()  # the backend is up: the flag could no longer take effect
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not mesh_lib.request_host_devices(8)
  assert os.environ["XLA_FLAGS"] == ""


class FakeMesh:
  """The two attributes ``fsdp_spec`` reads, for a mesh larger than this machine's."""

  def __init__(self):
    self.axis_names = ("fsdp",)
    self.shape = {"fsdp": 8}


@pytest.mark.parametrize(
  ("shape", "skip", "spec"),
  [
    ((257, 128), 0, P(None, "fsdp")),  # the vocabulary does not split: the model axis does
    ((128, 344), 0, P(None, "fsdp")),  # the largest axis that splits
    ((4, 128, 344), 1, P(None, None, "fsdp")),  # a stack: the layer axis stays whole
    ((8, 12), 1, P()),  # only the layer axis splits: replicated
    ((128,), 0, P("fsdp")),
    ((), 0, P()),
  ],
)
def test_fsdp_spec(shape, skip, spec):
  assert mesh_lib.fsdp_spec(shape, FakeMesh(), skip) == spec


# Runs the command line twice, on 8 devices and on one, in a process that starts without
# XLA_FLAGS: `main` asks for the 8 simulated devices itself. Then checks that a checkpoint
# of the sharded run restores onto the mesh.
SCRIPT = """
import json, pathlib, sys
import jax, numpy as np, orbax.checkpoint as ocp
from examples.llama import data, mesh as mesh_lib, model, train

model.CONFIGS["test"] = model.Config(
  vocab_size=data.BYTE_VOCAB_SIZE, d_model=32, d_ff=64, num_layers=2, num_heads=2, seq_len=16
)
out = pathlib.Path(sys.argv[1])
flags = ["--model", "test", "--steps", "4", "--batch-size", "8", "--rank", "8",
         "--update-proj-gap", "2", "--eval-every", "4", "--eval-batches", "1", "--log-every", "1"]
train.main([*flags, "--mesh", "fsdp=8", "--checkpoint-every", "4", "--out-dir", str(out / "eight")])
assert jax.device_count() == 8, jax.devices()
train.main([*flags, "--checkpoint-every", "0", "--out-dir", str(out / "one")])

def losses(run):
  lines = (out / run / "qgalore" / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return np.array([r.get("train_loss", r.get("eval_loss")) for r in records])

eight, one = losses("eight"), losses("one")
print("MAX_REL_DIFF", float(np.max(np.abs(eight - one) / one)))
np.testing.assert_allclose(eight, one, rtol=1e-5)

cfg = train.RunConfig(model="test", steps=4, batch_size=8, rank=8, update_proj_gap=2)
mesh = mesh_lib.make_mesh("fsdp=8")
_, params, opt_state, _, _ = train.init_state(cfg, mesh)
with ocp.CheckpointManager(out / "eight" / "qgalore" / "checkpoints") as manager:
  got_params, got_state, step, _ = train.restore_checkpoint(manager, params, opt_state)
assert step == 4
fresh_leaves = jax.tree.leaves((params, opt_state))
for fresh, got in zip(fresh_leaves, jax.tree.leaves((got_params, got_state)), strict=True):
  assert got.sharding == fresh.sharding, (got.sharding, fresh.sharding)
assert got_params["lm_head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
print("SHARDED_OK")
"""


@pytest.mark.slow
def test_mesh_of_8_cpu_devices_follows_one_device(tmp_path):
  # No XLA_FLAGS: the example asks for the 8 devices itself.
  stdout = run_on_8_cpu_devices(SCRIPT, str(tmp_path), set_device_count=False)
  # The 8-device losses equal the one-device ones to float32 rounding (measured: at most
  # one ulp, 2e-7 relative); the tolerance leaves room for an INT8 code that a one-ulp
  # difference rounds the other way.
  diff = float(stdout.split("MAX_REL_DIFF")[1].split()[0])
  assert diff <= 1e-5, diff
