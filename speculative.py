"""
Lossless self-speculative decoding for the depth adapter (hf_wrap.py): a cheap draft, one full-depth verify pass,
and the output is exactly the full model's. Read hf_wrap.py first. The one entry point:

    out, stats = speculative.generate(DepthAdapter(model, router="skip", router_path="routers.pt"), ids, K=4)
    python sample.py --hf smollm2-135m --routers=out-spec-draft/routers.pt --speculative=4   # --no_skip's text

Three draft sources, one verification:
  the adapter's routing   any router (a trained router file, fixed depth, dropped layers, CALM exits, a trained exit
                          head: `python tune.py config/hf_spec_draft.py`)
  a drafter               Drafter (below), a small MLP on the full model's final state and the token it chose
                          (`python tune.py config/hf_spec_drafter.py`): a draft runs no layer at all
  prompt lookup           lookup=n: the tokens that followed the text's last n tokens earlier in it, no model call
Draft, verify, accept, emit: an algorithm of its own on the adapter's public primitives (new_cache, forward_chunk,
AdapterCache.realign).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import hf_wrap
from hf_wrap import (DRAFTER_FILE_FORMAT, head_rows, load_router_file, now, save_router_file, spread,
                     timing_stats)
from model import token_probs


# -----------------------------------------------------------------------------
# A draft source on top of the full model (tune.py --drafter=True trains it)

class Drafter(nn.Module):
    """A recurrent drafter (ReDrafter, Cheng et al. 2024; the idea of Medusa, Hydra and EAGLE: draft from the
    full model's last state, which a verify pass computes anyway). After the full model ran at position t,
    s = its final state there (before the final norm) and x = the token it chose for t + 1. Then
        s <- s + up(silu(down([rms_norm(s); rms_norm(embed(x))])))       one step: no layer of the model runs
        q  = softmax(head_rows(norm(s)))                                 the draft for token t + 2
    and again from (s, the drafted token) for t + 3, ... A draft costs one small MLP and the LM head's rows for
    `vocab` (as ExitHead's): a few percent of a decode step."""

    def __init__(self, hidden_size, vocab, hidden=512, eps=1e-5):
        super().__init__()
        self.hidden = hidden
        self.register_buffer("vocab", torch.as_tensor(vocab, dtype=torch.long))
        self.down = nn.Linear(2 * hidden_size, hidden, bias=False)
        self.up = nn.Linear(hidden, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def step(self, s, e):
        """s (..., C) the state so far, e (..., C) the embedding of the token after it -> the next state."""
        s, e = s.float(), e.float()
        C = s.shape[-1]
        return s + self.up(F.silu(self.down(torch.cat([F.rms_norm(s, (C,)), F.rms_norm(e, (C,))], -1))))

    def forward(self, s, head_weight):
        """s (..., C) a state from step(); head_weight (V', C) the LM head's rows for vocab -> logits (..., V')."""
        return F.linear(self.norm(s).to(head_weight.dtype), head_weight)


def new_drafter(model, vocab=None, hidden=512):
    """An untrained Drafter for `model` (vocab None: every token), its norm copied from the model's final norm."""
    cfg = model.config
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"drafter hidden={hidden!r}: the width of its MLP, an int >= 1 (512 is a good start).")
    vocab = torch.arange(cfg.vocab_size) if vocab is None else vocab
    drafter = Drafter(cfg.hidden_size, vocab, hidden, model.model.norm.variance_epsilon)
    drafter.norm.weight.data.copy_(model.model.norm.weight.float())
    return drafter.to(model.get_input_embeddings().weight.device)


def save_drafter(path, drafter, hf_model, **meta):
    save_router_file(path, DRAFTER_FILE_FORMAT, drafter, hf_model.config, {
        "router": "drafter", "hidden": drafter.hidden, "head_vocab": drafter.vocab.numel()}, **meta)


def load_drafter(path, model, tune_command="python tune.py"):
    """-> (Drafter, the file's dict)."""
    def make(blob):
        return Drafter(model.config.hidden_size, torch.zeros(blob["head_vocab"]), blob["hidden"],
                       model.model.norm.variance_epsilon)
    return load_router_file(path, model.config, DRAFTER_FILE_FORMAT, make, tune_command)


# -----------------------------------------------------------------------------
# Draft, verify, accept, emit

@torch.no_grad()
def generate(adapter, input_ids, attention_mask=None, max_new_tokens=32, K=4, adapt_k=False, temperature=0.0,
             top_k=None, eos_token_id=None, return_logits=False, lookup=0, drafter=None, return_trace=False,
             on_tokens=None, compile=False):
    """Self-speculative decoding (LayerSkip, Draft & Verify, Kangaroo): `adapter` or `drafter` drafts.

    A cycle, per row: from the pending token (emitted, not yet in the cache) the draft proposes d1..dk one at a
    time; ONE full-depth pass over [pending, d1..dk] gives the full model's p after each of the k + 1 positions.
    Speculative sampling (Leviathan et al.; Chen et al. 2023): d_j (drawn from the draft's q) is kept with
    probability min(1, p(d_j) / q(d_j)); the token after the kept ones comes from norm(max(0, p - q)) (after k
    kept: from p), so every token is distributed as p. Greedy is the same rule with p and q on their argmax. The
    cache stays exact: the verify pass overwrites every layer's K/V at the drafted slots, rejected slots are
    reused, and rows that kept different numbers are re-aligned (AdapterCache.realign). A cycle costs k draft
    steps and one pass over k + 1 tokens (about one decode step at batch 1 on a GPU; 1.26 for 2 tokens on one CPU
    thread, compiled: README).

    lookup=n (prompt lookup, Saxena 2023; _lookup): a cycle where every live row found a match drafts from it (q:
    all its mass on those tokens); otherwise the drafter or a routed adapter drafts, and a full-depth one (router
    'none', no drafter) drafts for the rows that found one only.

    adapt_k: K is the start, +1 after a cycle where every row kept all drafts, -1 after one where rows kept under
    half on average, within 1..2K. on_tokens: a streamer, called with each row's new tokens (a list of B 1-D
    tensors, some empty) after the prefill (its one token) and after each cycle (the run it accepted). compile:
    the draft's decode steps run on compiled layers, and the verify pass is one compiled full-depth step over the
    chunk (DepthAdapter.decode_step).
    -> (output_ids, stats): generate()'s timings (and logits), draft (its source), speculative (K), k_final,
    k_mean, cycles, drafted, accepted, acceptance_rate, mean_accepted (per row and cycle), tokens_per_cycle,
    draft_s, verify_s, draft_layers (layers run per drafted token).
    """
    _check(adapter, K, max_new_tokens, lookup, drafter, return_trace)
    full = adapter.full_depth()
    if compile:
        full.compile()
    k_max = 2 * K if adapt_k else K
    cache, ids, pos, mask = adapter.new_cache(input_ids, attention_mask, max_new_tokens, extra=k_max + 1,
                                                compile=compile)
    rule, steps = _Rule(temperature, top_k, adapter.lm_head.weight.shape[0]), torch.arange(k_max + 1, device=ids.device)
    source = _Source(adapter, drafter, lookup, rule)
    t0 = now(ids.device)
    first = full.forward_chunk(cache, ids, pos, 0)                          # 1. the prompt: exact at every layer
    t1 = now(ids.device)
    rows = _Rows(ids, mask, pos, max_new_tokens, eos_token_id, return_logits, rule, first)
    if on_tokens is not None:
        on_tokens(rows.since(rows.n * 0))                                   # the prefill's token
    k, tally = K, _Tally()
    while True:
        live = ~rows.done & (rows.n < max_new_tokens)                      # 2. the rows still decoding
        if not bool(live.any()):
            break
        kd = min(k, int((max_new_tokens - rows.n)[live].max()) - 1)       # never draft past what a row still needs
        ta = now(ids.device)
        drafts, q, lens = source.draft(cache, rows, live, kd, tally)        # 3. draft
        kd = len(drafts)
        tb = now(ids.device)
        chunk = torch.stack([rows.pending, *drafts], 1)                     # (B, kd + 1)
        verify = full.decode_step(cache, chunk, rows.next_pos[:, None] + steps[:kd + 1], rows.end)
        #                                                                     4. ONE full pass: (B, kd + 1, V)
        tc = now(ids.device)
        m, after = _accept(rule, verify.logits, chunk[:, 1:], q, lens)      # 5. accept
        n = rows.n
        rows.emit(chunk[:, 1:], m, after, live, verify, cache, steps[:kd + 1])   # 6. emit, realign the cache
        if on_tokens is not None:
            on_tokens(rows.since(n))                                        # each row's accepted run
        tally.add(lens, live, kd, m, tb - ta, tc - tb)                      # 7. count, and move k
        if adapt_k and kd == k:                       # grow after full acceptance, shrink after early rejection
            kept = float(m[live].float().mean())
            k = min(k + 1, k_max) if kept == kd else max(k - 1, 1) if kept < kd / 2 else k
    return rows.result(adapter, drafter, tally, K, k, adapt_k, (t0, t1, now(ids.device)))


def _check(adapter, K, max_new_tokens, lookup, drafter, return_trace):
    if return_trace:
        raise ValueError("return_trace with speculative decoding: every kept token ran at full depth (the verify "
                         "pass), so there is no depth to trace; the stats report the draft's acceptance instead.")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1 or max_new_tokens < 1:
        raise ValueError(f"speculative K={K!r} with max_new_tokens={max_new_tokens}: both must be an int >= 1 "
                         "(K, the tokens drafted per cycle: 4 is a good start).")
    if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
        raise ValueError(f"lookup={lookup!r}: the n-gram length that prompt-lookup drafting matches, an int >= 0 "
                         "(3 is a good start; 0 = off: the adapter's router drafts).")
    if adapter.keep_ratio is not None and adapter.cutoffs is None and adapter.router in hf_wrap.ROUTER_KINDS:
        raise ValueError("a keep_ratio draft needs calibrated cutoffs (calibrate(windows)): speculative "
                         "decoding prefills with the full model, so the prompt cannot set them.")
    if drafter is not None and adapter.router != "none":
        raise ValueError(f"drafter= drafts from the full model's final state, so the adapter must run at full depth "
                         f"(DepthAdapter(model), router 'none'); got router={adapter.router!r}.")


class _Rule:
    """The one sampling rule: probs(logits), draw(p). Greedy puts all the mass on the argmax and accepts at
    u = 1/2: a draft is kept iff it is p's argmax, and no random number is used."""

    def __init__(self, temperature, top_k, V):
        self.greedy, self.temperature, self.top_k, self.V = temperature == 0, temperature, top_k, V

    def probs(self, logits):                                                  # (..., V) -> (..., V)
        if self.greedy:
            return F.one_hot(logits.argmax(-1), self.V).float()
        return token_probs(logits, self.temperature, self.top_k)

    def draw(self, p):                                                        # (B, V) -> (B,)
        return p.argmax(-1) if self.greedy else torch.multinomial(p, 1)[:, 0]

    def uniform(self, like):
        return torch.full_like(like, 0.5) if self.greedy else torch.rand_like(like)


class _Source:
    """Step 3, the draft: prompt lookup, else the drafter, else the adapter's own routing."""

    def __init__(self, adapter, drafter, lookup, rule):
        self.adapter, self.drafter, self.lookup, self.rule = adapter, drafter, lookup, rule
        self.alone = adapter.router == "none" and drafter is None             # lookup drafts, or nothing does
        if drafter is not None:
            self.head_weight, self.head_vocab = head_rows(adapter.lm_head, drafter.vocab)

    def draft(self, cache, rows, live, kd, tally):
        """-> (drafts, a list of (B,) tokens; q, their (B, V) distributions; a lookup draft's lens (B,) or None)."""
        if self.lookup:                                                       # the text's own continuations
            found = [_lookup(rows.text(r), self.lookup, kd) if live[r] else rows.out[r, :0]
                     for r in range(len(live))]
            lens = torch.tensor([len(f) for f in found], device=live.device)
            if self.alone or bool((lens > 0)[live].all()):
                kd = int(lens.max())
                drafts = list(torch.stack([F.pad(f, (0, kd - len(f))) for f in found]).T)   # (kd of (B,))
                return drafts, [F.one_hot(d, self.rule.V).float() * (j < lens)[:, None]
                                for j, d in enumerate(drafts)], lens
        tok, s, drafts, q = rows.pending, rows.final_h, [], []
        for j in range(kd):                                                   # one token at a time
            if self.drafter is not None:          # from the full model's last state: no layer runs, no cache slot
                s = self.drafter.step(s, self.adapter.embed(tok))
                sub = self.drafter(s, self.head_weight)                       # (B, V') over its vocab
                if self.rule.greedy:                                          # its argmax, mapped to the model's
                    tok = self.drafter.vocab[sub.argmax(-1)]
                    qj = F.one_hot(tok, self.rule.V).float()
                else:
                    qj = self.rule.probs(spread(sub, self.head_vocab, self.rule.V))
                    tok = self.rule.draw(qj)
            else:                                 # the adapter's routing: its layers write draft K/V (overwritten)
                out = self.adapter.forward_chunk(cache, tok[:, None], (rows.next_pos + j)[:, None], rows.end + j)
                tally.draft_layers, tally.kv_only = tally.draft_layers + float(out.cost[live, 0].sum()), \
                    tally.kv_only + out.kv_only
                qj = self.rule.probs(out.logits)
                tok = self.rule.draw(qj)
            drafts.append(tok)
            q.append(qj)
        return drafts, q, None


def _accept(rule, logits, d, q, lens):
    """Step 5. logits (B, kd + 1, V) the verify pass's, after [pending, d1..dk]; d (B, kd) the drafts and q their
    draft distributions (kd of (B, V); a lookup row's are 0 past its lens). -> (m (B,) kept, the token after)."""
    B, kd = d.shape
    p = rule.probs(logits)                                                    # (B, kd + 1, V)
    qd = torch.stack(q, 1) if kd else p[:, :0]                                # (B, kd, V)
    pd, qx = p[:, :kd].gather(2, d[..., None])[..., 0], qd.gather(2, d[..., None])[..., 0]
    m = (rule.uniform(pd) * qx < pd).long().cumprod(1).sum(1)                 # accept d_j w.p. min(1, p / q)
    if lens is not None:                            # a lookup row keeps at most what it drafted (q = 0 past it)
        m = torch.minimum(m, lens)
    rows = torch.arange(B, device=d.device)
    resid = (p[rows, m] - torch.cat([qd, p[:, :1] * 0], 1)[rows, m]).clamp(min=0)   # q = 0 after kd
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[rows, m])   # p == q: no rejection
    return m, rule.draw(resid)


class _Rows:
    """Step 6's state: each row's output so far (out, n, done), its pending token and the final state that chose
    it, and where the shared cache ends."""

    def __init__(self, ids, mask, pos, max_new_tokens, eos, return_logits, rule, first):
        (B, T0), dev = ids.shape, ids.device
        self.out = ids.new_full((B, T0 + max_new_tokens), 0 if eos is None else eos)
        self.out[:, :T0] = ids
        self.logits = torch.zeros(B, max_new_tokens, rule.V, device=dev) if return_logits else None
        self.pending = rule.draw(rule.probs(first.logits))
        self.final_h = first.final_h[:, -1]          # (B, C) the final state that chose `pending`
        self.out[:, T0], self.n = self.pending, torch.ones(B, dtype=torch.long, device=dev)   # tokens per row
        self.done = self.pending == eos if eos is not None else torch.zeros_like(self.n, dtype=torch.bool)
        if return_logits:
            self.logits[:, 0] = first.logits.float()
        self.next_pos, self.end = pos[:, -1] + 1, T0  # the pending token's position; the cache holds slots < end
        self.first, self.T0, self.eos, self.max_new, self.mask = T0 - mask.sum(1), T0, eos, max_new_tokens, mask

    def text(self, r):                               # row r's tokens so far, without its left padding
        return self.out[r, self.first[r]:self.T0 + self.n[r]]

    def since(self, n):                              # each row's new tokens after its first n (B,): B 1-D tensors
        return [self.out[r, self.T0 + a:self.T0 + b] for r, (a, b) in enumerate(zip(n.tolist(), self.n.tolist()))]

    def emit(self, d, m, after, live, verify, cache, steps):
        """d1..dm, then `after`, for each live row (up to its first eos and its max_new_tokens); the pending token
        and its final state move to the last one emitted; the cache keeps each row's c exact slots."""
        B = d.shape[0]
        new = torch.cat([d, after[:, None]], 1).scatter(1, m[:, None], after[:, None])   # d1..dm, then after
        c = torch.minimum(m + 1, self.max_new - self.n) * live               # (B,) tokens each row emits
        if self.eos is not None:
            eos = (new == self.eos) & (steps < c[:, None])
            self.done |= eos.any(1)
            c = torch.where(eos.any(1), eos.long().argmax(1) + 1, c)         # up to its first eos
        r, j = (steps < c[:, None]).nonzero(as_tuple=True)
        self.out[r, self.T0 + self.n[r] + j] = new[r, j]
        if self.logits is not None:
            self.logits[r, self.n[r] + j] = verify.logits[r, j].float()
        self.pending = torch.where(c > 0, new.gather(1, (c - 1).clamp(min=0)[:, None])[:, 0], self.pending)
        last = (c - 1).clamp(min=0)                                           # the verify position that chose it
        self.final_h = torch.where((c > 0)[:, None], verify.final_h[torch.arange(B, device=d.device), last],
                                   self.final_h)
        self.n, self.next_pos = self.n + c, self.next_pos + c
        self.end = cache.realign(self.end, c)        # each row keeps [pending, d1..d_{c-1}]: c exact slots

    def result(self, adapter, drafter, tally, K, k, adapt_k, times):
        B, n_new = self.out.shape[0], int(self.n.max())
        stats = dict(router=adapter.router, draft="drafter" if drafter is not None else adapter.router, batch=B,
                     new_tokens=n_new, prompt_tokens=int(self.mask.sum()), **timing_stats(B, n_new, times),
                     speculative=K, adapt_k=adapt_k, k_final=k, **tally.stats(int(self.n.sum()) - B))
        if self.logits is not None:
            stats["logits"] = self.logits[:, :n_new]
        return self.out[:, :self.T0 + n_new], stats


class _Tally:
    """Step 7's counts over the cycles."""

    def __init__(self):
        self.ks, self.drafted, self.accepted, self.row_cycles, self.draft_layers, self.kv_only = [], 0, 0, 0, 0, 0
        self.draft_s = self.verify_s = 0.0

    def add(self, lens, live, kd, m, draft_s, verify_s):
        self.drafted += int(lens[live].sum()) if lens is not None else kd * int(live.sum())
        self.accepted += int(m[live].sum())
        self.row_cycles, self.ks = self.row_cycles + int(live.sum()), self.ks + [kd]
        self.draft_s, self.verify_s = self.draft_s + draft_s, self.verify_s + verify_s

    def stats(self, emitted):
        return dict(k_mean=sum(self.ks) / max(len(self.ks), 1), cycles=len(self.ks), drafted=self.drafted,
                    accepted=self.accepted, acceptance_rate=self.accepted / max(self.drafted, 1),
                    mean_accepted=self.accepted / max(self.row_cycles, 1),
                    tokens_per_cycle=emitted / max(self.row_cycles, 1), draft_s=self.draft_s,
                    verify_s=self.verify_s, draft_layers=self.draft_layers / max(self.drafted, 1),
                    kv_only_layer_calls=self.kv_only)


def _lookup(text, n, k):
    """Prompt lookup: the up to k tokens that followed the latest earlier occurrence of text's (1-D) last n
    tokens, else its last n - 1, ..., 2 (1 only when n = 1: one token recurs too often to predict), or none."""
    for g in range(min(n, len(text) - 1), min(n, 2) - 1, -1):
        grams = text.unfold(0, g, 1)[:-1]                                 # every g-gram that has a follower
        hit = (grams == text[-g:]).all(1).nonzero()
        if len(hit):
            start = int(hit[-1]) + g
            return text[start:start + k]
    return text[:0]
