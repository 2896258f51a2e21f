"""Distributed LoRA training for diffusion models."""

from difftrain_dist.quiet import quiet_loggers

quiet_loggers()
