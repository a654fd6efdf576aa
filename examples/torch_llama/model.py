"""A LLaMA decoder in PyTorch: RMSNorm, RoPE, SwiGLU MLP, untied head, no biases.

The twin of ``examples/llama/model.py`` (Flax): the same configs, the same rotate-half RoPE
and the same initialisation distributions, so losses of the two examples can be compared.
The seven block matrices carry Hugging Face's names (``q_proj`` ... ``down_proj``), so
``qgalore_torch.quantize_linears(model, is_llama_projection)`` finds them, in this model and
in a ``transformers`` LLaMA alike.
"""

import torch
import torch.nn.functional as F
from torch import nn

from examples.llama.configs import CONFIGS  # noqa: F401  (re-exported as model.CONFIGS)
from examples.llama.configs import Config

# The linear layers of a LLaMA block (attention and MLP projections), by Hugging Face's names:
# the matrices that Q-GaLore projects and holds in INT8 (embeddings, norms and head are not).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_llama_projection(name: str) -> bool:
  """Whether a module name ends in one of :data:`LLAMA_PROJECTIONS` (q/k/v/o/gate/up/down).

  Example:
    >>> is_llama_projection("layers.0.attn.q_proj"), is_llama_projection("lm_head")
    (True, False)
  """
  return name.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS


def apply_rope(x_BTHD: torch.Tensor, positions_T: torch.Tensor, theta: float) -> torch.Tensor:
  """Rotary position embedding, LLaMA's rotate-half layout (as ``examples.llama.model``).

  Feature ``i`` is paired with feature ``i + D/2`` and the pair is rotated by the angle
  ``position * theta ** (-2 i / D)``.

  Args:
    x_BTHD: queries or keys, shape (batch, time, heads, head_dim), head_dim even.
    positions_T: integer positions of the time axis.
    theta: base of the frequencies.

  Returns:
    ``x_BTHD`` rotated, same shape and dtype.
  """
  half = x_BTHD.shape[-1] // 2
  exponents_F = -torch.arange(half, dtype=torch.float32, device=x_BTHD.device) / half
  freqs_F = torch.pow(torch.tensor(theta, dtype=torch.float32), exponents_F)
  angles_TF = positions_T[:, None].to(torch.float32) * freqs_F[None, :]
  cos_T1F = torch.cos(angles_TF)[:, None, :]
  sin_T1F = torch.sin(angles_TF)[:, None, :]
  x1, x2 = x_BTHD[..., :half].float(), x_BTHD[..., half:].float()
  out = torch.cat([x1 * cos_T1F - x2 * sin_T1F, x2 * cos_T1F + x1 * sin_T1F], dim=-1)
  return out.to(x_BTHD.dtype)


def _linear(d_in: int, d_out: int) -> nn.Linear:
  layer = nn.Linear(d_in, d_out, bias=False)
  nn.init.normal_(layer.weight, std=d_in**-0.5)
  return layer


class Attention(nn.Module):
  """Causal multi-head self-attention with RoPE on queries and keys."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.cfg = cfg
    self.q_proj = _linear(cfg.d_model, cfg.d_model)
    self.k_proj = _linear(cfg.d_model, cfg.d_model)
    self.v_proj = _linear(cfg.d_model, cfg.d_model)
    self.o_proj = _linear(cfg.d_model, cfg.d_model)

  def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
    cfg = self.cfg
    b, t, _ = x_BTD.shape
    split = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)
    positions_T = torch.arange(t, device=x_BTD.device)
    q_BTHD = apply_rope(split(self.q_proj(x_BTD)), positions_T, cfg.rope_theta)
    k_BTHD = apply_rope(split(self.k_proj(x_BTD)), positions_T, cfg.rope_theta)
    v_BTHD = split(self.v_proj(x_BTD))
    heads_first = lambda y: y.transpose(1, 2)
    out_BHTD = F.scaled_dot_product_attention(
      heads_first(q_BTHD), heads_first(k_BTHD), heads_first(v_BTHD), is_causal=True
    )
    return self.o_proj(out_BHTD.transpose(1, 2).reshape(b, t, cfg.d_model))


class MLP(nn.Module):
  """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.gate_proj = _linear(cfg.d_model, cfg.d_ff)
    self.up_proj = _linear(cfg.d_model, cfg.d_ff)
    self.down_proj = _linear(cfg.d_ff, cfg.d_model)

  def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
    return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Block(nn.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.attn = Attention(cfg)
    self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.mlp = MLP(cfg)

  def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Llama(nn.Module):
  """Token ids (batch, time) to next-token logits (batch, time, vocab)."""

  def __init__(self, cfg: Config):
    super().__init__()
    self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
    nn.init.normal_(self.embed.weight, std=1.0)
    self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
    self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.lm_head = _linear(cfg.d_model, cfg.vocab_size)

  def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
    x_BTD = self.embed(tokens_BT)
    for layer in self.layers:
      x_BTD = layer(x_BTD)
    return self.lm_head(self.norm(x_BTD))


def build(cfg: Config, seed: int) -> Llama:
  """A freshly initialised model; the same ``seed`` gives the same weights."""
  with torch.random.fork_rng(devices=[]):  # leaves the global generator untouched
    torch.manual_seed(seed)
    return Llama(cfg)


def param_count(cfg: Config) -> int:
  """Number of parameters of a config, from shapes only (built on the meta device)."""
  with torch.device("meta"):
    return sum(p.numel() for p in Llama(cfg).parameters())
