"""
Who attends to whom in Mixture-of-Recursions, and which keys and values are kept.

Read model.py and router.py first. By the time a layer reaches attention, the router
has picked the tokens that run this recursion step, and model.py has packed them into
an ActiveSet (below). Layers only ever see those packed tokens, [N, d]; this file is
where they meet the other tokens' keys and values. Two strategies from the paper
(section 2.3, "KV caching strategies"):

  recursion-wise  ('recursion')   At step r, a token attends only to the tokens that
      are active at r (and came before it), and only their K/V are kept for step r.
      Expert-choice keeps capacity_r * T tokens at step r, so step r costs
      (capacity_r)^2 of full attention, and the K/V memory over R steps is
      sum_r capacity_r of one full stack: (R+1)/2R of vanilla with the default
      schedule 1, (R-1)/R, ..., 1/R.

  share-first     ('share_first') Only the first recursion step writes K/V, for every
      token; deeper steps project queries only and attend to that first-step cache.
      K/V memory is 1/R of the upper bound and deeper steps skip the K and V
      projections, but every deeper query reads the full-length cache.

Two classes give one interface, `wants_kv(site)` and `attend(site, q, k, v, active)`:
  SequenceKV  inside one forward pass over whole sequences (training, evaluation):
              the keys are the call's own active tokens; nothing outlives the call.
  KVCache     generation: per-layer buffers that grow token by token, so prefill
              followed by decoding computes exactly what one causal pass does.

ContinuousBatching (the end of the file) decodes with one call of the shared block per tick for every
sequence at once, each sequence's token at its own step, reading and writing that step's cache row.

A `Site` names one layer application: Site('pre', None, i) for the unshared first
layers, Site('rec', r, j) for layer j of the shared block at recursion step r,
Site('post', None, i) for the unshared last layers.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from router import RouteState


class Site(NamedTuple):
    """One layer application. part: 'pre' | 'rec' | 'post'; step: the recursion step of a
    'rec' site (None elsewhere, and None for continuous batching, whose tokens each sit
    at their own step, folded into their cache row: see KVCache.cache_row); index: the
    layer inside its part."""
    part: str
    step: Optional[int]
    index: int


# -----------------------------------------------------------------------------
# Depth-wise batching: the tokens that run one step, packed
#
# Linear layers and the MLP run on packed [N, d] rows with no padding at all.
# Attention needs a rectangle: each batch row that has active tokens becomes one grid
# row of width K = its largest active count. Expert-choice keeps the same count in
# every row, so the grid is exactly full and packing is a free .view(). Token-choice
# (and threshold routing at inference) keeps different counts per row: the gaps are
# zero-padded. A row's real tokens fill its first grid slots and pads come after
# them, so a causal mask over grid slots is already exact for the real tokens; the
# pads' outputs are dropped. We pad only here, inside attention, because a varlen
# kernel does not run on the CPU and flex_attention compiles per mask shape.

@dataclass
class ActiveSet:
    """The tokens of one forward call ([B, T] tokens, flattened) that run a step.

    Tokens are listed row by row, in position order, so causal order survives packing.
    """
    flat: torch.Tensor         # [N] index into the call's B*T tokens (the gather/scatter index)
    row: torch.Tensor          # [N] batch row of each token (a cache row for continuous batching)
    rank: torch.Tensor         # [N] rank of the token among its row's active tokens
    pos: torch.Tensor          # [N] absolute position (rotary angle, causal masks)
    rows: torch.Tensor         # [n_rows] batch rows with at least one active token
    counts: torch.Tensor       # [n_rows] active tokens in each of those rows
    qpos: torch.Tensor         # [n_rows, K] position at each grid slot (pads: later than everything)
    grid_index: Optional[torch.Tensor]   # [N] flat grid slot of each token; None when the grid is full
    B: int                     # rows of the call
    T: int                     # tokens per row in the call
    K: int                     # grid width: the most active tokens in any row
    all_rows: bool             # rows == every batch row, in order
    start: int                 # position of the call's first token (tokens already in the cache)

    @property
    def n(self):
        return self.flat.numel()

    @property
    def n_rows(self):
        return self.rows.numel()

    @staticmethod
    def everyone(B, T, start, device):
        """All B*T tokens: unshared layers, vanilla layers, and steps that keep everyone."""
        flat = torch.arange(B * T, device=device)
        pos = start + flat % T
        return ActiveSet(flat=flat, row=flat // T, rank=flat % T, pos=pos, rows=torch.arange(B, device=device),
                         counts=torch.full((B,), T, device=device), qpos=pos.view(B, T), grid_index=None,
                         B=B, T=T, K=T, all_rows=True, start=start)

    def subset(self, keep, per_row=None):
        """The tokens of this set where keep [N] is True (hierarchical selection), and the
        index of each kept token in this set [N'].

        per_row: every row keeps exactly this many (expert-choice top-k on a full grid).
        The result is then a full grid again, built without reading the mask on the host.
        """
        if per_row is not None:
            assert self.grid_index is None and self.all_rows, "per-row selection needs a full grid"
            # a stable descending sort puts each row's kept slots first, in position order
            cols = keep.view(self.B, self.K).to(torch.int32).sort(dim=1, descending=True, stable=True).indices
            picked = (torch.arange(self.B, device=keep.device)[:, None] * self.K + cols[:, :per_row]).view(-1)
            flat = self.flat[picked]
            pos = self.start + flat % self.T
            rows = torch.arange(self.B, device=keep.device)
            return ActiveSet(flat=flat, row=rows.repeat_interleave(per_row),
                             rank=torch.arange(per_row, device=keep.device).repeat(self.B), pos=pos, rows=rows,
                             counts=torch.full((self.B,), per_row, device=keep.device),
                             qpos=pos.view(self.B, per_row), grid_index=None, B=self.B, T=self.T, K=per_row,
                             all_rows=True, start=self.start), picked
        picked = keep.nonzero().squeeze(1)
        mask = torch.zeros(self.B * self.T, dtype=torch.bool, device=keep.device)
        mask[self.flat[picked]] = True
        return ActiveSet._from_mask(mask.view(self.B, self.T), self.start), picked

    @staticmethod
    def _from_mask(mask, start):
        """Any subset: mask [B, T] bool. Rows may keep different counts (ragged)."""
        B, T = mask.shape
        dev = mask.device
        per_row = mask.sum(1)                                    # [B]
        rows = per_row.nonzero().squeeze(1)                      # rows with any active token
        flat = mask.view(-1).nonzero().squeeze(1)                # row-major: causal order kept
        n_rows, N = rows.numel(), flat.numel()
        K = int(per_row.max()) if N else 0
        row, t = flat // T, flat % T
        rank = torch.arange(N, device=dev) - (per_row.cumsum(0) - per_row)[row]   # rank inside the row
        grid_row = torch.zeros(B, dtype=torch.long, device=dev)
        grid_row[rows] = torch.arange(n_rows, device=dev)
        grid_index = grid_row[row] * K + rank
        qpos = torch.full((n_rows * K,), 2**40, dtype=torch.long, device=dev)  # pads: after everything
        qpos = qpos.index_copy(0, grid_index, start + t).view(n_rows, K)
        full = N == n_rows * K
        return ActiveSet(flat=flat, row=row, rank=rank, pos=start + t, rows=rows, counts=per_row[rows], qpos=qpos,
                         grid_index=None if full else grid_index, B=B, T=T, K=K, all_rows=n_rows == B, start=start)


class Lanes(NamedTuple):
    """Continuous depth-wise batching (ContinuousBatching, at the end of this file): one token per sequence
    ("lane"), each at its own recursion step, every lane in every call. Shapes never change
    from call to call, so a compiled call can be captured once (a CUDA graph on a GPU)."""
    flat: torch.Tensor        # [B] lane ids: index into per-lane state (RouteState), like ActiveSet.flat
    row: torch.Tensor         # [B] the sequence of each lane (= flat), like ActiveSet.row
    pos: torch.Tensor         # [B] position of each lane's token
    cache_row: torch.Tensor   # [B] the cache row each lane reads and writes at this layer
    write: torch.Tensor       # [B] bool: lanes whose K/V are kept; the others run and leave nothing


def to_grid(x, active):
    """[N, ...] packed -> [rows, K, ...] grid (pads are zeros)."""
    if active.grid_index is None:  # every grid row full: a pure reshape
        return x.view(active.n_rows, active.K, *x.shape[1:])
    grid = x.new_zeros(active.n_rows * active.K, *x.shape[1:])
    return grid.index_copy(0, active.grid_index, x).view(active.n_rows, active.K, *x.shape[1:])


def from_grid(y, active):
    """[rows, K, ...] grid -> [N, ...] packed (pads dropped)."""
    y = y.reshape(active.n_rows * active.K, *y.shape[2:])
    return y if active.grid_index is None else y.index_select(0, active.grid_index)


def sdpa(q, k, v, mask=None, is_causal=False, dropout_p=0.0, scale=None):
    """q [rows, H, Kq, hd], k/v [rows, Hkv, Kk, hd]; grouped-query attention when Hkv < H.
    mask: bool, True = may attend. is_causal: top-left aligned (query i sees keys <= i)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _shares_first(kv_mode, site):
    """Share-first: deeper recursion steps read step 0's K/V and write none."""
    return kv_mode == "share_first" and site.part == "rec" and site.step > 0


# -----------------------------------------------------------------------------
# Inside one forward pass (training, evaluation, a causal pass for tests)

class SequenceKV:
    def __init__(self, kv_mode="recursion", dropout_p=0.0, causal=True):
        self.kv_mode = kv_mode
        self.dropout_p = dropout_p
        self.causal = causal  # False: bidirectional, every token sees every token (masked diffusion)
        self.first = {}  # share-first: layer index -> (k, v, key positions) written at step 0

    def wants_kv(self, site):
        return not _shares_first(self.kv_mode, site)

    def attend(self, site, q, k, v, active):
        """q [N, H, hd]; k, v [N, Hkv, hd] or None (share-first deeper step). Returns [N, H*hd]."""
        qg = to_grid(q, active).transpose(1, 2)                           # (rows, H, K, hd)
        if _shares_first(self.kv_mode, site):
            # Step r > 0 reuses step 0's K/V of *every* token: the query at position p
            # attends to all tokens at positions <= p, active at this step or not.
            kg, vg, key_pos = self.first[site.index]
            if not active.all_rows:
                kg, vg = kg[active.rows], vg[active.rows]
            mask = key_pos.view(1, 1, 1, -1) <= active.qpos[:, None, :, None]   # (rows, 1, K, T)
            y = sdpa(qg, kg, vg, mask if self.causal else None, dropout_p=self.dropout_p)
        else:
            kg, vg = to_grid(k, active).transpose(1, 2), to_grid(v, active).transpose(1, 2)
            if self.kv_mode == "share_first" and site.part == "rec" and site.step == 0:
                assert active.grid_index is None and active.all_rows and active.K == active.T, \
                    "share-first needs every token at step 0"
                self.first[site.index] = (kg, vg, active.qpos[0])
            # Recursion-wise: queries and keys are the same active tokens, sorted by
            # position, so causal order in the grid is causal order in the text, and
            # ragged rows need no mask either (pads come after a row's real tokens).
            # Mask-free attention keeps the fused (flash) kernels. Bidirectional attention
            # needs a mask only to hide the pads of ragged rows.
            pads = None if self.causal or active.grid_index is None else \
                (torch.arange(active.K, device=q.device) < active.counts[:, None])[:, None, None, :]  # (rows,1,1,K)
            y = sdpa(qg, kg, vg, pads, is_causal=self.causal, dropout_p=self.dropout_p)
        return from_grid(y.transpose(1, 2), active).flatten(1)


# -----------------------------------------------------------------------------
# Generation: a cache per layer that holds just the tokens that reached it

class _Store:
    """K/V buffers for one layer of the model, rows = batch rows (or R * batch rows). One slot
    more than max_len: continuous batching sends the writes of lanes that keep nothing there."""
    def __init__(self, rows, n_kv_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(rows, n_kv_head, max_len + 1, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(rows, max_len + 1, dtype=torch.long, device=device)  # position of each entry
        self.length = torch.zeros(rows, dtype=torch.long, device=device)        # valid entries per row
        self.bound = {}    # row offset -> python-side upper bound on length (no GPU sync to read it)
        self.uniform = {}  # row offset -> True while every row holds the same entries (no mask needed)


class KVCache:
    """Recursion-wise or share-first cache for batched generation.

    Storage per layer of the shared block is one tensor of R*B rows (row r*B + b =
    sequence b at step r) under recursion-wise caching, or B rows under share-first.
    Each row is compacted: a token that skipped step r leaves no entry there, so a
    row's length at step r counts the tokens that reached r.
    """
    def __init__(self, model, batch_size, max_len=None):
        cfg = model.config
        if cfg.bidirectional:
            raise ValueError("KVCache is for autoregressive generation, and this model attends bidirectionally "
                             "(a masked-diffusion model): sample it with diffusion.py's AdaptiveRefiner "
                             "(sample.py does this for a diffusion checkpoint)")
        self.kv_mode = cfg.kv_mode
        self.B = batch_size
        self.max_len = max_len or cfg.block_size
        self.n_kv_head, self.head_dim = cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.R = model.plan.n_recursion
        self.stores = {}   # (part, index) -> _Store, created on first write
        self.seq_len = 0   # tokens fed so far: the next token's position
        # tokens of each row that ran recursion step r so far, [B, R] (FLOP counting in model.py)
        self.reached = torch.zeros(batch_size, self.R, dtype=torch.long, device=model.rope_cos.device)

    def advance(self, depth):
        """Record a finished forward call: depth [B, T] of its tokens."""
        self.seq_len += depth.shape[1]
        steps = torch.arange(self.R, device=depth.device)
        self.reached = self.reached + (depth[..., None] > steps).sum(1)   # a new tensor: old counts stay valid

    def cache_row(self, step, lane):
        """Continuous batching: the recursion-wise cache row of sequence `lane` at `step`."""
        return step * self.B + lane

    def wants_kv(self, site):
        return not _shares_first(self.kv_mode, site)

    def _where(self, site):
        """The store a site reads and writes, and its row offset in that store."""
        if site.part != "rec":
            return (site.part, site.index), 0
        r = 0 if self.kv_mode == "share_first" else site.step
        return ("rec", site.index), r * self.B

    def attend(self, site, q, k, v, active):
        if isinstance(active, Lanes):
            return self._attend_lanes(site, q, k, v, active)
        key, off = self._where(site)
        if k is not None:
            self._write(key, off, k, v, active)
        st = self.stores[key]
        L = st.bound[off]                                                # upper bound on keys per row
        if active.all_rows:   # every batch row is in this call: slice, no copy
            sl = slice(off, off + self.B)
            kg, vg, lengths, key_pos = st.k[sl, :, :L], st.v[sl, :, :L], st.length[sl], st.pos[sl, :L]
        else:                 # a subset of rows: gather them
            rows = active.rows + off
            kg, vg, lengths, key_pos = st.k[rows, :, :L], st.v[rows, :, :L], st.length[rows], st.pos[rows, :L]
        qg = to_grid(q, active).transpose(1, 2)                          # (rows, H, K, hd)
        is_causal, mask = False, None
        if active.grid_index is None and st.uniform[off] and L == active.K:
            is_causal = True   # the rows hold exactly this call's tokens: plain causal attention
        elif not (active.T == 1 and st.uniform[off]):
            # general case: a key is visible if it exists in its row and is not in the future.
            # (Decoding one token per row, with equal-length rows, needs no mask: the new
            # token is the latest, so it sees every entry.)
            valid = torch.arange(L, device=q.device) < lengths[:, None]                              # (rows, L)
            mask = (valid[:, None, :] & (key_pos[:, None, :] <= active.qpos[:, :, None]))[:, None]   # (rows,1,K,L)
        y = sdpa(qg, kg, vg, mask, is_causal=is_causal)
        return from_grid(y.transpose(1, 2), active).flatten(1)

    def _write(self, key, off, k, v, active):
        """Append the active tokens' K/V ([N, Hkv, hd]) at the end of their rows."""
        if key not in self.stores:
            rows = self.B * (self.R if key[0] == "rec" and self.kv_mode == "recursion" else 1)
            self.stores[key] = _Store(rows, self.n_kv_head, self.max_len, self.head_dim, k.dtype, k.device)
        st = self.stores[key]
        if st.bound.get(off, 0) + active.K > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} tokens); generate() re-prefills before this")
        row = active.row + off
        at = st.length[row] + active.rank                                # write index inside each row
        st.k[row, :, at] = k.to(st.k.dtype)
        st.v[row, :, at] = v.to(st.v.dtype)
        st.pos[row, at] = active.pos
        st.length.index_add_(0, active.rows + off, active.counts)
        st.uniform[off] = st.uniform.get(off, True) and active.all_rows and active.grid_index is None
        st.bound[off] = st.bound.get(off, 0) + active.K

    def _attend_lanes(self, site, q, k, v, lanes):
        """One query per lane against its own cache row, with shapes that never change: the
        new K/V go to the end of the row (lanes that keep nothing write the scratch slot),
        and every row is read in full, its empty slots masked. No host sync, no Python state."""
        st = self.stores[(site.part, site.index)]       # prefill created every store
        rows = lanes.cache_row
        if k is not None:
            at = torch.where(lanes.write, st.length[rows], self.max_len)   # (B,) write slot
            st.k[rows, :, at] = k.to(st.k.dtype)
            st.v[rows, :, at] = v.to(st.v.dtype)
            st.pos[rows, at] = lanes.pos
            st.length[rows] = st.length[rows] + lanes.write.long()
        # every entry of a lane's row is this sequence, at this step, at or before this position
        visible = torch.arange(self.max_len + 1, device=q.device) < st.length[rows][:, None]   # (B, L)
        y = sdpa(q[:, :, None], st.k[rows], st.v[rows], visible[:, None, None, :])            # (B, H, 1, hd)
        return y.flatten(1)

    # -- memory accounting: bytes of K/V actually held ---------------------------
    def nbytes(self, part=None):
        """Bytes of K/V held (K and V, every entry written). part: None, 'pre', 'rec' or 'post'."""
        total = 0
        for key, st in self.stores.items():
            if part is None or key[0] == part:
                per_entry = 2 * st.k.shape[1] * st.k.shape[3] * st.k.element_size()
                total += int(st.length.sum()) * per_entry
        return total


# -----------------------------------------------------------------------------
# Continuous depth-wise batching (the paper's section 2.3 throughput engine): lanes over the cache's step rows

class ContinuousBatching:
    """Decode B sequences so that every call of the shared block is a full batch.

    generate() runs recursion step r on the rows whose token reached step r, so its
    calls shrink step by step, and at decode a call costs about the same with 3 rows
    as with 32 (reading the block's weights dominates). Here each sequence is a *lane*
    with one token in flight, and one *tick* runs the shared block once on the tokens of
    all lanes, whatever step each is at: the weights are the same at every step, so one
    call serves them all.

    The algorithm, per tick (all of it on all B lanes, with per-lane masks):
      1. run the shared block on every lane's token; each reads and writes the cache row
         of its own step (KVCache.cache_row), and the gated update h <- h + g * f(h);
      2. ask the router, step by step, which tokens go on (router.py's one interface);
      3. a token that stops runs the unshared last layer(s), the LM head and sampling;
      4. its sequence's next token enters at once: embedding, unshared first layer(s),
         the step-0 routing decision; it runs the block in the next tick.
    A token costs exactly its depth in block rows, and each token sees exactly what it
    sees in generate(), so greedy outputs are the same (tests check both).

    Why every lane runs every part of the tick: the shapes never change, so there is no
    host sync and nothing data-dependent, and compile=True captures the tick whole
    (torch.compile fullgraph; on a GPU, mode='reduce-overhead' replays it as one CUDA
    graph). The price: the unshared layers, the LM head and the embedding run on every
    lane in every tick, where only the lanes whose token exits or enters need them, and a
    lane whose sequence is finished idles in the block until all are. With sharing='cycle'
    there are no unshared layers, and the LM head is what is left. A vanilla model
    (R = 1) runs here too: every token exits after one tick.

    Needs recursion-wise caching, one block for every step (cycle or middle_cycle sharing)
    and capacity 1 at step 0. The prompt is prefilled as in generate(). Sampling at
    temperature > 0 draws for every lane, so its random stream differs from generate()'s.
    """

    def __init__(self, model, idx, max_new_tokens, temperature=1.0, top_k=None, compile=False):
        cfg, plan = model.config, model.plan
        if cfg.kv_mode != "recursion" or not (plan.n_recursion == 1 or cfg.sharing.endswith("cycle")):
            raise ValueError("continuous depth-wise batching needs one block for every step (sharing cycle or "
                             "middle_cycle) and kv_mode='recursion'")
        if cfg.router == "expert_choice" and cfg.capacity_schedule(plan.n_recursion)[0] < 1:
            raise ValueError("continuous depth-wise batching needs capacity 1 at step 0")
        B, T0 = idx.shape
        if T0 + max_new_tokens > cfg.block_size:
            raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceed block_size "
                             f"{cfg.block_size}: continuous decoding does not re-prefill")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        from model import sample_next      # here, not at the top: model.py imports this file
        self.sample_next = sample_next
        self.model, self.idx, self.max_new = model, idx, max_new_tokens
        self.temperature, self.top_k = temperature, top_k
        self.gated = model.router is not None and model.router.gated
        dev = idx.device
        self.kv = KVCache(model, B)
        self.lane = torch.arange(B, device=dev)
        # per-lane state, updated in place (so a captured graph always finds it at the same address)
        self.out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)      # generated tokens
        self.n_out = torch.ones(B, dtype=torch.long, device=dev)                     # tokens generated per lane
        self.depths = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)   # depth of each decoded token
        self.pos = torch.full((B,), T0, dtype=torch.long, device=dev)                # position of the lane's token
        self.h = torch.zeros(B, cfg.n_embd, device=dev, dtype=model.embed_tokens.weight.dtype)
        self.step = torch.zeros(B, dtype=torch.long, device=dev)                     # the step it runs next
        self.gate = torch.ones(B, device=dev)                                        # its gate at that step
        self.block_rows = torch.zeros((), dtype=torch.long, device=dev)              # lanes with a live token, summed
        self.state = RouteState(B)                     # token-choice: each lane's chosen depth
        self.state.depth = torch.zeros(B, dtype=torch.long, device=dev)
        self.state.prob = torch.ones(B, device=dev)
        self.tick = self._tick
        if compile:
            mode = "reduce-overhead" if dev.type == "cuda" else None    # reduce-overhead = CUDA graphs
            self.tick = torch.compile(self._tick, fullgraph=True, mode=mode)

    @torch.no_grad()
    def run(self):
        """Returns (idx [B, T0 + new], depths [B, new - 1] of the decoded tokens, stats)."""
        m = self.model
        logits, _ = m(self.idx, kv=self.kv, rule="causal", last_only=True)       # prefill, as in generate()
        self.out[:, 0] = self.sample_next(logits[:, -1], self.temperature, self.top_k)[:, 0]
        if self.idx.device.type == "cuda":     # let a CUDA graph mutate the state and the cache in place
            for t in [self.out, self.n_out, self.depths, self.pos, self.h, self.step, self.gate, self.block_rows,
                      self.state.depth, self.state.prob, *(x for st in self.kv.stores.values()
                                                         for x in (st.k, st.v, st.pos, st.length))]:
                torch._dynamo.mark_static_address(t)
        self._enter(self.n_out < self.max_new)
        ticks = 0
        while True:
            self.tick()
            ticks += 1
            if ticks % 4 == 0 and not bool((self.n_out < self.max_new).any()):   # one host sync per 4 ticks
                break
        stats = {"ticks": ticks, "block_rows": int(self.block_rows),
                 "rows_per_block_call": int(self.block_rows) / ticks}
        return torch.cat((self.idx, self.out), dim=1), self.depths[:, :-1], stats

    def _lanes(self, cache_row, write):
        return Lanes(flat=self.lane, row=self.lane, pos=self.pos, cache_row=cache_row, write=write)

    def _edge_layers(self, x, part, write):
        """The unshared first ('pre') or last ('post') layer(s) on every lane; K/V kept where `write`."""
        m, plan = self.model, self.model.plan
        first = 0 if part == "pre" else plan.n_pre + plan.n_shared
        for i in range(plan.n_pre if part == "pre" else plan.n_post):
            x = m.layers[first + i](x, m.rope(self.pos), self.kv, Site(part, None, i), self._lanes(self.lane, write))
        return x

    def _enter(self, entering):
        """A new token for the lanes in `entering`: embedding, first layer(s), step-0 routing."""
        m = self.model
        x = m.embed_tokens(self.out[self.lane, (self.n_out - 1).clamp(max=self.max_new - 1)])
        x = self._edge_layers(x, "pre", entering)
        self.h.copy_(torch.where(entering[:, None], x.to(self.h.dtype), self.h))
        if m.router is not None:
            kept_depth, kept_prob = self.state.depth.clone(), self.state.prob.clone()
            route = m.router(0, x, self._lanes(self.lane, entering), self.state, "causal")
            assert route.keep is None, "step 0 takes every token"
            self.state.depth.copy_(torch.where(entering, self.state.depth, kept_depth))  # the others keep theirs
            self.state.prob.copy_(torch.where(entering, self.state.prob, kept_prob))
            if self.gated:
                self.gate.copy_(torch.where(entering, route.gate.float(), self.gate))

    def _tick(self):
        """One call of the shared block on every lane, then exits and entries."""
        m, plan = self.model, self.model.plan
        live = self.n_out < self.max_new                                  # lanes with a token in flight
        # 1. the shared block, each token at its own step's cache row
        lanes = self._lanes(self.kv.cache_row(self.step, self.lane), live)
        x_in = x = self.h
        for j, li in enumerate(plan.steps[0]):                           # the block, the same at every step
            x = m.layers[li](x, m.rope(self.pos), self.kv, Site("rec", None, j), lanes)
        if self.gated:
            x = x_in + self.gate[:, None].to(x.dtype) * (x - x_in)       # h <- h + g * f(h)
        self.h.copy_(x)
        self.step.copy_(self.step + live.long())
        self.block_rows.add_(live.sum())
        # 2. routing: which tokens go on to the step they are now at
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
        logits = m.lm_head(m.norm(self._edge_layers(self.h, "post", done)))
        nxt = self.sample_next(logits, self.temperature, self.top_k)[:, 0]
        at = (self.lane, self.n_out.clamp(max=self.max_new - 1))          # where the sampled token goes
        self.out[at] = torch.where(done, nxt, self.out[at])
        read = (self.lane, self.n_out - 1)                               # the token that just finished its depth
        self.depths[read] = torch.where(done, self.step, self.depths[read])
        self.n_out.add_(done.long())
        self.pos.add_(done.long())
        self.step.copy_(torch.where(done, 0, self.step))
        # 4. entries: the sequences that go on feed the token they just sampled
        self._enter(done & (self.n_out < self.max_new))
