"""Checkpoints: Hugging Face safetensors directories and orbax."""
