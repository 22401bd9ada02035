"""A Hugging Face checkpoint's own tokenizer.json: special tokens from the files beside it.

Tokenizers are built here in the layouts real checkpoints use (Llama 3: distinct bos/eos and a
split-regex pre-tokenizer; Qwen: one `<|endoftext|>`, no bos, a non-special added `<think>`),
since nothing can be downloaded. transformers reads the exported files back where installed.
"""

import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from input_pipeline import BpeTokenizer, build_datasets, load_tokenizer
from input_pipeline import tokenizer as tokenizer_lib
from configs import common as configs_common

WORDS = ('alpha beta gamma delta def class return import lambda yield café naïve 日本 😀 '
         'for while if else').split()
TEXTS = [' '.join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
LLAMA3 = {'bos': '<|begin_of_text|>', 'eos': '<|end_of_text|>'}
# The Llama 3 / GPT-4 style pre-tokenizer: a split regex, then byte-level without its own regex.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def real_tokenizer(directory, specials, added=(), split=False, sidecar='tokenizer_config.json',
                   sidecar_fields=None):
  """A byte-level BPE trained with a checkpoint's own special tokens, saved as HF does."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not split)
  tokenizer.pre_tokenizer = (pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(SPLIT), behavior='isolated'), byte_level])
                             if split else byte_level)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=list(specials.values()), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if added:
    tokenizer.add_tokens([tokenizers.AddedToken(t, special=False) for t in added])
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'tokenizer.json')
  tokenizer.save(path)
  if sidecar:
    fields = sidecar_fields if sidecar_fields is not None else {
        f'{k}_token': v for k, v in specials.items()}
    with open(os.path.join(directory, sidecar), 'w') as f:
      json.dump(fields, f)
  return path, tokenizer


def test_llama3_style_tokenizer(tmp_path):
  path, raw = real_tokenizer(tmp_path, LLAMA3, split=True)
  tok = load_tokenizer(path)
  assert isinstance(tok, BpeTokenizer)
  assert (tok.bos_id, tok.eos_id) == (raw.token_to_id(LLAMA3['bos']), raw.token_to_id(LLAMA3['eos']))
  assert tok.pad_id == tok.eos_id and tok.mask_id is None
  for text in ['naïve café 日本 😀 x', 'don\'t  stop\n\nnow 12345', '<|end_of_text|> is text']:
    ids = tok.encode(text)
    assert tok.eos_id not in ids  # a special token's string in a document is plain text
    assert tok.token_bytes_V[ids].sum() == len(text.encode('utf-8'))
    assert tok.decode(ids) == text


def test_qwen_style_tokenizer_single_separator_and_added_tokens(tmp_path):
  path, raw = real_tokenizer(tmp_path, {'eos': '<|endoftext|>'}, added=('<think>',),
                             sidecar_fields={'bos_token': None, 'eos_token': '<|endoftext|>',
                                             'pad_token': {'content': '<|endoftext|>'}})
  tok = load_tokenizer(path)
  sep = raw.token_to_id('<|endoftext|>')
  assert tok.bos_id == tok.eos_id == tok.pad_id == sep
  text = 'alpha <think>beta</think> gamma'
  ids = tok.encode(text)
  assert raw.token_to_id('<think>') in ids
  assert tok.token_bytes_V[ids].sum() == len(text.encode('utf-8'))

  # The pipeline writes one separator per document (eos doc eos doc ...), not two.
  texts = {'a.txt': 'alpha beta', 'b.txt': 'gamma', 'c.txt': 'delta def class'}
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for name, body in texts.items():
    (corpus / name).write_text(body)
  config = configs_common.base_config().data
  config.update(corpus='text', paths=str(corpus / '*.txt'), tokenizer='bpe', tokenizer_path=path,
                seq_len=4, val_fraction=0.0, eval_batches=0, cache_dir=str(tmp_path / 'cache'))
  datasets = build_datasets(config, global_batch_size=1, workdir=None)
  train = np.load(os.path.join(datasets.stats['cache_dir'], 'train.npy'))
  val = np.load(os.path.join(datasets.stats['cache_dir'], 'val.npy'))
  docs = [list(tok.encode(body)) for body in texts.values()]
  both = np.concatenate([train, val])
  assert len(both) == sum(len(d) + 1 for d in docs) and (both == sep).sum() == len(docs)
  pieces = np.split(both, np.flatnonzero(both == sep))
  assert sorted(tuple(p) for p in pieces if len(p)) == sorted((sep, *d) for d in docs)


def test_special_tokens_from_config_json_ids(tmp_path):
  path, raw = real_tokenizer(tmp_path, LLAMA3, sidecar='config.json', sidecar_fields={})
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'bos_token_id': raw.token_to_id(LLAMA3['bos']),
               'eos_token_id': [raw.token_to_id(LLAMA3['eos']), 7]}, f)
  tok = load_tokenizer(path)
  assert (tok.bos_id, tok.eos_id) == (raw.token_to_id(LLAMA3['bos']), raw.token_to_id(LLAMA3['eos']))


@pytest.mark.parametrize('sidecar_fields,match', [
    (None, "has none of archlab's special tokens .* names an eos token"),
    ({'eos_token': '<|missing|>'}, "its eos token '<|missing|>' is not in the vocabulary"),
])
def test_unusable_special_tokens_are_one_line(tmp_path, sidecar_fields, match):
  path, _ = real_tokenizer(tmp_path, LLAMA3, sidecar='tokenizer_config.json' if sidecar_fields
                           else None, sidecar_fields=sidecar_fields)
  with pytest.raises(ValueError, match=match) as info:
    load_tokenizer(path)
  assert str(tmp_path / 'tokenizer.json') in str(info.value) and '\n' not in str(info.value)


def test_not_byte_level_is_refused(tmp_path):
  tokenizer = tokenizers.Tokenizer(models.WordLevel({'<eos>': 0, 'hello': 1, '▁world': 2},
                                                    unk_token='<eos>'))
  path = str(tmp_path / 'tokenizer.json')
  tokenizer.save(path)
  with open(tmp_path / 'tokenizer_config.json', 'w') as f:
    json.dump({'eos_token': '<eos>'}, f)
  with pytest.raises(ValueError, match="token 2 \\('▁world'\\) is not byte-level BPE"):
    load_tokenizer(path)


def test_save_writes_the_sidecar_and_reloads_the_same(tmp_path):
  path, _ = real_tokenizer(tmp_path / 'ckpt', LLAMA3, split=True)
  tok = load_tokenizer(path)
  copy = str(tmp_path / 'workdir' / 'tokenizer.json')
  os.makedirs(os.path.dirname(copy))
  tok.save(copy)
  with open(tmp_path / 'workdir' / 'tokenizer_config.json') as f:
    assert json.load(f) == {'bos_token': LLAMA3['bos'], 'eos_token': LLAMA3['eos']}
  again = load_tokenizer(copy)
  assert again.fingerprint == tok.fingerprint and again.bos_id == tok.bos_id
  # archlab's own tokenizers keep their fingerprint scheme and write no sidecar.
  own = tokenizer_lib.BpeTokenizer.train(TEXTS, vocab_size=300)
  own.save(str(tmp_path / 'own.json'))
  assert not os.path.exists(tmp_path / 'tokenizer_config.json')
  assert load_tokenizer(str(tmp_path / 'own.json')).fingerprint == own.fingerprint


def test_transformers_reads_the_exported_tokenizer(tmp_path):
  transformers = pytest.importorskip('transformers')
  from models.hf import files
  path, _ = real_tokenizer(tmp_path / 'src', LLAMA3, split=True)
  out = tmp_path / 'out'
  out.mkdir()
  files.copy_tokenizer(path, str(out))
  ids = files.special_token_ids(path)
  tok = load_tokenizer(path)
  assert ids == {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id,
                 'pad_token_id': tok.pad_id}
  theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / 'tokenizer.json'),
                                                **json.load(open(out / 'tokenizer_config.json')))
  assert theirs.eos_token_id == tok.eos_id and theirs.bos_token_id == tok.bos_id
  text = 'naïve café 日本 😀 return lambda'
  assert theirs.encode(text, add_special_tokens=False) == tok.encode(text)
