"""
Lossless self-speculative decoding for the depth adapter (hf_wrap.py): a shallow pass drafts, the full model
verifies, and the output is exactly the full model's. Read hf_wrap.py first.

    out, stats = DepthAdapter(model, router="skip", router_path="routers.pt").generate(ids, speculative=4)
    python sample.py --hf smollm2-135m --routers=out-spec-draft/routers.pt --speculative=4   # --no_skip's text

Any router drafts (a trained skip / ffn / expert / token-choice file, fixed depth, dropped layers, CALM exits),
and so do two trained heads (base frozen, trained here to match the full model's distribution):
  exit head   a small adapter plus the model's own LM head at one layer (tune_exit_head, `python tune.py
              config/hf_spec_draft.py`): a draft runs the layers below it.
  drafter     a small MLP on the full model's final state and the token it chose (tune_drafter, `python tune.py
              config/hf_spec_drafter.py`): a draft runs no layer at all; the verify pass hands it the state.
The draft and the verify share one cache: the verify pass rewrites every layer's K/V at the drafted slots, so
whatever the draft computed there is replaced by the full model's. What it pays: k drafts and one pass over
k + 1 tokens per cycle, for 1 to k + 1 tokens (the README has the measured split between them).

A file of its own because it is its own algorithm on top of the adapter (draft, verify, accept, re-align), and
so that hf_wrap.py stays the one loop it teaches.
"""
import torch
import torch.nn.functional as F

import hf_wrap
from data import cpu_linears
from hf_wrap import DepthAdapter, now
from model import token_probs


# -----------------------------------------------------------------------------
# Draft, verify, accept

@torch.no_grad()
def speculate(adapter, input_ids, attention_mask=None, max_new_tokens=32, K=4, adapt_k=False, temperature=0.0,
              top_k=None, eos_token_id=None, return_logits=False, lookup=0):
    """Self-speculative decoding (LayerSkip, Draft & Verify, Kangaroo): `adapter` (an hf_wrap.DepthAdapter, any
    router) drafts, the full model verifies, and the output is the full model's own.

    A cycle, per row: from the pending token (emitted, not yet in the cache) this adapter's routing drafts
    d1..dk one at a time (a drafter: from the final state that chose the pending token, no layer run); ONE
    full-depth pass over [pending, d1..dk] gives the full model's distribution p after each of the k + 1
    positions. Greedy keeps the drafts up to the first that is not p's argmax, then
    emits p's argmax there: 1 to k + 1 tokens, each the full model's choice. With temperature > 0, speculative
    sampling (Leviathan et al.; Chen et al. 2023): d_j (drawn from the draft's q) is kept with probability
    min(1, p(d_j) / q(d_j)); at the first rejection the token comes from norm(max(0, p - q)), after k kept
    drafts from p: every token is distributed as p. The cache stays exact: the verify pass overwrites every
    layer's K/V at the drafted slots, rejected slots are reused, and rows that kept different numbers are
    re-aligned (_Run.keep). A cycle costs k draft steps and one pass over k + 1 tokens (about one decode step
    at batch 1 on a GPU, where reading the weights is the cost; about 1.2 on this project's CPU: README).

    lookup=n (prompt lookup, Saxena 2023): a row whose last n tokens (or n - 1, ..., 2) occurred earlier in its
    own text drafts the up to K tokens that followed there, with no model call (q: all its mass on that token).
    A cycle where every live row found one drafts that way; otherwise a routed adapter drafts as above, and a
    full-depth one (router 'none') drafts for the rows that found one only. Verification is the same.

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
    if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
        raise ValueError(f"lookup={lookup!r}: the n-gram length that prompt-lookup drafting matches, an int >= 0 "
                         "(3 is a good start; 0 = off: the adapter's router drafts).")
    if adapter.keep_ratio is not None and adapter.cutoffs is None and adapter.router in hf_wrap.ROUTER_KINDS:
        raise ValueError("a keep_ratio draft needs calibrated cutoffs (calibrate(windows)): speculative "
                         "decoding prefills with the full model, so the prompt cannot set them.")
    full = adapter if adapter.router in ("none", "drafter") else DepthAdapter(adapter.model, no_skip=True)
    drafter = adapter.drafter                                # or None: the adapter's own routing drafts
    k_max = 2 * K if adapt_k else K
    run, ids, pos, mask = adapter._start(input_ids, attention_mask, max_new_tokens, extra=k_max + 1)
    dev, V, greedy = ids.device, adapter.lm_head.weight.shape[0], temperature == 0
    out = ids.new_full((B, T0 + max_new_tokens), 0 if eos_token_id is None else eos_token_id)
    out[:, :T0] = ids
    out_logits = torch.zeros(B, max_new_tokens, V, device=dev) if return_logits else None

    def pick(logits):                                                     # (B, V) -> token (B,), its probs
        if greedy:
            return logits.argmax(-1), None
        p = token_probs(logits, temperature, top_k)
        return torch.multinomial(p, 1)[:, 0], p

    t0 = now(dev)
    logits, _, _ = full._forward(run, ids, pos, 0)            # the prompt: exact at every layer
    t1 = now(dev)
    pending, _ = pick(logits)
    state = run.h[:, -1]                      # (B, C) the final state that chose `pending`: the drafter starts there
    out[:, T0], n = pending, torch.ones(B, dtype=torch.long, device=dev)  # n: tokens emitted per row
    done = pending == eos_token_id if eos_token_id is not None else torch.zeros_like(n, dtype=torch.bool)
    if return_logits:
        out_logits[:, 0] = logits.float()
    next_pos, end = pos[:, -1] + 1, T0             # the pending token's position; the cache holds slots < end
    k, ks, drafted, accepted, row_cycles, draft_layers, draft_s, verify_s = K, [], 0, 0, 0, 0, 0.0, 0.0
    first = T0 - mask.sum(1)                                    # (B,) each row's first real token (left padding)
    steps = torch.arange(k_max + 1, device=dev)
    while True:
        live = ~done & (n < max_new_tokens)
        if not bool(live.any()):
            break
        kd = min(k, int((max_new_tokens - n)[live].max()) - 1)      # never draft past what a row still needs
        ta = now(dev)
        tok, drafts, q, found = pending, [], [], None
        if lookup:                                                        # the text's own continuations
            found = [_lookup(out[r, first[r]:T0 + n[r]], lookup, kd) if live[r] else out[r, :0] for r in range(B)]
            lens = torch.tensor([len(f) for f in found], device=dev)
            if adapter.router == "none" or bool((lens > 0)[live].all()):
                kd = int(lens.max())
                drafts = list(torch.stack([F.pad(f, (0, kd - len(f))) for f in found]).T)   # (kd of (B,))
                q = [None if greedy else F.one_hot(d, V).float() * (j < lens)[:, None] for j, d in enumerate(drafts)]
            else:
                found = None                                              # a row found none: the router drafts
        s = state
        for j in range(kd if found is None else 0):                       # the draft: one token at a time
            if drafter is not None:               # from the full model's last state: no layer runs, no cache slot
                s = drafter.step(s, adapter.embed(tok))
                sub = drafter(s, adapter.head_weight)                     # (B, V') over its vocab
                tok, qj = (drafter.vocab[sub.argmax(-1)], None) if greedy else pick(
                    adapter._spread(sub, drafter.vocab))
            else:                                 # the adapter's routing: its layers write draft K/V (overwritten)
                logits, _, cost = adapter._forward(run, tok[:, None], (next_pos + j)[:, None], end + j)
                draft_layers += float(cost[live, 0].sum())
                tok, qj = pick(logits)
            drafts.append(tok)
            q.append(qj)
        tb = now(dev)
        chunk = torch.stack([pending, *drafts], 1)                        # (B, kd + 1)
        vl, _, _ = full._forward(run, chunk, next_pos[:, None] + steps[:kd + 1], end,
                                 all_logits=True)                         # ONE full pass: (B, kd + 1, V)
        tc = now(dev)
        draft_s, verify_s = draft_s + tb - ta, verify_s + tc - tb
        d = chunk[:, 1:]                                                  # (B, kd) the drafts
        if greedy:
            target = vl.argmax(-1)                                        # (B, kd + 1) the full model's tokens
            m = (d == target[:, :kd]).long().cumprod(1).sum(1)            # (B,) leading drafts it agrees with
        else:
            p = token_probs(vl, temperature, top_k)                            # (B, kd + 1, V)
            qd = torch.stack(q, 1) if kd else p[:, :0]                    # (B, kd, V)
            pd, qx = p[:, :kd].gather(2, d[..., None])[..., 0], qd.gather(2, d[..., None])[..., 0]
            m = (torch.rand_like(pd) * qx < pd).long().cumprod(1).sum(1)  # accept d_j w.p. min(1, p / q)
        if found is not None:                       # a lookup row keeps at most what it drafted (q = 0 past it)
            m = torch.minimum(m, lens)
        if greedy:
            after = target.gather(1, m[:, None])[:, 0]                    # its own token after them
        else:
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
        last = (c - 1).clamp(min=0)                                       # the verify position that chose it
        state = torch.where((c > 0)[:, None], run.h[torch.arange(B, device=dev), last], state)
        n, next_pos = n + c, next_pos + c
        end = run.keep(end, c)                       # each row keeps [pending, d1..d_{c-1}]: c exact slots
        drafted += int(lens[live].sum()) if found is not None else kd * int(live.sum())
        accepted += int(m[live].sum())
        row_cycles, ks = row_cycles + int(live.sum()), ks + [kd]
        if adapt_k and kd == k:                      # grow after full acceptance, shrink after early rejection
            kept = float(m[live].float().mean())
            k = min(k + 1, k_max) if kept == kd else max(k - 1, 1) if kept < kd / 2 else k
    t2 = now(dev)
    n_new = int(n.max())
    stats = dict(router=adapter.router, batch=B, new_tokens=n_new, prompt_tokens=int(mask.sum()), prefill_s=t1 - t0,
                 decode_s=t2 - t1, tokens_per_s=B * n_new / max(t2 - t1, 1e-9),
                 ms_per_token=1000 * (t2 - t1) / max(n_new, 1), speculative=K, adapt_k=adapt_k, k_final=k,
                 k_mean=sum(ks) / max(len(ks), 1), cycles=len(ks), drafted=drafted, accepted=accepted,
                 acceptance_rate=accepted / max(drafted, 1), mean_accepted=accepted / max(row_cycles, 1),
                 tokens_per_cycle=(int(n.sum()) - B) / max(row_cycles, 1), draft_s=draft_s, verify_s=verify_s,
                 draft_layers=draft_layers / max(drafted, 1), kv_only_layer_calls=run.kv_only)
    if return_logits:
        stats["logits"] = out_logits[:, :n_new]
    return out[:, :T0 + n_new], stats


def _lookup(text, n, k):
    """Prompt lookup: the up to k tokens that followed the latest earlier occurrence of text's last n tokens
    (else its last n - 1, ..., 2; 1 only when n = 1), or none. text: one row's tokens so far (1-D). Not down
    to one token for n >= 2: a single token recurs too often to predict what follows it, and a wrong draft
    widens the verify pass for nothing."""
    for g in range(min(n, len(text) - 1), min(n, 2) - 1, -1):
        grams = text.unfold(0, g, 1)[:-1]                                 # every g-gram that has a follower
        hit = (grams == text[-g:]).all(1).nonzero()
        if len(hit):
            start = int(hit[-1]) + g
            return text[start:start + k]
    return text[:0]


# -----------------------------------------------------------------------------
# Measured: what a verify pass costs, and the drafts against transformers (bench.py --mode=hf --hf=<model>)

@torch.no_grad()
def verify_cost(model, B, prompt_len, widths=(1, 2, 3, 5, 9), n=5, interleaved=None):
    """The premise of speculative decoding, measured: one full-depth pass over w new tokens per row (the verify
    pass of w - 1 drafts) against one decode step (w = 1), batch B after a prompt of prompt_len random tokens, on
    the model's own device and kernels. interleaved: bench.py's timer (median of its repeats, round-robin);
    each timed call runs n passes. -> rows {batch, tokens per row, ms per pass, vs one step}."""
    full, dev = DepthAdapter(model, no_skip=True), model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (B, prompt_len + max(widths)), device=dev)
    run, ids, pos, _ = full._start(ids[:, :prompt_len], None, max(widths))
    full._forward(run, ids, pos, 0)
    new = torch.randint(0, model.config.vocab_size, (B, max(widths)), device=dev)
    steps = pos[:, -1:] + 1 + torch.arange(max(widths), device=dev)

    def passes(w):                      # the same cache slots each time: the cost, not the text, is measured
        for _ in range(n):
            full._forward(run, new[:, :w], steps[:, :w], prompt_len, all_logits=True)
        now(dev)
    timings = interleaved([(w, lambda w=w: passes(w)) for w in widths])
    one = timings[widths[0]][1]
    return [{"batch": B, "tokens per row": w, "ms per pass": 1000 * timings[w][1] / n,
             "vs one step": timings[w][1] / one} for w in widths]


def _on_mkl(model, fn):
    cpu_linears(model, "mkl")
    try:
        return fn()
    finally:
        cpu_linears(model, "onednn")


SPEC_PROMPTS = ("Explain mixture of recursions simply.", "Write a short story about a lighthouse keeper.",
                "How does a refrigerator keep food cold?", "Describe the water cycle for a ten-year-old.")


def compare(model, tok, router_paths, threshold, batches, n, K, interleaved, emit=lambda row: None, lookup=3):
    """Greedy decoding of chat prompts (SPEC_PROMPTS), n new tokens, in one interleaved run (bench.py's
    interleaved): transformers generate (and, on a CPU, the same on torch's default MKL linears instead of
    load_hf's oneDNN); transformers' own early-exit assistant (generate(assistant_early_exit=l),
    batch 1 only) at the exit layer l of the first exit-head draft; the adapter at full depth; and, for each draft
    (each router file in router_paths, threshold = the trained routers' bias or None for the file's, and the
    untrained exit at layer l: the model's own head there), the router alone (routed decode: speed, and the share
    of generate's tokens it keeps) and speculative decoding with K drafts per cycle, fixed and adaptive. Every
    speculative row must give generate's tokens ("same as generate"); they add the acceptance, tokens per cycle
    and the draft / verify time split. lookup=n > 0 adds prompt-lookup drafts (n-gram): transformers' own
    (generate(prompt_lookup_num_tokens=K), batch 1), ours at full depth, and ours with the first exit head drafting
    when a row finds no match. -> rows (each also passed to emit as it is made)."""
    dev = model.get_input_embeddings().weight.device
    L, eos = model.config.num_hidden_layers, tok.eos_token_id
    drafts = []
    for path in router_paths:
        kind = hf_wrap.read_router_file(path)["router"]
        drafts.append((f"{kind} ({path})", DepthAdapter(model, router=kind, router_path=path,
                                                        threshold=None if kind in ("exit_head", "drafter")
                                                        else threshold)))
    exit_layer = next((ad.exit_head.layer for _, ad in drafts if ad.exit_head is not None), 2 * L // 3)
    drafts.append((f"untrained exit at layer {exit_layer}",
                   DepthAdapter(model, router="fixed", R=L - 1, base_layers=1, depth=exit_layer - 1)))
    full, table = DepthAdapter(model, no_skip=True), []
    for B in batches:
        chats = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
                 if getattr(tok, "chat_template", None) else t for t in (SPEC_PROMPTS * B)[:B]]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)     # left padding (load_hf)
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        gen = dict(attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        runs = [("transformers generate", lambda: (model.generate(ids, **gen), None))]
        if any("forward" in m.__dict__ for m in model.modules()):   # load_hf's oneDNN linears; what they gain:
            runs.append(("transformers generate, MKL linears", lambda: _on_mkl(model, lambda: (
                model.generate(ids, **gen), None))))      # the same call on torch's default kernels
        if B == 1:
            runs.append((f"transformers assistant_early_exit={exit_layer}",
                         lambda: (model.generate(ids, assistant_early_exit=exit_layer, **gen), None)))
            if lookup:                                     # transformers' own prompt lookup (batch 1 only)
                runs.append((f"transformers prompt_lookup_num_tokens={K}", lambda: (model.generate(
                    ids, prompt_lookup_num_tokens=K, max_matching_ngram_size=lookup, **gen), None)))
        runs.append(("adapter --no_skip", lambda: full.generate(ids, attention_mask=mask, max_new_tokens=n,
                                                               eos_token_id=eos)))
        for name, ad in drafts:
            if ad.router in hf_wrap.ROUTER_KINDS + ("drop",):   # the router alone, no verification: speed + quality
                runs.append((f"routed decode, {name}", lambda ad=ad: ad.generate(ids, attention_mask=mask,
                                                                                max_new_tokens=n)))   # all n tokens
            for adapt in (False, True):
                runs.append((f"speculative, {name}{', adaptive K' if adapt else ''}",
                             lambda ad=ad, adapt=adapt: ad.generate(ids, attention_mask=mask, max_new_tokens=n,
                                                                     eos_token_id=eos, speculative=K,
                                                                     adapt_k=adapt)))
        if lookup:                                         # drafts from the text itself, alone and with a head
            runs.append((f"speculative, prompt lookup ({lookup}-gram)", lambda: full.generate(
                ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, speculative=K, lookup=lookup)))
            heads = [d for d in drafts if d[1].drafter is not None] + [d for d in drafts if d[1].exit_head is not None]
            for name, ad in heads[:1]:                     # the drafter, else the first exit head
                runs.append((f"speculative, prompt lookup, else {name}, adaptive K", lambda ad=ad: ad.generate(
                    ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, speculative=K, adapt_k=True,
                    lookup=lookup)))
        timings = interleaved(runs)
        ref, base = timings["transformers generate"][0][0], timings["transformers generate"][1]
        for name, _ in runs:
            (out, st), med, lo, hi = timings[name]
            row = {"batch": B, "decoder": name, "tokens/s": B * (out.shape[1] - ids.shape[1]) / med,
                   "spread %": 100 * (hi - lo) / med,
                   "vs generate": (out.shape[1] - ids.shape[1]) / med / ((ref.shape[1] - ids.shape[1]) / base),
                   "same as generate": "yes" if torch.equal(out, ref) else "NO"}
            if out.shape == ref.shape:                 # routed decode: the share of new tokens that match generate's
                row["same tokens %"] = 100 * float((out == ref)[:, ids.shape[1]:].float().mean())
            if st is not None and "compute_saved_pct" in st and "acceptance_rate" not in st:
                row["layer calls %"] = 100 - st["compute_saved_pct"]
            if st is not None and "acceptance_rate" in st:
                row.update({"K": f"{st['speculative']}" + (f" -> {st['k_final']} (mean {st['k_mean']:.1f})"
                                                           if st["adapt_k"] else ""),
                            "acceptance %": 100 * st["acceptance_rate"], "tokens/cycle": st["tokens_per_cycle"],
                            "draft ms/cycle": 1000 * st["draft_s"] / st["cycles"],
                            "verify ms/cycle": 1000 * st["verify_s"] / st["cycles"]})
            table.append(row)
            emit(row)
    return table
