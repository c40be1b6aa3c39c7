"""
Attention over the tokens that are still active, and the K/V they leave behind.

Read model.py and router.py first: by the time a layer reaches attention, the
router has picked the tokens that run this recursion step and packed them into
an ActiveSet (router.py). Layers only ever see those packed tokens, [N, d]; this
file is where they meet the other tokens' keys and values. Two strategies from
the paper (section 2.3 "KV caching strategies"):

  recursion-wise  ('recursion')   At step r, attention runs only among the tokens
      active at r, and only their K/V are kept for step r. Expert-choice keeps
      capacity_r * T tokens at step r, so step r costs (capacity_r)^2 of full
      attention and the K/V memory over R steps is sum_r capacity_r of one full
      stack: (R+1)/2R of vanilla with the default schedule 1, (R-1)/R, ..., 1/R.

  share-first     ('share_first') Only the first recursion writes K/V, for every
      token; deeper steps project queries only and attend to that first-step
      cache. K/V memory is 1/R of the upper bound, deeper steps skip the K and V
      projections, but every deeper query reads the full-length cache.

Two classes implement one interface, `wants_kv(slot)` and
`attend(slot, q, k, v, active)`:
  SequenceKV  inside one forward pass over whole sequences (training, eval):
              keys are the call's own active tokens; nothing outlives the call.
  KVCache     generation: per-slot buffers that grow token by token, so prefill
              followed by decoding computes exactly what one causal pass does.

A *slot* names one layer application: ('pre', i) for the unshared first layers,
('rec', r, j) for layer j of the shared block at recursion step r, ('post', i)
for the unshared last layers.
"""
import torch
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Packed tokens <-> the [rows, K] grid that scaled_dot_product_attention wants.
# Linear layers and the MLP run on packed [N, ...] rows with no padding at all.
# Attention needs a rectangle: each batch row that has active tokens becomes one
# grid row of width K = its largest active count. Expert-choice keeps the same
# count in every row, so the grid is exactly full and packing is a free .view().
# Token-choice (and threshold routing at inference) keep different counts per
# row: the gaps are zero-padded, and masked as keys. We pad only here, inside
# attention, because flattening with per-sequence attention would need a varlen
# kernel that does not run on CPU, and flex_attention compiles per mask shape.

def to_grid(x, act):
    """[N, ...] packed -> [rows, K, ...] grid (pads are zeros)."""
    if act.slot is None:  # every grid row full: a pure reshape
        return x.view(act.n_rows, act.K, *x.shape[1:])
    grid = x.new_zeros(act.n_rows * act.K, *x.shape[1:])
    return grid.index_copy(0, act.slot, x).view(act.n_rows, act.K, *x.shape[1:])


def from_grid(y, act):
    """[rows, K, ...] grid -> [N, ...] packed (pads dropped)."""
    y = y.reshape(act.n_rows * act.K, *y.shape[2:])
    return y if act.slot is None else y.index_select(0, act.slot)


def sdpa(q, k, v, mask=None, is_causal=False, dropout_p=0.0):
    """q [rows, H, Kq, hd], k/v [rows, Hkv, Kk, hd]; grouped-query attention when Hkv < H."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          dropout_p=dropout_p, enable_gqa=k.shape[1] != q.shape[1])


def _shares_first(kv_mode, slot):
    """Share-first: deeper recursion steps read step 0's K/V and write none."""
    return kv_mode == "share_first" and slot[0] == "rec" and slot[1] > 0


# -----------------------------------------------------------------------------
# Inside one forward pass (training, evaluation, a causal pass for tests)

class SequenceKV:
    def __init__(self, kv_mode="recursion", dropout_p=0.0):
        self.kv_mode = kv_mode
        self.dropout_p = dropout_p
        self.first = {}  # share-first: layer j -> (k, v) written at step 0, [B, Hkv, T, hd]
        self.attn_pairs = 0  # (query, key) pairs attended: the FLOP counter reads this

    def wants_kv(self, slot):
        return not _shares_first(self.kv_mode, slot)

    def attend(self, slot, q, k, v, act):
        """q [N, H, hd]; k, v [N, Hkv, hd] or None (share-first deeper step). Returns [N, H*hd]."""
        qg = to_grid(q, act).transpose(1, 2)                          # (rows, H, K, hd)
        if _shares_first(self.kv_mode, slot):
            # Step r>0 reuses step 0's K/V of *every* token: query at position p
            # attends to all tokens at positions <= p, active here or not.
            kg, vg, key_pos = self.first[slot[2]]
            if not act.all_rows:
                kg, vg = kg[act.rows], vg[act.rows]
            mask = key_pos.view(1, 1, 1, -1) <= act.qpos[:, None, :, None]  # (rows, 1, K, T)
            self.attn_pairs += (act.pos + 1).sum()                            # keys at positions <= p
            y = sdpa(qg, kg, vg, mask, dropout_p=self.dropout_p)
        else:
            kg, vg = to_grid(k, act).transpose(1, 2), to_grid(v, act).transpose(1, 2)
            if self.kv_mode == "share_first" and slot[0] == "rec" and slot[1] == 0:
                assert act.slot is None and act.all_rows and act.K == act.T, "share-first needs every token at step 0"
                self.first[slot[2]] = (kg, vg, act.qpos[0])
            # Recursion-wise: queries and keys are the same active tokens, sorted
            # by position, so causal order in the grid is causal order in the text.
            # Ragged rows (token-choice) need no mask either: a row's real tokens fill
            # its first slots and pads come after them, so a real query's causal keys
            # (slots <= its own) are all real. Pad queries' outputs are dropped by
            # from_grid. Mask-free attention keeps the fused (flash) kernels.
            self.attn_pairs += (act.n_rows * act.K * (act.K + 1) // 2 if act.slot is None
                                else (act.counts * (act.counts + 1) // 2).sum())
            y = sdpa(qg, kg, vg, is_causal=True, dropout_p=self.dropout_p)
        return from_grid(y.transpose(1, 2), act).flatten(1)


# -----------------------------------------------------------------------------
# Generation: a cache per slot that holds just the tokens that reached it

class _Store:
    """K/V buffers for one layer position, rows = batch rows (or R * batch rows)."""
    def __init__(self, rows, n_kv_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(rows, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(rows, max_len, dtype=torch.long, device=device)  # position of each entry
        self.length = torch.zeros(rows, dtype=torch.long, device=device)        # valid entries per row
        self.bound = {}    # row offset -> python-side upper bound on length (no GPU sync to read it)
        self.uniform = {}  # row offset -> True while every row holds the same entries (no mask needed)


class KVCache:
    """Recursion-wise or share-first cache for batched generation.

    Storage per layer position of the shared block is one tensor of R*B rows
    (row r*B + b = sequence b at step r) under recursion-wise caching, or B rows
    under share-first. Each row is compacted: a token that skipped step r leaves
    no entry there, so a row's length at step r counts the tokens that reached r.
    """
    def __init__(self, model, batch_size, max_len=None):
        cfg = model.config
        self.kv_mode = cfg.kv_mode
        self.B = batch_size
        self.max_len = max_len or cfg.block_size
        self.n_kv_head, self.head_dim = cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.R = model.plan.n_recursion
        self.stores = {}   # ('pre', i) / ('rec', j) / ('post', i) -> _Store (created on first write)
        self.seq_len = 0   # tokens fed so far; the next token's position
        self.horizon = None  # continuous batching: rows differ in length; read this many slots (set per call)
        self.dropout_p = 0.0
        self.attn_pairs = 0

    def wants_kv(self, slot):
        return not _shares_first(self.kv_mode, slot)

    def _where(self, slot):
        """The store a slot reads and writes, and its row offset in that store.
        ('rec', None, j): continuous batching, the ActiveSet already holds storage rows."""
        if slot[0] != "rec" or slot[1] is None:
            return (slot if slot[0] != "rec" else ("rec", slot[2])), 0
        r = 0 if self.kv_mode == "share_first" else slot[1]
        return ("rec", slot[2]), r * self.B

    def attend(self, slot, q, k, v, act):
        key, off = self._where(slot)
        if k is not None:
            self._write(key, off, k, v, act)
        st = self.stores[key]
        L = self.horizon or st.bound[off]                              # upper bound on keys per row
        if act.all_rows:   # every batch row is in this call: slice, no copy
            sl = slice(off, off + self.B)
            kg, vg, lengths, key_pos = st.k[sl, :, :L], st.v[sl, :, :L], st.length[sl], st.pos[sl, :L]
        else:              # a subset of rows: gather them
            rows = act.rows + off
            kg, vg, lengths, key_pos = st.k[rows, :, :L], st.v[rows, :, :L], st.length[rows], st.pos[rows, :L]
        qg = to_grid(q, act).transpose(1, 2)                           # (rows, H, K, hd)
        is_causal, mask = False, None
        if act.slot is None and st.uniform[off] and L == act.K:
            is_causal = True   # the rows hold exactly this call's tokens: plain causal attention
        elif not (act.T == 1 and st.uniform[off]):
            # general case: a key is visible if it exists in its row and is not in the future.
            # (Decoding one token per row, with equal-length rows, needs no mask: the new
            # token is the latest, so it sees every entry.)
            valid = torch.arange(L, device=q.device) < lengths[:, None]                          # (rows, L)
            mask = (valid[:, None, :] & (key_pos[:, None, :] <= act.qpos[:, :, None]))[:, None]  # (rows,1,K,L)
        y = sdpa(qg, kg, vg, mask, is_causal=is_causal)
        return from_grid(y.transpose(1, 2), act).flatten(1)

    def _write(self, key, off, k, v, act):
        """Append the active tokens' K/V ([N, Hkv, hd]) at the end of their rows."""
        if key not in self.stores:
            rows = self.B * (self.R if key[0] == "rec" and self.kv_mode == "recursion" else 1)
            self.stores[key] = _Store(rows, self.n_kv_head, self.max_len, self.head_dim, k.dtype, k.device)
        st = self.stores[key]
        if self.horizon is None and st.bound.get(off, 0) + act.K > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} tokens); generate() re-prefills before this")
        b = act.b + off
        w = st.length[b] + act.s                                       # write index inside each row
        st.k[b, :, w] = k.to(st.k.dtype)
        st.v[b, :, w] = v.to(st.v.dtype)
        st.pos[b, w] = act.pos
        st.length.index_add_(0, act.rows + off, act.counts)
        st.uniform[off] = st.uniform.get(off, True) and act.all_rows and act.slot is None
        st.bound[off] = st.bound.get(off, 0) + act.K

    # -- memory accounting: bytes of K/V actually held ---------------------------
    def nbytes(self, part=None):
        """Bytes of K/V held (K and V, every entry written). part: None, 'pre', 'rec' or 'post'."""
        total = 0
        for key, st in self.stores.items():
            if part is None or key[0] == part:
                per_entry = 2 * st.k.shape[1] * st.k.shape[3] * st.k.element_size()
                total += int(st.length.sum()) * per_entry
        return total
