"""data.py: the Markdown cleaner, the by-play split, both tokenizers, preparation and batches."""
import json
import os

import numpy as np
import pytest
import torch

import data
from data import Tokenizer, clean_play, get_batch, load_meta, load_split, prepare, train_val_text


# preparing the full corpus takes ~1-2 s per tokenizer: do it once per test module
@pytest.fixture(scope='module')
def char_dir(tmp_path_factory):
    return prepare('shakespeare', 'char', str(tmp_path_factory.mktemp('data')))


@pytest.fixture(scope='module')
def bpe_dir(tmp_path_factory):
    return prepare('shakespeare', 'bpe', str(tmp_path_factory.mktemp('data')))


def split_text(prepared, split):
    tok = Tokenizer.from_meta(load_meta(prepared)['tokenizer'])
    return tok.decode(load_split(prepared, split))


@pytest.fixture(scope='module')
def char_text(char_dir):  # the decoded char splits, {'train': str, 'val': str}
    return {split: split_text(char_dir, split) for split in ('train', 'val')}


def error_of(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert str(e.value.code).startswith('error: ')
    return e.value.code


MARKDOWN = """# A Play

## ACT I

### SCENE I. A heath.

_Thunder and lightning. Enter three Witches,
and a Ghost_

**First Witch**  
When shall we three meet again  
In thunder\\--lightning, or in rain?

*Exeunt.*

**HAMLET**  
__\\[Aside]_  
To be, or not to be...

_Exit Ghost_

Who comes here?

**PAGE**  
[Within]_  
Who's there? No, no; he'll __\\[ ]_  
go.

**ALL**  
_They fight_
"""


def test_clean_play_on_every_markdown_construct():
    assert clean_play(MARKDOWN) == (
        "First Witch:\n"
        "When shall we three meet again\n"
        "In thunder--lightning, or in rain?\n"
        "\n"
        "HAMLET:\n"
        "To be, or not to be...\n"
        "Who comes here?\n"  # the speech goes on after a stage direction
        "\n"
        "PAGE:\n"
        "Who's there? No, no; he'll\n"
        "go.\n")  # ALL only had a stage direction: dropped


def test_cleaned_corpus_is_plain_text(char_dir, char_text):
    chars = load_meta(char_dir)['tokenizer']['chars']
    assert not set(chars) & set('#*_[]\\'), f"markdown left in the text: {chars!r}"
    assert all(c == '\n' or ' ' <= c <= '~' for c in chars), f"non-ASCII left: {chars!r}"
    train = char_text['train']
    assert 'First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n\n' in train
    for markup in ('ACT I', 'SCENE II', 'Thunder and lightning', 'Exeunt'):  # headings, stage directions
        assert markup not in train, markup
    assert ' \n' not in train and '\n\n\n' not in train  # no hard-break spaces, one blank line between speeches


def test_val_plays_are_held_out(char_dir, char_text):
    meta = load_meta(char_dir)
    assert meta['val_plays'] == list(data.VAL_PLAYS) and 'hamlet' in meta['split']
    train, val = char_text['train'], char_text['val']
    for line in ('To be, or not to be: that is the question', 'Friends, Romans, countrymen, lend me your ears',
                 'We are such stuff\nAs dreams are made on', 'If music be the food of love, play on'):
        assert line in val and line not in train, line  # Hamlet, Julius Caesar, The Tempest, Twelfth Night
    assert 'Now is the winter of our discontent' in train and 'Now is the winter' not in val  # Richard III
    assert 0.07 < meta['val_tokens'] / (meta['train_tokens'] + meta['val_tokens']) < 0.13  # about 10%


def test_prepare_is_deterministic_and_reused(char_dir, tmp_path, capsys):
    again = prepare('shakespeare', 'char', str(tmp_path))
    assert os.path.basename(again) == os.path.basename(char_dir) == 'shakespeare_char'
    for name in ('train.bin', 'val.bin', 'meta.json'):
        with open(os.path.join(char_dir, name), 'rb') as a, open(os.path.join(again, name), 'rb') as b:
            assert a.read() == b.read(), name
    capsys.readouterr()
    assert prepare('shakespeare', 'char', str(tmp_path)) == again
    assert 'prepared' not in capsys.readouterr().out  # second call reuses the files
    assert not [f for f in os.listdir(again) if f.endswith('.tmp')]  # atomic writes left no temp files


def test_meta_and_dtype(char_dir):
    meta = load_meta(char_dir)
    assert meta['dtype'] == 'uint16' and load_split(char_dir, 'train').dtype == np.uint16
    assert meta['train_tokens'] == len(load_split(char_dir, 'train'))
    assert meta['val_tokens'] == len(load_split(char_dir, 'val'))
    assert meta['vocab_size'] == len(meta['tokenizer']['chars']) < 100
    json.dumps(meta)  # JSON-able


def test_char_round_trip_and_errors(char_dir):
    tok = Tokenizer.from_meta(load_meta(char_dir)['tokenizer'])
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    with pytest.raises(ValueError, match=r"'@'.*\(%d characters" % tok.vocab_size):
        tok.encode('email me @ home')
    with pytest.raises(ValueError, match='out of range'):
        tok.decode([tok.vocab_size])


def test_bpe_vocab_is_small_and_round_trips_unseen_text(bpe_dir):
    meta = load_meta(bpe_dir)
    tok = Tokenizer.from_meta(meta['tokenizer'])
    assert 256 < tok.vocab_size == meta['vocab_size'] < 30_000  # not cl100k's 100k rows
    assert meta['dtype'] == 'uint16'
    text = 'quantum computer GPU: naïve café 東京 🚀 <|endoftext|>'
    unseen = [i for i in tok.enc.encode_ordinary(text) if i not in set(tok.ids)]
    assert unseen, 'the test text should need the byte fallback'
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert len(split_text(bpe_dir, 'val')) > 400_000  # decodes the whole val split
    with pytest.raises(ValueError, match='out of range'):
        tok.decode([-1])


def test_bpe_and_char_hold_out_the_same_text(char_text, bpe_dir):
    assert split_text(bpe_dir, 'val') == char_text['val']


def test_get_batch_shapes_shift_and_determinism(char_dir):
    train = load_split(char_dir, 'train')
    x, y = get_batch(train, 4, 16, torch.Generator().manual_seed(0), 'cpu')
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    x2, y2 = get_batch(train, 4, 16, torch.Generator().manual_seed(0), 'cpu')
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = get_batch(train, 4, 16, torch.Generator().manual_seed(1), 'cpu')
    assert not torch.equal(x, x3)


def test_get_batch_rows_are_windows_of_the_stream():
    stream = np.arange(1000, dtype=np.uint16)  # token i at position i: a row's first token is its offset
    x, y = get_batch(stream, 8, 10, torch.Generator().manual_seed(0), 'cpu')
    offsets = x[:, 0]
    assert torch.equal(x, offsets[:, None] + torch.arange(10))
    assert torch.equal(y, x + 1)
    assert int(offsets.max()) + 10 < 1000  # the target of the last position stays in range
    x, y = get_batch(np.arange(11, dtype=np.uint16), 3, 10, torch.Generator(), 'cpu')  # exactly T + 1
    assert torch.equal(x[0], torch.arange(10)) and torch.equal(y[0], torch.arange(1, 11))
    with pytest.raises(ValueError, match='block_size'):
        get_batch(np.arange(10, dtype=np.uint16), 2, 10, torch.Generator(), 'cpu')


def test_user_text_file(tmp_path, capsys):
    text = ''.join(f"line {i}: the quick brown fox\n" for i in range(200))
    path = tmp_path / 'notes.txt'
    path.write_text(text)
    for kind in ('char', 'bpe'):
        prepared = prepare(str(path), kind, str(tmp_path / 'data'))
        assert os.path.basename(prepared) == f'notes_{kind}'
        train, val = split_text(prepared, 'train'), split_text(prepared, 'val')
        assert train + val == text and val == text[int(len(text) * 0.9):]  # the last 10% is val
        assert load_meta(prepared)['val_plays'] == []
    # a changed file is prepared again (the fingerprint changed)
    path.write_text(text + 'a new last line\n')
    prepared = prepare(str(path), 'char', str(tmp_path / 'data'))
    assert split_text(prepared, 'val').endswith('a new last line\n')


def test_pydoc_is_held_out_modern_english(tmp_path):
    """Dataset 'pydoc': the Python reference's topics that CPython ships (offline, every machine), split by
    position like a user's file; what the HF quality table evaluates on besides Shakespeare."""
    train, val = train_val_text('pydoc')
    assert len(train) > 300_000 and len(val) > 30_000 and train[-200:] not in val
    assert 'statement' in train and 'ROMEO' not in train
    prepared = prepare('pydoc', 'char', str(tmp_path))
    assert os.path.basename(prepared) == 'pydoc_char' and split_text(prepared, 'val') == val


def test_user_file_named_like_a_builtin_dataset(tmp_path):
    path = tmp_path / 'shakespeare.txt'
    path.write_text('to be or not to be\n' * 20)
    assert os.path.basename(prepare(str(path), 'char', str(tmp_path))) == 'shakespeare_txt_char'


def test_errors(tmp_path):
    missing = str(tmp_path / 'nope.txt')
    assert missing in error_of(prepare, missing, 'char', str(tmp_path))
    assert 'char, bpe' in error_of(prepare, 'shakespeare', 'wordpiece', str(tmp_path))
    assert 'shakespeare' in error_of(prepare, 'tinystories', 'char', str(tmp_path))
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9 '.encode('latin-1') * 100)
    assert 'UTF-8' in error_of(prepare, str(tmp_path / 'latin1.txt'), 'char', str(tmp_path))
    (tmp_path / 'short.txt').write_text('hi')
    assert 'too short' in error_of(prepare, str(tmp_path / 'short.txt'), 'char', str(tmp_path))
    assert 'no prepared data' in error_of(load_meta, str(tmp_path / 'empty'))
    with pytest.raises(ValueError, match="'train' or 'val'"):
        load_split(str(tmp_path), 'test')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_get_batch_on_cuda_matches_cpu():
    stream = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(stream, 4, 8, torch.Generator().manual_seed(0), 'cuda')
    x_cpu, y_cpu = get_batch(stream, 4, 8, torch.Generator().manual_seed(0), 'cpu')
    assert x.is_cuda and torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)


def test_data_imports_none_of_the_project():
    """data.py is the bottom layer: it imports no file of the project, not even in a function."""
    import ast
    root = os.path.dirname(os.path.abspath(data.__file__))
    tree = ast.parse(open(os.path.join(root, "data.py")).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {n.split(".")[0] + ".py" for n in names} & set(os.listdir(root))


def test_text_streamer_prints_whole_characters(capsys):
    """data.TextStreamer (sample.py --stream) fed one token at a time: this bpe vocab spells ✓, 😀 and é as 3, 4
    and 2 byte tokens. Each character prints once, whole, never as U+FFFD, and the pieces add up to the text."""
    tok = Tokenizer.build('bpe', 'hello world, the king is dead.')
    prompt, new = tok.encode('a '), tok.encode('✓ 😀 é!')
    show = data.TextStreamer(tok.decode, prompt)
    pieces = [capsys.readouterr().out]
    for t in new:
        show([torch.tensor([t])])
        pieces.append(capsys.readouterr().out)
    show.end()
    assert pieces == ['a ', '', '', '✓', ' ', '', '', '', '😀', ' ', '', 'é', '!']
    assert ''.join(pieces) + capsys.readouterr().out == tok.decode(prompt + new) + '\n'
    show = data.TextStreamer(tok.decode, tok.encode('✓')[:2])       # cut short: end() prints what decode says
    assert capsys.readouterr().out == ''
    show.end()
    assert capsys.readouterr().out == tok.decode(tok.encode('✓')[:2]) + '\n' == '\ufffd\n'
