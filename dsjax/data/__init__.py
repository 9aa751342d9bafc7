"""Pretraining data: tokenizers, the embedded default corpus, document-level FIM, packing and the Grain pipeline."""

from dsjax.data.corpus import default_corpus, generate_document, train_validation_split, unigram_entropy
from dsjax.data.fim import FIM_MODES, apply_fim, document_tokens, fim_layout, fim_mode, fim_parts, is_fim, undo_fim
from dsjax.data.packing import ROW_KEYS, PackIterDataset
from dsjax.data.pipeline import future_targets, make_pretrain_dataset, make_pretrain_iterator
from dsjax.data.repo import Repository, load_repository_corpus, order_files, read_repository, repository_documents
from dsjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "FIM_MODES",
    "ROW_KEYS",
    "ByteTokenizer",
    "HFTokenizer",
    "PackIterDataset",
    "Repository",
    "Tokenizer",
    "apply_fim",
    "default_corpus",
    "document_tokens",
    "fim_layout",
    "fim_mode",
    "fim_parts",
    "future_targets",
    "generate_document",
    "is_fim",
    "load_repository_corpus",
    "make_pretrain_dataset",
    "make_pretrain_iterator",
    "order_files",
    "read_repository",
    "repository_documents",
    "train_validation_split",
    "undo_fim",
    "unigram_entropy",
]
