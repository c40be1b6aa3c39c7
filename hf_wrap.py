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
costs an LM-head call per group boundary on the active tokens).

The KV choice. A token that exited before layer l left no K/V there, yet later tokens attend to it at layer l.
We fill that slot from the token's exit hidden state: input_layernorm -> k_proj/v_proj (-> k_norm) -> RoPE, the
K/V projections only. Cost for Llama-3-8B shapes (C=4096, 32 query / 8 KV heads of 128, MLP 14336): a layer holds
q 16.8M + k 4.2M + v 4.2M + o 16.8M + MLP 176.2M = 218.1M weights; k+v are 8.4M = 3.8% of its weight bytes and
of its matmul FLOPs per token. The fill is lazy: exit states are kept (B, max_len, C) and a group's missing K/V
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
ROUTERS = ("none", "fixed", "expert_choice", "token_choice", "confidence", "entropy")
LEARNED_ROUTERS = ("expert_choice", "token_choice")          # weights come from router_path
DEFAULT_THRESHOLD = {"confidence": 0.9, "entropy": 1.0}      # top-1 probability / entropy in nats
ROUTER_FILE_FORMAT = "nanomor-hf-routers-v1"
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

    def __init__(self, hidden_size, n_out=1, mlp_hidden=0):
        super().__init__()
        self.mlp_hidden = mlp_hidden                  # 0 = a bias-free linear layer
        if mlp_hidden:
            self.net = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, n_out))
        else:
            self.net = nn.Linear(hidden_size, n_out, bias=False)

    def forward(self, h):
        h = h.float()
        return self.net(F.rms_norm(h, (h.shape[-1],)))


def make_routers(router, hidden_size, R, mlp_hidden=0):
    """The trainable part of a learned router, as one ModuleList (what a router file holds)."""
    if router == "expert_choice":
        return nn.ModuleList(GroupRouter(hidden_size, 1, mlp_hidden) for _ in range(R))
    return nn.ModuleList([GroupRouter(hidden_size, R + 1, mlp_hidden)])


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
            self.exit_h = torch.zeros(B, max_len, ad.hidden_size, device=dev, dtype=dt)  # state at exit
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
                 threshold=None, router_path=None, no_skip=False):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"DepthAdapter supports model_type {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family "
                             f"decoders); got {cfg.model_type!r} ({type(model).__name__}).")
        router = "none" if no_skip else router
        L = cfg.num_hidden_layers
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}.")
        if not isinstance(base_layers, int) or not 1 <= base_layers < L:
            raise ValueError(f"base_layers={base_layers}: need 1 <= base_layers < {L} (layer 0 is never skipped "
                             "and at least one layer must be left to route).")
        if not isinstance(R, int) or not 1 <= R <= L - base_layers:
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
        # none / fixed send every token through the same groups: no routing work, no host syncs in decode
        self.static_depth = {"none": R, "fixed": depth}.get(router)

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
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != ROUTER_FILE_FORMAT:
            raise ValueError(f"{path}: not a router file (expected format {ROUTER_FILE_FORMAT!r}, written by "
                             "DepthAdapter.save_routers).")
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
    def _forward(self, run, ids, pos, start, prefill):
        """ids, pos (B, T) fill cache slots start..start+T. -> last position's logits (B, V), depths (B, T)."""
        B, T = ids.shape
        x = self.embed(ids)                                                   # (B, T, C)
        cos, sin = self.rotary(x, pos)                                        # (B, T, hd) each
        run.pos[:, start:start + T] = pos
        everyone = _Tokens(run, start, cos, sin)
        for l in range(self.base_layers):
            x = self._layer(run, l, x, everyone)
        if self.static_depth is not None:
            for g in range(self.static_depth):
                for l in self.groups[g]:
                    x = self._layer(run, l, x, everyone)
            depth = torch.full((B, T), self.static_depth, device=x.device)
        else:
            x, depth = self._routed_groups(run, x, start, everyone, prefill)
        return self.lm_head(self.norm(x[:, -1])), depth                      # exited tokens: their exit state

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

    # --- generation ------------------------------------------------------------------------------------------
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
        dev = self.embed.weight.device
        ids = input_ids.to(dev)
        B, T0 = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(dev).bool()
        if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask must be LEFT padding (zeros then ones, every row ending in a token); "
                             "set tokenizer.padding_side = 'left'.")
        key_valid = torch.ones(B, T0 + max_new_tokens, dtype=torch.bool, device=dev)
        key_valid[:, :T0] = mask
        run = _Run(self, B, T0 + max_new_tokens, key_valid)
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)                        # HF's position ids under left padding
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
