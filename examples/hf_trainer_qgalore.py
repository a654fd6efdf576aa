"""Q-GaLore with a Hugging Face ``transformers`` model and ``Trainer``.

  python -m examples.hf_trainer_qgalore                 # 30 steps of a tiny LLaMA, CPU
  python -m examples.hf_trainer_qgalore --no-int8 --steps 100

Builds a small ``LlamaForCausalLM`` from a ``LlamaConfig`` (no download), swaps its
q/k/v/o/gate/up/down projections for INT8 ``qgalore_torch.Int8Linear`` layers, puts their
weights in a param group with ``rank`` (projected by Q-GaLore, INT4 projector, adaptive
refresh) and the rest (embeddings, norms, head) in a plain AdamW group, and hands the
optimizer and a ``get_cosine_schedule_with_warmup`` scheduler to
``Trainer(optimizers=(optimizer, scheduler))``. The data is this file's own bytes,
tokenised as in ``examples/llama/data.py`` (256 byte values and an end-of-file token).

Needs ``pip install transformers accelerate``.
"""

import argparse
import pathlib

import torch

import qgalore_torch
from examples.llama import data
from examples.torch_llama.model import is_llama_projection


class ByteWindows(torch.utils.data.Dataset):
  """Non-overlapping windows of ``seq_len`` byte tokens as causal-LM examples."""

  def __init__(self, tokens, seq_len: int):
    rows = len(tokens) // seq_len
    self.windows = torch.as_tensor(tokens[: rows * seq_len], dtype=torch.long).view(rows, seq_len)

  def __len__(self):
    return len(self.windows)

  def __getitem__(self, i):
    # LlamaForCausalLM shifts the labels itself.
    return {"input_ids": self.windows[i], "labels": self.windows[i]}


def build_model(seed: int = 0):
  """A 2-layer ``LlamaForCausalLM``, hidden size 64, byte vocabulary, randomly initialised."""
  import transformers  # optional dependency: imported when the example runs

  config = transformers.LlamaConfig(
    vocab_size=data.BYTE_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=False,
  )
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(config)


def build_optimizer(model, *, lr: float, rank: int, update_proj_gap: int, int8: bool):
  """``QGaLoreAdamW`` projecting the 7 projections of each block; optionally INT8 first.

  Call before ``Trainer``: with ``int8`` the model's projection layers are replaced in place.
  """
  if int8:
    qgalore_torch.quantize_linears(model, is_llama_projection)
  matrices = [module.weight for name, module in model.named_modules() if is_llama_projection(name)]
  others = [p for p in model.parameters() if all(p is not w for w in matrices)]
  return qgalore_torch.QGaLoreAdamW(
    [
      {"params": matrices, "rank": rank, "update_proj_gap": update_proj_gap},
      {"params": others},
    ],
    lr=lr,
    betas=(0.9, 0.95),
    weight_decay=0.0,
  )


def main(argv: list[str] | None = None):
  """Trains with ``transformers.Trainer`` and returns the trainer (losses in its
  ``state.log_history``)."""
  import transformers  # optional dependency: imported when the example runs

  parser = argparse.ArgumentParser(
    prog="python -m examples.hf_trainer_qgalore", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--update-proj-gap", type=int, default=10)
  parser.add_argument("--no-int8", dest="int8", action="store_false", help="keep float weights")
  parser.add_argument("--out-dir", default="runs/hf_trainer_qgalore")
  args = parser.parse_args(argv)

  model = build_model()
  optimizer = build_optimizer(
    model,
    lr=args.learning_rate,
    rank=args.rank,
    update_proj_gap=args.update_proj_gap,
    int8=args.int8,
  )
  scheduler = transformers.get_cosine_schedule_with_warmup(
    optimizer, num_warmup_steps=max(1, args.steps // 10), num_training_steps=args.steps
  )
  tokens = data.encode_bytes([pathlib.Path(__file__).read_bytes()])
  training_args = transformers.TrainingArguments(
    output_dir=args.out_dir,
    max_steps=args.steps,
    per_device_train_batch_size=args.batch_size,
    logging_steps=max(1, args.steps // 10),
    save_strategy="no",
    report_to=[],
    use_cpu=not torch.cuda.is_available(),
    seed=0,
  )
  trainer = transformers.Trainer(
    model=model,
    args=training_args,
    train_dataset=ByteWindows(tokens, args.seq_len),
    optimizers=(optimizer, scheduler),
  )
  trainer.train()
  svds = sum(s["svd_count"] for s in optimizer.projection_stats() if s is not None)
  losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps; {svds} SVDs")
  return trainer


if __name__ == "__main__":
  main()
