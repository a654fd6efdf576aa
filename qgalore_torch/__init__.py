"""Q-GaLore for PyTorch: low-rank projected AdamW with an INT4 projector and adaptive refresh.

The twin of ``qgalore_jax``: the same module and function names, the same numbers. See
``docs/spec.md`` (the numerical contract) and arXiv 2407.08296 (the method).
"""

from qgalore_torch._src.distributed import broadcast_int8_weights
from qgalore_torch._src.generator import uniforms
from qgalore_torch._src.int8 import Int8Linear
from qgalore_torch._src.int8 import Int8Weight
from qgalore_torch._src.int8 import apply_int8_update
from qgalore_torch._src.int8 import dequantize_linears
from qgalore_torch._src.int8 import quantize_linears
from qgalore_torch._src.int8 import stochastic_round
from qgalore_torch._src.moments import QuantizedMoment
from qgalore_torch._src.moments import dequantize_moment
from qgalore_torch._src.moments import quantize_moment
from qgalore_torch._src.optimizer import QGaLoreAdamW
from qgalore_torch._src.projector import compute_projector
from qgalore_torch._src.projector import project
from qgalore_torch._src.projector import project_back
from qgalore_torch._src.projector import projector_side
from qgalore_torch._src.projector import sign_canonical
from qgalore_torch._src.quantization import QuantizedTensor
from qgalore_torch._src.quantization import dequantize
from qgalore_torch._src.quantization import pack_int4
from qgalore_torch._src.quantization import quantize
from qgalore_torch._src.quantization import quantized_nbytes
from qgalore_torch._src.quantization import unpack_int4
from qgalore_torch._src.schedule import SubspaceState

__version__ = "0.1.0"

__all__ = (
  "Int8Linear",
  "Int8Weight",
  "QGaLoreAdamW",
  "QuantizedMoment",
  "QuantizedTensor",
  "SubspaceState",
  "apply_int8_update",
  "broadcast_int8_weights",
  "compute_projector",
  "dequantize",
  "dequantize_linears",
  "dequantize_moment",
  "pack_int4",
  "project",
  "project_back",
  "projector_side",
  "quantize",
  "quantize_linears",
  "quantize_moment",
  "quantized_nbytes",
  "sign_canonical",
  "stochastic_round",
  "uniforms",
  "unpack_int4",
)
