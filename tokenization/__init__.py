"""Tokenization for serving: HF-compatible encode/decode/chat rendering, streaming detokenization,
stop strings, and a small BPE trainer for tests and the demo model."""
from tokenization.chat_template import normalize_messages
from tokenization.detokenizer import IncrementalDetokenizer
from tokenization.errors import TokenizerError
from tokenization.stop import StopMatcher
from tokenization.tokenizer import Tokenizer
from tokenization.training import DEFAULT_CHAT_TEMPLATE, train_bpe_tokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IncrementalDetokenizer",
    "StopMatcher",
    "Tokenizer",
    "TokenizerError",
    "normalize_messages",
    "train_bpe_tokenizer",
]
