"""The PyTorch twin of ``examples.llama``: LLaMA pre-training with ``qgalore_torch``."""
