"""Pretraining a small LLaMA in Flax NNX with AdamW, GaLore or Q-GaLore.

Run ``python -m examples.llama.train --help``; ``--compare`` trains every optimizer on the
same data and seed and prints a markdown table.
"""
