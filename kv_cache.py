"""
Who attends to whom in Mixture-of-Recursions, and which keys and values are kept.

Layers see only a step's packed tokens (model.py's ActiveSet, [N, d]); this file is
where they meet the other tokens' keys and values. It imports nothing from model.py: it
reads an ActiveSet's fields by name. Two strategies from the paper (section 2.3):

  recursion-wise  ('recursion')   At step r a token attends only to the earlier tokens
      active at r, and only their K/V are kept for step r. Expert-choice keeps
      capacity_r * T tokens at step r, so step r costs (capacity_r)^2 of full
      attention, and the K/V memory over R steps is sum_r capacity_r of one full
      stack: (R+1)/2R of vanilla with the default schedule 1, (R-1)/R, ..., 1/R.

  share-first     ('share_first') Only step 0 writes K/V, for every token; deeper steps
      project queries only and attend to that cache. K/V memory is 1/R of the upper
      bound and deeper steps skip the K and V projections, but every deeper query
      reads the full-length cache.

Two classes give one interface, `wants_kv(site)` and `attend(site, q, k, v, active)`:
  SequenceKV  one forward pass over whole sequences (training, evaluation): the keys
              are the call's own active tokens; nothing outlives the call.
  KVCache     generation: per-layer buffers that grow token by token, so prefill then
              decoding computes exactly what one causal pass does; also ContinuousBatching's
              Lanes, one token per sequence, each at its own step.
A cache passed to MoR.forward as kv (KVCache, diffusion.py's RefinementKV) also has
`seq_len`, the position of the call's first token, and `advance(depth)`, told what ran.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Lanes(NamedTuple):
    """ContinuousBatching's lanes (model.py): every lane in every call, so shapes never change."""
    flat: torch.Tensor       # [B] lane ids, index into per-lane state, like ActiveSet.flat
    row: torch.Tensor        # [B] the sequence of each lane (= flat), like ActiveSet.row
    pos: torch.Tensor        # [B] position of each lane's token
    cache_row: torch.Tensor  # [B] the cache row each lane reads and writes at this layer
    write: torch.Tensor      # [B] bool: lanes whose K/V are kept; the others leave nothing

    @property
    def n(self):
        return self.flat.numel()


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


def shares_first(kv_mode, site):
    """Share-first: deeper steps read step 0's K/V and write none."""
    return kv_mode == "share_first" and site.part == "rec" and site.step > 0


# -----------------------------------------------------------------------------
# Inside one forward pass (training, evaluation, a causal pass for tests)

class SequenceKV:
    def __init__(self, kv_mode="recursion", dropout_p=0.0, causal=True):
        self.kv_mode = kv_mode
        self.dropout_p = dropout_p
        self.causal = causal  # False: bidirectional (masked diffusion)
        self.first = {}  # share-first: layer index -> (k, v, key positions) written at step 0

    def wants_kv(self, site):
        return not shares_first(self.kv_mode, site)

    def attend(self, site, q, k, v, active):
        """q [N, H, hd]; k, v [N, Hkv, hd] or None (share-first deeper step). Returns [N, H*hd]."""
        qg = to_grid(q, active).transpose(1, 2)  # (rows, H, K, hd)
        if shares_first(self.kv_mode, site):
            kg, vg, key_pos = self.first[site.index]  # every token's: a query sees positions <= its own
            if not active.all_rows:
                kg, vg = kg[active.rows], vg[active.rows]
            mask = key_pos.view(1, 1, 1, -1) <= active.qpos[:, None, :, None]  # (rows, 1, K, T)
            y = sdpa(qg, kg, vg, mask if self.causal else None, dropout_p=self.dropout_p)
        else:
            kg, vg = to_grid(k, active).transpose(1, 2), to_grid(v, active).transpose(1, 2)
            if self.kv_mode == "share_first" and site.part == "rec" and site.step == 0:
                assert active.grid_index is None and active.all_rows and active.K == active.T, \
                    "share-first needs every token at step 0"
                self.first[site.index] = (kg, vg, active.qpos[0])
            # recursion-wise: queries and keys are the same active tokens, so is_causal over the grid
            # is exact (ActiveSet's comment) and keeps fused kernels; bidirectional masks ragged pads
            pads = None if self.causal or active.grid_index is None else \
                (torch.arange(active.K, device=q.device) < active.counts[:, None])[:, None, None, :]  # (rows,1,1,K)
            y = sdpa(qg, kg, vg, pads, is_causal=self.causal, dropout_p=self.dropout_p)
        return from_grid(y.transpose(1, 2), active).flatten(1)


# -----------------------------------------------------------------------------
# Generation: a cache per layer that holds just the tokens that reached it

class _Store:
    """K/V buffers for one layer: B rows (or R * B). One slot more than max_len: continuous
    batching sends the writes of lanes that keep nothing there."""
    def __init__(self, rows, n_kv_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(rows, n_kv_head, max_len + 1, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(rows, max_len + 1, dtype=torch.long, device=device)  # entry positions
        self.length = torch.zeros(rows, dtype=torch.long, device=device)  # valid entries per row
        self.bound = {}    # row offset -> host-side upper bound on length (read with no sync)
        self.uniform = {}  # row offset -> True while every row holds the same entries

    def put(self, row, at, k, v, pos):
        """Write K/V [N, Hkv, hd] and positions [N] at slot at[i] of row[i]."""
        self.k[row, :, at] = k.to(self.k.dtype)
        self.v[row, :, at] = v.to(self.v.dtype)
        self.pos[row, at] = pos


class KVCache:
    """Recursion-wise or share-first cache for batched generation. A layer of the shared
    block stores R*B rows (row r*B + b = sequence b at step r) recursion-wise, B rows
    share-first. Rows are compacted: a row's length at step r counts the tokens that
    reached r."""
    def __init__(self, model, batch_size):
        cfg = model.config
        if cfg.bidirectional:
            raise ValueError("KVCache is for autoregressive generation, not a bidirectional (masked-diffusion) "
                             "model: sample it with diffusion.py's AdaptiveRefiner, as sample.py does")
        self.kv_mode = cfg.kv_mode
        self.B = batch_size
        self.max_len = cfg.block_size
        self.n_kv_head, self.head_dim = cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.R = model.plan.n_recursion
        self.stores = {}  # (part, index) -> _Store, created on first write
        self.seq_len = 0  # tokens fed so far: the next token's position
        # the FLOP counter model.py's count_flops reads: tokens of each row that ran step r, [B, R]
        self.reached = torch.zeros(batch_size, self.R, dtype=torch.long, device=model.rope_cos.device)

    def advance(self, depth):
        """Record a finished forward call: depth [B, T] of its tokens."""
        self.seq_len += depth.shape[1]
        steps = torch.arange(self.R, device=depth.device)
        self.reached = self.reached + (depth[..., None] > steps).sum(1)  # new tensor: old ones stay valid

    def cache_row(self, step, lane):
        """The recursion-wise cache row of sequence `lane` at `step` (ContinuousBatching)."""
        return step * self.B + lane

    def wants_kv(self, site):
        return not shares_first(self.kv_mode, site)

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
        L = st.bound[off]  # upper bound on keys per row
        rows = slice(off, off + self.B) if active.all_rows else active.rows + off  # a slice: no copy
        kg, vg, lengths, key_pos = st.k[rows, :, :L], st.v[rows, :, :L], st.length[rows], st.pos[rows, :L]
        qg = to_grid(q, active).transpose(1, 2)  # (rows, H, K, hd)
        is_causal, mask = False, None
        if active.grid_index is None and st.uniform[off] and L == active.K:
            is_causal = True  # the rows hold exactly this call's tokens: plain causal attention
        elif not (active.T == 1 and st.uniform[off]):
            # a key is visible if it exists in its row and is not in the future (one new token
            # per row over equal-length rows is the latest, sees every entry: no mask)
            valid = torch.arange(L, device=q.device) < lengths[:, None]                             # (rows, L)
            mask = (valid[:, None, :] & (key_pos[:, None, :] <= active.qpos[:, :, None]))[:, None]  # (rows,1,K,L)
        y = sdpa(qg, kg, vg, mask, is_causal=is_causal)
        return from_grid(y.transpose(1, 2), active).flatten(1)

    def _write(self, key, off, k, v, active):
        """Append the active tokens' K/V ([N, Hkv, hd]) at the end of their rows."""
        if key not in self.stores:
            rows = self.B * (self.R if key[0] == "rec" and self.kv_mode == "recursion" else 1)
            self.stores[key] = _Store(rows, self.n_kv_head, self.max_len, self.head_dim, k.dtype, k.device)
        st = self.stores[key]
        if st.bound.get(off, 0) + active.K > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} tokens): re-prefill, as generate() does")
        row = active.row + off
        st.put(row, st.length[row] + active.rank, k, v, active.pos)  # after each row's entries
        st.length.index_add_(0, active.rows + off, active.counts)
        st.uniform[off] = st.uniform.get(off, True) and active.all_rows and active.grid_index is None
        st.bound[off] = st.bound.get(off, 0) + active.K

    def _attend_lanes(self, site, q, k, v, lanes):
        """One query per lane against its own cache row, shapes fixed: new K/V go to the end of
        the row (lanes that keep nothing write the scratch slot), every row is read in full with
        its empty slots masked. No host sync, no Python state."""
        st = self.stores[(site.part, site.index)]  # prefill created every store
        rows = lanes.cache_row
        if k is not None:
            st.put(rows, torch.where(lanes.write, st.length[rows], self.max_len), k, v, lanes.pos)
            st.length[rows] = st.length[rows] + lanes.write.long()
        # every entry of a lane's row is this sequence, at this step, at or before this position
        visible = torch.arange(self.max_len + 1, device=q.device) < st.length[rows][:, None]  # (B, L)
        y = sdpa(q[:, :, None], st.k[rows], st.v[rows], visible[:, None, None, :])  # (B, H, 1, hd)
        return y.flatten(1)

    # -- memory accounting: bytes of K/V actually held ---------------------------
    def nbytes(self, part=None):
        """Bytes of K and V held, every entry written. part: None, 'pre', 'rec' or 'post'."""

        total = 0
        for key, st in self.stores.items():
            if part is None or key[0] == part:
                per_entry = 2 * st.k.shape[1] * st.k.shape[3] * st.k.element_size()
                total += int(st.length.sum()) * per_entry
        return total
