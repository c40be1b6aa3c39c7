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
drop (ShortGPT's static baseline: the same layers removed for every token). tune_routers trains skip gates and
exit gates with the base frozen (train.py init_from='hf:...'); eval_ppl, block_influence and search_cutoff give
bench.py --mode=ppl its perplexity-at-matched-depth table.

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
window's keys, as HF's sliding cache does). Supported: model_type in SUPPORTED_MODEL_TYPES, batch > 1 with LEFT
padding.
"""
import csv
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from router import depth_summary

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROUTERS = ("none", "fixed", "expert_choice", "token_choice", "confidence", "entropy", "skip", "drop")
LEARNED_ROUTERS = ("expert_choice", "token_choice")          # weights come from router_path
DEFAULT_THRESHOLD = {"confidence": 0.9, "entropy": 1.0}      # top-1 probability / entropy in nats
ROUTER_FILE_FORMAT = "nanomor-hf-routers-v1"
SKIP_FILE_FORMAT = "nanomor-hf-skip-routers-v1"                # trained skip routers + exit gates (tune_routers)
GATE_INIT_LOGIT = 3.0     # a new skip gate starts at sigmoid(3) = 0.95 (nearly the full model) for every token
EXIT_INIT_LOGIT = -3.0    # a new exit gate starts at 0.05: nobody exits until phase 2 trains it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# -----------------------------------------------------------------------------
# Loading

def load_hf(name_or_path, device="cpu", dtype="float32", trust_remote_code=False):
    """(model, tokenizer) from a local directory or a hub name, eval mode, on `device`.

    Offline-safe: with HF_HUB_OFFLINE set, or after a first attempt fails to connect, only the local cache is
    read. A missing path or an uncached hub name ends in SystemExit with what to do, not a hub traceback.
    The tokenizer pads on the left (what DepthAdapter.generate needs); None (with a note) if there is none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = os.path.expanduser(name_or_path)
    looks_local = os.path.exists(path) or name_or_path.startswith(("/", ".", "~"))
    if looks_local and not os.path.isdir(path):
        raise SystemExit(f"load_hf: {name_or_path!r} is not a directory. Pass a directory holding config.json and "
                         "the weights (save_pretrained output) or a hub name like 'Qwen/Qwen2.5-0.5B'.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no", "off")
    kwargs = dict(trust_remote_code=trust_remote_code)
    dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    try:
        model = _from_pretrained(AutoModelForCausalLM, path if looks_local else name_or_path, offline,
                                 dtype=dtype, **kwargs)
    except OSError as e:
        raise SystemExit(f"load_hf: cannot load {name_or_path!r}: it is not a local directory and not in the local "
                         f"Hugging Face cache ({'HF_HUB_OFFLINE is set' if offline else 'no network'}). Download it "
                         f"where there is network (`hf download {name_or_path}`) or pass a local directory.\n"
                         f"  ({str(e).splitlines()[0]})") from None
    tokenizer = None
    # transformers 5 builds an empty tokenizer from config.json alone, so a local dir is checked for its files
    if not looks_local or any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        try:
            tokenizer = _from_pretrained(AutoTokenizer, path if looks_local else name_or_path, offline, **kwargs)
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


# -----------------------------------------------------------------------------
# Routers with weights (trained by a later step: frozen base, soft gates)

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
# Trained skip routers and exit gates (router tuning with a frozen base, MindSkip-style; see tune_routers)

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
        raise ValueError(f"no router file at {path!r}: router tuning (python train.py config/hf_router_tune.py) "
                         "writes out_dir/routers.pt.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable router file ({type(e).__name__}: {str(e)[:120]}); it may be "
                         "truncated: tune the routers again.") from None
    if not isinstance(blob, dict) or blob.get("format") not in (ROUTER_FILE_FORMAT, SKIP_FILE_FORMAT):
        raise ValueError(f"{path} is not a router file (no format {SKIP_FILE_FORMAT!r} or {ROUTER_FILE_FORMAT!r}): "
                         "pass out_dir/routers.pt from router tuning, not a model checkpoint.")
    return blob


def save_skip_routers(path, routers, hf_model, **meta):
    """Atomic torch.save of trained SkipRouters, their layout and the model's shape (meta: plain types, tensors;
    meta['model'] = the model's name or path, which sample.py loads when --hf is not given)."""
    from model import save_checkpoint
    cfg = hf_model.config
    save_checkpoint({"format": SKIP_FILE_FORMAT, "router": "skip", "model_type": cfg.model_type,
                     "num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                     "vocab_size": cfg.vocab_size, "units": [list(u) for u in routers.units],
                     "exit_layers": list(routers.exit_layers), "mlp_hidden": routers.mlp_hidden,
                     "state_dict": {k: v.detach().cpu() for k, v in routers.state_dict().items()}, **meta}, path)


def load_skip_routers(path, model):
    """-> (SkipRouters, the file's dict). ValueError when the file was tuned for another model or layout."""
    blob = read_router_file(path)
    if blob["format"] != SKIP_FILE_FORMAT:
        raise ValueError(f"{path} holds {blob.get('router')!r} routers (DepthAdapter.save_routers), not trained skip "
                         f"routers: use router={blob.get('router')!r} with it.")
    cfg = model.config
    want = {"model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}
    bad = {k: blob.get(k) for k in want if blob.get(k) != want[k]}
    if bad:
        raise ValueError(f"{path} was tuned for another model ({blob.get('model')!r}: {bad}); this one has "
                         f"{ {k: want[k] for k in bad} }. Tune routers for this model: python train.py "
                         "config/hf_router_tune.py --init_from=hf:<it>.")
    routers = SkipRouters(cfg.hidden_size, blob["units"], blob["exit_layers"], blob["mlp_hidden"])
    try:
        routers.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit its recorded layout ({str(e).splitlines()[0]}).") from None
    return routers, blob


def _quantile_at(q, level):
    """q (U, K): each unit's gate-logit quantiles at levels linspace(0, 1, K). -> (U,) the cutoffs at `level`."""
    pos = min(max(level, 0.0), 1.0) * (q.shape[1] - 1)
    i = min(int(pos), q.shape[1] - 2)
    return q[:, i] + (pos - i) * (q[:, i + 1] - q[:, i])


def _logit(p):
    """Probability threshold -> logit threshold (0 -> -inf: every gate passes; 1 -> inf: none does)."""
    return -math.inf if p <= 0 else math.inf if p >= 1 else math.log(p / (1 - p))


# -----------------------------------------------------------------------------
# Attention pieces

def _rope(x, cos, sin):
    """Rotary embedding, HF's rotate-half convention. x (..., n_heads, hd); cos, sin (..., hd)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _sdpa(q, k, v, mask, scale, n_rep):
    """q (b, H, Tq, hd); k, v (b, n_kv, S, hd); mask (b, 1, Tq, S) additive, or None. -> (b, H, Tq, hd)."""
    b, H, Tq, hd = q.shape
    if n_rep > 1 and Tq == 1:
        # decode: the n_rep query heads sharing a KV head become n_rep queries of that head (no K/V copy)
        o = F.scaled_dot_product_attention(q.reshape(b, H // n_rep, n_rep, hd), k, v, attn_mask=mask, scale=scale)
        return o.reshape(b, H, 1, hd)
    if n_rep > 1:  # grouped-query attention: repeat K/V heads (SDPA's enable_gqa falls back to math with a mask)
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class _Run:
    """State of one generate() call: the preallocated KV cache and the lazy-fill bookkeeping."""

    def __init__(self, ad, B, max_len, key_valid):
        dev, dt = key_valid.device, ad.embed.weight.dtype
        shape = (B, ad.n_kv, max_len, ad.head_dim)
        self.k = [torch.zeros(shape, device=dev, dtype=dt) for _ in ad.layers]  # per layer (B, n_kv, max_len, hd)
        self.v = [torch.zeros(shape, device=dev, dtype=dt) for _ in ad.layers]
        self.key_valid = key_valid                                            # (B, max_len) False at left padding
        self.no_pad = bool(key_valid.all())
        self.pos = torch.zeros(B, max_len, dtype=torch.long, device=dev)     # position id of every cache slot
        if ad.static_depth is None:                                           # routed: per-token exits to track
            exits = ad.router != "skip" or ad.use_exits                       # skip without exit gates: no exits
            self.exit_h = torch.zeros(B, max_len if exits else 0, ad.hidden_size, device=dev, dtype=dt)  # at exit
            self.depth = torch.full((B, max_len), ad.R, dtype=torch.long, device=dev)    # R until decided
            self.filled_to = [0] * ad.R         # group g holds every needed K/V for slots < filled_to[g]
            self.threshold = torch.full((ad.R, B), float("inf"), device=dev)  # expert_choice decode cutoffs
        self.kv_only = 0                        # token-layers whose K/V alone was computed (the fill)


class _Tokens:
    """The tokens of a chunk (slots start..end of the cache) that a layer call runs on, and their SDPA layout.

    dense (act None): all B*T tokens; x is (B, T, C), SDPA runs on (B, H, T, hd). No gathers.
    packed: the active tokens only, x[rows, cols] -> (N, C): projections and MLP see N rows. SDPA runs on
    (B, H, Tq, hd), Tq = the most active tokens in one row; a row's k-th active token is its query slot k. Empty
    slots (and rows with no active token) hold a zero query that attends to itself only and is discarded. That
    waste is attention reading one row's cache, ~1% of a Llama-3-8B layer's bytes at 1k context: less than
    gathering the active rows' caches into a smaller batch would move.
    """

    def __init__(self, run, start, cos, sin, act=None, Tq=None):
        B, T = cos.shape[:2]
        self.start, self.end, self.dense = start, start + T, act is None
        self.dtype, self.no_pad, self.key_valid, self.masks = cos.dtype, run.no_pad, run.key_valid[:, :start + T], {}
        if self.dense:
            self.Tq, self.cos, self.sin = T, cos, sin                         # cos, sin (B, T, hd)
            self.q_slot = start + torch.arange(T, device=cos.device).expand(B, T)   # (B, T) cache slot of each query
        else:
            self.Tq = Tq
            self.rows, self.cols = act.nonzero(as_tuple=True)                 # (N,) each, row-major
            self.cos, self.sin = cos[self.rows, self.cols], sin[self.rows, self.cols]  # (N, hd)
            self.slot = (act.cumsum(1) - 1)[self.rows, self.cols]             # (N,) the token's rank within its row
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

    def attend(self, q, kc, vc, scale, n_rep, window):                        # q (..., H, hd) -> (..., H, hd)
        lo, mask = self.keys(window)
        k, v = kc[:, :, lo:self.end], vc[:, :, lo:self.end]                   # (B, n_kv, end - lo, hd)
        if self.dense:
            return _sdpa(q.transpose(1, 2), k, v, mask, scale, n_rep).transpose(1, 2)
        qp = q.new_zeros(k.shape[0], self.Tq, *q.shape[1:])                   # (B, Tq, H, hd)
        qp[self.rows, self.slot] = q
        o = _sdpa(qp.transpose(1, 2), k, v, mask, scale, n_rep).transpose(1, 2)
        return o[self.rows, self.slot]


# -----------------------------------------------------------------------------
# The adapter

class DepthAdapter:
    """Route each token of a pretrained Llama-family model through fewer layers. See the module docstring."""

    def __init__(self, model, router="none", R=4, base_layers=2, keep_ratio=1.0, depth=None,
                 threshold=None, router_path=None, no_skip=False, hard_threshold=None, exit_threshold=None,
                 exits=True, skip_routers=None, drop_layers=None):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"DepthAdapter supports model_type {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family "
                             f"decoders); got {cfg.model_type!r} ({type(model).__name__}).")
        router = "none" if no_skip else router
        L = cfg.num_hidden_layers
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}.")
        if router in ("skip", "drop"):
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

        # the HF modules we call ourselves
        self.embed, self.layers = model.get_input_embeddings(), model.model.layers
        self.norm, self.lm_head, self.rotary = model.model.norm, model.get_output_embeddings(), model.model.rotary_emb
        attn = self.layers[0].self_attn
        self.head_dim, self.hidden_size = attn.head_dim, cfg.hidden_size      # head_dim honours config.head_dim
        self.n_kv = cfg.num_key_value_heads
        self.n_rep = cfg.num_attention_heads // self.n_kv
        self.windows = [self._window(cfg, i) for i in range(L)]              # None = full attention

        # groups: layers base_layers..L-1 in R contiguous runs, the first (L - base) % R one layer longer
        rest = L - base_layers
        sizes = [rest // R + (g < rest % R) for g in range(R)]
        edges = [base_layers + sum(sizes[:g]) for g in range(R + 1)]
        self.groups = [range(edges[g], edges[g + 1]) for g in range(R)]
        self.layers_per_depth = edges                                         # cost of depth d = edges[d]
        # none / fixed / drop send every token through the same layers: no routing work, no host syncs in decode.
        # drop (ShortGPT): the dropped layers are gone for every token, so nobody ever needs their K/V either.
        self.static_layers = {"none": range(L), "fixed": range(edges[depth]) if router == "fixed" else None,
                              "drop": [l for l in range(L) if l not in getattr(self, "drop_layers", ())]}.get(router)
        self.static_depth = {"none": R, "fixed": depth, "drop": L - len(getattr(self, "drop_layers", ()))}.get(router)

        self.routers = None
        if router in LEARNED_ROUTERS:
            if router_path is not None:
                self.routers = self._load_routers(router_path)
            else:
                self.routers = make_routers(router, self.hidden_size, R)
                if not (router == "expert_choice" and keep_ratio == 1.0):
                    print(f"WARNING: hf_wrap: router={router!r} has RANDOM, untrained weights (no router_path): "
                          "routing is random and quality/speed results are NOT meaningful. Train the routers "
                          "and pass router_path=...", file=sys.stderr)
            self.routers.to(self.embed.weight.device).eval()
        self.use_exits = False
        if router == "skip":
            self._setup_skip(router_path, skip_routers, keep_ratio, hard_threshold, exit_threshold, exits)

    def _setup_skip(self, path, routers, keep_ratio, hard_threshold, exit_threshold, exits):
        """router='skip': the trained gates (a tuning file, or a SkipRouters module) and their cutoffs, kept as
        logits (a gate passes when its logit > the cutoff's logit: no sigmoid at inference, no saturation)."""
        if (routers is None) == (path is None):
            raise ValueError("router='skip' needs trained routers: router_path='out_dir/routers.pt' (written by "
                             "python train.py config/hf_router_tune.py) or skip_routers=<a SkipRouters module>.")
        self.file = {}
        if routers is None:
            routers, self.file = load_skip_routers(path, self.model)
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
        # exit gates act only once phase 2 trained them (a file says so; a module passed in: the caller decides)
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
                    "model_type": self.model.config.model_type, "meta": meta,
                    "state_dict": {k: v.cpu() for k, v in self.routers.state_dict().items()}}, path)

    def _load_routers(self, path):
        blob = read_router_file(path)
        if blob["format"] != ROUTER_FILE_FORMAT:
            raise ValueError(f"{path} holds trained skip routers (router tuning), not {self.router!r} routers: "
                             "use router='skip' with it.")
        want = {"router": self.router, "R": self.R, "base_layers": self.base_layers, "hidden_size": self.hidden_size}
        bad = {k: blob.get(k) for k in want if blob.get(k) != want[k]}
        if bad:
            raise ValueError(f"{path} was trained for {bad}, this adapter has "
                             f"{ {k: want[k] for k in bad} }: construct DepthAdapter with the file's settings.")
        routers = make_routers(self.router, self.hidden_size, self.R, blob["mlp_hidden"])
        routers.load_state_dict(blob["state_dict"])
        return routers

    # --- one layer ----------------------------------------------------------------------------------------
    def _heads(self, y, norm):                          # (..., n * hd) -> (..., n, hd), Qwen3's per-head norm
        y = y.unflatten(-1, (-1, self.head_dim))
        return y if norm is None else norm(y)

    def _kv(self, attn, a, cos, sin):                   # normed input (..., C) -> k, v (..., n_kv, hd), k rotated
        k = _rope(self._heads(attn.k_proj(a), getattr(attn, "k_norm", None)), cos, sin)
        return k, self._heads(attn.v_proj(a), None)     # Qwen2's q/k/v biases live inside the Linear modules

    def _layer(self, run, l, x, tok):
        """Decoder layer l on the tokens `tok` selects: HF's sub-modules and weights, our cache and attention."""
        layer = self.layers[l]
        attn = layer.self_attn
        h = tok.gather(x)                                                     # (B, T, C) or (N, C)
        a = layer.input_layernorm(h)
        q = _rope(self._heads(attn.q_proj(a), getattr(attn, "q_norm", None)), tok.cos, tok.sin)  # (..., H, hd)
        k, v = self._kv(attn, a, tok.cos, tok.sin)                            # (..., n_kv, hd)
        tok.write_kv(run.k[l], run.v[l], k, v)                                # before attending: a token sees itself
        o = tok.attend(q, run.k[l], run.v[l], attn.scaling, self.n_rep, self.windows[l])
        h = h + attn.o_proj(o.flatten(-2))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return tok.scatter(x, h)

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
    def _on_active(fn, x, act, all_active):
        """fn over the active tokens only -> (B, T, k); zeros where inactive (callers mask those)."""
        if all_active:                                                        # host flag: no sync to find out
            return fn(x)
        y = fn(x[act])
        out = y.new_zeros(*act.shape, y.shape[-1])
        out[act] = y
        return out

    def _continues(self, run, g, x, act, all_active, chunk, prefill):
        """Router decision before group g: (B, T) bool, which tokens run it (only active ones count)."""
        if self.router == "expert_choice" and self.keep_ratio == 1.0:
            return act
        if self.router == "token_choice":  # one decision after base_layers: argmax over depths 0..R
            if g == 0:
                chunk["choice"] = self._on_active(self.routers[0], x, act, all_active).argmax(-1)   # (B, T)
            return chunk["choice"] > g
        if self.router == "expert_choice":
            # The score is the group's router logit on the token's own hidden state, which (causal attention)
            # depends on that token and the past only. Prefill: per row, the top ceil(keep_ratio * n_active) of the
            # prompt by that score (the paper's expert-choice capacity; the *set* depends on the whole prompt, which
            # is given, but nothing generated). Its cutoff score becomes the row's fixed threshold in decode, so a
            # generated token's decision uses only itself and the past. The kept fraction in decode matches
            # keep_ratio only as far as generated tokens score like the prompt did.
            score = self._on_active(self.routers[g], x, act, all_active)[..., 0]          # (B, T)
            return self._top_k(run, g, score, act) if prefill else score >= run.threshold[g][:, None]
        # confidence / entropy (CALM): the intermediate state through the model's own final norm and LM head
        def stat(h):
            logp = F.log_softmax(self.lm_head(self.norm(h)).float(), dim=-1)
            if self.router == "confidence":
                return logp.max(-1, keepdim=True).values.exp()                # top-1 probability
            return -(logp.exp() * logp).sum(-1, keepdim=True)                 # entropy, nats
        s = self._on_active(stat, x, act, all_active)[..., 0]
        return s < self.threshold if self.router == "confidence" else s > self.threshold

    def _top_k(self, run, g, score, act):
        B, T = score.shape
        score = score.masked_fill(~act, float("-inf"))
        n_keep = torch.ceil(act.sum(1) * self.keep_ratio - 1e-6).long()      # (B,) -1e-6: 10 * 0.3 = 3.0000000004
        order = score.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=score.device).expand(B, T))
        cutoff = score.gather(1, (n_keep - 1).clamp(min=0)[:, None])[:, 0]
        run.threshold[g] = torch.where(n_keep > 0, cutoff, float("inf"))
        return act & (rank < n_keep[:, None])

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
        return self.lm_head(self.norm(x if all_logits else x[:, -1])), depth  # exited tokens: their exit state

    def _routed_groups(self, run, x, start, everyone, prefill):
        B, T, _ = x.shape
        end = start + T
        act = run.key_valid[:, start:end].clone()                            # (B, T) running; padding never runs
        all_active = run.no_pad or not prefill                                # host-side: is act all True?
        depth = torch.zeros(B, T, dtype=torch.long, device=x.device)
        chunk = {}
        for g, group in enumerate(self.groups):
            act = act & self._continues(run, g, x, act, all_active, chunk, prefill)
            run.exit_h[:, start:end] = x                                      # exited tokens' states are final
            run.depth[:, start:end] = torch.where(act, self.R, depth)
            counts = act.sum(1).cpu()                                         # host sync: shapes follow routing
            if counts.sum() == 0:
                break                                                         # all exited: no kernel for the rest
            all_active = bool((counts == T).all())
            depth += act
            self._fill_kv(run, g, end)
            tok = everyone if all_active else _Tokens(run, start, everyone.cos, everyone.sin, act, int(counts.max()))
            for l in group:
                x = self._layer(run, l, x, tok)
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
        act = run.key_valid[:, start:end].clone()                            # (B, T) not exited; never padding
        act_full = run.no_pad or not prefill                                  # host flag: act is all True
        go, tok = act, (everyone if act_full else None)                       # who runs this layer; None: lay out
        ran = torch.zeros(B, T, dtype=torch.long, device=x.device)
        first_exit = sr.exit_layers[0] if self.use_exits else len(self.layers)
        for l in range(len(self.layers)):
            if self.use_exits and l in sr.exit_at:
                logit = self._on_active(sr.exits[sr.exit_at[l]], x, act, act_full)[..., 0]      # (B, T)
                out = act & (logit > self.exit_cutoff)
                run.exit_h[:, start:end] = x                                  # exited tokens' states are final
                run.depth[:, start:end] = torch.where(out, l, run.depth[:, start:end])   # exit layer, L = never
                act, act_full = act & ~out, False
                if not bool(act.any()):
                    break                                                     # all exited: no kernel for the rest
                go, tok = go & act, None
            u = sr.unit_of.get(l)
            if u is not None and l == sr.units[u][0]:                         # a unit starts: its gate decides
                logit = self._on_active(sr.gates[u], x, act, act_full)[..., 0]
                go, tok = act & (logit > self.gate_cutoff[u]), None
            elif u is None and go is not act:                                 # an always-on layer
                go, tok = act, None
            if u is not None:
                self._fill_skipped(run, l, x, act & ~go, start, everyone)
            if tok is None:
                counts = go.sum(1).cpu()                                      # host sync: shapes follow routing
                n = int(counts.sum())
                tok = False if n == 0 else everyone if n == B * T else _Tokens(run, start, everyone.cos,
                                                                              everyone.sin, go, int(counts.max()))
            if tok is False:
                continue                                                      # nobody runs layer l: no kernel
            if l >= first_exit:
                self._fill_kv(run, l, end)
            x = self._layer(run, l, x, tok)
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
    def _start(self, input_ids, attention_mask, max_new_tokens):
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
        return _Run(self, B, T0 + max_new_tokens, key_valid), ids, pos, mask

    @torch.no_grad()
    def prefill_logits(self, input_ids, attention_mask=None):
        """Teacher forcing through the prefill path: one chunk of the whole sequence, every position's logits.

        What generation would compute for these tokens (prefill equals decode for causal routers; a test checks
        it), so a perplexity from here is what generation sees. Causal routers only: expert_choice with
        keep_ratio < 1 picks a top-k over the chunk, which would look at future tokens. Returns (logits (B, T, V)
        float32, stats): router.depth_summary over the non-pad tokens plus kv_only_layer_calls.
        """
        if self.router == "expert_choice" and self.keep_ratio < 1.0:
            raise ValueError("prefill_logits is teacher forcing and needs causal routing; expert_choice with "
                             "keep_ratio < 1 takes a top-k over the sequence (it sees future tokens). Use a "
                             "threshold router (skip, confidence, entropy) or token_choice.")
        run, ids, pos, mask = self._start(input_ids, attention_mask, 0)
        logits, depth = self._forward(run, ids, pos, 0, prefill=True, all_logits=True)
        stats = depth_summary(depth[mask].cpu(), self.layers_per_depth)
        stats["kv_only_layer_calls"] = run.kv_only
        return logits.float(), stats

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_k=None,
                 eos_token_id=None, return_trace=False, return_logits=False):
        """Prefill + decode with our cache. input_ids (B, T0), left-padded when attention_mask has zeros.

        Returns (output_ids (B, T0 + new), stats). stats: router.depth_summary over the generated tokens that went
        through the decode loop (all but the last, which is never fed back; finished rows included), plus
        prompt_tokens / prompt_mean_depth (non-pad prompt tokens, routed too), prefill_s, decode_s (from the
        first sample to the end), tokens_per_s = B * new / decode_s, ms_per_token (per decode step),
        kv_only_layer_calls, easy/medium/hard for confidence/entropy, trace = [(row, column in output_ids,
        depth)] with return_trace, logits (B, new, V) float32 with return_logits. Rows that emit eos_token_id
        continue with eos_token_id; generation stops early when every row has.
        """
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
            tok = _sample(logits, temperature, top_k)                         # (B,)
            if eos_token_id is not None:
                tok = tok.masked_fill(done, eos_token_id)
                done |= tok == eos_token_id
            out[:, T0 + i] = tok
            n_new = i + 1
            if n_new == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits, depth = self._forward(run, tok[:, None], next_pos[:, None], T0 + i, prefill=False)
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


def _sample(logits, temperature, top_k):
    if temperature == 0:
        return logits.argmax(-1)                                              # greedy
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# -----------------------------------------------------------------------------
# Router tuning: python train.py config/hf_router_tune.py (init_from='hf:<name or path>')

def corpus_text(dataset="shakespeare"):
    """(train text, val text): the built-in plays split as data.prepare splits them (data.VAL_PLAYS held out, so
    validation is text the routers never saw), or a UTF-8 .txt file's first 90% / last 10%."""
    import data
    if dataset == "shakespeare":
        plays = [(os.path.basename(p)[:-3], data.clean_play(open(p, encoding="utf-8").read()))
                 for p in data.play_paths()]
        return ("\n".join(t for name, t in plays if name not in data.VAL_PLAYS),
                "\n".join(t for name, t in plays if name in data.VAL_PLAYS))
    if not os.path.isfile(dataset):
        raise SystemExit(f"error: dataset={dataset!r}: use 'shakespeare' (built in) or the path of a UTF-8 .txt file.")
    with open(dataset, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * (1 - data.VAL_FRACTION))
    return text[:cut], text[cut:]


def corpus_ids(tokenizer, dataset="shakespeare"):
    """(train ids, val ids) as int32 numpy arrays, encoded by the model's OWN tokenizer (a model exported from a
    char checkpoint carries its char tokenizer, so the built-in corpus works offline)."""
    import numpy as np
    out = []
    for text in corpus_text(dataset):
        try:
            ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        except Exception as e:
            raise SystemExit(f"error: the model's tokenizer cannot encode dataset={dataset!r} "
                             f"({type(e).__name__}: {str(e)[:160]}).") from None
        out.append(np.asarray(ids, dtype=np.int32))
    return tuple(out)


def text_windows(ids, block_size, n, generator=None):
    """(n, block_size + 1) int64: n windows (inputs + next-token targets) of a token array, back to back from the
    start (deterministic: held-out text), or at random offsets drawn with `generator` (calibration text)."""
    span = block_size + 1
    if len(ids) < span:
        raise SystemExit(f"error: the text has {len(ids)} tokens; a window needs block_size + 1 = {span}.")
    if generator is None:
        n = min(n, len(ids) // span)
        starts = [i * span for i in range(n)]
    else:
        starts = torch.randint(len(ids) - span + 1, (n,), generator=generator).tolist()
    return torch.stack([torch.from_numpy(ids[s:s + span].astype("int64")) for s in starts])


def _causal_mask(T, window, like):
    """(1, 1, T, T) additive mask for a whole sequence: causal, and inside the sliding window if any."""
    i = torch.arange(T, device=like.device)
    ok = i[None, :] <= i[:, None]
    if window is not None:
        ok = ok & (i[None, :] > i[:, None] - window)
    return torch.zeros(T, T, dtype=like.dtype, device=like.device).masked_fill_(~ok, -math.inf)[None, None]


def _gate(logit, hard=False):
    """Gate value from its logit: soft sigmoid(logit), or with hard=True the 0/1 decision inference makes at
    threshold 0.5 in the forward pass and the sigmoid's gradient in the backward (straight-through)."""
    g = torch.sigmoid(logit)
    return g if not hard else (logit > 0).to(g.dtype) + g - g.detach()


def soft_forward(model, routers, ids, influence=None, hard=False):
    """The tuning forward: teacher forcing on whole sequences with SOFT gates (MindSkip). A routed unit's output is
    g * unit(x) + (1 - g) * x, g = sigmoid(gate logit) (B, T, 1) per token, so the LM loss tells each gate what
    skipping costs. HF's own decoder layers run it (explicit causal / sliding masks), not the adapter: the hard
    routing at inference is the adapter's prefill/decode path. routers=None: the model itself.

    ids (B, T) -> logits (B, T, V), gate logits (B, T, U) float32 (None without routers), {exit layer: state at
    its input (B, T, C)}. influence: a list to append, per layer, sum over tokens of 1 - cos(x_in, x_out).
    hard: straight-through gates (_gate): the forward is the hard routing, the gradient the soft one's.
    """
    inner = model.model
    B, T = ids.shape
    x = inner.embed_tokens(ids)                                               # (B, T, C)
    pos = torch.arange(T, device=ids.device)[None].expand(B, T)
    rope = inner.rotary_emb(x, pos)                                           # (cos, sin) (B, T, hd) each
    masks, gate_logits, states = {}, [], {}
    for l, layer in enumerate(inner.layers):
        if routers is not None and l in routers.exit_at:
            states[l] = x
        if routers is not None and l in routers.unit_at:                      # a unit starts: its gate, its input
            logit = routers.gates[routers.unit_at[l]](x)                      # (B, T, 1) float32
            gate_logits.append(logit)
            g, x_unit = _gate(logit, hard).to(x.dtype), x
        window = DepthAdapter._window(model.config, l)
        if window not in masks:
            masks[window] = _causal_mask(T, window, x)
        x_in, x = x, layer(x, attention_mask=masks[window], position_ids=pos, position_embeddings=rope)
        if influence is not None:
            influence.append(float((1 - F.cosine_similarity(x_in.float(), x.float(), dim=-1)).sum()))
        if routers is not None and l in routers.unit_end:
            x = x_unit + g * (x - x_unit)                                     # g * unit(x) + (1 - g) * x
    logits = model.get_output_embeddings()(inner.norm(x))
    return logits, (torch.cat(gate_logits, -1) if gate_logits else None), states


def _tuning_loss(logits, Y, gate_logits, cfg, it, hard=False):
    """LM loss + lambda * max(mean gate - target_active_ratio, 0) (lambda = 0 during warm-up) + z-loss + entropy.
    The mean gate pools every unit and token: the routers choose WHICH layers to skip for which tokens; only the
    average is held to the budget. The entropy term (weight > 0) pushes gates toward 0 or 1, narrowing the gap
    between soft gates in training and the hard threshold at inference; hard (straight-through) closes it: the
    penalty then sees the fraction of units that really run. -> (loss, {name: float})."""
    lm = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten())
    g = torch.sigmoid(gate_logits)
    mean_gate = _gate(gate_logits, hard).mean()
    lam = cfg["penalty_weight"] if it >= cfg["penalty_warmup_iters"] else 0.0
    penalty = F.relu(mean_gate - cfg["target_active_ratio"])
    z = gate_logits.pow(2).mean()                                             # one logit: its logsumexp is itself
    # H(g) = -g log g - (1 - g) log(1 - g), written with softplus to stay finite for large logits. (As
    # BCE(logit, g.detach()) its value is right but its gradient is g - g = 0: the term would do nothing.)
    entropy = (g * F.softplus(-gate_logits) + (1 - g) * F.softplus(gate_logits)).mean()
    loss = lm + lam * penalty + cfg["gate_z_weight"] * z + cfg["gate_entropy_weight"] * entropy
    return loss, {"lm": lm.item(), "penalty": penalty.item(), "mean_gate": mean_gate.item(), "z": z.item(),
                  "entropy": entropy.item()}


def tune_routers(cfg):
    """Router tuning for a pretrained model, every base weight frozen (train.py hands init_from='hf:...' here).

    Phase 1: skip routers (SkipRouters.gates) trained with soft gates and _tuning_loss for max_iters steps.
    Then each unit's gate-logit quantiles on calibration text (what keep_ratio converts through). Phase 2 (with
    exit_layers and exit_iters > 0): the routers are frozen and each exit gate learns, by BCE, whether the state
    at its layer, through the final norm and LM head, already gives the routed model's final argmax (CALM's
    consistency target, learned: the gate sees only the state). Last, with target_speedup (or
    target_mean_layers), a bisection on the hard threshold until the layer-call ratio measured through the
    adapter on calibration text is within target_tol of the target. Everything lands in out_dir/routers.pt
    (atomic): router weights, layout, model name/path, quantiles and the threshold sample.py uses by default.
    """
    import data
    from configurator import autocast_context, autodetect_device
    if int(os.environ.get("RANK", -1)) != -1:
        raise SystemExit("error: router tuning runs in one process (the base is frozen and the routers are tiny): "
                         "run python train.py ..., not torchrun.")
    name = cfg["init_from"][3:]
    if not name:
        raise SystemExit("error: init_from='hf:' names no model: init_from='hf:path/to/dir' (save_pretrained or "
                         "sample.py --export_hf output) or 'hf:Qwen/Qwen2.5-0.5B'.")
    for key, ok, what in [("target_active_ratio", 0 < cfg["target_active_ratio"] <= 1, "a fraction in (0, 1]"),
                          ("penalty_weight", cfg["penalty_weight"] >= 0, ">= 0"),
                          ("target_speedup", cfg["target_speedup"] == 0 or cfg["target_speedup"] >= 1,
                           "0 (off) or >= 1 (1.6 = 1.6x fewer layer calls)"),
                          ("router_mlp_hidden", cfg["router_mlp_hidden"] >= 0, ">= 0 (0 = a linear gate)")]:
        if not ok:
            raise SystemExit(f"error: {key}={cfg[key]!r}: must be {what}.")
    torch.manual_seed(cfg["seed"])
    device = autodetect_device(cfg["device"])
    _, dtype = autocast_context(device.split(":")[0], cfg["dtype"])          # bf16 on CUDA, float32 elsewhere
    model, tok = load_hf(name, device=device, dtype=dtype)                    # the frozen base holds this dtype
    mc = model.config
    if mc.model_type not in SUPPORTED_MODEL_TYPES:
        raise SystemExit(f"error: {name} is a {mc.model_type!r} model; router tuning and DepthAdapter support "
                         f"Llama-family decoders: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    if tok is None:
        raise SystemExit(f"error: {name} has no tokenizer: router tuning encodes its text with the model's own.")
    model.requires_grad_(False)                                               # frozen: only routers get gradients
    L = mc.num_hidden_layers
    try:
        units, exit_layers = skip_layout(L, cfg["router_pattern"], cfg["router_start"], cfg["router_stop"],
                                         cfg["router_group"], cfg["exit_layers"])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    routers = SkipRouters(mc.hidden_size, units, exit_layers, cfg["router_mlp_hidden"]).to(device)
    block = cfg["block_size"]
    max_pos = getattr(mc, "max_position_embeddings", None)
    if max_pos and block > max_pos:
        raise SystemExit(f"error: block_size={block} exceeds {name}'s context ({max_pos}): lower block_size.")
    train_ids, val_ids = corpus_ids(tok, cfg["dataset"])
    if max(int(train_ids.max()), int(val_ids.max())) >= mc.vocab_size:
        raise SystemExit(f"error: the tokenizer gives ids beyond the model's vocab_size={mc.vocab_size}.")
    B, accum = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    gen, calib_gen = torch.Generator().manual_seed(cfg["seed"]), torch.Generator().manual_seed(cfg["seed"] + 2)
    calib = text_windows(train_ids, block, cfg["calib_windows"], calib_gen)   # thresholds are set on these
    val = text_windows(val_ids, block, cfg["eval_iters"] * B)                 # held out: reported, never tuned on
    out_dir = cfg["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "routers.pt")
    routed = routers.routed_layers()
    print(f"router tuning for {name} ({mc.model_type}, {L} layers, base frozen): {len(units)} skip gates over "
          f"{routed} routed layers (units {units}), exit gates at {exit_layers or 'none'}; "
          f"{sum(p.numel() for p in routers.parameters()):,} trainable parameters; "
          f"{len(train_ids):,} train / {len(val_ids):,} val tokens")
    # every unit at target_active_ratio would run this fraction of all layer calls
    print(f"target_active_ratio {cfg['target_active_ratio']} of routed units ~ a layer-call ratio of "
          f"{(L - routed + cfg['target_active_ratio'] * routed) / L:.3f}")

    def lr_at(it, base, n_iters):                     # linear warmup, then cosine to min_lr (train.py's default)
        if it < cfg["warmup_iters"]:
            return base * (it + 1) / (cfg["warmup_iters"] + 1)
        ratio = min(1.0, (it - cfg["warmup_iters"]) / max(1, n_iters - cfg["warmup_iters"]))
        return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (base - cfg["min_lr"])

    def batches(windows, size=B):
        for i in range(0, len(windows), size):
            w = windows[i:i + size].to(device)
            yield w[:, :-1], w[:, 1:]

    @torch.no_grad()
    def evaluate(it):
        """Val loss of the full model (once) and with soft gates; hard-routed perplexity through the adapter."""
        routers.eval()
        soft = [F.cross_entropy(soft_forward(model, routers, X)[0].flatten(0, 1).float(), Y.flatten()).item()
                for X, Y in batches(val)]
        hard = eval_ppl(DepthAdapter(model, router="skip", skip_routers=routers, hard_threshold=0.5, exits=False),
                        val, B)
        routers.train()
        print(f"step {it}: val loss full depth {full_val:.4f}, soft gates {sum(soft) / len(soft):.4f} | hard "
              f"(gate > 0.5): val ppl {hard['ppl']:.3f} (full {math.exp(full_val):.3f}) at layer-call ratio "
              f"{hard['layer_ratio']:.3f}")
        return {"iter": it, "val_loss_soft": sum(soft) / len(soft), "val_ppl_hard_0.5": hard["ppl"],
                "layer_ratio_hard_0.5": hard["layer_ratio"]}

    def save(**extra):
        meta = {"model": name, "config": cfg, "hard_threshold": 0.5, "exit_threshold": cfg["exit_threshold"],
                "exits_trained": False, "full_val_loss": full_val, **state, **extra}
        save_skip_routers(path, routers, model, **meta)

    with torch.no_grad():
        full = [F.cross_entropy(soft_forward(model, None, X)[0].flatten(0, 1).float(), Y.flatten()).item()
                for X, Y in batches(val)]
    full_val, state = sum(full) / len(full), {}

    # ---- phase 1: skip routers, soft gates -----------------------------------------------------------------
    opt = torch.optim.AdamW(routers.gates.parameters(), lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                            weight_decay=cfg["weight_decay"])
    routers.train()
    t0 = time.time()
    for it in range(cfg["max_iters"] + 1):
        if it % cfg["eval_interval"] == 0 or it == cfg["max_iters"]:
            state["last_eval"] = evaluate(it)
            if it > 0:
                save(iter_num=it)
        if it == cfg["max_iters"]:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg["learning_rate"], cfg["max_iters"])
        hard = it >= (1 - cfg["hard_gate_frac"]) * cfg["max_iters"]            # the last part: straight-through
        for _ in range(accum):
            X, Y = data.get_batch(train_ids, B, block, gen, device)
            logits, gate_logits, _ = soft_forward(model, routers, X, hard=hard)
            loss, parts = _tuning_loss(logits, Y, gate_logits, cfg, it, hard)
            (loss / accum).backward()
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(routers.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (it + 1) % cfg["log_interval"] == 0:
            dt = (time.time() - t0) / cfg["log_interval"]
            t0 = time.time()
            print(f"iter {it + 1}: loss {loss.item():.4f} (lm {parts['lm']:.4f}, penalty {parts['penalty']:.4f}, "
                  f"entropy {parts['entropy']:.3f}), mean {'hard' if hard else 'soft'} gate "
                  f"{parts['mean_gate']:.3f} (target {cfg['target_active_ratio']}), lr {group['lr']:.2e}, "
                  f"{1000 * dt:.0f} ms/iter")
    routers.eval()
    routers.requires_grad_(False)

    # ---- gate quantiles on calibration text: what keep_ratio converts through ----------------------------------
    with torch.no_grad():
        q_logits = torch.cat([soft_forward(model, routers, X)[1].flatten(0, 1) for X, _ in batches(calib)])
    levels = torch.linspace(0, 1, 101, device=q_logits.device)
    state["gate_logit_quantiles"] = torch.quantile(q_logits.float(), levels, dim=0).T.contiguous().cpu()  # (U, 101)
    state["unit_mean_gate"] = torch.sigmoid(q_logits).mean(0).tolist()
    print("mean soft gate per unit on calibration text: "
          + ", ".join(f"{a}-{b - 1}: {g:.2f}" for (a, b), g in zip(units, state["unit_mean_gate"])))
    save(iter_num=cfg["max_iters"])

    # ---- phase 2: exit gates, routers frozen -------------------------------------------------------------------
    exits_trained = bool(exit_layers) and cfg["exit_iters"] > 0
    if exits_trained:
        opt = torch.optim.AdamW(routers.exits.parameters(), lr=cfg["learning_rate"],
                                betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"])
        routers.exits.requires_grad_(True)
        head, norm = model.get_output_embeddings(), model.model.norm
        t0 = time.time()
        for it in range(cfg["exit_iters"]):
            for group in opt.param_groups:
                group["lr"] = lr_at(it, cfg["learning_rate"], cfg["exit_iters"])
            X, _ = data.get_batch(train_ids, B, block, gen, device)
            with torch.no_grad():                                             # the model and routers: fixed
                logits, _, states = soft_forward(model, routers, X)
                final = logits.argmax(-1)                                     # (B, T) what continuing gives
                target = {l: (head(norm(h)).argmax(-1) == final).float() for l, h in states.items()}
            loss = sum(F.binary_cross_entropy_with_logits(routers.exits[i](states[l])[..., 0], target[l])
                       for l, i in routers.exit_at.items()) / len(exit_layers)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (it + 1) % cfg["log_interval"] == 0 or it + 1 == cfg["exit_iters"]:
                dt = (time.time() - t0) / cfg["log_interval"]
                t0 = time.time()
                agree = ", ".join(f"layer {l}: {target[l].mean().item():.2f}" for l in exit_layers)
                print(f"exit iter {it + 1}: BCE {loss.item():.4f}, intermediate argmax already final: {agree}, "
                      f"{1000 * dt:.0f} ms/iter")
        routers.eval()
        routers.requires_grad_(False)
        state["exits_trained"] = True

    # ---- target speedup: bisection on the hard threshold -------------------------------------------------------
    hard_threshold = 0.5
    target = (1 / cfg["target_speedup"] if cfg["target_speedup"] else cfg["target_mean_layers"] / L
              if cfg["target_mean_layers"] else None)
    if target is not None:
        def make(z):                                                          # z: the threshold as a logit
            return DepthAdapter(model, router="skip", skip_routers=routers, hard_threshold=_sigmoid(z),
                                exit_threshold=cfg["exit_threshold"], exits=exits_trained)
        z, found, reached = search_cutoff(make, -30.0, 30.0, target, calib, cfg["target_tol"], batch_size=B)
        hard_threshold = _sigmoid(z)
        held = eval_ppl(make(z), val, B)
        print(f"target layer-call ratio {target:.3f} (speedup {1 / target:.2f}x in layer calls): hard_threshold "
              f"{hard_threshold:.6g} gives {found['layer_ratio']:.3f} on calibration text"
              f"{'' if reached else ' (the closest reachable: not within target_tol)'}; held-out text: ratio "
              f"{held['layer_ratio']:.3f}, ppl {held['ppl']:.3f} vs full depth {math.exp(full_val):.3f} "
              f"({100 * (held['ppl'] / math.exp(full_val) - 1):+.1f}%)")
        state["target"] = {"layer_ratio": target, "calib_ratio": found["layer_ratio"], "reached": reached,
                           "val_ratio": held["layer_ratio"], "val_ppl": held["ppl"]}
    save(iter_num=cfg["max_iters"], hard_threshold=hard_threshold)
    print(f"saved {path}\n  python sample.py --routers {path} --prompt 'ROMEO:' --return_depth_trace")


# -----------------------------------------------------------------------------
# Quality at matched compute: perplexity, block influence, threshold search (bench.py --mode=ppl uses these)

def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


@torch.no_grad()
def eval_ppl(adapter, windows, batch_size=8):
    """Teacher-forced perplexity of `windows` (N, T + 1) through adapter.prefill_logits (what generation computes),
    and the compute it took: layer_ratio = layer calls / (tokens * L), kv_ratio = K/V-only fills / (tokens * L)."""
    dev = adapter.embed.weight.device
    nll = calls = full = kv = n = 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(dev)
        logits, st = adapter.prefill_logits(w[:, :-1])
        nll += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        calls, full, kv, n = calls + st["layer_calls"], full + st["layer_calls_full"], \
            kv + st["kv_only_layer_calls"], n + st["tokens"]
    L = len(adapter.layers)                           # layers_per_depth counts layers, so full = n * L
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "layer_ratio": calls / full,
            "mean_layers": calls / n, "kv_ratio": kv / (n * L)}


@torch.no_grad()
def block_influence(model, windows, batch_size=8):
    """ShortGPT's block influence per layer, BI_l = 1 - mean over tokens of cos(layer input, layer output), on the
    full model over calibration windows. Low BI: the layer barely turns the residual stream. -> list of L floats."""
    dev = model.get_input_embeddings().weight.device
    total, n = None, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size, :-1].to(dev)
        bi = []
        soft_forward(model, None, w, influence=bi)
        total = bi if total is None else [a + b for a, b in zip(total, bi)]
        n += w.numel()
    return [t / n for t in total]


def static_drop_layers(influence, n):
    """The n layers with the lowest block influence, never layer 0 (ShortGPT's static layer removal)."""
    order = sorted(range(1, len(influence)), key=lambda l: influence[l])
    return sorted(order[:n])


def search_cutoff(make, lo, hi, target, windows, tol=0.005, iters=40, batch_size=8):
    """Bisection on a router's threshold until the layer-call ratio it gives on `windows` is within tol of
    `target`. make(v) -> a DepthAdapter; the ratio must be monotone in v (either direction). -> (v, eval_ppl
    dict at v, reached). A target out of reach gives the closer end and reached=False; a ratio that jumps over
    the target (few tokens, or a discrete router) gives the closest value seen."""
    r_lo, r_hi = (eval_ppl(make(v), windows, batch_size) for v in (lo, hi))
    best = min(((abs(r["layer_ratio"] - target), v, r) for v, r in ((lo, r_lo), (hi, r_hi))), key=lambda t: t[0])
    if (r_lo["layer_ratio"] - target) * (r_hi["layer_ratio"] - target) > 0:
        return best[1], best[2], best[0] <= tol
    side_lo = r_lo["layer_ratio"] > target
    for _ in range(iters):
        if best[0] <= tol:
            break
        mid = (lo + hi) / 2
        r = eval_ppl(make(mid), windows, batch_size)
        best = min(best, (abs(r["layer_ratio"] - target), mid, r), key=lambda t: t[0])
        if (r["layer_ratio"] > target) == side_lo:
            lo = mid
        else:
            hi = mid
    return best[1], best[2], best[0] <= tol


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
