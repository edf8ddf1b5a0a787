"""nemodiff-train: convert autoregressive LLMs into diffusion LLMs and decode them in three modes."""

__version__ = "0.1.0"
