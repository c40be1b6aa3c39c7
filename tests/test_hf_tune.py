"""
Tests for router tuning on a frozen pretrained model (tune.py, hf_wrap.FrozenRouters of every kind: skip, ffn,
expert_choice, token_choice; router="drop"), its one optimizer loop, and the evaluation helpers behind bench.py
--mode=ppl (tune.py's and bench.py's).
Tiny random-weight models built from configs, offline.

What must hold: gradients reach the routers only and the base weights stay byte-identical; the compute penalty
moves the mean continue weight to its target; each kind's continue weights follow its rule (independent,
hierarchical, P(depth > u)); the straight-through tuning forward makes inference's decisions; the hard-routed
prefill (what perplexity is measured on) equals the decode path; the extremes are exact (every gate open = the
model, every gate shut = those layers dropped); ffn routing never skips attention; keep_ratio's cutoffs keep
that fraction; static dropping removes the lowest-influence layers and never layer 0; the bias search lands on
its target; the oracle (bench.OracleSkip) is exact at share 1 and its perplexity monotone in the share.
"""
import functools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import data  # noqa: E402
import hf_wrap  # noqa: E402
import tune  # noqa: E402
from hf_wrap import DepthAdapter  # noqa: E402
from tune import soft_forward  # noqa: E402
from test_hf_wrap import CONFIGS, LAYERS, VOCAB, RowCounter, hf_greedy, prompts, tiny  # noqa: E402

TEXT = "KING:\nWhat say you, my lord? Speak, and speak the truth.\n\nQUEEN:\nI have no words to give you now.\n\n" * 40
KINDS = hf_wrap.ROUTER_KINDS                      # skip, ffn, expert_choice, token_choice
GROUP_KINDS = ("expert_choice", "token_choice")


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def layout(kind, n_layers=LAYERS, R=4, base_layers=2, tail_layers=0, **unit_kw):
    """The units a kind routes: skip / ffn units (one layer each by default), or R groups after base_layers and
    before tail_layers (R=4, base_layers=2 on 6 layers: groups of one layer)."""
    if kind in GROUP_KINDS:
        return hf_wrap.group_layout(n_layers, R, base_layers, tail_layers)
    return hf_wrap.unit_layout(n_layers, **unit_kw)


def spread_routers(kind="skip", hidden=64, n_layers=LAYERS, exit_layers=(), seed=0, stand_in_rank=0, **kw):
    """FrozenRouters whose gates differ from token to token (a stand-in for trained ones): random last layers;
    with stand_in_rank, stand-ins whose output is not zero (as after training)."""
    torch.manual_seed(seed)
    r = hf_wrap.FrozenRouters(kind, hidden, layout(kind, n_layers, **kw), exit_layers, mlp_hidden=16)
    for gate in list(r.gates) + list(r.exits):
        torch.nn.init.normal_(gate.net[-1].weight, std=1.0)
        torch.nn.init.zeros_(gate.net[-1].bias)
    if stand_in_rank:                                             # the same gates, with stand-ins
        gates = r.state_dict()
        r = hf_wrap.FrozenRouters(kind, hidden, r.units, exit_layers, mlp_hidden=16, stand_in_rank=stand_in_rank)
        r.load_state_dict(gates, strict=False)
        for s in r.stand_ins:
            torch.nn.init.normal_(s.up.weight, std=0.1)
    return r.eval()


def healed_routers(model, kind="skip", heal_rank=4, tail_layers=0, fresh=False, seed=0, **kw):
    """spread_routers' gates (tail_layers: groups 1, 2, 3 and the tail after them) with healing on every layer from
    the first routed one; its corrections random (as after training), or zero (fresh, as tune.py starts them)."""
    if tail_layers:
        kw = dict(R=LAYERS - 1 - tail_layers, base_layers=1, tail_layers=tail_layers, **kw)
    plain = spread_routers(kind, seed=seed, **kw)
    r = hf_wrap.FrozenRouters(kind, 64, plain.units, mlp_hidden=16, heal_rank=heal_rank,
                              heal_layers=range(plain.units[0][0], LAYERS),
                              heal_shapes=hf_wrap.heal_shapes(model.model.layers[0]), tail_layers=tail_layers)
    r.load_state_dict(plain.state_dict(), strict=False)
    if not fresh:
        for heal in r.heals:
            for up in heal.up.values():
                torch.nn.init.normal_(up.weight, std=0.1)
    return r.eval(), plain


def rows_cost(counter, ad, stood=0.0):
    """The layer calls a routed pass made, from the rows each layer's projections were fed (RowCounter):
    attention (q_proj) and the MLP (gate_proj) by their shares, healing at its shares on the healed layers, and
    `stood` stand-in calls."""
    cost = ad.stand_in_share * stood
    for l in range(LAYERS):
        q, mlp = counter.rows[l, "self_attn.q_proj"], counter.rows[l, "mlp.gate_proj"]
        cost += ad.attn_share * q + (1 - ad.attn_share) * mlp
        if l in ad.heal:
            cost += ad.heal_attn_share * q + ad.heal_mlp_share * mlp
    return cost


def tune_config(**overrides):
    """tune.py's settings at a tiny size, on the dataset's own text (self_distill=0), with overrides."""
    return tune.default_config(**{**dict(device="cpu", dtype="float32", block_size=16, batch_size=4, eval_iters=2,
                                         calib_windows=4, max_iters=4, eval_interval=2, log_interval=2,
                                         warmup_iters=1, R=4, tail_layers=0, self_distill=0), **overrides})


def char_model(tmp_path=None, arch="llama", **kw):
    """A tiny model over TEXT's characters with its char tokenizer (saved to tmp_path when given)."""
    from data import Tokenizer
    tok = Tokenizer.build("char", TEXT)
    model = tiny(arch, vocab_size=tok.vocab_size, **kw)
    hf_tok = tok.to_hf()
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        hf_tok.save_pretrained(tmp_path)
    return model, hf_tok


def served(tmp_path, monkeypatch):
    """char_model() served to tune.py in place of load_hf, with TEXT as a dataset file: (model, tok, its path)."""
    model, tok = char_model()
    (tmp_path / "text.txt").write_text(TEXT)
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: (model, tok))
    return model, tok, str(tmp_path / "text.txt")


def is_0_or_1(w):
    """Straight-through weights are (z > 0) + w - w.detach(): 0 or 1 up to one rounding."""
    return bool(((w.abs() < 1e-6) | ((w - 1).abs() < 1e-6)).all())


# -----------------------------------------------------------------------------
# The tuning forward and its loss

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_soft_forward_without_routers_is_the_model(arch):
    """HF's own layers with our explicit causal (and sliding-window) masks give the model's logits."""
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    logits, weights, _ = soft_forward(model, None, ids)
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert weights is None


@pytest.mark.parametrize("kind", KINDS)
def test_router_only_gradients(kind):
    model = tiny("llama").requires_grad_(False)
    r = spread_routers(kind, exit_layers=(3,)).train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, weights, states = soft_forward(model, r, ids)
    assert weights.shape == (2, 16, len(r.units)) and weights.dtype == torch.float32 and set(states) == {3}
    assert 0 <= float(weights.detach().min()) and float(weights.detach().max()) <= 1         # continue weights, not logits
    with torch.no_grad():
        full = soft_forward(model, None, ids)[0]
    loss, parts = tune._tuning_loss(logits, ids, weights, tune_config(gate_entropy_weight=0.1), it=100,
                                    full_logits=full)
    assert set(parts) == {"fit", "penalty", "mean_weight", "entropy"} and parts["fit"] > 0
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.gates.parameters())
    assert all(p.grad is None for p in r.exits.parameters())      # phase 1 does not touch the exit gates


def test_kl_fit_is_zero_at_the_full_model_and_lm_without_it():
    """loss='kl': the fit is KL(full || routed), 0 when the routed logits are the full ones; without full_logits
    the fit is the LM loss on Y."""
    g = torch.Generator().manual_seed(0)
    logits, Y = torch.randn(2, 5, VOCAB, generator=g), torch.randint(0, VOCAB, (2, 5), generator=g)
    w = torch.full((2, 5, 3), 0.5)
    cfg = tune_config(penalty_weight=0.0, gate_entropy_weight=0.0)
    assert tune._tuning_loss(logits, Y, w, cfg, 0, full_logits=logits)[1]["fit"] == pytest.approx(0, abs=1e-6)
    assert tune._tuning_loss(logits, Y, w, cfg, 0, full_logits=logits + 1.0)[1]["fit"] == pytest.approx(0, abs=1e-6)
    other = torch.randn(2, 5, VOCAB, generator=g)
    assert tune._tuning_loss(logits, Y, w, cfg, 0, full_logits=other)[1]["fit"] > 0.1
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), Y.flatten())
    assert tune._tuning_loss(logits, Y, w, cfg, 0)[1]["fit"] == pytest.approx(float(lm), rel=1e-5)


def test_straight_through_gate():
    """hard=True: inference's 0/1 decision (logit > 0) forward, the sigmoid's gradient backward."""
    r = hf_wrap.FrozenRouters("skip", 8, [(1, 2)], mlp_hidden=0)
    r.gates[0] = torch.nn.Identity()                              # the gate's logit is its input: the rule alone
    z = torch.tensor([-2.0, 0.5]).view(1, 2, 1).requires_grad_()
    w, _ = r.continue_weights(0, z, None, hard=True)
    w.sum().backward()
    assert w.flatten().tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    s = torch.sigmoid(z.detach())
    torch.testing.assert_close(z.grad, s * (1 - s))
    soft, _ = r.continue_weights(0, z, None, hard=False)
    torch.testing.assert_close(soft, s)


def test_continue_weights_follow_each_kind():
    """skip: sigmoid(z_u), whatever is carried; expert_choice: the product of sigmoids so far (hierarchical, never
    rising: out is out for good); token_choice: P(depth > u) under the softmax over depths 0..U, from one
    decision at unit 0. Hard: the same rules on the 0/1 decisions."""
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(2, 7, 64, generator=g) for _ in range(4)]     # a different state entering each unit

    def weights(r, hard=False, states=h):
        carry, ws = None, []
        for u in range(len(r.units)):
            w, carry = r.continue_weights(u, states[u], carry, hard)
            ws.append(w)
        return torch.cat(ws, -1)                                   # (B, T, U)

    with torch.no_grad():
        skip = spread_routers("skip", n_layers=6)                  # units 1..4: four gates
        z = torch.cat([skip.gates[u](h[u]) for u in range(4)], -1)
        torch.testing.assert_close(weights(skip), torch.sigmoid(z))
        w, _ = skip.continue_weights(1, h[1], carry=torch.zeros(2, 7, 1))
        torch.testing.assert_close(w, torch.sigmoid(z[..., 1:2]))

        ec = spread_routers("expert_choice")
        z = torch.cat([ec.gates[u](h[u]) for u in range(4)], -1)
        W = weights(ec)
        torch.testing.assert_close(W, torch.sigmoid(z).cumprod(-1))
        assert (W[..., 1:] <= W[..., :-1]).all()
        # a token whose own gate at unit u says "go on" (z_u > 0) stays out once an earlier gate stopped it
        H = weights(ec, hard=True)
        assert is_0_or_1(H) and (H[..., 1:] <= H[..., :-1] + 1e-6).all()
        torch.testing.assert_close(H, (z > 0).float().cumprod(-1))
        assert bool(((z[..., 1:] > 0) & (H[..., 1:] < 0.5)).any())   # the hierarchy overrode an open gate

        tc = spread_routers("token_choice")
        p = torch.softmax(tc.gates[0](h[0]), -1)                   # (B, T, U + 1) over depths 0..U
        W = weights(tc)
        want = torch.stack([p[..., u + 1:].sum(-1) for u in range(4)], -1)   # P(depth > u)
        torch.testing.assert_close(W, want)
        junk = [h[0]] + [torch.full_like(h[0], 1e3)] * 3           # units after 0 read only the carry
        torch.testing.assert_close(weights(tc, states=junk), want)
        H = weights(tc, hard=True)
        depth = p.argmax(-1, keepdim=True)
        torch.testing.assert_close(H, (depth > torch.arange(4)).float())


def test_token_choice_straight_through_gradient_is_the_soft_one():
    """hard=True forward is one-hot on the chosen depth; backward it is the softmax's (straight-through)."""
    tc = spread_routers("token_choice").train()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    coeff = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(3))
    grads = []
    for hard in (False, True):
        h = x.clone().requires_grad_()
        carry, ws = None, []
        for u in range(4):
            w, carry = tc.continue_weights(u, h, carry, hard)
            ws.append(w)
        W = torch.cat(ws, -1)
        assert is_0_or_1(W) == hard
        (W * coeff).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_straight_through_forward_is_inference(kind):
    """hard=True: the tuning forward makes inference's 0/1 decisions at bias 0. With one layer per unit it is then
    exactly the adapter's hard-routed prefill (a skipped or stopped token's K/V at a layer comes from its state
    there in both; ffn runs every token's attention in both), and the weights count the layers the adapter ran."""
    model, r = tiny("llama"), spread_routers(kind)
    assert all(b - a == 1 for a, b in r.units)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, w, _ = soft_forward(model, r, ids, hard=True)
    assert is_0_or_1(w)
    ad = DepthAdapter(model, router=kind, routers=r, bias=0.0)
    routed, st = ad.prefill_logits(ids)
    torch.testing.assert_close(logits, routed, atol=1e-4, rtol=1e-4)
    assert 0 < st["compute_saved_pct"] < 100
    n, L, ran = ids.numel(), LAYERS, float(w.sum())               # routed unit-runs, one layer each
    always = n * (L - len(r.units))                               # the layers outside the units
    if kind == "ffn":                                             # attention everywhere, the MLP where w = 1
        want = n * L * st["attn_share"] + (1 - st["attn_share"]) * (always + ran)
    else:
        want = always + ran
    assert st["layer_calls"] == pytest.approx(want, abs=1e-2)


@pytest.mark.parametrize("kind", ["skip", "ffn"])
def test_stand_ins_train_as_they_run(kind):
    """Stand-ins (hf_wrap.StandIn) for the tokens that pass over a unit: a new one (up = 0) is the plain skip; a
    trained one changes the output, and the tuning forward's 0/1 decisions are the adapter's prefill, which is its
    cached decode, with each stand-in counted in the layer calls at its weights' share."""
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    plain = DepthAdapter(model, router=kind, routers=spread_routers(kind), bias=0.0).prefill_logits(ids)
    fresh = spread_routers(kind, stand_in_rank=8)
    for s in fresh.stand_ins:
        torch.nn.init.zeros_(s.up.weight)
    torch.testing.assert_close(DepthAdapter(model, router=kind, routers=fresh, bias=0.0).prefill_logits(ids)[0],
                               plain[0])
    r = spread_routers(kind, stand_in_rank=8)
    with torch.no_grad():
        logits, w, _ = soft_forward(model, r, ids, hard=True)
    ad = DepthAdapter(model, router=kind, routers=r, bias=0.0)
    routed, st = ad.prefill_logits(ids)
    torch.testing.assert_close(logits, routed, atol=1e-4, rtol=1e-4)
    assert (routed - plain[0]).abs().max() > 1e-3                 # the stand-ins did something
    n, ran, stood = ids.numel(), float(w.sum()), float((1 - w).sum())    # unit runs; skips, a stand-in call each
    always = n * (LAYERS - len(r.units))
    share = st["attn_share"] if kind == "ffn" else 0.0            # ffn: attention everywhere, the MLP where w = 1
    want = n * LAYERS * share + (1 - share) * (always + ran) + ad.stand_in_share * stood
    assert st["layer_calls"] == pytest.approx(want, abs=1e-2)
    assert 0 < ad.stand_in_share < 0.1
    prompt, mask = prompts(3)
    out, gst = ad.generate(prompt, attention_mask=mask, max_new_tokens=12, return_logits=True)
    full_mask = torch.cat([mask, torch.ones(3, out.shape[1] - 1 - prompt.shape[1], dtype=mask.dtype)], 1)
    tf, _ = ad.prefill_logits(out[:, :-1], attention_mask=full_mask)
    torch.testing.assert_close(tf[:, prompt.shape[1] - 1:], gst["logits"], atol=1e-4, rtol=1e-4)


def test_penalty_pushes_mean_gate_to_target():
    """A few dozen steps: the hinge penalty pulls the mean continue weight from ~0.95 down to target_active_ratio,
    where the LM loss holds it. The targets are the model's own greedy predictions, so the LM loss wants every
    layer (on random text a random model's layers are noise, and skipping them would lower the loss by itself)."""
    model = tiny("llama").requires_grad_(False)
    r = hf_wrap.FrozenRouters("skip", 64, hf_wrap.unit_layout(LAYERS), mlp_hidden=16).train()
    cfg = tune_config(target_active_ratio=0.4, penalty_weight=5.0, penalty_warmup_iters=5)
    opt = torch.optim.AdamW(r.parameters(), lr=2e-2, weight_decay=0.0)
    gen, means = torch.Generator().manual_seed(0), []
    for it in range(60):
        ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
        with torch.no_grad():
            Y = model(ids).logits.argmax(-1)
        logits, weights, _ = soft_forward(model, r, ids)
        loss, parts = tune._tuning_loss(logits, Y, weights, cfg, it)
        loss.backward()
        opt.step()
        opt.zero_grad()
        means.append(parts["mean_weight"])
    assert means[0] > 0.9 and means[4] > 0.9                       # warm-up: lambda = 0
    late = sum(means[-15:]) / 15
    assert abs(late - 0.4) < 0.1, means[-15:]


def test_entropy_term_pushes_gates_to_0_or_1():
    """gate_entropy_weight > 0 must move continue weights away from 0.5 (an earlier version had the right value
    and a zero gradient). Only the entropy term here: each gate logit grows in magnitude, keeping its sign."""
    z = torch.tensor([[[-0.8, -0.1, 0.2, 1.0]]], requires_grad=True)
    cfg = tune_config(penalty_weight=0.0, gate_entropy_weight=1.0)
    opt = torch.optim.SGD([z], lr=2.0)
    start = z.detach().clone()
    for it in range(30):
        loss, parts = tune._tuning_loss(torch.zeros(1, 1, VOCAB), torch.zeros(1, 1, dtype=torch.long),
                                        torch.sigmoid(z), cfg, it)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert (z.detach().abs() > 1.5 * start.abs()).all() and (z.detach().sign() == start.sign()).all(), z


def test_tuning_freezes_the_base_byte_for_byte(tmp_path, monkeypatch):
    """The whole loop (phase 1, exit gates, keep_ratio cutoffs, bias search) leaves every base weight
    byte-identical, and writes a router file that knows its model, layout, cutoffs and the bias it found: the
    adapter loaded from the file measures the same layer-call ratio on the calibration text."""
    model, tok, text = served(tmp_path, monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tune_config(hf="some/model", out_dir=str(tmp_path / "out"), dataset=text,
                      exit_layers=(3,), exit_iters=3, target_speedup=1.25, target_tol=0.02, weight_decay=0.1,
                      keep_ratios=(0.3, 0.55))
    tune.tune_routers(cfg)
    for k, v in model.state_dict().items():
        assert v.numpy().tobytes() == before[k].numpy().tobytes(), k
    path = str(tmp_path / "out" / "routers.pt")
    blob = hf_wrap.read_router_file(path)
    assert blob["model"] == "some/model" and blob["router"] == "skip" and blob["exits_trained"]
    assert blob["units"] == [[l, l + 1] for l in range(1, LAYERS - 1)] and blob["exit_layers"] == [3]
    assert sorted(blob["cutoffs"]) == ["0.30", "0.55"] and all(len(c) == LAYERS - 2 for c in blob["cutoffs"].values())
    assert "hard_threshold" not in blob and "gate_logit_quantiles" not in blob
    assert blob["target"]["reached"] and abs(blob["target"]["calib_ratio"] - 0.8) <= 0.02
    assert -30 <= blob["bias"] <= 30
    # the file's bias (and exit gates) reproduce the search's measurement on its calibration windows
    ad = DepthAdapter(model, router="skip", router_path=path)
    assert ad.bias == blob["bias"] and ad.use_exits and ad.exit_threshold == cfg["exit_threshold"]
    train_ids, _ = data.corpus_ids(tok, cfg["dataset"])
    calib = data.text_windows(train_ids, cfg["block_size"], cfg["calib_windows"],
                              torch.Generator().manual_seed(cfg["seed"] + 2))
    ratio = tune.eval_ppl(ad, calib, cfg["batch_size"])["layer_ratio"]
    assert ratio == pytest.approx(blob["target"]["calib_ratio"], abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_tuning_each_kind_loads_and_generates(kind, tmp_path, monkeypatch):
    """One short tuning run per kind: the base stays byte-identical, and the file loads through router_path
    (kind, layout, bias and, but for token-choice, keep_ratio cutoffs) and generates."""
    model, tok, text = served(tmp_path, monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tune_config(hf="some/model", out_dir=str(tmp_path / "out"), dataset=text,
                      router=kind, R=3, keep_ratios=(0.5,))
    tune.tune_routers(cfg)
    for k, v in model.state_dict().items():
        assert v.numpy().tobytes() == before[k].numpy().tobytes(), k
    path = str(tmp_path / "out" / "routers.pt")
    blob = hf_wrap.read_router_file(path)
    units = layout(kind, R=3)
    assert blob["router"] == kind and blob["model"] == "some/model" and blob["units"] == [list(u) for u in units]
    assert blob["bias"] == 0.0 and not blob["exits_trained"]                   # no target: bias 0
    assert ("cutoffs" in blob) == (kind != "token_choice")
    ad = DepthAdapter(model, router=kind, router_path=path)
    assert not ad.random_routers and ad.routers.kind == kind and ad.units == units and ad.bias == 0.0
    ids = torch.tensor([tok(TEXT[:40])["input_ids"]])
    out, st = ad.generate(ids, max_new_tokens=12)
    assert out.shape == (1, ids.shape[1] + 12) and torch.equal(out[:, :ids.shape[1]], ids)
    assert st["tokens"] == 11 and 0 <= st["compute_saved_pct"] < 100
    if kind != "token_choice":
        assert len(blob["cutoffs"]["0.50"]) == len(units)
        kr = DepthAdapter(model, router=kind, router_path=path, keep_ratio=0.5)
        assert torch.equal(kr.cutoffs, torch.tensor(blob["cutoffs"]["0.50"]))
        out, _ = kr.generate(ids, max_new_tokens=12)
        _, st = kr.prefill_logits(ids)                          # text like the calibration's: some tokens stop
        assert out.shape == (1, ids.shape[1] + 12) and 0 < st["compute_saved_pct"] < 100, st


def test_init_gates_influence_starts_at_the_static_drop(tmp_path, monkeypatch):
    """init_gates='influence': before any step, the gates of the units with the lowest block influence are off for
    every token and the rest on, round((1 - target_active_ratio) * units) of them off; other kinds are refused."""
    model, tok, text = served(tmp_path, monkeypatch)
    cfg = tune_config(hf="some/model", dataset=text, out_dir=str(tmp_path / "a"),
                      init_gates="influence", target_active_ratio=0.5, max_iters=0, keep_ratios=())
    tune.tune_routers(cfg)
    r, _ = hf_wrap.load_routers(str(tmp_path / "a" / "routers.pt"), model.config)
    train_ids, _ = data.corpus_ids(tok, cfg["dataset"])
    calib = data.text_windows(train_ids, cfg["block_size"], cfg["calib_windows"],
                              torch.Generator().manual_seed(cfg["seed"] + 2))
    bi = tune.block_influence(model, calib, cfg["batch_size"])
    off = sorted(sorted(range(len(r.units)), key=lambda u: bi[r.units[u][0]])[:round(0.5 * len(r.units))])
    with torch.no_grad():
        z = torch.cat([g(torch.randn(5, model.config.hidden_size)) for g in r.gates], -1)    # (5, units)
    assert [u for u in range(len(r.units)) if (z[:, u] < 0).all()] == off
    assert all((z[:, u] > 0).all() for u in range(len(r.units)) if u not in off)
    with pytest.raises(SystemExit, match="init_gates"):
        tune.tune_routers(tune_config(hf="some/model", dataset=text, init_gates="influence",
                                      router="token_choice", out_dir=str(tmp_path / "b")))


@pytest.mark.parametrize("kind", ["skip", "ffn"])
def test_tuning_trains_stand_ins(kind, tmp_path, monkeypatch):
    """--stand_in_rank: the stand-ins learn with the gates (their output starts at zero and must not stay there),
    the file carries them, init_from brings them back, and a wrong rank or a grouped unit is refused."""
    model, tok, text = served(tmp_path, monkeypatch)
    common = dict(hf="some/model", dataset=text, router=kind, keep_ratios=(0.5,))
    tune.tune_routers(tune_config(out_dir=str(tmp_path / "a"), stand_in_rank=4, **common))
    path = str(tmp_path / "a" / "routers.pt")
    r, blob = hf_wrap.load_routers(path, model.config)
    assert blob["stand_in_rank"] == 4 and all(float(s.up.weight.detach().abs().max()) > 0 for s in r.stand_ins)
    tune.tune_routers(tune_config(out_dir=str(tmp_path / "b"), stand_in_rank=4, init_from=path, max_iters=0,
                                  **common))
    again, _ = hf_wrap.load_routers(str(tmp_path / "b" / "routers.pt"), model.config)
    for a, b in zip(r.stand_ins.state_dict().values(), again.stand_ins.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(SystemExit, match="stand_in_rank=4"):
        tune.tune_routers(tune_config(out_dir=str(tmp_path / "c"), stand_in_rank=8, init_from=path, **common))
    with pytest.raises(SystemExit, match="router_group=1"):
        tune.tune_routers(tune_config(out_dir=str(tmp_path / "d"), stand_in_rank=4, router_group=2, **common))


# -----------------------------------------------------------------------------
# Hard routing through the adapter: causal, exact at the extremes, really skipping

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_teacher_forced_logits_equal_decode(arch):
    """prefill_logits (what perplexity is measured on) over a generated sequence equals generate's own logits at
    every decoded position: the routing is causal and the skip / exit K/V fills agree across chunks."""
    model = tiny(arch)
    r = spread_routers(exit_layers=(3, 4))
    ad = DepthAdapter(model, router="skip", routers=r, bias=0.0, exit_threshold=0.7)
    ids, mask = prompts(3)
    out, st = ad.generate(ids, attention_mask=mask, max_new_tokens=40, return_logits=True)
    assert 0 < st["compute_saved_pct"] < 100 and st["kv_only_layer_calls"] > 0
    full_mask = torch.cat([mask, torch.ones(3, out.shape[1] - 1 - ids.shape[1], dtype=mask.dtype)], 1)
    counter = RowCounter(model)
    logits, st2 = ad.prefill_logits(out[:, :-1], attention_mask=full_mask)
    counter.remove()
    T0 = ids.shape[1]
    torch.testing.assert_close(logits[:, T0 - 1:], st["logits"], atol=1e-4, rtol=1e-4)
    # the stats are the work done: MLP rows = layer calls; every slot (padding too) writes K/V at every layer, and
    # the valid tokens that ran no query there are the K/V-only fills
    valid = int(full_mask.sum())
    mlp = sum(counter.rows[l, "mlp.gate_proj"] for l in range(LAYERS))
    kv_only = sum(valid - counter.rows[l, "self_attn.q_proj"] for l in range(LAYERS))
    assert all(counter.rows[l, "self_attn.k_proj"] == full_mask.numel() for l in range(LAYERS))
    assert mlp == pytest.approx(st2["layer_calls"], abs=1e-2) and mlp < st2["layer_calls_full"]
    assert kv_only == st2["kv_only_layer_calls"] > 0
    assert st2["tokens"] == valid


def test_skip_extremes_are_exact():
    """Every gate open (bias -inf) = the model itself; every gate shut (bias +inf) = the routed layers dropped
    (ShortGPT-style)."""
    model = tiny("llama")
    r = spread_routers()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    opened, st = DepthAdapter(model, router="skip", routers=r, bias=-math.inf).prefill_logits(ids)
    torch.testing.assert_close(opened, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert st["compute_saved_pct"] == pytest.approx(0, abs=1e-6) and st["kv_only_layer_calls"] == 0
    shut, st = DepthAdapter(model, router="skip", routers=r, bias=math.inf).prefill_logits(ids)
    routed = [l for a, b in r.units for l in range(a, b)]
    dropped, st_drop = DepthAdapter(model, router="drop", drop_layers=routed).prefill_logits(ids)
    torch.testing.assert_close(shut, dropped, atol=1e-5, rtol=1e-5)
    assert st["layer_calls"] == pytest.approx(2 * 24 * (LAYERS - len(routed)), abs=1e-2)
    assert st_drop["layer_calls"] == 2 * 24 * (LAYERS - len(routed))
    assert st["kv_only_layer_calls"] == 2 * 24 * len(routed)        # a skipped layer still gets K/V
    assert st_drop["kv_only_layer_calls"] == 0                     # a dropped layer needs no K/V at all


@pytest.mark.parametrize("kind", KINDS)
def test_every_gate_open_is_the_model(kind):
    """bias -inf (token-choice: a huge negative depth bias, every token at full depth) is the full model."""
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    bias = -1e9 if kind == "token_choice" else -math.inf
    opened, st = DepthAdapter(model, router=kind, routers=spread_routers(kind), bias=bias).prefill_logits(ids)
    torch.testing.assert_close(opened, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert st["compute_saved_pct"] == pytest.approx(0, abs=1e-6) and st["kv_only_layer_calls"] == 0


def test_token_choice_bias_minus_inf_is_full_depth():
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    _, st = DepthAdapter(model, router="token_choice", routers=spread_routers("token_choice"),
                         bias=-math.inf).prefill_logits(ids)
    assert st["depth_hist"][-1] == st["tokens"]


def test_ffn_runs_attention_for_every_token():
    """ffn routes the MLPs only: at every layer every token runs its query and output projection (its K/V are
    exact, nothing is K/V-only), while the MLP rows drop at the routed layers. Depth counts the MLPs run."""
    model = tiny("llama")
    r = spread_routers("ffn")
    ids, mask = prompts(3)
    n = int(mask.sum())
    counter = RowCounter(model)
    _, st = DepthAdapter(model, router="ffn", routers=r, bias=0.0).prefill_logits(ids, attention_mask=mask)
    counter.remove()
    routed = {l for a, b in r.units for l in range(a, b)}
    for l in range(LAYERS):
        assert counter.rows[l, "self_attn.q_proj"] == counter.rows[l, "self_attn.o_proj"] == n, l
        assert counter.rows[l, "mlp.gate_proj"] == n or l in routed, l
    mlp = sum(counter.rows[l, "mlp.gate_proj"] for l in range(LAYERS))
    assert 0 < sum(counter.rows[l, "mlp.gate_proj"] for l in routed) < n * len(routed)
    assert st["kv_only_layer_calls"] == 0 and 0 < st["compute_saved_pct"] < 100
    assert st["layer_calls"] == pytest.approx(n * LAYERS * st["attn_share"] + (1 - st["attn_share"]) * mlp, abs=1e-2)
    assert st["mean_depth"] * n == pytest.approx(mlp)
    # every gate shut: attention alone at the routed layers, and not the model any more
    counter = RowCounter(model)
    _, st = DepthAdapter(model, router="ffn", routers=r, bias=math.inf).prefill_logits(ids, attention_mask=mask)
    counter.remove()
    assert all(counter.rows[l, "mlp.gate_proj"] == 0 and counter.rows[l, "self_attn.q_proj"] == n for l in routed)
    assert st["kv_only_layer_calls"] == 0


def test_keep_ratio_cutoffs(tmp_path):
    """keep_ratio gives per-unit cutoffs: from calibrate(windows) (each routed layer then runs for keep_ratio of
    the calibration tokens: the calibration prefill and this one route alike), from the router file's cutoffs
    table (the same routing), or, with neither, from the prompt's own prefill (which keep_ratio of it)."""
    model = tiny("llama")
    r = spread_routers()
    ids = torch.randint(0, VOCAB, (4, 25), generator=torch.Generator().manual_seed(4))
    routed = [l for a, b in r.units for l in range(a, b)]
    ad = DepthAdapter(model, router="skip", routers=r, keep_ratio=0.3)
    with pytest.raises(ValueError, match="calibrate"):             # teacher forcing needs causal cutoffs
        ad.prefill_logits(ids)
    cut = ad.calibrate(ids)
    assert cut.shape == (len(r.units),)
    counter = RowCounter(model)
    logits, _ = ad.prefill_logits(ids)
    counter.remove()
    for l in routed:
        assert abs(counter.rows[l, "mlp.gate_proj"] / ids.numel() - 0.3) < 0.02, l
    # the file's table
    path = str(tmp_path / "routers.pt")
    hf_wrap.save_routers(path, r, model.config, model="tiny", cutoffs={"0.30": cut.tolist()})
    fa = DepthAdapter(model, router="skip", router_path=path, keep_ratio=0.3)
    assert torch.equal(fa.cutoffs, cut)
    torch.testing.assert_close(fa.prefill_logits(ids)[0], logits)
    with pytest.raises(ValueError, match="keep_ratio"):
        DepthAdapter(model, router="skip", router_path=path, keep_ratio=0.5)
    # neither: the prompt's own prefill sets the cutoffs
    counter = RowCounter(model)
    DepthAdapter(model, router="skip", routers=r, keep_ratio=0.3).generate(ids, max_new_tokens=1)
    counter.remove()
    for l in routed:
        assert abs(counter.rows[l, "mlp.gate_proj"] / ids.numel() - 0.3) < 0.02, l


# -----------------------------------------------------------------------------
# Healing (low-rank corrections of the layers that run) and tail layers (group kinds)

@pytest.mark.parametrize("kind", KINDS)
def test_fresh_healing_changes_nothing_but_its_cost(kind):
    """A fresh correction (up = 0, as tune.py starts it) routes and predicts as the same gates without it, in the
    adapter and the tuning forward; the layer calls then count its weights' share on every healed layer run."""
    model = tiny("llama")
    r, plain = healed_routers(model, kind, fresh=True)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    ad, base = DepthAdapter(model, router=kind, routers=r, bias=0.0), DepthAdapter(model, router=kind, routers=plain,
                                                                                  bias=0.0)
    counter = RowCounter(model)
    healed, st = ad.prefill_logits(ids)
    counter.remove()
    want, st0 = base.prefill_logits(ids)
    torch.testing.assert_close(healed, want, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(soft_forward(model, r, ids)[0], soft_forward(model, plain, ids)[0])
    assert sorted(ad.heal) == list(range(r.units[0][0], LAYERS)) and 0 < ad.heal_attn_share < ad.heal_mlp_share
    assert st["layer_calls"] == pytest.approx(rows_cost(counter, ad), abs=1e-2) and st["layer_calls"] > st0["layer_calls"]
    kv = r.heals[0].share(("k_proj", "v_proj"), ad.layer_weights)
    assert ad.kv_share == pytest.approx(base.kv_share + kv)                   # a K/V-only fill is healed too


@pytest.mark.parametrize("kind", KINDS)
def test_healing_agrees_in_prefill_decode_and_the_tuning_forward(kind):
    """Trained-like corrections change the output; the tuning forward's 0/1 decisions (soft_forward, hard) are the
    adapter's prefill, which is its cached decode; its hooks are gone afterwards (the model is itself again)."""
    model = tiny("llama")
    r, plain = healed_routers(model, kind, tail_layers=2 if kind in GROUP_KINDS else 0)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, w, _ = soft_forward(model, r, ids, hard=True)
        torch.testing.assert_close(soft_forward(model, None, ids)[0], model(ids).logits, atol=1e-4, rtol=1e-4)
    assert is_0_or_1(w) and all(not m._forward_hooks for m in model.modules())
    ad = DepthAdapter(model, router=kind, routers=r, bias=0.0)
    routed, st = ad.prefill_logits(ids)
    torch.testing.assert_close(logits, routed, atol=1e-4, rtol=1e-4)
    unhealed, _ = DepthAdapter(model, router=kind, routers=plain, bias=0.0).prefill_logits(ids)
    assert (routed - unhealed).abs().max() > 1e-3 and 0 < st["compute_saved_pct"] < 100
    prompt, mask = prompts(3)
    out, gst = ad.generate(prompt, attention_mask=mask, max_new_tokens=12, return_logits=True)
    full_mask = torch.cat([mask, torch.ones(3, out.shape[1] - 1 - prompt.shape[1], dtype=mask.dtype)], 1)
    counter = RowCounter(model)
    tf, tst = ad.prefill_logits(out[:, :-1], attention_mask=full_mask)
    counter.remove()
    torch.testing.assert_close(tf[:, prompt.shape[1] - 1:], gst["logits"], atol=1e-4, rtol=1e-4)
    assert tst["layer_calls"] == pytest.approx(rows_cost(counter, ad), abs=1e-2)


@pytest.mark.parametrize("kind", ["skip", "expert_choice"])
def test_full_depth_is_exact_with_a_healing_file(kind, tmp_path):
    """Healing is off at full depth: with a healing file loaded, --no_skip and keep_ratio=1.0 give generate's
    tokens and logits (the corrections would change them: see the test above)."""
    model = tiny("llama")
    r, _ = healed_routers(model, kind)
    path = str(tmp_path / "routers.pt")
    hf_wrap.save_routers(path, r, model.config, model="tiny")
    ids, mask = prompts(3)
    ref_ids, ref_logits = hf_greedy(model, ids, mask, 16)
    for ad in (DepthAdapter(model, router=kind, router_path=path, keep_ratio=1.0),
               DepthAdapter(model, router=kind, router_path=path, no_skip=True)):
        out, st = ad.generate(ids, attention_mask=mask, max_new_tokens=16, return_logits=True)
        assert torch.equal(out, ref_ids) and st["compute_saved_pct"] == 0
        torch.testing.assert_close(st["logits"], ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", GROUP_KINDS)
def test_tail_layers_run_for_every_token(kind):
    """tail_layers=2 on 6 layers: groups 1, 2, 3, then layers 4 and 5 for every token, stopped or not (counted from
    the rows each projection was fed), in prefill and decode alike; the tuning forward's 0/1 decisions are the
    adapter's prefill; depths count the groups, layers_per_depth the tail in every depth."""
    model = tiny("llama")
    r = spread_routers(kind, R=3, base_layers=1, tail_layers=2)
    assert r.units == [(1, 2), (2, 3), (3, 4)]
    ad = DepthAdapter(model, router=kind, routers=r, bias=0.0)
    assert ad.tail_start == 4 and ad.layers_per_depth == [3, 4, 5, 6]
    ids, mask = prompts(3)
    out, gst = ad.generate(ids, attention_mask=mask, max_new_tokens=12, return_logits=True)
    full_mask = torch.cat([mask, torch.ones(3, out.shape[1] - 1 - ids.shape[1], dtype=mask.dtype)], 1)
    for prefill, n in ((True, int(full_mask.sum())), (False, int(mask.sum()) + 3 * 11)):   # generate: last not fed
        counter = RowCounter(model)
        tf, st = (ad.prefill_logits(out[:, :-1], attention_mask=full_mask) if prefill else
                  ad.generate(ids, attention_mask=mask, max_new_tokens=12))
        counter.remove()
        for l in (0, 4, 5):                                                   # layer 0 and the tail: everyone
            assert counter.rows[l, "self_attn.q_proj"] == counter.rows[l, "mlp.gate_proj"] == n, l
        assert counter.rows[3, "mlp.gate_proj"] < n                           # the last group: some stopped
        if prefill:                                                           # its stats: every token's
            assert st["layer_calls"] == pytest.approx(rows_cost(counter, ad), abs=1e-2)
            torch.testing.assert_close(tf[:, ids.shape[1] - 1:], gst["logits"], atol=1e-4, rtol=1e-4)
            assert st["depth_hist"][0] > 0 and st["layer_calls"] >= st["tokens"] * 3   # depth 0: layer 0 + tail
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, w, _ = soft_forward(model, r, x, hard=True)
    assert is_0_or_1(w) and float(w.min()) == 0
    torch.testing.assert_close(logits, ad.prefill_logits(x)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["skip", "expert_choice", "token_choice"])
def test_tuning_forward_is_inference_for_units_of_two_layers(kind):
    """Units of two layers (skip, router_group=2; groups of two): the tuning forward weighs each layer's update by
    its unit's weight, so at 0/1 a token that passes over a unit keeps its state through both layers and writes its
    K/V from it there, as the adapter does: the tuning forward is the adapter's prefill."""
    model = tiny("llama")
    kw = dict(group=2) if kind == "skip" else dict(R=2, base_layers=1, tail_layers=1)
    r = spread_routers(kind, **kw)
    assert all(b - a == 2 for a, b in r.units)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, w, _ = soft_forward(model, r, ids, hard=True)
    assert is_0_or_1(w) and 0 < float(w.mean()) < 1
    routed, _ = DepthAdapter(model, router=kind, routers=r, bias=0.0).prefill_logits(ids)
    torch.testing.assert_close(logits, routed, atol=1e-4, rtol=1e-4)


def test_tuning_trains_healing_and_tail_layers(tmp_path, monkeypatch):
    """--heal_rank: the corrections learn with the gates (from zero), the base stays byte-identical, the file carries
    them (and --tail_layers), init_from brings them back, a different rank is refused; heal_rank=0 writes no
    healing; tail_layers is refused where there are no groups."""
    model, tok, text = served(tmp_path, monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    common = dict(hf="some/model", dataset=text, router="expert_choice", R=2, keep_ratios=(0.5,), tail_layers=2)
    tune.tune_routers(tune_config(out_dir=str(tmp_path / "a"), heal_rank=4, **common))
    assert all(v.numpy().tobytes() == before[k].numpy().tobytes() for k, v in model.state_dict().items())
    path = str(tmp_path / "a" / "routers.pt")
    r, blob = hf_wrap.load_routers(path, model.config)
    assert blob["heal_rank"] == 4 and blob["heal_layers"] == list(range(2, LAYERS)) and blob["tail_layers"] == 2
    assert r.units == hf_wrap.group_layout(LAYERS, 2, 2, 2) and r.describe() == "expert_choice + tail 2 + healing r4"
    assert all(float(up.weight.detach().abs().max()) > 0 for heal in r.heals for up in heal.up.values())
    ad = DepthAdapter(model, router="expert_choice", router_path=path)
    assert sorted(ad.heal) == list(range(2, LAYERS)) and ad.tail_start == LAYERS - 2
    tune.tune_routers(tune_config(out_dir=str(tmp_path / "b"), heal_rank=4, init_from=path, max_iters=0, **common))
    again, _ = hf_wrap.load_routers(str(tmp_path / "b" / "routers.pt"), model.config)
    for a, b in zip(r.heals.state_dict().values(), again.heals.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(SystemExit, match="heal_rank=8"):
        tune.tune_routers(tune_config(out_dir=str(tmp_path / "c"), heal_rank=8, init_from=path, **common))
    tune.tune_routers(tune_config(out_dir=str(tmp_path / "d"), max_iters=0, **common))
    plain, blob = hf_wrap.load_routers(str(tmp_path / "d" / "routers.pt"), model.config, unfinished_ok=True)
    assert blob["heal_rank"] == 0 and plain.heals is None and not any("heal" in k for k in blob["state_dict"])
    for key, value in [("tail_layers", 1), ("heal_rank", -1)]:
        with pytest.raises(SystemExit, match=key):
            tune.tune_routers(tune_config(out_dir=str(tmp_path / "e"), hf="x", dataset=text, **{key: value}))


# -----------------------------------------------------------------------------
# Static dropping and the threshold search

def test_static_drop_picks_lowest_influence_never_layer_0():
    assert bench.static_drop_layers([0.0, 0.5, 0.1, 0.3, 0.2, 0.9], 2) == [2, 4]
    model = tiny("llama")
    windows = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(5))
    bi = tune.block_influence(model, windows, batch_size=2)
    ins, outs = {}, {}                                             # the same, from hooks on HF's own forward

    def hook(l):
        def record(module, args, kwargs, out):
            ins[l], outs[l] = args[0] if args else kwargs["hidden_states"], out
        return record

    hooks = [layer.register_forward_hook(hook(l), with_kwargs=True) for l, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(windows[:, :-1])
    for h in hooks:
        h.remove()
    want = [float((1 - torch.cosine_similarity(ins[l], outs[l], dim=-1)).mean()) for l in range(LAYERS)]
    assert bi == pytest.approx(want, abs=1e-5)
    drop = bench.static_drop_layers(bi, 2)
    assert 0 not in drop and drop == sorted(sorted(range(1, LAYERS), key=lambda l: bi[l])[:2])
    # dropping = HF's model with those layers removed
    keep = [l for l in range(LAYERS) if l not in drop]
    cut = AutoModelForCausalLM.from_config(CONFIGS["llama"](num_hidden_layers=len(keep))).eval()
    sd = model.state_dict()
    cut.load_state_dict({k if not k.startswith("model.layers.") else
                         f"model.layers.{keep.index(int(k.split('.')[2]))}." + ".".join(k.split(".")[3:]): v
                         for k, v in sd.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) in keep})
    logits, st = DepthAdapter(model, router="drop", drop_layers=drop).prefill_logits(windows[:, :-1])
    torch.testing.assert_close(logits, cut(windows[:, :-1]).logits, atol=1e-4, rtol=1e-4)


def test_target_search_converges():
    model = tiny("llama")
    r = spread_routers()
    windows = torch.randint(0, VOCAB, (8, 33), generator=torch.Generator().manual_seed(6))
    make = lambda b: DepthAdapter(model, router="skip", routers=r, bias=b)
    measure = lambda b: tune.eval_ppl(make(b), windows)
    b, found, reached = tune.search_cutoff(measure, -30.0, 30.0, 0.6, tol=0.01)
    assert reached and abs(found["layer_ratio"] - 0.6) <= 0.01
    assert abs(measure(b)["layer_ratio"] - found["layer_ratio"]) < 1e-9   # reproducible
    make = lambda v: DepthAdapter(model, router="entropy", R=LAYERS - 1, base_layers=1, threshold=v)
    v, found, reached = tune.search_cutoff(lambda v: tune.eval_ppl(make(v), windows), 0.0, 5.0, 0.7, tol=0.02)
    assert reached and abs(found["layer_ratio"] - 0.7) <= 0.02
    _, found, reached = tune.search_cutoff(lambda v: tune.eval_ppl(make(v), windows), 0.0, 5.0, 0.05)
    assert not reached and found["layer_ratio"] == pytest.approx(1 / LAYERS)   # below the 1 layer always run


def test_cheap_exit_search_matches_the_adapter():
    """bench.py --mode=ppl searches CALM's thresholds on statistics of the full model computed once
    (bench.exit_statistics / exit_ratio). The first exit point a statistic gives is the adapter's own decision for
    every token whose earlier tokens all ran at full depth, so at the extremes the two ratios are equal, and in
    between the ratio is monotone and lands near the adapter's (other tokens see shallower K/V)."""
    model = tiny("llama")
    windows = torch.randint(0, VOCAB, (6, 33), generator=torch.Generator().manual_seed(7))
    stats = bench.exit_statistics(model, windows, batch_size=3)
    assert stats["confidence"].shape == stats["entropy"].shape == (6 * 32, LAYERS - 1)
    assert bench.exit_ratio(stats, "confidence", 0.0)["layer_ratio"] == pytest.approx(1 / LAYERS)  # all at layer 1
    assert bench.exit_ratio(stats, "confidence", 1.01)["layer_ratio"] == 1.0                         # nobody exits
    ratios = [bench.exit_ratio(stats, "entropy", v)["layer_ratio"] for v in (0.0, 3.0, 4.0, 5.0, 9.0)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == 1.0 and ratios[-1] == pytest.approx(1 / LAYERS)
    v, found, reached = tune.search_cutoff(lambda v: bench.exit_ratio(stats, "entropy", v), 0.0, 9.0, 0.6, tol=0.02)
    assert reached
    real = tune.eval_ppl(DepthAdapter(model, router="entropy", R=LAYERS - 1, base_layers=1, threshold=v), windows)
    assert abs(real["layer_ratio"] - found["layer_ratio"]) < 0.1
    assert real["head_ratio"] > 0 and real["kv_ratio"] > 0                    # the exits' LM-head checks count


# -----------------------------------------------------------------------------
# The oracle (bench.OracleSkip) and the gap each row closes toward it

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_oracle_is_exact_at_full_share_and_keeps_h_below_its_threshold(arch):
    """Threshold 0 keeps every update: the model's own logits, every layer call. A threshold no update reaches:
    every token but the first (it always runs) keeps h through every layer, so it gets the LM head on its embedding
    (one row of layer calls, the rest K/V-only); with mlp_only, the model with every MLP's output zeroed (attention
    always, the MLPs only for the first tokens)."""
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(8))
    (B, T), n = ids.shape, ids.numel()
    with torch.no_grad():
        want = model(ids).logits
    for mlp_only in (False, True):
        logits, st = bench.OracleSkip(model, 0.0, mlp_only).prefill_logits(ids)
        assert torch.equal(logits, want) and st["layer_calls"] == pytest.approx(n * LAYERS)
        assert st["kv_only_layer_calls"] == 0
    logits, st = bench.OracleSkip(model, 1e9).prefill_logits(ids)
    with torch.no_grad():
        embed_only = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    torch.testing.assert_close(logits[:, 1:], embed_only[:, 1:])
    torch.testing.assert_close(logits[:, 0], want[:, 0])                      # the first token ran every layer
    assert st["layer_calls"] == B * LAYERS and st["kv_only_layer_calls"] == (n - B) * LAYERS
    logits, st = bench.OracleSkip(model, 1e9, mlp_only=True).prefill_logits(ids)
    zero_after_first = lambda mlp, args, out: torch.cat([out[:, :1], torch.zeros_like(out[:, 1:])], 1)
    hooks = [layer.mlp.register_forward_hook(zero_after_first) for layer in model.model.layers]
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits)                 # MLP outputs 0 but the first token's
    for hook in hooks:
        hook.remove()
    attn_share = DepthAdapter(model).attn_share
    assert st["layer_calls"] == pytest.approx((attn_share * n + (1 - attn_share) * B) * LAYERS)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])                # qwen2: sliding-window layers in the tail
def test_oracle_stop_is_exact_at_threshold_0_and_stops_by_the_adapters_rule(arch):
    """bench.OracleStop (expert_choice's oracle, tail 1 on 6 layers: groups 2, 3, 4, then layer 5 for everyone).
    Each group's stop KL is the KL to full depth of the model whose layers from that group to the tail return their
    input (everyone stopped there). KL < 0 stops nobody: the model's own logits, every layer call. A middle threshold:
    each token (but the first, the sink) runs the groups before its first close one, and the logits and the work are
    those of the model whose group layers keep the input of the tokens that stopped before them. Above every KL:
    everyone but the sink stops at the first group. at() reuses the stops' KLs; fewer calls as the threshold rises."""
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(8))
    (B, T), n = ids.shape, ids.numel()

    def hooked(keep):                                              # layers 2..4 keep y where keep(l), else h
        def edit(layer, args, kwargs, y, l):
            return torch.where(keep(l)[..., None], y, args[0] if args else kwargs["hidden_states"])
        hooks = [model.model.layers[l].register_forward_hook(functools.partial(edit, l=l), with_kwargs=True)
                 for l in (2, 3, 4)]
        with torch.no_grad():
            out = model(ids).logits.float()
        for hook in hooks:
            hook.remove()
        return out

    with torch.no_grad():
        want = model(ids).logits
    full = F.log_softmax(want.float(), -1)
    stop = bench.OracleStop(model, 0.0, tail_layers=1, R=3)
    assert stop.units == [(2, 3), (3, 4), (4, 5)]
    kl = stop._stop_kl(ids)
    for g, a in enumerate((2, 3, 4)):
        q = F.log_softmax(hooked(lambda l: torch.full((B, T), l < a)), -1)
        torch.testing.assert_close(kl[..., g], (full.exp() * (full - q)).sum(-1).clamp_min(0), atol=1e-5, rtol=1e-4)
    logits, st = stop.prefill_logits(ids)
    assert torch.equal(logits, want) and st["layer_calls"] == n * LAYERS and st["kv_only_layer_calls"] == 0
    v = float(kl[:, 1:].flatten().quantile(0.3))
    depth = torch.full((B, T), 3)
    for b in range(B):
        for t in range(1, T):
            depth[b, t] = next((g for g in range(3) if kl[b, t, g] < v), 3)
    assert 3 in depth[:, 1:] and len(set(depth[:, 1:].flatten().tolist())) >= 2   # mixed: some never stop
    logits, st = stop.at(v).prefill_logits(ids)
    torch.testing.assert_close(logits, hooked(lambda l: depth > l - 2))
    assert st["layer_calls"] == n * 3 + int(depth.sum())
    logits, st = stop.at(1e9).prefill_logits(ids)
    torch.testing.assert_close(logits, hooked(lambda l: torch.arange(T)[None].expand(B, T) == 0))
    assert st["layer_calls"] == n * 3 + B * 3 and st["kv_only_layer_calls"] == (n - B) * 3
    ratios = [tune.eval_ppl(stop.at(v), ids)["layer_ratio"] for v in (0.0, 1e-3, 1e-2, 0.1, 1.0, 1e9)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == 1.0 > ratios[-1]
    assert len(stop._kl) == 2                                      # ids, and the windows' inputs ids[:, :-1]


def test_oracle_perplexity_is_monotone_in_the_share():
    """The text is sampled from the full model itself, so the expected NLL of any predictor q on it is H(p) +
    KL(p || q): perplexity here measures how far q is from the full model. The oracle drops the smallest relative
    updates first, and a lower share drops a superset of them (only approximately: a dropped update changes the
    later states), so KL, and with it perplexity, grows as the share falls. 768 tokens and shares 0.15 apart keep
    the steps (1.5-24% of perplexity) above the sampling noise: it held for all 36 model and text seeds tried
    (llama, qwen2, mistral; 6 texts each; whole layers and MLPs)."""
    model = tiny("llama")
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, VOCAB, (8, 1), generator=g)
    with torch.no_grad():
        for _ in range(96):
            p = model(text).logits[:, -1].softmax(-1)
            text = torch.cat([text, torch.multinomial(p, 1, generator=g)], 1)
    full = tune.eval_ppl(DepthAdapter(model), text)["ppl"]
    for mlp_only in (False, True):
        measure = lambda v: tune.eval_ppl(bench.OracleSkip(model, v, mlp_only), text)
        assert measure(0.0)["ppl"] == pytest.approx(full, rel=1e-6)
        ppl = []
        for share in (0.85, 0.7, 0.55, 0.4):
            _, found, reached = tune.search_cutoff(measure, 0.0, 4.0, share, tol=0.02)
            assert reached, (mlp_only, share, found["layer_ratio"])
            ppl.append(found["ppl"])
        assert [full] + ppl == sorted([full] + ppl), (mlp_only, ppl)


def test_gap_closed_column(tmp_path):
    """bench.quality_table's gap closed, (static - ppl) / (static - oracle skip), recomputed here from each row's
    perplexity; and by hand: halfway is 0.5, beating the oracle is above 1."""
    table = [{"text": "a", "target depth": "80%", "method": m, "ppl": p}
             for m, p in ((bench.STATIC_ROW, 30.0), (bench.ORACLE_ROW, 20.0))]
    assert bench.gap_closed(table, dict(table[0], ppl=25.0)) == 0.5
    assert bench.gap_closed(table, dict(table[0], ppl=18.0)) == pytest.approx(1.2)
    assert bench.gap_closed(table, dict(table[0], text="b", ppl=18.0)) is None     # no static, oracle for "b"
    model, tok = char_model()
    (tmp_path / "text.txt").write_text(TEXT)
    rows, _ = bench.quality_table(model, tok, [], [str(tmp_path / "text.txt")], (0.8, 0.6), 16, 4, 4, 4, 0, 0.02)
    assert sum(r["method"].startswith("oracle") for r in rows) == 4               # whole layers and MLPs, 2 depths
    checked = 0
    for r in rows:
        at = {x["method"]: x["ppl"] for x in rows if x["target depth"] == r["target depth"]}
        if r["target depth"] == "100%" or r["method"] in (bench.STATIC_ROW, bench.ORACLE_ROW):
            assert r.get("gap closed") is None
            continue
        static, oracle = at[bench.STATIC_ROW], at[bench.ORACLE_ROW]
        assert r["gap closed"] == pytest.approx((static - r["ppl"]) / (static - oracle), rel=1e-9)
        checked += 1
    assert checked == 2 * 3                                                       # MLP oracle, confidence, entropy
    rows, _ = bench.quality_table(model, tok, [], [str(tmp_path / "text.txt")], (0.8,), 16, 4, 4, 4, 0, 0.02,
                                  calm=False)                                     # --ppl_calm=False: no CALM rows
    assert [r["method"] for r in rows] == ["full depth", bench.STATIC_ROW, bench.ORACLE_ROW, "oracle skip, MLPs only"]
    rows, _ = bench.quality_table(model, tok, [], [str(tmp_path / "text.txt")], (0.8,), 16, 4, 4, 4, 0, 0.02,
                                  calm=False, stop_tails=(2,))                   # --ppl_stop_tails: OracleStop's row
    assert rows[-1]["method"] == "oracle stop, expert_choice + tail 2" and rows[-1]["gap closed"] is not None
    with pytest.raises(SystemExit, match=r"ppl_stop_tails=\(6,\).*tail_layers=6"):   # no layers left to route
        bench.quality_table(model, tok, [], [str(tmp_path / "text.txt")], (0.8,), 16, 4, 4, 4, 0, 0.02, stop_tails=(6,))


# -----------------------------------------------------------------------------
# Router files and sample.py

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("heal_rank", [0, 4])
def test_router_file_round_trip(kind, heal_rank, tmp_path):
    """save_routers / load_routers: the same weights and layout (healing and tail layers included), the meta back
    as saved, the same routing."""
    model = tiny("llama")
    r = spread_routers(kind, exit_layers=(3,) if kind == "skip" else (),
                       stand_in_rank=4 if kind in ("skip", "ffn") else 0)
    if heal_rank:
        r, _ = healed_routers(model, kind, heal_rank, tail_layers=2 if kind in GROUP_KINDS else 0)
    path = str(tmp_path / "routers.pt")
    hf_wrap.save_routers(path, r, model.config, model="tiny", bias=0.25, exit_threshold=0.8, exits_trained=True)
    loaded, blob = hf_wrap.load_routers(path, model.config)
    assert loaded.kind == kind and loaded.units == r.units and loaded.exit_layers == r.exit_layers
    assert loaded.stand_in_rank == r.stand_in_rank and loaded.describe() == r.describe()
    assert (loaded.heal_rank, loaded.heal_layers, loaded.tail_layers) == (r.heal_rank, r.heal_layers, r.tail_layers)
    assert blob["router"] == kind and blob["mlp_hidden"] == 16 and blob["bias"] == 0.25 and blob["model"] == "tiny"
    for (ka, a), (kb, b) in zip(r.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    want, _ = DepthAdapter(model, router=kind, routers=r, bias=0.25, exit_threshold=0.8).prefill_logits(ids)
    ad = DepthAdapter(model, router=kind, router_path=path)                  # the file's bias by default
    assert ad.bias == 0.25
    torch.testing.assert_close(ad.prefill_logits(ids)[0], want)


def test_router_file_round_trip_through_sample_py(tmp_path):
    model, tok = char_model(tmp_path / "model")
    r = spread_routers(hidden=64, exit_layers=(3,))
    path = str(tmp_path / "routers.pt")
    hf_wrap.save_routers(path, r, model.config, model=str(tmp_path / "model"), bias=0.4, exit_threshold=0.8,
                    exits_trained=True)
    loaded, blob = hf_wrap.load_routers(path, model.config)
    for a, b in zip(r.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    ad = DepthAdapter(model, router="skip", router_path=path)                 # the file's bias and exits by default
    assert ad.bias == 0.4 and ad.exit_threshold == 0.8 and ad.use_exits
    ids = torch.tensor([tok("KING:")["input_ids"]])
    out, st = ad.generate(ids, max_new_tokens=12)
    want = tok.decode(out[0, ids.shape[1]:])
    p = subprocess.run([sys.executable, "sample.py", "--routers", path, "--prompt", "KING:", "--max_new_tokens", "12",
                        "--device", "cpu", "--return_depth_trace"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert want in p.stdout and "compute saved" in p.stdout
    assert f"mean {st['mean_depth']:.2f}" in p.stdout
    # TODO(sample.py CLI rewrite, --threshold replaces --hard_threshold): once its output settles, also check the
    # routers line; at the time of writing sample.py printed exactly
    #   "  skip routers: bias 0.4; exit gates at layers [3], exit_threshold 0.8; K/V-only layer fills <n>"
    # and "depth trace" (with --return_depth_trace).


# -----------------------------------------------------------------------------
# What a run leaves: the default home, unfinished and untrained files, resume, recalibration, its last lines

def sample_py(*args, cache):
    """python sample.py, offline, with its cache folder at `cache`."""
    return subprocess.run([sys.executable, "sample.py", "--device", "cpu", "--max_new_tokens", "8", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "NANOMOR_CACHE": str(cache)})


def test_cache_folder_keys(tmp_path, monkeypatch):
    """One folder per model in $NANOMOR_CACHE: a built-in name as is, a hub name with -- for /, a local folder by
    its name and a hash of its absolute path (two folders of one name stay apart)."""
    monkeypatch.setenv("NANOMOR_CACHE", str(tmp_path / "cache"))
    assert data.cache_folder("smollm2-135m") == str(tmp_path / "cache" / "smollm2-135m")
    assert data.cache_folder("Qwen/Qwen2.5-0.5B") == str(tmp_path / "cache" / "Qwen--Qwen2.5-0.5B")
    (tmp_path / "a" / "m").mkdir(parents=True)
    (tmp_path / "b" / "m").mkdir(parents=True)
    a, b = data.cache_folder(str(tmp_path / "a" / "m")), data.cache_folder(str(tmp_path / "b" / "m"))
    assert a != b and os.path.basename(a).startswith("m-") and os.path.dirname(a) == str(tmp_path / "cache")
    assert data.default_routers("smollm2-135m", "skip") == str(tmp_path / "cache" / "smollm2-135m" / "routers-skip.pt")


def test_tune_writes_the_default_home_and_sample_finds_it(tmp_path, monkeypatch, capsys):
    """No out_dir: tune writes routers-<kind>.pt in the model's cache folder, and its last lines are the sample
    command and one closing line (held-out ppl, the layer calls saved, the time, the file). sample.py --hf <model>
    --router <kind> refuses before (naming the one tune command and its time) and loads that file after."""
    folder = tmp_path / "model"
    char_model(folder)
    (tmp_path / "text.txt").write_text(TEXT)
    monkeypatch.setenv("NANOMOR_CACHE", str(tmp_path / "cache"))
    p = sample_py("--hf", str(folder), "--router", "skip", "--prompt", "KING:", cache=tmp_path / "cache")
    assert p.returncode != 0 and f"python tune.py --hf {folder} --router skip (" in p.stderr
    assert "not measured on a GPU" in p.stderr and "Traceback" not in p.stderr
    tune.tune_routers(tune_config(hf=str(folder), out_dir="", dataset=str(tmp_path / "text.txt"), keep_ratios=(0.6,)))
    path = data.default_routers(str(folder), "skip")
    assert os.path.dirname(path).startswith(str(tmp_path / "cache")) and os.path.isfile(path)
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last[0] == (f"  python sample.py --hf {folder} --router skip --keep_ratio 0.6 --prompt 'Explain mixture of "
                       "recursions simply.' --return_depth_trace")
    assert last[1].startswith("done in ") and " min: held-out ppl " in last[1] and last[1].endswith(f"; wrote {path}")
    assert "of layer calls (" in last[1] and "saved)" in last[1]
    p = sample_py("--hf", str(folder), "--router", "skip", "--keep_ratio", "0.6", "--prompt", "KING:",
                  cache=tmp_path / "cache")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"routers: {path}" in p.stdout and "skip routers: keep_ratio 0.6" in p.stdout


def crash_at_step(monkeypatch, n):
    """data.get_batch raises at phase 1's step n, as if the run were killed there (after the save before it)."""
    calls, get_batch = [], data.get_batch

    def batch(*args, **kw):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt("killed")
        return get_batch(*args, **kw)
    monkeypatch.setattr(data, "get_batch", batch)
    return lambda: monkeypatch.setattr(data, "get_batch", get_batch)


def test_unfinished_and_untrained_files_are_refused_and_init_from_finishes_them(tmp_path, monkeypatch):
    """A run killed mid-way leaves its last save: it says so (finished, iteration of max_iters, calibrated) and is
    refused with the command that finishes it; so is a max_iters=0 run's untrained file. random_routers loads either
    (speed measurements). --init_from=<the killed run's file> alone resumes it from that save (its settings, step,
    batches and optimizer state): the same gates as a run never killed."""
    model, tok, text = served(tmp_path, monkeypatch)
    common = dict(hf="some/model", dataset=text, max_iters=4, eval_interval=2, keep_ratios=(0.5,))
    tune.tune_routers(tune_config(out_dir=str(tmp_path / "whole"), **common))
    whole = hf_wrap.read_router_file(str(tmp_path / "whole" / "routers.pt"))
    assert whole["finished"] and whole["calibrated"] and whole["iter_num"] == 4 and "resume" not in whole
    restore = crash_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        tune.tune_routers(tune_config(out_dir=str(tmp_path / "killed"), **common))
    restore()
    path = str(tmp_path / "killed" / "routers.pt")
    blob = hf_wrap.read_router_file(path)
    assert not blob["finished"] and not blob["calibrated"] and (blob["iter_num"], blob["max_iters"]) == (2, 4)
    with pytest.raises(ValueError, match=f"unfinished.*iteration 2 of 4.*python tune.py --init_from={path}"):
        DepthAdapter(model, router="skip", router_path=path)
    assert DepthAdapter(model, router="skip", router_path=path, random_routers=True).random_routers
    with pytest.raises(SystemExit, match=r"unfinished run: it resumes with its own settings, and max_iters=9 \(its 4"):
        tune.tune_routers(tune.default_config(init_from=path, max_iters=9))
    tune.tune_routers(tune.default_config(init_from=path))               # the command the refusal names
    done = hf_wrap.read_router_file(path)
    assert done["finished"] and done["iter_num"] == 4 and sorted(done["cutoffs"]) == ["0.50"]
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, done["state_dict"][k]), k
    assert not DepthAdapter(model, router="skip", router_path=path).random_routers
    tune.tune_routers(tune_config(out_dir=str(tmp_path / "zero"), **{**common, "max_iters": 0}))
    zero = str(tmp_path / "zero" / "routers.pt")
    with pytest.raises(ValueError, match="untrained skip gates.*python tune.py --hf=some/model --router=skip"):
        DepthAdapter(model, router="skip", router_path=zero)
    assert DepthAdapter(model, router="skip", router_path=zero, random_routers=True).random_routers


def test_keep_ratio_without_cutoffs_lists_them_and_tune_adds_them(tmp_path, monkeypatch):
    """A keep_ratio the file was not calibrated for: the error lists the ratios it has and the tune.py command that
    adds one; that command (only init_from, max_iters=0 and keep_ratios on tune.py's defaults) keeps the gates and
    the old cutoffs, and adds the new ones."""
    model, tok, text = served(tmp_path, monkeypatch)
    tune.tune_routers(tune_config(hf="some/model", out_dir=str(tmp_path / "a"), dataset=text, router="expert_choice",
                                  keep_ratios=(0.5, 0.8)))
    path = str(tmp_path / "a" / "routers.pt")
    before = hf_wrap.read_router_file(path)
    with pytest.raises(ValueError, match=r"keep_ratio 0\.50, 0\.80 only") as e:
        DepthAdapter(model, router="expert_choice", router_path=path, keep_ratio=0.3)
    command = f"python tune.py --init_from={path} --max_iters=0 --keep_ratios=0.3"
    assert str(e.value).endswith(command)
    tune.tune_routers(tune.default_config(init_from=path, max_iters=0, keep_ratios=(0.3,)))
    after = hf_wrap.read_router_file(path)
    assert sorted(after["cutoffs"]) == ["0.30", "0.50", "0.80"]
    assert after["cutoffs"]["0.50"] == before["cutoffs"]["0.50"]
    assert all(torch.equal(v, after["state_dict"][k]) for k, v in before["state_dict"].items())
    assert after["finished"] and after["trained"]
    DepthAdapter(model, router="expert_choice", router_path=path, keep_ratio=0.3)


def test_a_run_that_learned_nothing_says_so(tmp_path, monkeypatch, capsys):
    """Routers still at full depth when tuning ends (a 2-step run, gates started on), or far from the budget, get a
    warning in the last lines with what to change; routers near it get none."""
    model, tok, text = served(tmp_path, monkeypatch)
    tune.tune_routers(tune_config(hf="some/model", out_dir=str(tmp_path / "a"), dataset=text, max_iters=2))
    last = capsys.readouterr().out.strip().splitlines()[-3:]
    assert last[0].startswith("warning: mean hard weight 1.000 at bias 0 (target 0.7): every token runs every "
                              "routed layer: the routers learned nothing. Try more steps (--max_iters=40)")
    cfg = tune_config(target_active_ratio=0.7)
    assert tune.learned_nothing(0.75, cfg) == "" and tune.learned_nothing(0.65, cfg) == ""
    assert "far above the target" in tune.learned_nothing(0.9, cfg) and "--penalty_weight=4" in tune.learned_nothing(
        0.9, cfg)
    assert "far below the target" in tune.learned_nothing(0.4, cfg) and "--hard_gate_frac=0" in \
        tune.learned_nothing(0.4, cfg)


def test_out_dir_that_is_a_file_fails_before_loading(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit, match="out_dir=.* is a file"):
        tune.tune_routers(tune_config(out_dir=str(tmp_path / "f")))


def test_bench_finds_the_default_files_that_are_ready(tmp_path, monkeypatch, capsys):
    """bench.py without --routers: the default file of each trained kind for --hf, named; an unfinished one is
    skipped with its reason. With --routers, an unfinished one is refused."""
    model = tiny("llama")
    monkeypatch.setenv("NANOMOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "hf", "some/model")
    monkeypatch.setattr(bench, "routers", "")
    skip, ffn = data.default_routers("some/model", "skip"), data.default_routers("some/model", "ffn")
    os.makedirs(os.path.dirname(skip))
    hf_wrap.save_routers(skip, spread_routers(), model.config, model="some/model", finished=True)
    hf_wrap.save_routers(ffn, spread_routers("ffn"), model.config, model="some/model", finished=False, iter_num=2,
                         max_iters=4)
    assert bench.router_files() == [skip]
    out = capsys.readouterr().out
    assert f"routers: {skip}" in out and f"note: skipping {ffn} is an unfinished tuning run" in out
    monkeypatch.setattr(bench, "routers", skip)                   # named ones: each read before the model loads
    assert bench.router_files() == [skip]
    monkeypatch.setattr(bench, "routers", f"{skip},{ffn}")        # ... and refused when not ready, as sample.py does
    with pytest.raises(SystemExit, match=f"error: {ffn} is an unfinished tuning run: .* --init_from={ffn}"):
        bench.router_files()


# -----------------------------------------------------------------------------
# Errors a person can act on

def test_fit_is_one_adamw_loop(capsys):
    """tune.fit, every tuning job's loop: evaluations at 0, every eval_interval and the end; accum calls a step;
    log lines every log_interval (log_last: and the last step), log(lr) only then; the result is plain AdamW's."""
    from configurator import lr_at
    w, ref = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    calls, logged = [], []
    loss_of = lambda it: (calls.append(it), (w ** 2).sum(), lambda lr: logged.append(it) or f"lr {lr:.3f}")[1:]
    evals = tune.fit([w], loss_of, 5, accum=2, evaluate=lambda it: it, eval_interval=2, log_last=True, log_interval=2,
                     learning_rate=0.1, min_lr=0.01, warmup_iters=1, beta1=0.9, beta2=0.95, weight_decay=0, grad_clip=0)
    assert evals == [0, 2, 4, 5] and calls == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and logged == [1, 3, 4]
    assert capsys.readouterr().out.count(" ms/iter") == 3
    opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    for it in range(5):
        opt.param_groups[0]["lr"] = lr_at(it, 0.1, 0.01, 1, 5)
        (ref ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(w, ref)                  # two half-losses a step: the same gradient as one whole loss
    # parameter groups: each at the schedule's rate times its lr_scale
    a, b = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    tune.fit([{"params": [a]}, {"params": [b], "lr_scale": 0.5}], lambda it: ((a ** 2).sum() + (b ** 2).sum(),
             lambda lr: ""), 5, learning_rate=0.1, min_lr=0.01, warmup_iters=1, beta1=0.9, beta2=0.95, weight_decay=0,
             grad_clip=0, log_interval=10)
    for p, scale in ((a, 1.0), (b, 0.5)):
        ref = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
        for it in range(5):
            opt.param_groups[0]["lr"] = scale * lr_at(it, 0.1, 0.01, 1, 5)
            (ref ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
        assert torch.equal(p, ref), scale


def test_renamed_draft_keys_still_work(capsys):
    """exit_head_vocab / exit_head_windows are draft_vocab / draft_windows: the old names work, with a note."""
    cfg = tune.check_config(tune.default_config(hf="x", exit_head_vocab=20, exit_head_windows=16))
    assert (cfg["draft_vocab"], cfg["draft_windows"]) == (20, 16) and "exit_head_vocab" not in cfg
    assert "exit_head_vocab is renamed draft_vocab" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="draft_windows"):
        tune.check_config(tune.default_config(hf="x", exit_head_windows=0))


def test_tune_config_is_tune_py_s_own():
    """tune.py reads its own settings (train.py no longer has them) and refuses keys it does not have."""
    cfg = tune.default_config()
    assert cfg["hf"] == "smollm2-135m" and cfg["target_active_ratio"] == 0.7 and "n_layer" not in cfg
    assert cfg["router"] == "skip" and cfg["loss"] == "kl" and "gate_z_weight" not in cfg
    with pytest.raises(KeyError, match="resume_from"):
        tune.default_config(resume_from="hf:x")
    assert tune.default_config(init_from="a/routers.pt")["init_from"] == "a/routers.pt"
    with pytest.raises(KeyError, match="hard_threshold"):
        tune.default_config(hard_threshold=0.5)


def test_errors_are_clear(tmp_path, monkeypatch):
    for kwargs, match in [(dict(pattern="odd"), "every_other"), (dict(start=0), "router_start"),
                          (dict(start=3, stop=3), "router_stop"), (dict(group=0), "router_group")]:
        with pytest.raises(ValueError, match=match):
            hf_wrap.unit_layout(LAYERS, **kwargs)
    for R, base, match in [(4, 0, "base_layers"), (4, LAYERS, "base_layers"), (0, 2, "R="), (5, 2, "R=")]:
        with pytest.raises(ValueError, match=match):
            hf_wrap.group_layout(LAYERS, R, base)
    for exits in [(0,), (LAYERS,), (LAYERS - 1,)]:                 # layer LAYERS - 1 is past the last unit's start
        with pytest.raises(ValueError, match="exit_layers"):
            hf_wrap.FrozenRouters("skip", 64, hf_wrap.unit_layout(LAYERS), exit_layers=exits)
    hf_wrap.FrozenRouters("skip", 64, hf_wrap.unit_layout(LAYERS), exit_layers=(1, LAYERS - 2))   # the ends that are fine
    with pytest.raises(ValueError, match="unknown router kind"):
        hf_wrap.FrozenRouters("skipp", 64, hf_wrap.unit_layout(LAYERS))
    model = tiny("llama")
    with pytest.raises(ValueError, match="needs trained routers"):
        DepthAdapter(model, router="skip")
    for drop in (None, [0, 2], [LAYERS]):
        with pytest.raises(ValueError, match="drop_layers"):
            DepthAdapter(model, router="drop", drop_layers=drop)
    for et in (1.5, 0.0):
        with pytest.raises(ValueError, match="exit_threshold"):
            DepthAdapter(model, router="skip", routers=spread_routers(), exit_threshold=et)
    for kr in (0.0, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            DepthAdapter(model, router="skip", routers=spread_routers(), keep_ratio=kr)
    with pytest.raises(ValueError, match="keep_ratio"):          # token-choice has no per-unit capacity
        DepthAdapter(model, router="token_choice", routers=spread_routers("token_choice"), keep_ratio=0.5)
    with pytest.raises(ValueError, match="calibrate"):
        DepthAdapter(model, router="skip", routers=spread_routers(), keep_ratio=0.5).prefill_logits(prompts(1)[0])
    with pytest.raises(ValueError, match="causal"):
        DepthAdapter(model, router="expert_choice", keep_ratio=0.5, random_routers=True).prefill_logits(prompts(1)[0])
    with pytest.raises(TypeError, match="hard_threshold"):       # the old argument is gone, not silently ignored
        DepthAdapter(model, router="skip", routers=spread_routers(), hard_threshold=0.5)
    # router files: missing, not a router file, another model, the other kind, keep_ratio without its cutoffs
    with pytest.raises(ValueError, match="no router file"):
        hf_wrap.read_router_file(str(tmp_path / "nope.pt"))
    torch.save({"model": {}, "model_args": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a router file"):
        hf_wrap.read_router_file(str(tmp_path / "ckpt.pt"))
    path = str(tmp_path / "r.pt")
    hf_wrap.save_routers(path, spread_routers(), model.config, model="tiny-6", cutoffs={"0.50": [0.0] * (LAYERS - 2)})
    with pytest.raises(ValueError, match="tuned for another model"):
        DepthAdapter(tiny("llama", num_hidden_layers=8), router="skip", router_path=path)
    with pytest.raises(ValueError, match="router='skip'"):
        DepthAdapter(model, router="expert_choice", router_path=path)
    with pytest.raises(ValueError, match="0.50"):                   # the file says which keep_ratios it has
        DepthAdapter(model, router="skip", router_path=path, keep_ratio=0.3)
    # tune_routers: a missing path, a non-Llama model, a bad layout or setting
    cfg = tune_config(out_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="not a directory"):
        tune.tune_routers({**cfg, "hf": str(tmp_path / "missing")})
    with pytest.raises(SystemExit, match="names no model"):
        tune.tune_routers({**cfg, "hf": ""})
    for key, value in [("router", "skipp"), ("loss", "mse"), ("target_active_ratio", 1.5)]:
        with pytest.raises(SystemExit, match=key):
            tune.tune_routers({**cfg, "hf": "x", key: value})
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: (gpt2, None))
    with pytest.raises(SystemExit, match="Llama-family"):
        tune.tune_routers({**cfg, "hf": "gpt2"})
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: char_model())
    for extra, match in [(dict(router_pattern="all"), "router_pattern"), (dict(router="expert_choice", R=9), "R="),
                         (dict(router="token_choice", base_layers=0), "base_layers"),
                         (dict(exit_layers=(0,)), "exit_layers")]:
        with pytest.raises(SystemExit, match=match):
            tune.tune_routers({**cfg, "hf": "x", **extra})


# -----------------------------------------------------------------------------
# The user's path, end to end: export a trained-from-scratch model, tune, sample, bench

@pytest.mark.slow
def test_tune_py_smoke(tmp_path):
    """python tune.py config/hf_router_tune.py on a tiny model exported by sample.py --export_hf, then
    sample.py --routers (the file names the model) and bench.py --mode=ppl on it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (tmp_path / "text.txt").write_text(TEXT * 5)

    def run(*args):
        p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, f"{args}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout

    base, hf_dir, out = tmp_path / "base", tmp_path / "hf", tmp_path / "tune"
    run("train.py", "--device=cpu", "--n_layer=4", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        f"--dataset={tmp_path / 'text.txt'}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={base}",
        "--max_iters=20", "--eval_interval=20", "--eval_iters=2")
    run("sample.py", f"--out_dir={base}", f"--export_hf={hf_dir}", "--device=cpu")
    s = run("tune.py", "config/hf_router_tune.py", f"--hf={hf_dir}", f"--out_dir={out}",
            f"--dataset={tmp_path / 'text.txt'}", "--block_size=32", "--batch_size=4", "--max_iters=10",
            "--eval_interval=5", "--log_interval=5", "--eval_iters=2", "--calib_windows=4", "--exit_layers=2",
            "--exit_iters=5", "--target_speedup=1.2", "--target_tol=0.02")
    assert "target layer-call ratio 0.833" in s and "saved" in s and (out / "routers.pt").exists()
    s = run("sample.py", f"--routers={out / 'routers.pt'}", "--prompt=KING:", "--max_new_tokens=20", "--device=cpu")
    assert "compute saved" in s
    # TODO(sample.py CLI rewrite): at the time of writing it also printed "  skip routers: bias <b>; exit gates ..."
    report = tmp_path / "ppl.csv"
    s = run("bench.py", "--mode=ppl", f"--hf={hf_dir}", f"--routers={out / 'routers.pt'}",
            f"--dataset={tmp_path / 'text.txt'}", "--block_size=32", "--ppl_windows=4", "--calib_windows=4",
            "--ppl_depths=0.75", "--device=cpu", f"--report_csv={report}")
    assert "perplexity at matched layer calls" in s and "static drop" in s and "trained skip" in s
    assert "ppl" in report.read_text()


@pytest.mark.parametrize("kind", ["skip", "ffn"])
def test_keep_ratio_holds_on_text_the_calibration_did_not_see(kind):
    """Cutoffs calibrated on 2048 windows keep keep_ratio of the layer calls (skip) or MLP calls (ffn) of each routed
    unit on 2048 other windows, teacher-forced and decoding, counted from the rows each MLP was fed. Tolerance: in a
    random model the tokens of a row are alike, so take rows as the independent samples: a share of p = 0.3 measured
    on N = 2048 rows, from cutoffs set on M = 2048 others, has a standard deviation of sqrt(p (1 - p) (1/N + 1/M))
    = 0.014; 0.05 is 3.5 of those (seeds 0-4 stay within 0.025)."""
    model = tiny("llama", vocab_size=4096)
    r = spread_routers(kind)
    calib, other = torch.randint(1, 4096, (2, 2048, 8), generator=torch.Generator().manual_seed(5))
    ad = DepthAdapter(model, router=kind, routers=r, keep_ratio=0.3)
    ad.calibrate(calib)
    routed = [l for a, b in r.units for l in range(a, b)]
    for run, tokens in ((lambda: ad.prefill_logits(other), other.numel()),
                        (lambda: ad.generate(other[:, :4], max_new_tokens=4), 2048 * (4 + 3))):   # last never fed
        counter = RowCounter(model)
        run()
        counter.remove()
        kept = [counter.rows[l, "mlp.gate_proj"] / tokens for l in routed]
        assert all(abs(k - 0.3) < 0.05 for k in kept), kept
        assert all(counter.rows[l, "self_attn.q_proj"] == (counter.rows[l, "mlp.gate_proj"] if kind == "skip" else
                                                           tokens) for l in routed)       # ffn never skips attention


@pytest.mark.slow                                                              # cold compiles: 20-40 s
@pytest.mark.parametrize("kind", ["skip", "ffn"])
def test_batch1_compiled_decode_with_stand_ins_and_healing_equals_eager(kind):
    """Batch-1 compiled decode (_routed_one: each layer's call also runs the next gate and a stand-in where one is
    due) makes the eager loop's decisions: the same tokens, trace and layer calls, close logits, no graph breaks;
    a second call compiles nothing."""
    model = tiny("llama")
    plain = spread_routers(kind, stand_in_rank=4)
    r = hf_wrap.FrozenRouters(kind, 64, plain.units, mlp_hidden=16, stand_in_rank=4, heal_rank=4,
                              heal_layers=range(plain.units[0][0], LAYERS),
                              heal_shapes=hf_wrap.heal_shapes(model.model.layers[0]))
    r.load_state_dict(plain.state_dict(), strict=False)
    for heal in r.heals:
        for up in heal.up.values():
            torch.nn.init.normal_(up.weight, std=0.1)
    ad = DepthAdapter(model, router=kind, routers=r.eval(), bias=0.0)
    ids = prompts(1)[0]
    ref, st_ref = ad.generate(ids, max_new_tokens=16, return_trace=True, return_logits=True)
    assert 0 < st_ref["compute_saved_pct"] < 100
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out, st = ad.generate(ids, max_new_tokens=16, return_trace=True, return_logits=True, compile=True)
    assert torch.equal(out, ref) and st["trace"] == st_ref["trace"]
    assert st["layer_calls"] == pytest.approx(st_ref["layer_calls"])
    torch.testing.assert_close(st["logits"], st_ref["logits"], atol=1e-4, rtol=1e-4)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert not torch._dynamo.utils.counters["graph_break"] and graphs <= 16
    again, _ = ad.generate(ids, max_new_tokens=16, compile=True)
    assert torch.equal(again, ref) and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
