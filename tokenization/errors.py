"""The one exception type the tokenization package raises for bad inputs or checkpoints."""
from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer directory is unusable, or an input cannot be tokenized or rendered."""
