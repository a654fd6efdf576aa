"""Runnable examples of qgalore_jax (see ``examples/llama`` for the main job)."""
