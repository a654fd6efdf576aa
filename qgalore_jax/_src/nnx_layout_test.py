"""Tests for nnx_dimension_numbers: each module kind against hand-written specs."""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from qgalore_jax._src.layout import DimensionNumbers
from qgalore_jax._src.nnx_layout import nnx_dimension_numbers

LAYERS = 3


def _stacked(make, layers=LAYERS, **vmap_kwargs):
  """A module built ``layers`` times under nnx.vmap, its variables stacked on axis 0."""
  keys = jax.random.split(jax.random.key(0), layers)
  return nnx.vmap(lambda key: make(nnx.Rngs(key)), **vmap_kwargs)(keys)


class Block(nnx.Module):
  """A pre-norm MLP block: RMSNorm, up (with bias), down (without)."""

  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(8, rngs=rngs)
    self.up = nnx.Linear(8, 32, rngs=rngs)
    self.down = nnx.Linear(32, 8, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.relu(self.up(self.norm(x))))


class ScannedModel(nnx.Module):
  """Embedding, a stack of blocks run by nnx.scan, and an output head."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(16, 8, rngs=rngs)
    self.blocks = _stacked(Block)
    self.head = nnx.Linear(8, 16, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return self.head(run(self.embed(tokens), self.blocks))


SCANNED_TABLE = {
  "blocks/down/kernel": DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=(0,)),
  "blocks/norm/scale": None,
  "blocks/up/bias": None,
  "blocks/up/kernel": DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=(0,)),
  "embed/embedding": None,
  "head/kernel": DimensionNumbers(reduction_axis=0, output_axis=1, batch_axis=()),
}


def _by_name(specs) -> dict[str, DimensionNumbers | None]:
  """The leaves of a spec pytree by '/'-joined path, None leaves included."""
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: x is None)[0]
  names = {}
  for path, spec in flat:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    if keys[-1] == "value":
      keys = keys[:-1]
    names["/".join(map(str, keys))] = spec
  return names


def test_plain_linear():
  table = nnx_dimension_numbers(nnx.Linear(8, 16, rngs=nnx.Rngs(0))).table
  assert table == {
    "bias": None,
    "kernel": DimensionNumbers(reduction_axis=0, output_axis=1, batch_axis=()),
  }


def test_linear_stacked_by_vmap_has_a_batch_axis():
  stack = _stacked(lambda rngs: nnx.Linear(8, 16, rngs=rngs))
  assert stack.kernel.shape == (LAYERS, 8, 16)
  table = nnx_dimension_numbers(stack).table
  assert table["kernel"] == DimensionNumbers(reduction_axis=1, output_axis=2, batch_axis=(0,))
  assert table["bias"] is None


def test_linear_stacked_twice_has_two_batch_axes():
  stack = _stacked(lambda rngs: _stacked(lambda r: nnx.Linear(8, 16, rngs=r), layers=2))
  assert stack.kernel.shape == (LAYERS, 2, 8, 16)
  assert nnx_dimension_numbers(stack).table["kernel"] == DimensionNumbers(
    reduction_axis=2, output_axis=3, batch_axis=(0, 1)
  )


def test_scanned_model_in_model_order():
  model = ScannedModel(nnx.Rngs(0))
  assert model(jnp.zeros((2, 5), jnp.int32)).shape == (2, 5, 16)  # really runs as a scan
  dims = nnx_dimension_numbers(model)
  assert list(dims.table.items()) == list(SCANNED_TABLE.items())
  state_order = [name for name in _by_name(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]
  assert list(dims.table) == state_order


def test_stack_created_by_nnx_scan():
  def body(carry, key):
    return carry, Block(nnx.Rngs(key))

  make = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  _, blocks = make(0, jax.random.split(jax.random.key(0), LAYERS))
  table = nnx_dimension_numbers(blocks).table
  assert table == {k.removeprefix("blocks/"): v for k, v in SCANNED_TABLE.items() if "/" in k[7:]}


def test_stack_on_a_trailing_axis_raises():
  stack = _stacked(lambda rngs: nnx.Linear(8, 16, rngs=rngs), out_axes=1)
  assert stack.kernel.shape == (8, LAYERS, 16)
  with pytest.raises(ValueError, match=r"Linear '<root>'.*\(8, 3, 16\).*\(8, 16\)"):
    nnx_dimension_numbers(stack)


def test_linear_general():
  layer = nnx.LinearGeneral(64, (4, 16), rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (64, 4, 16)
  assert nnx_dimension_numbers(layer).table == {
    "bias": None,
    "kernel": DimensionNumbers(reduction_axis=0, output_axis=(1, 2), batch_axis=()),
  }


def test_linear_general_stacked():
  stack = _stacked(lambda rngs: nnx.LinearGeneral(64, (4, 16), rngs=rngs))
  assert stack.kernel.shape == (LAYERS, 64, 4, 16)
  assert nnx_dimension_numbers(stack).table["kernel"] == DimensionNumbers(
    reduction_axis=1, output_axis=(2, 3), batch_axis=(0,)
  )


def test_linear_general_with_several_in_features_and_its_own_batch_axis():
  layer = nnx.LinearGeneral((4, 16), 64, axis=(-2, -1), batch_axis={0: 2}, rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (2, 4, 16, 64)
  assert layer(jnp.ones((2, 4, 16))).shape == (2, 64)
  assert nnx_dimension_numbers(layer).table["kernel"] == DimensionNumbers(
    reduction_axis=(1, 2), output_axis=3, batch_axis=(0,)
  )


def test_einsum_head_axis_only_in_the_output_is_an_output_axis():
  layer = nnx.Einsum("BTD,NDH->BTNH", (4, 8, 16), rngs=nnx.Rngs(0))
  assert nnx_dimension_numbers(layer).table["kernel"] == DimensionNumbers(
    reduction_axis=1, output_axis=(0, 2), batch_axis=()
  )


def test_einsum_head_axis_in_input_and_output_is_a_batch_axis():
  layer = nnx.Einsum("BTND,NDH->BTNH", (4, 8, 16), rngs=nnx.Rngs(0))
  assert nnx_dimension_numbers(layer).table["kernel"] == DimensionNumbers(
    reduction_axis=1, output_axis=2, batch_axis=(0,)
  )


def test_einsum_stacked():
  stack = _stacked(lambda rngs: nnx.Einsum("BTND,NDH->BTNH", (4, 8, 16), rngs=rngs))
  assert nnx_dimension_numbers(stack).table["kernel"] == DimensionNumbers(
    reduction_axis=2, output_axis=3, batch_axis=(0, 1)
  )


@pytest.mark.parametrize("einsum_str", ["BTD,DX->BTD", "BTD,D->BT", "BTD,DDH->BTH", "BH,HK->BHK"])
def test_ambiguous_einsum_raises(einsum_str):
  shape = tuple(4 for _ in einsum_str.split(",")[1].split("->")[0])

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.Einsum(einsum_str, shape, kernel_init=nnx.initializers.zeros, rngs=rngs)

  with pytest.raises(ValueError, match=rf"'attn'.*{einsum_str}.*`exclude`"):
    nnx_dimension_numbers(Model(nnx.Rngs(0)))


def test_ambiguous_einsum_can_be_excluded():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.Einsum("BTD,DX->BTD", (4, 4), rngs=rngs)

  assert nnx_dimension_numbers(Model(nnx.Rngs(0)), exclude=("attn",)).table == {"attn/kernel": None}


def test_embed_and_norms_are_not_projected_and_do_not_warn():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(16, 8, rngs=rngs)
      self.norms = _stacked(lambda r: nnx.LayerNorm(8, rngs=r))  # scale (L, 8)
      self.conv = nnx.Conv(3, 4, kernel_size=(3, 3), rngs=rngs)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    table = nnx_dimension_numbers(Model(nnx.Rngs(0))).table
  assert set(table.values()) == {None}
  assert set(table) == {
    "conv/bias",
    "conv/kernel",
    "embed/embedding",
    "norms/bias",
    "norms/scale",
  }


def test_exclude():
  dims = nnx_dimension_numbers(ScannedModel(nnx.Rngs(0)), exclude=("head", "up"))
  expected = dict(SCANNED_TABLE, **{"head/kernel": None, "blocks/up/kernel": None})
  assert dims.table == expected


def test_exclude_of_an_unknown_name_raises():
  with pytest.raises(ValueError, match=r"\['lm_head'\]"):
    nnx_dimension_numbers(ScannedModel(nnx.Rngs(0)), exclude=("head", "lm_head"))


def test_exclude_must_be_a_collection_of_strings():
  with pytest.raises(TypeError, match="collection of strings"):
    nnx_dimension_numbers(ScannedModel(nnx.Rngs(0)), exclude="head")


def _optimizer_params(model):
  """The params that nnx.Optimizer hands to tx.init and to tx.update."""
  seen = {}

  def init(params):
    seen["init"] = params
    return optax.EmptyState()

  def update(updates, state, params=None):
    seen["update"] = params
    return updates, state

  optimizer = nnx.Optimizer(model, optax.GradientTransformation(init, update), wrt=nnx.Param)
  grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  return seen["init"], seen["update"]


def test_every_params_form_resolves():
  model = ScannedModel(nnx.Rngs(0))
  dims = nnx_dimension_numbers(model)
  init_params, update_params = _optimizer_params(model)
  forms = {
    "nnx.state": nnx.state(model, nnx.Param),
    "tx.init": init_params,
    "tx.update": update_params,
    "to_pure_dict": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
  }
  for form, params in forms.items():
    specs = dims(params)
    assert _by_name(specs) == SCANNED_TABLE, form
    is_leaf = lambda x: x is None or isinstance(x, DimensionNumbers)
    assert jax.tree.structure(specs, is_leaf=is_leaf) == jax.tree.structure(params), form


def test_string_list_indices_match_int_ones():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 6, rngs=rngs) for _ in range(2)])

  dims = nnx_dimension_numbers(Model(nnx.Rngs(0)))
  assert list(dims.table) == [
    "layers/0/bias",
    "layers/0/kernel",
    "layers/1/bias",
    "layers/1/kernel",
  ]
  params = {"layers": {"1": {"kernel": jnp.zeros((4, 6))}}}  # as a checkpoint restores it
  assert dims(params) == {"layers": {"1": {"kernel": DimensionNumbers(0, 1)}}}


def test_masked_nodes_are_kept():
  model = ScannedModel(nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params["embed"]["embedding"] = optax.MaskedNode()
  specs = nnx_dimension_numbers(model)(params)
  assert specs["embed"]["embedding"] == optax.MaskedNode()
  assert specs["head"]["kernel"] == SCANNED_TABLE["head/kernel"]


def test_a_path_not_in_the_table_raises():
  dims = nnx_dimension_numbers(ScannedModel(nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"\['blocks'\]\['gate'\]\['kernel'\].*'blocks/gate/kernel'"):
    dims({"blocks": {"gate": {"kernel": jnp.zeros((3, 8, 32))}}})


def test_a_leaf_with_other_axes_than_the_model_raises():
  dims = nnx_dimension_numbers(ScannedModel(nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"2 axes.*'blocks/up/kernel' has 3"):
    dims({"blocks": {"up": {"kernel": jnp.zeros((8, 32))}}})


def test_uncovered_custom_param_warns_once():
  class Experts(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 8, 16)))
      self.gate = nnx.Param(jnp.zeros((8, 4)))
      self.temperature = nnx.Param(jnp.ones(()))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.moe = Experts(rngs)
      self.out = nnx.Linear(16, 8, rngs=rngs)

  with pytest.warns(UserWarning) as record:
    table = nnx_dimension_numbers(Model(nnx.Rngs(0))).table
  assert len(record) == 1
  message = str(record[0].message)
  assert "moe/gate, moe/w" in message and "plain AdamW" in message
  assert "temperature" not in message and "out/" not in message
  assert table["moe/w"] is None and table["out/kernel"] == DimensionNumbers(0, 1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    nnx_dimension_numbers(Model(nnx.Rngs(0)), exclude=("moe",))


def test_specs_resolve_to_each_modules_in_and_out_sizes():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.blocks = _stacked(Block)
      self.proj = nnx.LinearGeneral(64, (4, 16), rngs=rngs)
      self.heads = _stacked(lambda r: nnx.LinearGeneral((4, 16), 32, axis=(-2, -1), rngs=r))
      self.qkv = nnx.Einsum("BTD,NDH->BTNH", (4, 8, 16), rngs=rngs)
      self.experts = nnx.Einsum("EBD,EDF->EBF", (2, 8, 24), rngs=rngs)

  model = Model(nnx.Rngs(0))
  # (batch shape, (out, in)) of every projected kernel, from the modules' own sizes.
  expected = {
    "blocks/down/kernel": ((LAYERS,), (8, 32)),
    "blocks/up/kernel": ((LAYERS,), (32, 8)),
    "proj/kernel": ((), (64, 64)),
    "heads/kernel": ((LAYERS,), (32, 64)),
    "qkv/kernel": ((), (64, 8)),
    "experts/kernel": ((2,), (24, 8)),
  }
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  specs = nnx_dimension_numbers(model)(params)
  leaves = _by_name(params)
  resolved = {}
  for name, spec in _by_name(specs).items():
    if spec is not None:
      layout = spec.resolve(leaves[name].shape, name)
      resolved[name] = (layout.batch_shape, layout.matrix_shape)
  assert resolved == expected
