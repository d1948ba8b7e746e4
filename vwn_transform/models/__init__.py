"""Reference models shipped with vwn_transform."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
