"""Corpora, tokenizers and grain pipelines: `build_datasets(config.data, ...)` is the entry."""

from input_pipeline.pipeline import Datasets, build_datasets
from input_pipeline.tokenizer import BpeTokenizer, ByteTokenizer, load_tokenizer

__all__ = ['BpeTokenizer', 'ByteTokenizer', 'Datasets', 'build_datasets', 'load_tokenizer']
