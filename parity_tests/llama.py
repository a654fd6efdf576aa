"""A tiny LLaMA block written twice: pure JAX functions on a Flax-layout params dict, and a
torch ``nn.Module``, computing the same next-token loss from the same weights.

embedding -> RMSNorm -> causal attention (q, k, v, o; no RoPE) -> residual -> RMSNorm ->
SwiGLU MLP (gate, up, down) -> residual -> RMSNorm -> untied head -> cross-entropy.
JAX kernels are (in, out), as ``flax.nnx.Linear`` stores them; torch weights are (out, in).
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HEADS, HIDDEN, SEQ, BATCH = 64, 32, 2, 64, 16, 8
EPS = 1e-6
# JAX leaf -> torch parameter, in the order of the torch param groups (projections first,
# so a projection's torch tensor id is its index here).
PROJECTIONS = {
  "q": "q_proj.weight",
  "k": "k_proj.weight",
  "v": "v_proj.weight",
  "o": "o_proj.weight",
  "gate": "gate_proj.weight",
  "up": "up_proj.weight",
  "down": "down_proj.weight",
}
OTHERS = {
  "embed": "embed.weight",
  "attn_norm": "attn_norm",
  "mlp_norm": "mlp_norm",
  "final_norm": "final_norm",
  "head": "lm_head.weight",
}
NAMES = {**PROJECTIONS, **OTHERS}
KERNELS = (*PROJECTIONS, "head")  # stored (in, out) in JAX: transposed against torch


def init_params(seed=0) -> dict:
  """float32 NumPy weights in the JAX layout."""
  rng = np.random.default_rng(seed)
  shapes = {"q": (DIM, DIM), "k": (DIM, DIM), "v": (DIM, DIM), "o": (DIM, DIM)}
  shapes |= {"gate": (DIM, HIDDEN), "up": (DIM, HIDDEN), "down": (HIDDEN, DIM)}
  shapes |= {"head": (DIM, VOCAB)}
  params = {k: rng.normal(size=s) / np.sqrt(s[0]) for k, s in shapes.items()}
  params["embed"] = rng.normal(size=(VOCAB, DIM))
  params |= {k: np.ones(DIM) for k in ("attn_norm", "mlp_norm", "final_norm")}
  return {k: v.astype(np.float32) for k, v in params.items()}


def to_torch_layout(name: str, value):
  """A JAX-layout array as the torch parameter holds it (kernels transposed)."""
  return value.T if name in KERNELS else value


def batches(steps: int, seed=0) -> np.ndarray:
  """int64 [steps, BATCH, SEQ + 1]: sequences ``x' = 5 x + 3 mod VOCAB``, 10% random tokens.

  Step ``t`` has its own generator, so a shorter run sees the first batches of a longer one.
  """
  out = np.empty((steps, BATCH, SEQ + 1), np.int64)
  for t in range(steps):
    rng = np.random.default_rng((seed, t))
    tokens = out[t]
    tokens[:, 0] = rng.integers(0, VOCAB, size=BATCH)
    for i in range(1, SEQ + 1):
      tokens[:, i] = (5 * tokens[:, i - 1] + 3) % VOCAB
    noise = rng.random(tokens.shape) < 0.1
    tokens[noise] = rng.integers(0, VOCAB, size=int(noise.sum()))
  return out


def _rms_norm(x, w):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def jax_loss(params: dict, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of the block on ``tokens`` [batch, SEQ + 1]."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  x = params["embed"][inputs]
  h = _rms_norm(x, params["attn_norm"])
  b, s, _ = h.shape
  split = lambda t: t.reshape(b, s, HEADS, DIM // HEADS).transpose(0, 2, 1, 3)
  q, k, v = (split(h @ params[n]) for n in ("q", "k", "v"))
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(DIM // HEADS)
  scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
  attn = jax.nn.softmax(scores, axis=-1) @ v
  x = x + attn.transpose(0, 2, 1, 3).reshape(b, s, DIM) @ params["o"]
  h = _rms_norm(x, params["mlp_norm"])
  x = x + (jax.nn.silu(h @ params["gate"]) * (h @ params["up"])) @ params["down"]
  logits = _rms_norm(x, params["final_norm"]) @ params["head"]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


class TorchBlock(nn.Module):
  """The same block in torch, with LLaMA's module names (so ``quantize_linears`` finds them)."""

  def __init__(self, params: dict):
    super().__init__()
    self.embed = nn.Embedding(VOCAB, DIM)
    self.attn_norm, self.mlp_norm, self.final_norm = (
      nn.Parameter(torch.ones(DIM)) for _ in range(3)
    )
    linear = lambda i, o: nn.Linear(i, o, bias=False)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = (linear(DIM, DIM) for _ in range(4))
    self.gate_proj, self.up_proj = linear(DIM, HIDDEN), linear(DIM, HIDDEN)
    self.down_proj, self.lm_head = linear(HIDDEN, DIM), linear(DIM, VOCAB)
    named = dict(self.named_parameters())
    with torch.no_grad():
      for name, torch_name in NAMES.items():
        value = np.ascontiguousarray(to_torch_layout(name, params[name]))
        named[torch_name].copy_(torch.from_numpy(value))

  @staticmethod
  def _rms_norm(x, w):
    return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + EPS) * w

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    x = self.embed(inputs)
    h = self._rms_norm(x, self.attn_norm)
    b, s, _ = h.shape
    split = lambda t: t.reshape(b, s, HEADS, DIM // HEADS).transpose(1, 2)
    q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
    scores = q @ k.transpose(-1, -2) / np.sqrt(DIM // HEADS)
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool, device=tokens.device))
    attn = torch.softmax(scores.masked_fill(~mask, -torch.inf), dim=-1) @ v
    x = x + self.o_proj(attn.transpose(1, 2).reshape(b, s, DIM))
    h = self._rms_norm(x, self.mlp_norm)
    x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
    logits = self.lm_head(self._rms_norm(x, self.final_norm))
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

  def parameter(self, name: str) -> torch.Tensor:
    """The torch parameter of JAX leaf ``name``."""
    return self.get_parameter(NAMES[name])
