"""The optimizers the torch example compares, by name (twin of ``examples/llama/optimizers.py``).

- ``adamw``: ``torch.optim.AdamW`` on every parameter (the full-rank baseline).
- ``qgalore``: ``qgalore_torch.QGaLoreAdamW`` with an INT4 projector and adaptive refresh,
  the seven block matrices held as INT8 (``Int8Linear``) and updated by stochastic rounding.
- ``qgalore-noquant``: ``QGaLoreAdamW`` with quantisation off (float32 projector, fixed
  gap, float weights): GaLore as implemented by this project.

The low-rank ones project only the attention and MLP matrices (q, k, v, o, gate, up,
down); embeddings, norms and the head get Adam. All use the paper's ``b2 = 0.95``, no weight
decay and GaLore's ``scale = 0.25``, and the peak learning rates tuned for the Flax example.
Ours skip a step whose gradients are not all finite, whole, and count it
(``skip_nonfinite=True``; ``skipped_steps`` reads the count).
"""

import dataclasses

import torch
from torch import nn

import qgalore_torch
from examples.torch_llama.model import is_llama_projection

NAMES = ("adamw", "qgalore", "qgalore-noquant")
B2 = 0.95
SCALE = 0.25
INT8_GROUP_SIZE = 256
# The Flax example's tuned peak rates (examples/llama/README.md, "How the learning rates
# were chosen").
LEARNING_RATES = {"adamw": 3e-3, "qgalore": 3e-2, "qgalore-noquant": 3e-2}


@dataclasses.dataclass(frozen=True)
class LowRank:
  """Rank and initial refresh gap of the low-rank optimizers (the rest are paper values)."""

  rank: int
  update_proj_gap: int


def projected_weights(model: nn.Module) -> list[torch.Tensor]:
  """The weights of the q/k/v/o/gate/up/down layers, in ``named_modules`` order."""
  return [module.weight for name, module in model.named_modules() if is_llama_projection(name)]


def build(
  name: str, model: nn.Module, lr: float, low_rank: LowRank, seed: int = 0
) -> torch.optim.Optimizer:
  """The optimizer ``name`` for ``model``, at peak learning rate ``lr``.

  For ``qgalore`` this first swaps the projected layers of ``model`` for ``Int8Linear``
  (in place), since the optimizer must see the INT8 weights; ``seed`` keys their
  stochastic rounding.

  Raises:
    ValueError: for an unknown name.
  """
  if name == "adamw":
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, B2), weight_decay=0.0)
  if name in ("qgalore", "qgalore-noquant"):
    quantised = name == "qgalore"
    if quantised:
      qgalore_torch.quantize_linears(model, is_llama_projection, group_size=INT8_GROUP_SIZE)
    matrices = projected_weights(model)
    others = [p for p in model.parameters() if all(p is not w for w in matrices)]
    groups = [
      {"params": matrices, "rank": low_rank.rank, "update_proj_gap": low_rank.update_proj_gap},
      {"params": others},
    ]
    return qgalore_torch.QGaLoreAdamW(
      groups,
      lr=lr,
      betas=(0.9, B2),
      weight_decay=0.0,
      scale=SCALE,
      proj_bits=4 if quantised else None,
      gamma_proj=2 if quantised else 1,
      seed=seed,
      skip_nonfinite=True,
    )
  raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(NAMES)}")


def skipped_steps(optimizer: torch.optim.Optimizer) -> int:
  """Steps skipped for non-finite gradients (0 for ``torch.optim.AdamW``, which never skips)."""
  return optimizer.skipped_steps if isinstance(optimizer, qgalore_torch.QGaLoreAdamW) else 0


def svd_count(optimizer: torch.optim.Optimizer) -> int:
  """SVDs done so far, summed over the projected matrices (0 for ``torch.optim.AdamW``)."""
  if not isinstance(optimizer, qgalore_torch.QGaLoreAdamW):
    return 0
  return sum(s["svd_count"] for s in optimizer.projection_stats() if s is not None)
