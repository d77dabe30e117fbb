"""Token sources for statelens: where the token ids fed to a model come from.

Start with :func:`load_tokens` (a ``.npy``, ``.jsonl``, text file or directory -> :class:`TokenData`)
and :func:`load_tokenizer` (a checkpoint directory -> :class:`Tokenizer`, local files only).
"""

from statelens.data.sources import TokenData, load_tokens
from statelens.data.tokenizer import (
    ByteTokenizer,
    JsonTokenizer,
    Tokenizer,
    TransformersTokenizer,
    load_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "JsonTokenizer",
    "TokenData",
    "Tokenizer",
    "TransformersTokenizer",
    "load_tokenizer",
    "load_tokens",
]
