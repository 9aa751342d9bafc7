"""Pretraining data: tokenizers, the embedded default corpus, document-level FIM, packing and the Grain pipeline."""

from dsjax.data.corpus import default_corpus, generate_document, train_validation_split, unigram_entropy
from dsjax.data.fim import apply_fim, document_tokens, is_fim, undo_fim
from dsjax.data.packing import ROW_KEYS, PackIterDataset
from dsjax.data.pipeline import future_targets, make_pretrain_dataset, make_pretrain_iterator
from dsjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "ROW_KEYS",
    "ByteTokenizer",
    "HFTokenizer",
    "PackIterDataset",
    "Tokenizer",
    "apply_fim",
    "default_corpus",
    "document_tokens",
    "future_targets",
    "generate_document",
    "is_fim",
    "make_pretrain_dataset",
    "make_pretrain_iterator",
    "train_validation_split",
    "undo_fim",
    "unigram_entropy",
]
