"""The recursive model: shapes, causality, cached decoding, sharing arithmetic, routing
that really skips compute, both KV strategies, HF export parity."""
import pytest
import torch

from kv_cache import KVCache, Lanes
from model import ContinuousBatching, MoR, MoRConfig, export_hf, layer_plan

V = 53
VARIANTS = {
    "vanilla": dict(),
    "recursive": dict(n_recursion=3, sharing="middle_cycle"),
    "ec_recursion": dict(n_recursion=3, sharing="middle_cycle", router="expert_choice"),
    "ec_share_first": dict(n_recursion=3, sharing="middle_cycle", router="expert_choice", kv_mode="share_first"),
    "ec_aux_router": dict(n_recursion=3, sharing="cycle", router="expert_choice", router_aux="router"),
    "tc_recursion": dict(n_recursion=3, sharing="middle_cycle", router="token_choice"),
    "tc_share_first": dict(n_recursion=3, sharing="middle_sequence", router="token_choice", kv_mode="share_first"),
}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=V, block_size=48, n_layer=5, n_head=4, n_kv_head=2, n_embd=32)
    base.update(kw)
    return MoR(MoRConfig(**base))


def spread_router(m):
    """Random routers send every token the same way at init; make decisions vary token to token."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("router"):
                p.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("name", list(VARIANTS))
def test_shapes_and_loss(name):
    m = tiny(**VARIANTS[name]).train()
    x = torch.randint(0, V, (3, 20))
    logits, loss = m(x, x)
    assert logits.shape == (3, 20, V)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert m.last_depth.shape == (3, 20)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_future_token_changes_a_past_logit_or_depth(name):
    m = spread_router(tiny(**VARIANTS[name])).eval()
    x = torch.randint(0, V, (2, 24))
    y = x.clone()
    y[:, 15:] = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        la, _ = m(x, rule="causal")
        da = m.last_depth.clone()
        lb, _ = m(y, rule="causal")
        db = m.last_depth.clone()
    torch.testing.assert_close(la[:, :15], lb[:, :15], atol=1e-5, rtol=1e-5)
    assert torch.equal(da[:, :15], db[:, :15])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_equals_full_causal_pass(name):
    m = spread_router(tiny(**VARIANTS[name])).eval()
    x = torch.randint(0, V, (3, 30))
    with torch.no_grad():
        full, _ = m(x, rule="causal")
        full_depth = m.last_depth.clone()
        kv = KVCache(m, 3)
        parts, depths = [], []
        for lo, hi in [(0, 11), (11, 12), (12, 20), (20, 21), (21, 30)]:   # prefill, then mixed chunks
            out, _ = m(x[:, lo:hi], kv=kv, rule="causal")
            parts.append(out)
            depths.append(m.last_depth)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat(depths, 1), full_depth)
    if name not in ("vanilla", "recursive"):
        assert full_depth.min() < full_depth.max(), "routing should vary by token for this test to mean something"


def test_generate_matches_greedy_full_forward():
    m = spread_router(tiny(**VARIANTS["ec_recursion"])).eval()
    x = torch.randint(0, V, (2, 6))
    out, depths = m.generate(x, 12, temperature=0, return_depths=True)
    assert out.shape == (2, 18) and depths.shape == (2, 18)
    seq = x
    for _ in range(12):   # the slow way: a full causal pass per token
        with torch.no_grad():
            logits, _ = m(seq, rule="causal")
        seq = torch.cat((seq, logits[:, -1:].argmax(-1)), 1)
    assert torch.equal(out, seq)
    with torch.no_grad():
        m(seq, rule="causal")
    assert torch.equal(depths, m.last_depth)


def test_generate_calls_on_tokens_each_step():
    """on_tokens (sample.py's streamer) hears each step's token per row as it is sampled, past the context too."""
    m = spread_router(tiny(block_size=16, **VARIANTS["ec_recursion"])).eval()
    x = torch.randint(0, V, (2, 10))
    calls = []
    out = m.generate(x, 12, temperature=0, on_tokens=lambda new: calls.append(torch.stack(new)))
    assert len(calls) == 12 and all(c.shape == (2, 1) for c in calls)
    assert torch.equal(torch.cat(calls, 1), out[:, 10:])


def test_generate_past_the_context_and_errors():
    m = tiny(block_size=16).eval()
    out = m.generate(torch.zeros(1, 10, dtype=torch.long), 30, temperature=1.0, top_k=5)
    assert out.shape == (1, 40)
    # greedy: 6 tokens fill the context (16), then the cache restarts from the last half, the 8
    # tokens 9..16, and decoding goes on exactly as a fresh generate from those 8 tokens
    m = tiny(block_size=16, **VARIANTS["ec_recursion"]).eval()
    with torch.no_grad():
        for p in m.parameters():                             # big weights: greedy tokens follow the context
            if p.dim() == 2:
                p.normal_(0, 0.5)
    x = torch.randint(0, V, (2, 10))
    out = m.generate(x, 30, temperature=0)
    assert torch.equal(out[:, :17], m.generate(x, 7, temperature=0))
    fresh = m.generate(out[:, 9:17], 23, temperature=0)
    assert torch.equal(out[:, 17:], fresh[:, 8:])
    assert out[:, 17:].unique().numel() > 3                     # varied tokens, so a wrong restart shows
    with pytest.raises(ValueError, match="context"):
        m.generate(torch.zeros(1, 17, dtype=torch.long), 1)


def test_the_docstring_loop_is_the_code():
    """model.py's docstring and the README show MoR.forward's loop line for line, so they cannot drift."""
    import inspect
    import os
    import textwrap
    import model
    code = textwrap.dedent(inspect.getsource(MoR.forward))
    doc = model.__doc__
    at = doc.index("    h = self._run(h, everyone, plan.prelude")
    loop = textwrap.dedent(doc[at:doc.index("\n\n", at)])
    assert loop.count("\n") >= 8 and textwrap.indent(loop, "    ") in code
    readme = open(os.path.join(os.path.dirname(model.__file__), "README.md")).read()
    at = readme.index("```python\n") + len("```python\n")
    assert textwrap.indent(readme[at:readme.index("```", at)], "    ") in code


@pytest.mark.parametrize("sharing,R,L,expect", [
    ("none", 1, 6, (0, 6, 0, 0)),
    ("cycle", 3, 6, (0, 2, 0, 0)),
    ("sequence", 2, 7, (0, 3, 0, 1)),
    ("middle_cycle", 3, 8, (1, 2, 1, 0)),
    ("middle_sequence", 3, 9, (1, 2, 1, 1)),
    ("middle_cycle", 4, 32, (1, 7, 1, 2)),   # the paper's example: 1 + 28 + 1
])
def test_layer_plan_arithmetic(sharing, R, L, expect):
    p = layer_plan(L, R, sharing)
    assert (p.n_pre, p.n_shared, p.n_post, p.n_dropped) == expect
    assert p.full_depth_layers == p.n_pre + p.n_shared * R + p.n_post


def test_sharing_orders():
    assert layer_plan(6, 3, "cycle").steps == [[0, 1], [0, 1], [0, 1]]
    assert layer_plan(6, 3, "sequence").steps == [[0, 0], [0, 1], [1, 1]]
    assert layer_plan(8, 3, "middle_cycle").steps == [[1, 2], [1, 2], [1, 2]]


@pytest.mark.parametrize("sharing,R", [("cycle", 3), ("sequence", 2), ("middle_cycle", 3), ("middle_sequence", 2)])
def test_unique_parameter_counts(sharing, R):
    vanilla = tiny(n_layer=8)
    shared = tiny(n_layer=8, n_recursion=R, sharing=sharing)
    per_layer = sum(p.numel() for p in vanilla.layers[0].parameters())
    norm = vanilla.norm.weight.numel()
    assert vanilla.num_params() == 8 * per_layer + norm
    assert shared.num_params() == shared.plan.n_unique * per_layer + norm
    if sharing == "cycle":   # the recursion block holds exactly 1/R of the layers
        assert shared.plan.n_unique * R == 8 - shared.plan.n_dropped


def _record_rows(m):
    """Hook every layer's projections: how many rows each call actually received."""
    calls = []
    for i, layer in enumerate(m.layers):
        for name in ("q_proj", "k_proj", "mlp"):
            mod = layer.mlp if name == "mlp" else getattr(layer.self_attn, name)
            mod.register_forward_hook(lambda mod, inp, out, i=i, name=name: calls.append((i, name, inp[0].shape[0])))
    return calls


def test_expert_choice_capacity_and_no_compute_for_exited_tokens():
    m = tiny(n_layer=8, n_recursion=3, sharing="middle_cycle", router="expert_choice").train()
    calls = _record_rows(m)
    B, T = 2, 30
    m(torch.randint(0, V, (B, T)))
    mlp_rows = [n for i, name, n in calls if name == "mlp"]
    # prelude (all), 3 steps x 2 shared layers at capacity 1, 2/3, 1/3, coda (all)
    assert mlp_rows == [B * T] + [B * T] * 2 + [B * 20] * 2 + [B * 10] * 2 + [B * T]
    assert torch.bincount(m.last_depth.flatten(), minlength=4).tolist() == [0, B * 10, B * 10, B * 10]


def test_token_choice_rows_match_chosen_depths():
    m = spread_router(tiny(n_layer=5, n_recursion=3, sharing="middle_cycle", router="token_choice")).eval()
    calls = _record_rows(m)
    x = torch.randint(0, V, (3, 25))
    m(x)
    depth = m.last_depth
    shared_rows = [n for i, name, n in calls if name == "mlp" and i == 1]   # the one shared layer
    expect = [int((depth > r).sum()) for r in range(3) if (depth > r).any()]
    assert shared_rows == expect and expect[0] > expect[-1]


def test_share_first_deeper_steps_compute_no_kv():
    m = tiny(n_layer=5, n_recursion=3, sharing="middle_cycle", router="expert_choice", kv_mode="share_first")
    calls = _record_rows(m)
    m.train()(torch.randint(0, V, (2, 30)))
    shared = [(name, n) for i, name, n in calls if i == 1]
    assert [n for name, n in shared if name == "k_proj"] == [60]          # step 0 only, every token
    assert [n for name, n in shared if name == "q_proj"] == [60, 40, 20]  # queries for active tokens


def _expected_rows(m, depth):
    """What _record_rows should see for one call whose tokens ran `depth` [B, T] steps: every
    token in the unshared layers, at step r only the tokens that reached it."""
    plan, share_first = m.plan, m.config.kv_mode == "share_first"
    rows = []
    def layer(i, n, with_kv=True):
        rows.extend([(i, "q_proj", n)] + [(i, "k_proj", n)] * with_kv + [(i, "mlp", n)])
    for i in plan.prelude:
        layer(i, depth.numel())
    for r in range(plan.n_recursion):
        for i in plan.steps[r] if (depth > r).any() else []:
            layer(i, int((depth > r).sum()), not (share_first and r > 0))
    for i in plan.coda:
        layer(i, depth.numel())
    return rows


@pytest.mark.parametrize("name", ["ec_recursion", "ec_share_first", "tc_recursion", "tc_share_first"])
def test_cached_decoding_feeds_each_step_only_the_tokens_that_reached_it(name):
    """Prefill and token-by-token decoding under a KVCache: hooks on every layer's q/k
    projections and MLP see, call by call, exactly the rows of the tokens that reached each
    step, so an exited token costs nothing in generation either."""
    m = spread_router(tiny(**VARIANTS[name])).eval()
    calls = _record_rows(m)
    x = torch.randint(0, V, (3, 16))
    kv, depths = KVCache(m, 3), []
    with torch.no_grad():
        for lo, hi in [(0, 8)] + [(t, t + 1) for t in range(8, 16)]:
            calls.clear()
            m(x[:, lo:hi], kv=kv, rule="causal")
            assert calls == _expected_rows(m, m.last_depth), (lo, hi)
            depths.append(m.last_depth)
    assert torch.cat(depths, 1).unique().numel() > 1              # tokens stopped at different steps


def _linear_flops_by_hooks(m, run):
    """2 * rows * in * out summed over every Linear of the layers and the LM head, as fed by run()."""
    total = []
    def count(mod, inp, out):                                    # rows: tokens fed, [N, d] or [B, T, d]
        total.append(2 * (inp[0].numel() // mod.in_features) * mod.in_features * mod.out_features)
    hooks = [mod.register_forward_hook(count)
             for mod in [*m.layers.modules(), m.lm_head] if isinstance(mod, torch.nn.Linear)]
    run()
    for h in hooks:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("name", ["recursive", "ec_recursion", "ec_share_first", "tc_recursion", "tc_share_first"])
def test_flop_count_equals_the_rows_every_linear_was_fed(name):
    """The FLOP formula's linear part against what really ran: hooks count the rows into every
    Linear, in a training pass (top-k) and in prefill + cached decoding (causal)."""
    m = spread_router(tiny(**VARIANTS[name]))
    x = torch.randint(0, V, (3, 20))
    def linear_part():
        f = m.last_forward
        return int(m.flop_parts(f.depth, f.start, f.reached, f.n_logits, f.ran)[0])
    m.train()
    assert _linear_flops_by_hooks(m, lambda: m(x, x)) == linear_part()
    m.eval()
    kv = KVCache(m, 3)
    with torch.no_grad():
        for lo, hi in [(0, 8)] + [(t, t + 1) for t in range(8, 12)]:
            assert _linear_flops_by_hooks(m, lambda: m(x[:, lo:hi], kv=kv, last_only=hi > 8)) == linear_part()


@pytest.mark.parametrize("name", ["ec_recursion", "ec_aux_router", "tc_recursion"])
def test_routers_receive_gradients(name):
    m = tiny(**VARIANTS[name]).train()
    x = torch.randint(0, V, (2, 24))
    _, loss = m(x, x)
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if n.startswith("router")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_kv_memory_share_first_is_one_over_R_of_recursion_upper_bound():
    B, T, R = 2, 30, 3
    x = torch.randint(0, V, (B, T))
    sizes = {}
    for mode in ("recursion", "share_first"):
        for router in ("none", "expert_choice"):
            m = tiny(n_layer=5, n_recursion=R, sharing="middle_cycle", router=router, kv_mode=mode).eval()
            kv = KVCache(m, B)
            with torch.no_grad():
                m(x, kv=kv, rule="causal")
            sizes[mode, router] = kv.nbytes("rec")
    upper = sizes["recursion", "none"]               # every token cached at every step
    assert sizes["share_first", "none"] * R == upper
    assert sizes["share_first", "expert_choice"] * R == upper
    # recursion-wise with routing keeps only the tokens that reached each step
    assert sizes["recursion", "expert_choice"] <= upper


def test_loss_free_bias_moves_loads_towards_balance():
    m = tiny(n_layer=5, n_recursion=3, sharing="middle_cycle", router="token_choice", balancing="loss_free",
             balance_bias_rate=0.02).train()
    with torch.no_grad():
        m.router.net.net.weight.normal_(0, 1.0)  # token-to-token variation...
        m.router.bias[0] = 1.0                   # ...but a bias that sends everyone to depth 1
    x = torch.randint(0, V, (4, 32))
    spread = []
    for _ in range(60):
        m(x)
        load = m.last_route.stats["load"]
        spread.append(float(load.max() - load.min()))
        m.router.update_bias(load)
    assert spread[0] == 1.0                      # all on one depth
    assert sum(spread[-10:]) / 10 < 0.4          # the bias spread them out


@pytest.mark.parametrize("tie", [True, False])
def test_export_matches_transformers_llama(tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from data import Tokenizer
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    tok = Tokenizer.build("char", text)
    m = tiny(n_layer=3, tie_embeddings=tie, rope_theta=500.0).eval()
    export_hf(m, tmp_path, tok)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok(text)["input_ids"] == tok.encode(text) and hf_tok.decode(tok.encode(text)) == text
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], hf(x).logits, atol=1e-5, rtol=1e-5)
    ours = m.generate(x[:, :5], 10, temperature=0)
    theirs = hf.generate(x[:, :5], max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)


def test_export_refuses_shared_models(tmp_path):
    with pytest.raises(ValueError, match="sharing"):
        export_hf(tiny(n_recursion=2, sharing="cycle"), tmp_path)


@pytest.mark.parametrize("kw,msg", [
    (dict(sharing="weird"), "sharing must be"),
    (dict(router="expert_choice"), "needs n_recursion > 1"),
    (dict(n_recursion=3, sharing="none"), "one pass"),
    (dict(n_recursion=3, sharing="middle_cycle", router="expert_choice", capacity=(1.0, 0.5)), "3 entries"),
    (dict(n_recursion=2, sharing="cycle", router="expert_choice", capacity=(0.5, 1.0)), "must not increase"),
    (dict(n_recursion=2, sharing="cycle", router="expert_choice", kv_mode="share_first", capacity=(0.5, 0.5)),
     "step 0"),
    (dict(n_layer=3, n_recursion=3, sharing="middle_cycle"), "need n_layer >= 5"),
])
def test_bad_configs_explain_themselves(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny(**kw)


@pytest.mark.parametrize("kw,forced", [
    (dict(n_recursion=3, sharing="middle_cycle", router="expert_choice"), False),
    (dict(n_recursion=3, sharing="cycle", router="token_choice"), False),
    (dict(n_recursion=3, sharing="middle_cycle"), False),
    (dict(n_recursion=4, sharing="middle_cycle", router="expert_choice"), True),
])
def test_continuous_batching_decodes_the_same_tokens(kw, forced):
    """Continuous depth-wise batching mixes tokens of different sequences and depths in one
    block call; every token must still see exactly what per-step decoding shows it."""
    from bench import ForcedDepthRouter
    if forced:
        torch.manual_seed(0)
        m = MoR(MoRConfig(vocab_size=V, block_size=48, n_layer=6, n_head=4, n_kv_head=2, n_embd=32, **kw),
                router=ForcedDepthRouter([0.25] * 4)).eval()
    else:
        m = spread_router(tiny(n_layer=6, **kw)).eval()
    x = torch.randint(0, V, (4, 5))
    ref, ref_depth = m.generate(x, 20, temperature=0, return_depths=True)
    out, depth, stats = ContinuousBatching(m, x, 20, temperature=0).run()
    assert torch.equal(out, ref)
    assert torch.equal(depth, ref_depth[:, 5:-1])        # the decoded tokens (the last is never fed back)
    if m.router is not None:
        assert depth.min() < depth.max()                  # mixed depths, so calls really mixed steps
    # a token's useful cost is exactly its depth in block rows
    assert stats["live_rows"] == int(depth.sum())


def test_continuous_batching_counts_the_rows_that_enter_the_block():
    """A hook on the shared layer counts the rows each tick feeds it: every lane, every tick
    (B per tick), also lanes whose sequence is finished. The stats say so (block_rows), and
    keep the useful part apart (live_rows: the decoded tokens' depths, from generate)."""
    m = spread_router(tiny(n_layer=6, n_recursion=3, sharing="middle_cycle", router="expert_choice")).eval()
    B, T0, new = 4, 5, 20
    x = torch.randint(0, V, (B, T0))
    _, ref_depth = m.generate(x, new, temperature=0, return_depths=True)
    rows = []
    shared = m.layers[m.plan.steps[0][0]]
    shared.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]) if isinstance(inp[4], Lanes)
                                 else None)                      # ticks only: prefill passes an ActiveSet
    _, depth, stats = ContinuousBatching(m, x, new, temperature=0).run()
    assert rows == [B] * stats["ticks"] and stats["block_rows"] == sum(rows)
    assert stats["live_rows"] == int(ref_depth[:, T0:-1].sum()) < stats["block_rows"]


def test_continuous_batching_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="cycle"):
        ContinuousBatching(tiny(n_layer=6, n_recursion=3, sharing="sequence", router="expert_choice"),
                           torch.zeros(1, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="recursion"):
        m = tiny(n_layer=6, n_recursion=3, sharing="cycle", router="token_choice", kv_mode="share_first")
        ContinuousBatching(m, torch.zeros(1, 3, dtype=torch.long), 4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_flops_of_prefill_plus_cached_decoding_equal_one_full_pass(name):
    """FLOPs are counted from what ran (depths and the layer plan), attention included, so a
    prefill followed by token-by-token decoding costs what one causal pass over the same
    tokens costs."""
    m = spread_router(tiny(**VARIANTS[name])).eval()
    x = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        m(x, rule="causal")
        full, full_depth = float(m.last_flops), m.last_depth.clone()
        kv = KVCache(m, 3)
        m(x[:, :8], kv=kv, rule="causal")
        cached, depths = float(m.last_flops), [m.last_depth]
        for t in range(8, 20):
            m(x[:, t:t + 1], kv=kv, rule="causal")
            cached += float(m.last_flops)
            depths.append(m.last_depth)
    assert torch.equal(torch.cat(depths, 1), full_depth)   # the same tokens ran the same steps
    assert cached == full
    # attention is in the count: a longer context costs more per token
    deepest = torch.full((1, 1), m.plan.n_recursion)
    short = m.count_flops(deepest, start=0)
    long_ = m.count_flops(deepest, start=10, reached=torch.full((1, m.plan.n_recursion), 10))
    assert float(long_) > float(short)


def test_flops_count_only_the_tokens_that_ran():
    """A token that exited after step 1 costs one step of the block, not R."""
    m = tiny(**VARIANTS["tc_recursion"])
    R, k = m.plan.n_recursion, m.plan.n_shared
    one = m.count_flops(torch.ones(1, 1, dtype=torch.long))
    deep = m.count_flops(torch.full((1, 1), R, dtype=torch.long))
    assert float(deep - one) == (R - 1) * k * (m._layer_flops(1, True) + 4 * m.config.n_embd)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(n_recursion=3, sharing="middle_cycle", router="expert_choice"),
                                dict(n_recursion=3, sharing="cycle", router="token_choice")])
def test_compiled_continuous_decoding_is_one_graph_with_the_same_tokens(kw):
    """The CPU proxy for CUDA-graph decoding: the continuous-batching tick compiles with
    fullgraph=True (no graph breaks: torch.compile would raise), gives the tokens of eager
    per-step decoding, and more ticks (and a second run) compile nothing new."""
    import torch._dynamo
    torch._dynamo.reset()
    m = spread_router(tiny(n_layer=6 if kw else 5, **kw)).eval()
    x = torch.randint(0, V, (3, 5))
    ref = m.generate(x, 10, temperature=0)
    torch._dynamo.utils.counters.clear()
    out, _, stats = ContinuousBatching(m, x, 10, temperature=0, compile=True).run()
    assert torch.equal(out, ref)
    assert stats["ticks"] > 8
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1
    out2, _, _ = ContinuousBatching(m, x, 10, temperature=0, compile=True).run()
    assert torch.equal(out2, ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs     # 0 recompilations


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ec_recursion", "tc_recursion", "ec_share_first"])
def test_compiled_training_step_matches_eager(name):
    """torch.compile(model) trains every routed variant (graph breaks allowed where routing makes
    shapes data-dependent): the same loss as eager, a backward pass, and the same FLOP count."""
    import torch._dynamo
    torch._dynamo.reset()
    eager, compiled = tiny(**VARIANTS[name]).train(), tiny(**VARIANTS[name]).train()
    x = torch.randint(0, V, (4, 32))
    loss_e = eager(x, x)[1]
    step = torch.compile(compiled)
    loss_c = step(x, x)[1]
    loss_c.backward()
    assert abs(float(loss_c) - float(loss_e)) < 1e-5
    assert all(p.grad is not None for p in compiled.router.parameters())
    assert float(compiled.last_flops) == float(eager.last_flops)
