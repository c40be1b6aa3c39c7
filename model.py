"""
A Mixture-of-Recursions language model, in one file. Read this, then router.py,
then kv_cache.py.

The network is a Llama-style decoder (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU MLP, no biases). What makes it MoR (Bae et al. 2025):

  1. Parameter sharing. Of the n_layer layers of a vanilla model, a *recursion
     block* of n_layer / R layers is kept and applied R times ("sharing"):
        cycle            layers 1..k, 1..k, ... (the block is reused as a whole)
        sequence         layers 1,1,..,2,2,..   (each layer repeated in place)
        middle_cycle     first and last layer unique, the middle shared as cycle
        middle_sequence  first and last layer unique, the middle shared as sequence
     middle_cycle was the paper's best and is what every MoR config here uses.
  2. Routing. Before each recursion step a router (router.py) picks which tokens
     take part; the others keep their hidden state. A token's *depth* is the
     number of steps it ran. Vanilla is sharing='none' with R=1; the recursive
     baseline shares weights but sends every token through all R steps.
  3. Depth-wise batching. _route packs each step's active tokens into an ActiveSet;
     _run gathers them, x_in = h[act.flat] (N, d), runs the layers on that and
     scatters the result back. A token that exited costs nothing: no projection,
     no MLP, no attention.
  4. KV caching (kv_cache.py): attention at step r among the tokens active at r
     (recursion-wise), or against the K/V that step 0 wrote (share-first).

The whole method is the loop in MoR.forward, over the packed tokens h (B*T, d):

    h = self._run(h, everyone, plan.prelude, "pre", None, attn)     # unshared first layer(s)
    act, depth = everyone, torch.zeros(B * T, dtype=torch.long, device=idx.device)
    for r in range(plan.n_recursion):                               # R steps of one shared block
        act, gate = self._route(r, h, act, state, rule)             # who of last step's tokens runs r
        if act.n == 0:
            break                                                   # every token has exited
        h = self._run(h, act, plan.steps[r], "rec", r, attn, gate)  # gather, block, gate, scatter back
        depth[act.flat] += 1                                        # depth: the steps a token ran
    h = self._run(h, everyone, plan.coda, "post", None, attn)       # unshared last layer(s)

The gate. The layers return x = h + f(h), f(h) being all they add to the residual
stream; a routed token gets h <- h + g * f(h), computed as x_in + g * (x - x_in). g is
the router's score (router.py): for expert-choice g = alpha * sigmoid(logit), alpha = 0.1
as in the paper. The gate gives the router a gradient (top-k has none): a higher score
takes more of the update, so the LM loss tells the router which tokens gained from the
step. A small alpha lets the block learn before the router's early random choices
matter (its output projections grow to compensate). Token-choice gates only a token's
last step, by the probability of the depth it chose.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kv_cache import KVCache, Lanes, SequenceKV
from router import ExpertChoiceRouter, RouteState, TokenChoiceRouter, depth_summary


# -----------------------------------------------------------------------------
# Depth-wise batching: the tokens that run one step, packed (ActiveSet), and where (Site)
#
# Attention, unlike the other layers, needs a rectangle: each batch row with active
# tokens becomes a grid row of width K = its most active tokens. Expert-choice keeps
# equal counts, so the grid is full and packing is a free .view(). Token-choice (and
# threshold routing) is ragged: pads go after each row's tokens, so a causal mask over
# grid slots is exact, and their outputs are dropped. We pad only in attention: varlen
# kernels don't run on CPU, and flex_attention compiles per mask shape.

@dataclass
class ActiveSet:
    """The tokens of one forward call ([B, T], flattened) that run a step, listed row by
    row in position order, so causal order survives packing."""
    flat: torch.Tensor    # [N] index into the call's B*T tokens (gather/scatter)
    row: torch.Tensor     # [N] batch row of each token
    rank: torch.Tensor    # [N] rank of the token among its row's active tokens
    pos: torch.Tensor     # [N] absolute position (rotary angle, causal masks)
    rows: torch.Tensor    # [n_rows] batch rows with an active token
    counts: torch.Tensor  # [n_rows] active tokens in each of those rows
    qpos: torch.Tensor    # [n_rows, K] position at each grid slot (pads: after everything)
    grid_index: Optional[torch.Tensor]  # [N] grid slot of each token; None: the grid is full
    B: int                # rows of the call
    T: int                # tokens per row
    K: int                # grid width: the most active tokens in any row
    all_rows: bool        # rows == every batch row, in order
    start: int            # position of the call's first token (tokens already cached)

    @property
    def n(self):
        return self.flat.numel()

    @property
    def n_rows(self):
        return self.rows.numel()

    @staticmethod
    def everyone(B, T, start, device):
        """All B*T tokens (unshared layers, vanilla, steps that keep everyone)."""
        return ActiveSet._full(torch.arange(B * T, device=device), B, T, T, start)

    @staticmethod
    def _full(flat, B, T, K, start):
        """Every row keeps K tokens, flat [B*K]: a full grid, built with no host sync."""
        dev = flat.device
        pos = start + flat % T
        rows = torch.arange(B, device=dev)
        return ActiveSet(flat=flat, row=rows.repeat_interleave(K), rank=torch.arange(K, device=dev).repeat(B),
                         pos=pos, rows=rows, counts=torch.full((B,), K, device=dev), qpos=pos.view(B, K),
                         grid_index=None, B=B, T=T, K=K, all_rows=True, start=start)

    def subset(self, keep, per_row=None):
        """The tokens where keep [N] is True, and their index in this set [N']. per_row:
        every row keeps this many (expert-choice top-k), so the result is a full grid
        again, built without reading the mask on the host."""
        if per_row is not None:
            assert self.grid_index is None and self.all_rows, "per-row selection needs a full grid"
            # a stable descending sort puts each row's kept slots first, in position order
            cols = keep.view(self.B, self.K).to(torch.int32).sort(dim=1, descending=True, stable=True).indices
            picked = (torch.arange(self.B, device=keep.device)[:, None] * self.K + cols[:, :per_row]).view(-1)
            return ActiveSet._full(self.flat[picked], self.B, self.T, per_row, self.start), picked
        picked = keep.nonzero().squeeze(1)
        mask = torch.zeros(self.B * self.T, dtype=torch.bool, device=keep.device)
        mask[self.flat[picked]] = True
        return ActiveSet._from_mask(mask.view(self.B, self.T), self.start), picked

    @staticmethod
    def _from_mask(mask, start):
        """Any subset, mask [B, T] bool; rows may be ragged."""
        B, T = mask.shape
        dev = mask.device
        per_row = mask.sum(1)                      # [B]
        rows = per_row.nonzero().squeeze(1)        # rows with any active token
        flat = mask.view(-1).nonzero().squeeze(1)  # row-major: causal order kept
        n_rows, N = rows.numel(), flat.numel()
        K = int(per_row.max()) if N else 0
        row, t = flat // T, flat % T
        rank = torch.arange(N, device=dev) - (per_row.cumsum(0) - per_row)[row]  # rank inside the row
        grid_row = torch.zeros(B, dtype=torch.long, device=dev)
        grid_row[rows] = torch.arange(n_rows, device=dev)
        grid_index = grid_row[row] * K + rank
        qpos = torch.full((n_rows * K,), 2**40, dtype=torch.long, device=dev)  # pads: after everything
        qpos = qpos.index_copy(0, grid_index, start + t).view(n_rows, K)
        full = N == n_rows * K
        return ActiveSet(flat=flat, row=row, rank=rank, pos=start + t, rows=rows, counts=per_row[rows], qpos=qpos,
                         grid_index=None if full else grid_index, B=B, T=T, K=K, all_rows=n_rows == B, start=start)


class Site(NamedTuple):
    """One layer application: Site('pre'|'post', None, i) for unshared layer i, Site('rec', r, j)
    for shared layer j at step r (None in continuous batching: it is in the cache row)."""
    part: str
    step: Optional[int]
    index: int


# -----------------------------------------------------------------------------
# Building blocks (each maps 1:1 onto transformers' LlamaDecoderLayer)

def rotate_half(x):
    """Rotary embeddings, the rotate-half convention of transformers' Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [..., heads, hd]; cos/sin [..., hd] at each token's own position (broadcast over heads)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, rope, kv, site, act):
        """x [N, d] packed active tokens -> [N, d]. kv (kv_cache.py) decides which keys they see."""
        N = x.shape[0]
        cos, sin = rope
        q = apply_rope(self.q_proj(x).view(N, self.n_head, self.head_dim), cos, sin)  # (N, nh, hd)
        k = v = None
        if kv.wants_kv(site):  # share-first deeper steps project no K/V
            k = apply_rope(self.k_proj(x).view(N, self.n_kv_head, self.head_dim), cos, sin)  # (N, nkv, hd)
            v = self.v_proj(x).view(N, self.n_kv_head, self.head_dim)
        return self.o_proj(kv.attend(site, q, k, v, act))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer; its norm weights are shared with it."""
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, kv, site, act):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), rope, kv, site, act))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


# -----------------------------------------------------------------------------
# Configuration and the layer plan

@dataclass
class LayerPlan:
    """Which unique layer runs where. layers = [prelude..., shared block..., coda...]."""
    n_pre: int
    n_shared: int
    n_post: int
    n_recursion: int
    steps: list     # steps[r] = indices into the unique layers for recursion step r
    n_dropped: int  # layers of the vanilla count that do not fit the sharing pattern

    @property
    def n_unique(self):
        return self.n_pre + self.n_shared + self.n_post

    @property
    def prelude(self):
        return list(range(self.n_pre))  # unique-layer indices of the first layer(s)

    @property
    def coda(self):
        return list(range(self.n_pre + self.n_shared, self.n_unique))  # ... of the last layer(s)

    @property
    def full_depth_layers(self):
        return self.n_pre + sum(len(s) for s in self.steps) + self.n_post

    def layers_per_depth(self):
        """Layer applications a token of depth d costs, d = 0..R (for depth_summary)."""
        k = self.n_shared if self.n_recursion > 1 else len(self.steps[0])
        return [self.n_pre + self.n_post + d * k for d in range(self.n_recursion + 1)]


def layer_plan(n_layer, R, sharing):
    """Section 1 of the paper: L layers, R recursions. Layers that don't divide are dropped
    (R=4, 32 layers, middle_cycle: 1 + 4*7 + 1 = 30 layer applications)."""

    if sharing == "none":
        return LayerPlan(0, n_layer, 0, 1, [list(range(n_layer))], 0)
    middle = sharing.startswith("middle_")
    edge = 1 if middle else 0
    inner = n_layer - 2 * edge
    k = inner // R
    if k < 1:
        raise ValueError(f"sharing={sharing!r} with n_layer={n_layer} leaves {inner} layers for "
                         f"{R} recursions: need n_layer >= {R + 2 * edge}")
    if sharing.endswith("cycle"):
        unrolled = [i for _ in range(R) for i in range(k)]  # 1..k, 1..k, ...
    else:
        unrolled = [i for i in range(k) for _ in range(R)]  # 1,1,..,2,2,..
    steps = [[edge + i for i in unrolled[r * k:(r + 1) * k]] for r in range(R)]
    return LayerPlan(edge, k, edge, R, steps, inner - k * R)


CHOICES = {"sharing": ("none", "cycle", "sequence", "middle_cycle", "middle_sequence"),  # MoRConfig's string keys
           "router": ("none", "expert_choice", "token_choice"), "kv_mode": ("recursion", "share_first"),
           "balancing": ("loss", "loss_free", "none"), "router_fn": ("sigmoid", "tanh"),
           "router_aux": ("loss", "router"), "router_arch": ("linear", "mlp")}


@dataclass
class MoRConfig:
    # shape (a Llama decoder)
    vocab_size: int = 65
    block_size: int = 256        # context length
    n_layer: int = 6             # layers of the equivalent vanilla model
    n_head: int = 6
    n_kv_head: int = 0           # 0 = n_head (no grouping); fewer = grouped-query attention
    n_embd: int = 384
    intermediate_size: int = 0   # 0 = 8/3 * n_embd rounded up to a multiple of 32 (Llama's ratio)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    # recursion (section 1 of the paper)
    n_recursion: int = 1         # R: how many times the shared block is applied
    sharing: str = "none"        # none | cycle | sequence | middle_cycle | middle_sequence (item 1)
    # routing (router.py) and caching (kv_cache.py)
    router: str = "none"         # none (every token, every step) | expert_choice | token_choice
    kv_mode: str = "recursion"   # recursion | share_first (kv_cache.py)
    capacity: tuple = ()         # expert-choice keep fraction per step; () = (R - r) / R
    router_arch: str = "linear"  # linear | mlp
    router_fn: str = "sigmoid"   # expert-choice gate: sigmoid | tanh
    router_alpha: float = 0.1    # gate scale g = alpha * sigmoid(logit / temperature)
    router_temperature: float = 1.0
    router_aux: str = "loss"     # expert-choice's causal rule: loss (aux BCE) | router (aux router)
    router_aux_weight: float = 0.001
    router_z_weight: float = 0.0
    balancing: str = "loss"      # token-choice: loss | loss_free | none
    router_balance_weight: float = 0.1
    balance_bias_rate: float = 1e-3  # loss-free bias step u
    router_entropy_weight: float = 0.0
    target_depth: float = 0.0    # token-choice: pull the mean depth towards this (0 = off)
    target_depth_weight: float = 0.0
    # masked diffusion (diffusion.py): train.py sets both for objective='diffusion'
    bidirectional: bool = False  # every token attends to every token (no causal mask)
    mask_token: int = -1         # id of [MASK] (train.py reserves the last vocab id); -1 = none

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if not self.intermediate_size:
            self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        self.capacity = tuple(self.capacity)
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            need(value in allowed, f"{key} must be one of {' | '.join(allowed)}, got {value!r}")
        need(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        need((self.n_embd // self.n_head) % 2 == 0, "head size must be even for rotary embeddings")
        need(self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} must be a multiple of n_kv_head "
                                                 f"{self.n_kv_head}")
        need(self.n_recursion >= 1, "n_recursion must be >= 1")
        for key in ("rope_theta", "router_alpha", "router_temperature"):   # a scale, a gate's size, a divisor
            need(getattr(self, key) > 0, f"{key} must be > 0, got {getattr(self, key)}")
        need(-1 <= self.mask_token < self.vocab_size,
             f"mask_token must be a vocab id (0..{self.vocab_size - 1}) or -1 for none, got {self.mask_token}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.sharing != "none" or self.n_recursion == 1, "sharing='none' means one pass (n_recursion=1); "
             "to recurse pick cycle, sequence, middle_cycle or middle_sequence")
        need(self.router == "none" or self.n_recursion > 1, f"router={self.router!r} needs n_recursion > 1")
        need(self.kv_mode == "recursion" or self.n_recursion > 1, "kv_mode='share_first' needs n_recursion > 1")
        layer_plan(self.n_layer, self.n_recursion, self.sharing)  # raises if the layers don't fit
        if self.router == "expert_choice":
            cap = self.capacity_schedule(self.n_recursion)
            need(len(cap) == self.n_recursion, f"capacity needs {self.n_recursion} entries, got {len(cap)}")
            need(all(0 < c <= 1 for c in cap), f"capacity fractions must lie in (0, 1], got {cap}")
            need(all(a >= b for a, b in zip(cap, cap[1:])), f"capacity must not increase step to step, got {cap}")
            need(self.kv_mode != "share_first" or cap[0] == 1,
                 "kv_mode='share_first' needs capacity[0] = 1: step 0 writes every token's K/V")

    def capacity_schedule(self, R):
        """Expert-choice keep fraction per step: the configured list, or (R - r) / R."""
        return self.capacity if self.capacity else tuple((R - r) / R for r in range(R))


# -----------------------------------------------------------------------------
# The model

class ForwardInfo(NamedTuple):
    """What one forward call ran: behind MoR.last_depth, last_route, last_flops."""
    depth: torch.Tensor              # [B, T] recursion steps each token ran
    route: RouteState                # the routers' losses and statistics
    start: int                       # position of the call's first token
    reached: Optional[torch.Tensor]  # [B, R] cached tokens per row that ran step r; None: no cache
    n_logits: int                    # positions per row sent to the LM head
    ran: Optional[torch.Tensor]      # [B, T] bool: the tokens that ran (run_only); None: all


def gather(h, act):
    """The rows of h (B*T, d) that act lists, (N, d); h itself for every token."""
    return h if act.n == h.shape[0] else h[act.flat]


class MoR(nn.Module):
    def __init__(self, config, router=None):
        """router: a module with router.py's interface, to use instead of the one
        config.router names (bench.py's forced-depth router)."""
        super().__init__()
        self.config = cfg = config
        self.plan = layer_plan(cfg.n_layer, cfg.n_recursion, cfg.sharing)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(self.plan.n_unique))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if router is None and cfg.router != "none":
            router = {"expert_choice": ExpertChoiceRouter, "token_choice": TokenChoiceRouter}[cfg.router](
                cfg, cfg.n_recursion)
        if router is not None and self.plan.n_recursion < 2:
            raise ValueError("a router needs n_recursion > 1")
        self.router = router
        # rotary tables for every position, float32 (cast at use, as transformers does)
        hd = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (block_size, hd)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        # init: N(0, 0.02); residual projections scaled by the number of layer applications
        self.apply(self._init_weights)
        depth = self.plan.full_depth_layers
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))
        self.last_forward = None  # ForwardInfo of the last forward call

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Unique parameters: shared layers and tied embeddings count once."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def rope(self, pos):
        return self.rope_cos[pos], self.rope_sin[pos]

    def forward(self, idx, targets=None, kv=None, rule=None, last_only=False, run_only=None):
        """idx [B, T] token ids -> (logits [B, T, V], loss or None).

        kv:   a KVCache to continue from (generation); None: a whole-sequence pass.
        rule: expert-choice's 'topk' or 'causal' (router.py); default 'topk' in train mode.
        run_only: [B, T] bool, the only tokens that run (None: all); kv serves the others'
              K/V from an earlier call (diffusion.py). Their logits are meaningless.
        """
        cfg, plan = self.config, self.plan
        B, T = idx.shape
        start = 0 if kv is None else kv.seq_len  # tokens already in the cache
        if start + T > cfg.block_size:
            raise ValueError(f"{start + T} tokens exceed the context of {cfg.block_size} (block_size)")
        rule = rule or ("topk" if self.training else "causal")
        attn = kv if kv is not None else SequenceKV(cfg.kv_mode, cfg.dropout if self.training else 0.0,
                                                    causal=not cfg.bidirectional)
        state = RouteState(B * T)
        h = self.drop(self.embed_tokens(idx)).view(B * T, cfg.n_embd)  # packed tokens (B*T, d)
        everyone = ActiveSet.everyone(B, T, start, idx.device)
        if run_only is not None:
            everyone = everyone.subset(run_only.view(-1))[0]
        h = self._run(h, everyone, plan.prelude, "pre", None, attn)     # unshared first layer(s)
        act, depth = everyone, torch.zeros(B * T, dtype=torch.long, device=idx.device)
        for r in range(plan.n_recursion):                               # R steps of one shared block
            act, gate = self._route(r, h, act, state, rule)             # who of last step's tokens runs r
            if act.n == 0:
                break                                                   # every token has exited
            h = self._run(h, act, plan.steps[r], "rec", r, attn, gate)  # gather, block, gate, scatter back
            depth[act.flat] += 1                                        # depth: the steps a token ran
        h = self._run(h, everyone, plan.coda, "post", None, attn)       # unshared last layer(s)

        h = h.view(B, T, cfg.n_embd)
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(self.norm(h))
        depth = depth.view(B, T)
        reached = getattr(kv, "reached", None)  # KVCache's FLOP counter
        self.last_forward = ForwardInfo(depth, state, start, reached, h.shape[1], run_only)
        if kv is not None:
            kv.advance(depth)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
            if self.training:
                loss = loss + state.total_loss()
        return logits, loss

    def _route(self, r, h, act, state, rule):
        """Which of last step's tokens `act` run step r (router.py): them, packed, and their
        gates (None: ungated)."""
        if self.router is None:
            return act, None                                     # every token runs every step
        route = self.router(r, gather(h, act), act, state, rule)
        gate = route.gate
        if route.keep is not None:                               # hierarchical: a subset of act
            act, picked = act.subset(route.keep, route.per_row)  # picked: index in the old act
            gate = None if gate is None else gate[picked]
        state.log_step(r, act.n, state.n_tokens)
        return act, gate

    def _run(self, h, act, layer_ids, part, step, kv, gate=None):
        """Gather the tokens `act` from h (B*T, d), run the layers, gate, scatter back (the
        module docstring). act is an ActiveSet, or Lanes in ContinuousBatching."""
        x_in = x = gather(h, act)  # (N, d)
        rope = self.rope(act.pos)
        for j, li in enumerate(layer_ids):
            x = self.layers[li](x, rope, kv, Site(part, step, j), act)
        if gate is not None:  # h <- h + g * f(h) (the module docstring)
            x = x_in + gate[:, None].to(x.dtype) * (x - x_in)
        return x if act.n == h.shape[0] else h.index_copy(0, act.flat, x)  # scatter back

    # -- FLOP accounting: from what ran, in one place ----------------------------
    def _layer_flops(self, n, with_kv):
        """Matmul FLOPs of one layer over n tokens (attention scores counted separately)."""
        cfg = self.config
        hd = cfg.n_embd // cfg.n_head
        per_token = cfg.n_embd * cfg.n_head * hd * 2 + 3 * cfg.n_embd * cfg.intermediate_size  # q, o, MLP
        if with_kv:
            per_token += 2 * cfg.n_embd * cfg.n_kv_head * hd  # k, v
        return 2 * n * per_token

    def flop_parts(self, depth, start=0, reached=None, n_logits=None, ran=None):
        """Forward FLOPs of one call from ForwardInfo's fields: (linear, attention). linear:
        2 * rows * in * out per Linear; attention: 4 * d per (query, key) pair. A query at
        step r sees recursion-wise its row's earlier tokens that ran step r (cached too);
        share-first deeper steps and unshared layers, every earlier token; bidirectional,
        its whole row."""
        cfg, plan = self.config, self.plan
        B, T = depth.shape
        pair = 4 * cfg.n_embd
        pos = start + torch.arange(T, device=depth.device)
        ran = torch.ones_like(depth, dtype=torch.bool) if ran is None else ran
        def pairs_all(queries):  # queries [B, T] bool: their keys, summed
            return (queries.sum() * (start + T)) if cfg.bidirectional else ((pos + 1) * queries).sum()
        n_edge = plan.n_pre + plan.n_post
        linear = n_edge * self._layer_flops(1, True) * ran.sum()
        attention = n_edge * pair * pairs_all(ran)
        for r in range(plan.n_recursion):
            at = depth > r  # [B, T]: the tokens that ran step r
            n = at.sum(1)   # [B]
            shared = cfg.kv_mode == "share_first" and r > 0
            if cfg.bidirectional or shared:
                pairs = pairs_all(at)
            else:
                before = 0 if reached is None else reached[:, r]
                pairs = (before * n + n * (n + 1) // 2).sum()
            linear = linear + len(plan.steps[r]) * self._layer_flops(1, not shared) * n.sum()

            attention = attention + len(plan.steps[r]) * pair * pairs
        lm_head = 2 * B * (T if n_logits is None else n_logits) * cfg.n_embd * cfg.vocab_size
        return linear + lm_head, attention

    def count_flops(self, depth, start=0, reached=None, n_logits=None, ran=None):
        """flop_parts' linear + attention."""
        linear, attention = self.flop_parts(depth, start, reached, n_logits, ran)
        return linear + attention

    @property
    def last_flops(self):
        """Forward FLOPs the last forward call ran (a tensor; float() it)."""
        f = self.last_forward
        return self.count_flops(f.depth, f.start, f.reached, f.n_logits, f.ran)

    @property
    def last_depth(self):
        """[B, T] depth of each token in the last forward."""
        return self.last_forward.depth

    @property
    def last_route(self):
        """RouteState of the last forward."""
        return self.last_forward.route

    def dense_flops_per_token(self, T):
        """Forward FLOPs per token if every token ran every step (vanilla)."""
        cfg, n = self.config, self.plan.full_depth_layers
        return (self._layer_flops(1, True) * n + 2 * cfg.n_embd * cfg.vocab_size
                + 4 * cfg.n_embd * n * (T + 1) / 2)

    # -- training helpers -------------------------------------------------------
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices, not on norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def depth_stats(self, depth=None):
        """depth_summary (router.py) of the last forward's depths."""
        depth = self.last_depth if depth is None else depth
        return depth_summary(depth.flatten(), self.plan.layers_per_depth())

    # -- generation -------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, return_depths=False, on_tokens=None):
        """Sample max_new_tokens after idx [B, T0] with a KV cache, routing causally;
        temperature 0 = greedy. A full context re-prefills from its last half (positions
        restart at 0, as in training). on_tokens: called after each step with its new
        tokens, a list of B 1-D tensors (a streamer: sample.py --stream). Returns idx
        [B, T0 + new], and with return_depths each token's depth as input, [B, T0 + new]."""
        B, T0 = idx.shape
        bs = self.config.block_size
        if T0 > bs:
            raise ValueError(f"the prompt is {T0} tokens but the model's context is {bs} (block_size): shorten it")
        if T0 == 0:
            raise ValueError("the prompt is empty: give at least one token")
        kv = KVCache(self, B)
        logits, _ = self(idx, kv=kv, rule="causal", last_only=True)
        depths = [self.last_depth]
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
            if on_tokens is not None:
                on_tokens(list(nxt))
            if i == max_new_tokens - 1 and not return_depths:
                break             # the last token's logits are not needed
            if kv.seq_len >= bs:  # context full: keep the last half and re-prefill
                kv = KVCache(self, B)
                logits, _ = self(idx[:, -(bs // 2):], kv=kv, rule="causal", last_only=True)
                depths.append(self.last_depth[:, -1:])
            else:
                logits, _ = self(nxt, kv=kv, rule="causal", last_only=True)
                depths.append(self.last_depth)
        if return_depths:
            return idx, torch.cat(depths, dim=1)
        return idx


# -----------------------------------------------------------------------------
# Sampling one token (generate() above, continuous batching below)

def token_probs(logits, temperature=1.0, top_k=None):
    """logits [..., V] -> softmax(logits / temperature), float32; over the top_k logits if set."""
    logits = logits / temperature
    if top_k is not None:
        v = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < v, -float("inf"))
    return F.softmax(logits.float(), dim=-1)


def sample_next(logits, temperature=1.0, top_k=None):
    """logits [B, V] -> next token [B, 1]. temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(token_probs(logits, temperature, top_k), num_samples=1)


# -----------------------------------------------------------------------------
# Continuous depth-wise batching (the paper's section 2.3)

class ContinuousBatching:
    """Decode B sequences so that every call of the shared block is a full batch.

    generate()'s calls shrink step by step, yet at decode 3 rows cost about what 32 do:
    reading the weights dominates. Here each sequence is a *lane* with one token in
    flight, and a *tick* runs the shared block once on all lanes, whatever their step:
      1. the shared block on every lane, each at its step's cache row (KVCache.cache_row);
      2. the router, step by step, says which tokens go on;
      3. a token that stops runs the last layer(s), the LM head and sampling;
      4. its sequence's next token enters: embedding, first layer(s), step-0 routing.
    Each token sees what it sees in generate(): greedy outputs are the same.

    Saves: host syncs and shape changes, so compile=True captures the tick whole (on a GPU
    one CUDA graph). Spends: every lane runs every part of every tick, finished or idle.
    run()'s stats count both: block_rows (B per tick), live_rows (decoded tokens' depths).

    Needs kv_mode='recursion', sharing cycle or middle_cycle, capacity 1 at step 0. At
    temperature > 0 every lane draws, so the random stream differs from generate()'s.
    """

    def __init__(self, model, idx, max_new_tokens, temperature=1.0, top_k=None, compile=False):
        cfg, plan = model.config, model.plan
        if cfg.kv_mode != "recursion" or not (plan.n_recursion == 1 or cfg.sharing.endswith("cycle")):
            raise ValueError("continuous batching needs sharing cycle or middle_cycle and kv_mode='recursion'; "
                             "use generate()")
        if cfg.router == "expert_choice" and cfg.capacity_schedule(plan.n_recursion)[0] < 1:
            raise ValueError("continuous batching needs capacity 1 at step 0; use generate()")
        B, T0 = idx.shape
        if T0 + max_new_tokens > cfg.block_size:
            raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceed block_size "
                             f"{cfg.block_size}: continuous batching does not re-prefill; use generate()")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.idx, self.max_new = model, idx, max_new_tokens
        self.temperature, self.top_k = temperature, top_k
        self.gated = model.router is not None and model.router.gated
        dev = idx.device
        self.kv = KVCache(model, B)
        self.lane = torch.arange(B, device=dev)
        # per-lane state, updated in place (a captured graph finds it at the same address)
        i64 = dict(dtype=torch.long, device=dev)
        self.out = torch.zeros(B, max_new_tokens, **i64)     # generated tokens
        self.n_out = torch.ones(B, **i64)                    # tokens generated per lane
        self.depths = torch.zeros(B, max_new_tokens, **i64)  # depth of each decoded token
        self.pos = torch.full((B,), T0, **i64)               # position of the lane's token
        self.h = torch.zeros(B, cfg.n_embd, device=dev, dtype=model.embed_tokens.weight.dtype)
        self.step = torch.zeros(B, **i64)                    # the step it runs next
        self.gate = torch.ones(B, device=dev)                # its gate at that step
        self.live_rows = torch.zeros((), **i64)              # block rows of live tokens, summed
        self.state = RouteState(B)                           # token-choice: each lane's depth
        self.state.depth = torch.zeros(B, **i64)
        self.state.prob = torch.ones(B, device=dev)
        self.tick = self._tick
        if compile:
            mode = "reduce-overhead" if dev.type == "cuda" else None  # CUDA graphs
            self.tick = torch.compile(self._tick, fullgraph=True, mode=mode)

    @torch.no_grad()
    def run(self):
        """Returns (idx [B, T0 + new], depths [B, new - 1] of the decoded tokens, stats)."""
        m = self.model
        logits, _ = m(self.idx, kv=self.kv, rule="causal", last_only=True)  # prefill
        self.out[:, 0] = sample_next(logits[:, -1], self.temperature, self.top_k)[:, 0]
        if self.idx.device.type == "cuda":  # a CUDA graph mutates the state and cache in place
            caches = [x for st in self.kv.stores.values() for x in (st.k, st.v, st.pos, st.length)]
            for t in [self.out, self.n_out, self.depths, self.pos, self.h, self.step, self.gate, self.live_rows,
                      self.state.depth, self.state.prob, *caches]:
                torch._dynamo.mark_static_address(t)
        self._enter(self.n_out < self.max_new)
        ticks = 0
        while True:
            self.tick()
            ticks += 1
            if ticks % 4 == 0 and not bool((self.n_out < self.max_new).any()):  # one host sync per 4 ticks
                break
        B, live = self.lane.numel(), int(self.live_rows)
        stats = {"ticks": ticks, "block_rows": B * ticks, "live_rows": live, "live_rows_per_tick": live / ticks}
        return torch.cat((self.idx, self.out), dim=1), self.depths[:, :-1], stats

    def _lanes(self, cache_row, write):
        return Lanes(flat=self.lane, row=self.lane, pos=self.pos, cache_row=cache_row, write=write)

    def _enter(self, entering):
        """A new token for the lanes in `entering` (tick part 4)."""

        m = self.model
        x = m.embed_tokens(self.out[self.lane, (self.n_out - 1).clamp(max=self.max_new - 1)])
        x = m._run(x, self._lanes(self.lane, entering), m.plan.prelude, "pre", None, self.kv)
        self.h.copy_(torch.where(entering[:, None], x.to(self.h.dtype), self.h))
        if m.router is not None:
            kept_depth, kept_prob = self.state.depth.clone(), self.state.prob.clone()
            route = m.router(0, x, self._lanes(self.lane, entering), self.state, "causal")
            self.state.depth.copy_(torch.where(entering, self.state.depth, kept_depth))  # others keep theirs
            self.state.prob.copy_(torch.where(entering, self.state.prob, kept_prob))
            if self.gated:
                self.gate.copy_(torch.where(entering, route.gate.float(), self.gate))

    def _tick(self):
        """One call of the shared block on every lane, then exits and entries."""
        m, plan = self.model, self.model.plan
        live = self.n_out < self.max_new  # lanes with a token in flight
        # 1. the shared block, each token at its own step's cache row
        lanes = self._lanes(self.kv.cache_row(self.step, self.lane), live)
        gate = self.gate if self.gated else None
        self.h.copy_(m._run(self.h, lanes, plan.steps[0], "rec", None, self.kv, gate))
        self.step.copy_(self.step + live.long())
        self.live_rows.add_(live.sum())
        # 2. routing: which tokens go on to their next step
        go_on = self.step < plan.n_recursion
        if m.router is not None:
            for r in range(1, plan.n_recursion):
                route = m.router(r, self.h, lanes, self.state, "causal")
                at = self.step == r
                if route.keep is not None:
                    go_on = torch.where(at, route.keep, go_on)
                if self.gated:
                    self.gate.copy_(torch.where(at, route.gate.float(), self.gate))
        # 3. exits: last layer(s), LM head, sampling
        done = live & ~go_on
        x = m._run(self.h, self._lanes(self.lane, done), plan.coda, "post", None, self.kv)  # K/V kept: done
        logits = m.lm_head(m.norm(x))
        nxt = sample_next(logits, self.temperature, self.top_k)[:, 0]
        at = (self.lane, self.n_out.clamp(max=self.max_new - 1))  # where the sampled token goes
        self.out[at] = torch.where(done, nxt, self.out[at])
        read = (self.lane, self.n_out - 1)  # the token that just finished
        self.depths[read] = torch.where(done, self.step, self.depths[read])
        self.n_out.add_(done.long())
        self.pos.add_(done.long())
        self.step.copy_(torch.where(done, 0, self.step))
        # 4. entries: the sequences that go on feed their sampled token
        self._enter(done & (self.n_out < self.max_new))


# -----------------------------------------------------------------------------
# Export: a model without sharing is a LlamaForCausalLM, weight for weight

def export_hf(model, out_dir, tokenizer=None):
    """Write the model as a transformers LlamaForCausalLM directory. Our module names are
    Llama's, so the state dict maps by the 'model.' prefix. tokenizer: a data.Tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = model.config
    if cfg.sharing != "none" or cfg.router != "none":
        raise ValueError(f"only a vanilla model (sharing='none', router='none') exports to Llama; "
                         f"this one has sharing={cfg.sharing!r}, router={cfg.router!r}")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.n_embd // cfg.n_head, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(hf_cfg)
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
          for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export mapping is incomplete: missing {missing}, unexpected {unexpected}")
    hf.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.to_hf().save_pretrained(out_dir)
    return out_dir
