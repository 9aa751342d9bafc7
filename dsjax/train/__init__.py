"""Pretraining: losses, optimizer, the jit-compiled sharded train step, checkpoints and the training loop."""
