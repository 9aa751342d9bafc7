"""Flax NNX modules that hold DeepSeek parameters (with logical axis names) and call :mod:`dsjax.ops`."""
