"""LLaMA shapes shared by the Flax and torch examples (framework-free).

The paper's configs (arXiv 2407.08296 section 4.1, after GaLore; hidden/ffn/layers/heads
from the project's reference notes), T5 vocabulary and sequence 256, plus ``tiny``, a
CPU-sized model for the default run.
"""

import dataclasses

# Names of the matrices that GaLore / Q-GaLore project (the authors' target_modules).
PROJECTED = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Config:
  """Shape of a LLaMA model.

  Attributes:
    vocab_size: number of token ids.
    d_model: hidden size.
    d_ff: inner size of the SwiGLU MLP.
    num_layers: number of decoder blocks.
    num_heads: attention heads (d_model must be divisible by it).
    seq_len: training sequence length.
    rope_theta: base of the rotary frequencies.
    norm_eps: epsilon of RMSNorm.
  """

  vocab_size: int
  d_model: int
  d_ff: int
  num_layers: int
  num_heads: int
  seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


CONFIGS = {
  "tiny": Config(vocab_size=257, d_model=128, d_ff=344, num_layers=4, num_heads=4, seq_len=128),
  "60m": Config(vocab_size=32000, d_model=512, d_ff=1376, num_layers=8, num_heads=8),
  "130m": Config(vocab_size=32000, d_model=768, d_ff=2048, num_layers=12, num_heads=12),
  "350m": Config(vocab_size=32000, d_model=1024, d_ff=2736, num_layers=24, num_heads=16),
  "1b": Config(vocab_size=32000, d_model=2048, d_ff=5461, num_layers=24, num_heads=32),
  "7b": Config(vocab_size=32000, d_model=4096, d_ff=11008, num_layers=32, num_heads=32),
}
