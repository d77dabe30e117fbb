"""statelens: diagnostics for the recurrent state of linear recurrent language models."""

__version__ = "0.1.0"
