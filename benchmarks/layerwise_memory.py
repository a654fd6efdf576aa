"""Peak memory saved by layer-wise updates (``register_layerwise_hooks``) (issue 3, part 3).

Trains a minimal LLaMA-like model (token embeddings; blocks of RMSNorm, causal multi-head
attention without rotary embeddings, RMSNorm, SwiGLU MLP; final RMSNorm; untied head) with
``qgalore_torch.QGaLoreAdamW`` (q,k,v,o,gate,up,down projected at rank 128, the rest AdamW)
in two modes, each in a fresh subprocess started from the same seed and fed the same tokens:

* ``normal``: ``loss.backward()``, then ``step()`` and ``zero_grad(set_to_none=True)``;
  every gradient is alive at once between the end of backward and the end of the step.
* ``layerwise``: ``register_layerwise_hooks()``; each parameter is updated inside backward
  as soon as its gradient is complete, and the gradient is freed right away.

The default model has the LLaMA-60M shapes (hidden 512, ffn 1376, 8 layers, 8 heads, vocab
32000; 58.1M parameters, 232 MB of float32 gradients) and trains on batches of 2 x 128
random tokens. The first iteration refreshes every projector (SVD); the gap is 200, so the
measured iterations are normal ones. Reported per mode, as the peak above what was
allocated when the iteration began (parameters, moments, projectors):

* ``allocated`` (the primary measure): one iteration (forward, backward, step, zero_grad)
  runs under ``torch.profiler.profile(profile_memory=True)``; the running sum of the
  allocations and frees that torch's CPU allocator reports, in time order, peaks at this
  many bytes, and the ops that enclose the peak are named. It counts exactly the tensor
  bytes torch allocates (activations, gradients, optimizer temporaries) and nothing else:
  not the Python objects of the autograd graph, nor scratch that BLAS or oneDNN allocate
  themselves.
* ``rss``: the growth of the process's resident set over the measured iterations, read from
  the kernel: ``VmHWM`` (peak resident set, reset by writing ``5`` to
  ``/proc/self/clear_refs`` before them; never below ``VmRSS`` at either end, since the
  kernel updates it lazily) minus ``VmRSS`` when they began. It sees everything
  the process touches, library scratch included, but also the allocator's behaviour: glibc
  keeps freed small blocks, so the children run with ``MALLOC_MMAP_THRESHOLD_=131072``
  (blocks of 128 KiB or more are mapped and unmapped one by one, the threshold no longer
  grows), and pages of a new block count only once written.
* ``cuda_allocated`` (with ``--device cuda``): ``torch.cuda.max_memory_allocated()`` after
  ``torch.cuda.reset_peak_memory_stats()``, minus ``torch.cuda.memory_allocated()`` when
  the iteration began.

Both children save their weights after the last iteration; the script checks that the two
modes give the same weights. The CPU measures read ``/proc``, so they need Linux.

  python -m benchmarks.layerwise_memory
  python -m benchmarks.layerwise_memory --device cuda
"""

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import qgalore_torch
from benchmarks.llama_shapes import BLOCK_MATRICES
from benchmarks.llama_shapes import CONFIGS
from benchmarks.llama_shapes import VOCAB
from benchmarks.torch_step_speed import source_version

# The paper's 60M shapes with 8 heads of 64 (the number of heads does not change the shapes).
LLAMA_60M = dict(zip(("hidden", "ffn", "layers"), CONFIGS["60M"], strict=True))
LLAMA_60M |= {"heads": 8, "vocab": VOCAB}
MODES = ("normal", "layerwise")
RESULTS = pathlib.Path(__file__).parent / "results"
_REPO = pathlib.Path(__file__).parents[1]
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class Block(nn.Module):
  """Pre-norm LLaMA block: causal attention and a SwiGLU MLP, no rotary embeddings."""

  def __init__(self, hidden, ffn, heads):
    super().__init__()
    self.heads = heads
    self.attn_norm = nn.RMSNorm(hidden)
    self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
    self.mlp_norm = nn.RMSNorm(hidden)
    self.gate = nn.Linear(hidden, ffn, bias=False)
    self.up = nn.Linear(hidden, ffn, bias=False)
    self.down = nn.Linear(ffn, hidden, bias=False)

  def forward(self, x_BxSxD):
    b, s, d = x_BxSxD.shape
    h_BxSxD = self.attn_norm(x_BxSxD)
    q, k, v = (
      proj(h_BxSxD).view(b, s, self.heads, d // self.heads).transpose(1, 2)
      for proj in (self.q, self.k, self.v)
    )
    attn_BxSxD = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    x_BxSxD = x_BxSxD + self.o(attn_BxSxD.reshape(b, s, d))
    h_BxSxD = self.mlp_norm(x_BxSxD)
    return x_BxSxD + self.down(F.silu(self.gate(h_BxSxD)) * self.up(h_BxSxD))


class TinyLlama(nn.Module):
  """Embeddings, ``layers`` blocks, final RMSNorm and an untied head."""

  def __init__(self, hidden, ffn, layers, heads, vocab):
    super().__init__()
    self.embed = nn.Embedding(vocab, hidden)
    self.layers = nn.ModuleList(Block(hidden, ffn, heads) for _ in range(layers))
    self.final_norm = nn.RMSNorm(hidden)
    self.lm_head = nn.Linear(hidden, vocab, bias=False)

  def forward(self, tokens_BxS):
    x_BxSxD = self.embed(tokens_BxS)
    for layer in self.layers:
      x_BxSxD = layer(x_BxSxD)
    return self.lm_head(self.final_norm(x_BxSxD))


def make_optimizer(model, rank, gap, moment_bits=None):
  """``QGaLoreAdamW`` projecting q,k,v,o,gate,up,down; AdamW for the rest."""
  matrices = [p for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in BLOCK_MATRICES]
  others = [p for p in model.parameters() if all(p is not m for m in matrices)]
  groups = [{"params": matrices, "rank": rank, "update_proj_gap": gap}, {"params": others}]
  return qgalore_torch.QGaLoreAdamW(groups, lr=1e-3, weight_decay=0.01, moment_bits=moment_bits)


def train_iteration(model, opt, tokens_BxS, mode):
  """One batch; the phases are labelled so the profiler can say where the peak was."""
  with torch.profiler.record_function("forward"):
    logits_BxSxV = model(tokens_BxS[:, :-1])
    loss = F.cross_entropy(logits_BxSxV.flatten(0, 1), tokens_BxS[:, 1:].flatten())
  with torch.profiler.record_function("backward"):
    loss.backward()
  if mode == "normal":
    with torch.profiler.record_function("step"):
      opt.step()
      opt.zero_grad(set_to_none=True)


def _proc_status_kib(field):
  with open("/proc/self/status") as f:
    return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _peak_allocated(prof):
  """Peak of the running sum of the CPU allocations and frees the profiler recorded.

  Returns:
    ``(peak_bytes, where)``: ``where`` names the ops that enclose the peak, outermost first.
  """
  events = list(prof.profiler.kineto_results.events())
  memory = sorted(
    (
      e
      for e in events
      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ),
    key=lambda e: e.start_ns(),
  )
  running = peak = 0
  peak_ns = None
  for e in memory:
    running += e.nbytes()
    if running > peak:
      peak, peak_ns = running, e.start_ns()
  enclosing = [
    e for e in events if e.name() != "[memory]" and e.start_ns() <= (peak_ns or 0) <= e.end_ns()
  ]
  enclosing.sort(key=lambda e: (e.start_ns(), -e.end_ns()))
  return peak, [e.name() for e in enclosing]


def _iterations(warmup, measured, device_type):
  """Warm-up, RSS-measured, profiled and (on CUDA) CUDA-measured iterations."""
  return warmup + measured + 1 + (device_type == "cuda")


def measure_mode(
  mode,
  config,
  batch,
  seq,
  rank,
  gap,
  warmup,
  measured,
  device,
  weights_path,
  int8_weights=False,
  moment_bits=None,
):
  """Trains in one mode and returns its peaks (bytes); run it in a fresh process.

  ``int8_weights``: q,k,v,o,gate,up,down as ``Int8Linear`` (``quantize_linears``);
  ``moment_bits=8``: 8-bit Adam moments. On CUDA, deterministic algorithms are enforced
  (``torch.use_deterministic_algorithms``): the embedding's backward otherwise sums with
  atomics, in an order that changes from run to run, and the two modes could not be
  compared bit for bit.
  """
  device = torch.device(device)
  stages, last = {}, [time.perf_counter()]

  def mark(stage):
    """Wall seconds since the previous mark, the device's queued work included."""
    if device.type == "cuda":
      torch.cuda.synchronize(device)
    now = time.perf_counter()
    stages[stage] = round(now - last[0], 3)
    last[0] = now

  if device.type == "cuda":
    torch.use_deterministic_algorithms(True, warn_only=True)
  torch.manual_seed(0)
  model = TinyLlama(**config).to(device)
  if int8_weights:
    qgalore_torch.quantize_linears(model, lambda name: name.rsplit(".", 1)[-1] in BLOCK_MATRICES)
  opt = make_optimizer(model, rank, gap, moment_bits)
  if mode == "layerwise":
    opt.register_layerwise_hooks()
  generator = torch.Generator().manual_seed(1)
  iterations = _iterations(warmup, measured, device.type)
  tokens = torch.randint(config["vocab"], (iterations, batch, seq + 1), generator=generator)
  tokens = tokens.to(device)
  rss_model_kib = _proc_status_kib("VmRSS")
  mark("model and optimizer")
  for i in range(warmup):
    train_iteration(model, opt, tokens[i], mode)
  mark("warm-up iterations (the first refreshes every projector)")

  gc.collect()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
  rss_start_kib = _proc_status_kib("VmRSS")
  start = time.perf_counter()
  for i in range(warmup, warmup + measured):
    train_iteration(model, opt, tokens[i], mode)
  if device.type == "cuda":
    torch.cuda.synchronize(device)
  seconds = (time.perf_counter() - start) / measured
  mark("measured iterations")
  # The kernel folds the live resident set into VmHWM lazily (on unmap, not on every
  # madvise-free), so VmHWM can read a page or two under the VmRSS taken just after the
  # reset. The peak is at least the resident set at either end of the measured window.
  rss_peak_kib = max(_proc_status_kib("VmHWM"), _proc_status_kib("VmRSS"), rss_start_kib)

  peaks = {"rss": (rss_peak_kib - rss_start_kib) * 1024}
  activities = [torch.profiler.ProfilerActivity.CPU]
  with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
    train_iteration(model, opt, tokens[warmup + measured], mode)
  peaks["allocated"], peak_where = _peak_allocated(prof)
  mark("profiled iteration")
  if device.type == "cuda":
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start_bytes = torch.cuda.memory_allocated(device)
    train_iteration(model, opt, tokens[-1], mode)
    torch.cuda.synchronize(device)
    peaks["cuda_allocated"] = torch.cuda.max_memory_allocated(device) - start_bytes

  # The state dict: INT8 layers save their codes, scales and zeros.
  torch.save({n: t.detach().cpu() for n, t in model.state_dict().items()}, weights_path)
  mark("CUDA-measured iteration and saving the weights")
  return {
    "peak_bytes": peaks,
    "rss_after_model_bytes": rss_model_kib * 1024,
    "rss_start_bytes": rss_start_kib * 1024,
    "rss_peak_bytes": rss_peak_kib * 1024,
    "allocated_peak_during": peak_where,
    "seconds_per_iteration": seconds,
    "svd_counts": sorted({s["svd_count"] for s in opt.projection_stats() if s is not None}),
    "parameters": sum(p.numel() for p in model.parameters()),
    "stage_seconds": stages,
  }


def _start_child(mode, settings, weights_path, threads):
  command = [sys.executable, "-m", "benchmarks.layerwise_memory", "--child", mode]
  command += ["--settings", json.dumps(settings), "--weights", str(weights_path)]
  if threads is not None:
    command += ["--threads", str(threads)]
  # cuBLAS is deterministic only with a fixed workspace (measure_mode's CUDA determinism).
  env = {**os.environ, **_MALLOC_ENV, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
  pipe = subprocess.PIPE
  return subprocess.Popen(command, cwd=_REPO, env=env, stdout=pipe, stderr=pipe, text=True)


def _child_result(mode, child):
  stdout, stderr = child.communicate()
  if child.returncode != 0:
    raise RuntimeError(f"{mode} child failed:\n{stderr[-4000:]}")
  return json.loads(stdout.strip().splitlines()[-1])


def run(
  config=None,
  batch=2,
  seq=128,
  rank=128,
  gap=200,
  warmup=2,
  measured=1,
  device="cpu",
  threads=None,
  concurrent=False,
  int8_weights=False,
  moment_bits=None,
):
  """Measures both modes in fresh subprocesses; returns the result as a JSON-ready dict.

  ``concurrent=True`` runs the two at once: the bytes are per process and do not change,
  but then the seconds per iteration compare runs that competed for the CPU.
  """
  config = dict(LLAMA_60M if config is None else config)
  settings = dict(
    config=config,
    batch=batch,
    seq=seq,
    rank=rank,
    gap=gap,
    warmup=warmup,
    measured=measured,
    device=device,
    int8_weights=int8_weights,
    moment_bits=moment_bits,
  )
  source = source_version()
  modes, weights = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    paths = {mode: pathlib.Path(tmp) / f"{mode}.pt" for mode in MODES}
    children = {}
    for mode in MODES:
      children[mode] = _start_child(mode, settings, paths[mode], threads)
      if not concurrent:
        modes[mode] = _child_result(mode, children[mode])
    for mode in MODES:
      if concurrent:
        modes[mode] = _child_result(mode, children[mode])
      weights[mode] = torch.load(paths[mode], weights_only=True)
  if source_version()["qgalore_torch_sha256"] != source["qgalore_torch_sha256"]:
    raise RuntimeError("qgalore_torch changed while the two modes ran: run again")
  a, b = weights["normal"], weights["layerwise"]
  max_diff = max(float((a[n].float() - b[n].float()).abs().max()) for n in a)
  measures = list(modes["normal"]["peak_bytes"])
  saving = {
    m: modes["normal"]["peak_bytes"][m] - modes["layerwise"]["peak_bytes"][m] for m in measures
  }
  num_params = modes["normal"]["parameters"]
  if torch.device(device).type == "cuda":
    device_name = torch.cuda.get_device_name(device)
  else:
    device_name = f"cpu ({platform.processor() or platform.machine()})"
  return {
    "benchmark": "peak memory, layer-wise vs normal QGaLoreAdamW updates, LLaMA-like model",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device": device_name,
    "backend": torch.device(device).type,
    "versions": {"torch": torch.__version__, "qgalore_torch": qgalore_torch.__version__},
    "source": source,
    "settings": {
      **settings,
      "parameters": num_params,
      "gradient_bytes": 4 * num_params,
      "malloc_env": _MALLOC_ENV,
      "torch_threads": threads or torch.get_num_threads(),
      "concurrent": concurrent,
    },
    "modes": modes,
    "saving_bytes": saving,
    "saving_fraction": {
      m: saving[m] / modes["normal"]["peak_bytes"][m] if modes["normal"]["peak_bytes"][m] else None
      for m in measures
    },
    "same_weights": {
      "identical": all(torch.equal(a[n], b[n]) for n in a),
      "max_abs_diff": max_diff,
      "iterations": _iterations(warmup, measured, torch.device(device).type),
    },
  }


def _mb(num_bytes):
  return f"{num_bytes / 2**20:,.1f} MiB"


def to_markdown(result):
  s = result["settings"]
  c = s["config"]
  labels = {
    "allocated": "tensor bytes (profiler)",
    "rss": "resident set (VmHWM)",
    "cuda_allocated": "CUDA max_memory_allocated",
  }
  lines = [
    f"Peak memory of one training iteration above its start (parameters and optimizer state"
    f" excluded), LLaMA-like model: hidden {c['hidden']}, ffn {c['ffn']}, {c['layers']} layers,"
    f" vocab {c['vocab']} ({s['parameters']:,} parameters, {_mb(s['gradient_bytes'])} of"
    f" float32 gradients), batch {s['batch']} x {s['seq']} tokens, rank {s['rank']},"
    f" {'INT8' if s.get('int8_weights') else 'float32'} block weights,"
    f" {s.get('moment_bits') or 32}-bit moments;"
    f" {result['device']}, torch {result['versions']['torch']}, {result['date']}.",
    "",
    "| measure | mode | peak | saving vs normal |",
    "|---|---|---:|---:|",
  ]
  for measure in result["saving_bytes"]:
    for mode in MODES:
      peak = result["modes"][mode]["peak_bytes"][measure]
      if mode == "normal":
        saving = ""
      else:
        fraction = result["saving_fraction"][measure]
        percent = "" if fraction is None else f" ({fraction:.0%})"
        saving = f"{_mb(result['saving_bytes'][measure])}{percent}"
      lines.append(f"| {labels[measure]} | {mode} | {_mb(peak)} | {saving} |")
  same = result["same_weights"]
  lines += [
    "",
    f"- Same weights after {same['iterations']} iterations:"
    f" **{'identical' if same['identical'] else 'different'}**"
    f" (max |difference| {same['max_abs_diff']:.3g}).",
    *(
      f"- Peak of the tensor bytes, {mode} mode, during:"
      f" {' > '.join(result['modes'][mode]['allocated_peak_during'])}."
      for mode in MODES
    ),
    "- Seconds per iteration: "
    + ", ".join(f"{m} {result['modes'][m]['seconds_per_iteration']:.1f}" for m in MODES)
    + ".",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--device", default="cpu")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
  parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
  parser.add_argument("--settings", help=argparse.SUPPRESS)
  parser.add_argument("--weights", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.threads is not None:
    torch.set_num_threads(args.threads)
  if args.child is not None:
    measured = measure_mode(args.child, **json.loads(args.settings), weights_path=args.weights)
    print(json.dumps(measured))
    return
  result = run(batch=args.batch, seq=args.seq, device=args.device, threads=args.threads)
  markdown = to_markdown(result)
  print(markdown)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"layerwise_memory_{result['backend']}"
  (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (args.out / f"{stem}.md").write_text(markdown)


if __name__ == "__main__":
  main()
