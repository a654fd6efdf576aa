"""Q-GaLore for JAX/Optax: low-rank projected Adam with an INT4 projector and adaptive refresh.

See ``docs/spec.md`` (the numerical contract) and arXiv 2407.08296 (the method).
"""

from qgalore_jax._src.alias import qgalore_adamw
from qgalore_jax._src.alias import skipped_steps
from qgalore_jax._src.checks import STATIC_ARGS
from qgalore_jax._src.generator import uniforms
from qgalore_jax._src.int8 import QuantizedWeight
from qgalore_jax._src.int8 import apply_updates
from qgalore_jax._src.int8 import dequantize_params
from qgalore_jax._src.int8 import int8_train_step
from qgalore_jax._src.int8 import is_quantized
from qgalore_jax._src.int8 import quantize_params
from qgalore_jax._src.int8 import stochastic_round
from qgalore_jax._src.layerwise import layerwise_train_step
from qgalore_jax._src.layout import DimensionNumbers
from qgalore_jax._src.moments import QuantizedMoment
from qgalore_jax._src.moments import ScaleByAdam8bitState
from qgalore_jax._src.moments import adamw_8bit
from qgalore_jax._src.moments import dequantize_moment
from qgalore_jax._src.moments import quantize_moment
from qgalore_jax._src.moments import scale_by_adam_8bit
from qgalore_jax._src.nnx_layout import nnx_dimension_numbers
from qgalore_jax._src.projector import compute_projector
from qgalore_jax._src.projector import project
from qgalore_jax._src.projector import project_back
from qgalore_jax._src.projector import projector_side
from qgalore_jax._src.projector import sign_canonical
from qgalore_jax._src.qgalore import ScaleByQGaLoreState
from qgalore_jax._src.qgalore import projection_stats
from qgalore_jax._src.qgalore import scale_by_qgalore
from qgalore_jax._src.quantization import QuantizedArray
from qgalore_jax._src.quantization import dequantize
from qgalore_jax._src.quantization import pack_int4
from qgalore_jax._src.quantization import quantize
from qgalore_jax._src.quantization import quantized_nbytes
from qgalore_jax._src.quantization import unpack_int4
from qgalore_jax._src.schedule import SubspaceState
from qgalore_jax._src.sharding import state_shardings

__version__ = "0.1.0"

__all__ = (
  "STATIC_ARGS",
  "DimensionNumbers",
  "QuantizedArray",
  "QuantizedMoment",
  "QuantizedWeight",
  "ScaleByAdam8bitState",
  "ScaleByQGaLoreState",
  "SubspaceState",
  "adamw_8bit",
  "apply_updates",
  "compute_projector",
  "dequantize",
  "dequantize_moment",
  "dequantize_params",
  "int8_train_step",
  "is_quantized",
  "layerwise_train_step",
  "nnx_dimension_numbers",
  "pack_int4",
  "project",
  "project_back",
  "projection_stats",
  "projector_side",
  "qgalore_adamw",
  "quantize",
  "quantize_moment",
  "quantize_params",
  "quantized_nbytes",
  "scale_by_adam_8bit",
  "scale_by_qgalore",
  "sign_canonical",
  "skipped_steps",
  "state_shardings",
  "stochastic_round",
  "uniforms",
  "unpack_int4",
)
