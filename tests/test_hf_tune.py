"""
Tests for router tuning on a frozen pretrained model (tune.py, hf_wrap.SkipRouters, router="skip"/"drop") and
the evaluation helpers behind bench.py --mode=ppl (tune.py too). Tiny random-weight models built from configs, offline.

What must hold: gradients reach the routers only and the base weights stay byte-identical; the compute penalty
moves the mean gate to its target; the hard-routed prefill (what perplexity is measured on) equals the decode
path; the extremes are exact (every gate open = the model, every gate shut = those layers dropped); static
dropping removes the lowest-influence layers and never layer 0; the threshold search lands on its target.
"""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import hf_wrap  # noqa: E402
import tune  # noqa: E402
from hf_wrap import DepthAdapter, SkipRouters, skip_layout  # noqa: E402
from tune import soft_forward  # noqa: E402
from test_hf_wrap import CONFIGS, LAYERS, VOCAB, RowCounter, prompts, tiny  # noqa: E402

TEXT = "KING:\nWhat say you, my lord? Speak, and speak the truth.\n\nQUEEN:\nI have no words to give you now.\n\n" * 40


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def spread_routers(hidden=64, n_layers=LAYERS, exit_layers=(), seed=0, **layout):
    """SkipRouters whose gates differ from token to token (a stand-in for trained ones): random last layers."""
    torch.manual_seed(seed)
    r = SkipRouters(hidden, *skip_layout(n_layers, exit_layers=exit_layers, **layout), mlp_hidden=16)
    for gate in list(r.gates) + list(r.exits):
        torch.nn.init.normal_(gate.net[-1].weight, std=1.0)
        torch.nn.init.zeros_(gate.net[-1].bias)
    return r.eval()


def tune_config(**overrides):
    """tune.py's settings at a tiny size, with overrides."""
    return tune.default_config(**{**dict(device="cpu", dtype="float32", block_size=16, batch_size=4, eval_iters=2,
                                         calib_windows=4, max_iters=4, eval_interval=2, log_interval=2,
                                         warmup_iters=1), **overrides})


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


# -----------------------------------------------------------------------------
# The tuning forward and its loss

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_soft_forward_without_routers_is_the_model(arch):
    """HF's own layers with our explicit causal (and sliding-window) masks give the model's logits."""
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    logits, gates, _ = soft_forward(model, None, ids)
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert gates is None


def test_router_only_gradients():
    model = tiny("llama").requires_grad_(False)
    r = spread_routers(exit_layers=(3,)).train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, gate_logits, states = soft_forward(model, r, ids)
    assert gate_logits.shape == (2, 16, len(r.units)) and set(states) == {3}
    loss, parts = tune._tuning_loss(logits, ids, gate_logits, tune_config(gate_entropy_weight=0.1), it=100)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.gates.parameters())
    assert all(p.grad is None for p in r.exits.parameters())      # phase 1 does not touch the exit gates


def test_straight_through_forward_is_inference():
    """hard=True: the tuning forward makes inference's 0/1 decisions (gate > 0.5), with the sigmoid's gradient.
    With one layer per unit it is then exactly the adapter's hard-routed prefill (a skipped token's K/V at the
    layer comes from its state there in both)."""
    logit = torch.tensor([-2.0, 0.5], requires_grad=True)
    g = tune._gate(logit, hard=True)
    g.sum().backward()
    assert g.tolist() == [0.0, 1.0]
    torch.testing.assert_close(logit.grad, torch.sigmoid(logit.detach()) * (1 - torch.sigmoid(logit.detach())))
    model, r = tiny("llama"), spread_routers()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = soft_forward(model, r, ids, hard=True)[0]
    routed, st = DepthAdapter(model, router="skip", skip_routers=r, hard_threshold=0.5).prefill_logits(ids)
    torch.testing.assert_close(logits, routed, atol=1e-4, rtol=1e-4)
    assert 0 < st["compute_saved_pct"] < 100


def test_penalty_pushes_mean_gate_to_target():
    """A few dozen steps: the hinge penalty pulls the mean gate from ~0.95 down to target_active_ratio, where the
    LM loss holds it. The targets are the model's own greedy predictions, so the LM loss wants every layer (on
    random text a random model's layers are noise, and skipping them would lower the loss by itself)."""
    model = tiny("llama").requires_grad_(False)
    r = SkipRouters(64, *skip_layout(LAYERS), mlp_hidden=16).train()
    cfg = tune_config(target_active_ratio=0.4, penalty_weight=5.0, penalty_warmup_iters=5)
    opt = torch.optim.AdamW(r.parameters(), lr=2e-2, weight_decay=0.0)
    gen, means = torch.Generator().manual_seed(0), []
    for it in range(60):
        ids = torch.randint(0, VOCAB, (4, 16), generator=gen)
        with torch.no_grad():
            Y = model(ids).logits.argmax(-1)
        logits, gate_logits, _ = soft_forward(model, r, ids)
        loss, parts = tune._tuning_loss(logits, Y, gate_logits, cfg, it)
        loss.backward()
        opt.step()
        opt.zero_grad()
        means.append(parts["mean_gate"])
    assert means[0] > 0.9 and means[4] > 0.9                       # warm-up: lambda = 0
    late = sum(means[-15:]) / 15
    assert abs(late - 0.4) < 0.1, means[-15:]


def test_entropy_term_pushes_gates_to_0_or_1():
    """gate_entropy_weight > 0 must move gates away from 0.5 (an earlier version had the right value and a zero
    gradient). Only the entropy term here: each gate logit grows in magnitude, keeping its sign."""
    z = torch.tensor([[[-0.8, -0.1, 0.2, 1.0]]], requires_grad=True)
    cfg = tune_config(penalty_weight=0.0, gate_entropy_weight=1.0)
    opt = torch.optim.SGD([z], lr=2.0)
    start = z.detach().clone()
    for it in range(30):
        loss, parts = tune._tuning_loss(torch.zeros(1, 1, VOCAB), torch.zeros(1, 1, dtype=torch.long), z, cfg, it)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert (z.detach().abs() > 1.5 * start.abs()).all() and (z.detach().sign() == start.sign()).all(), z


def test_tuning_freezes_the_base_byte_for_byte(tmp_path, monkeypatch):
    """The whole loop (phase 1, quantiles, exit gates, target search) leaves every base weight byte-identical,
    and writes a router file that knows its model, layout, quantiles and the threshold it found."""
    model, tok = char_model()
    (tmp_path / "text.txt").write_text(TEXT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: (model, tok))
    cfg = tune_config(hf="some/model", out_dir=str(tmp_path / "out"), dataset=str(tmp_path / "text.txt"),
                         exit_layers=(3,), exit_iters=3, target_speedup=1.25, target_tol=0.02, weight_decay=0.1)
    tune.tune_routers(cfg)
    for k, v in model.state_dict().items():
        assert v.numpy().tobytes() == before[k].numpy().tobytes(), k
    blob = hf_wrap.read_router_file(str(tmp_path / "out" / "routers.pt"))
    assert blob["model"] == "some/model" and blob["router"] == "skip" and blob["exits_trained"]
    assert blob["units"] == [[l, l + 1] for l in range(1, LAYERS - 1)] and blob["exit_layers"] == [3]
    assert blob["gate_logit_quantiles"].shape == (LAYERS - 2, 101)
    assert blob["target"]["reached"] and abs(blob["target"]["calib_ratio"] - 0.8) <= 0.02
    assert 0 < blob["hard_threshold"] < 1


# -----------------------------------------------------------------------------
# Hard routing through the adapter: causal, exact at the extremes, really skipping

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_teacher_forced_logits_equal_decode(arch):
    """prefill_logits (what perplexity is measured on) over a generated sequence equals generate's own logits at
    every decoded position: the routing is causal and the skip / exit K/V fills agree across chunks."""
    model = tiny(arch)
    r = spread_routers(exit_layers=(3, 4))
    ad = DepthAdapter(model, router="skip", skip_routers=r, hard_threshold=0.5, exit_threshold=0.7)
    ids, mask = prompts(3)
    out, st = ad.generate(ids, attention_mask=mask, max_new_tokens=40, return_logits=True)
    assert 0 < st["compute_saved_pct"] < 100 and st["kv_only_layer_calls"] > 0
    full_mask = torch.cat([mask, torch.ones(3, out.shape[1] - 1 - ids.shape[1], dtype=mask.dtype)], 1)
    counter = RowCounter(model)
    logits, st2 = ad.prefill_logits(out[:, :-1], attention_mask=full_mask)
    counter.remove()
    T0 = ids.shape[1]
    torch.testing.assert_close(logits[:, T0 - 1:], st["logits"], atol=1e-4, rtol=1e-4)
    # the stats are the work done: MLP rows = layer calls, extra k_proj rows = K/V-only fills
    mlp = sum(counter.rows[l, "mlp.gate_proj"] for l in range(LAYERS))
    k_extra = sum(counter.rows[l, "self_attn.k_proj"] - counter.rows[l, "self_attn.q_proj"] for l in range(LAYERS))
    assert mlp == st2["layer_calls"] < st2["layer_calls_full"] and k_extra == st2["kv_only_layer_calls"] > 0
    assert st2["tokens"] == int(full_mask.sum())


def test_skip_extremes_are_exact():
    """Every gate open = the model itself; every gate shut = the routed layers dropped (ShortGPT-style)."""
    model = tiny("llama")
    r = spread_routers()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    opened, st = DepthAdapter(model, router="skip", skip_routers=r, hard_threshold=0.0).prefill_logits(ids)
    torch.testing.assert_close(opened, model(ids).logits, atol=1e-4, rtol=1e-4)
    assert st["compute_saved_pct"] == 0 and st["kv_only_layer_calls"] == 0
    shut, st = DepthAdapter(model, router="skip", skip_routers=r, hard_threshold=1.0).prefill_logits(ids)
    routed = [l for a, b in r.units for l in range(a, b)]
    dropped, st_drop = DepthAdapter(model, router="drop", drop_layers=routed).prefill_logits(ids)
    torch.testing.assert_close(shut, dropped, atol=1e-5, rtol=1e-5)
    assert st["layer_calls"] == st_drop["layer_calls"] == 2 * 24 * (LAYERS - len(routed))
    assert st_drop["kv_only_layer_calls"] == 0                     # a dropped layer needs no K/V at all


def test_keep_ratio_uses_calibrated_quantiles():
    """keep_ratio converts to per-unit cutoffs through gate quantiles. The first routed layer sees the same state
    in soft and hard routing, so on the calibration text it runs for exactly keep_ratio of the tokens."""
    model = tiny("llama")
    r = spread_routers()
    ids = torch.randint(0, VOCAB, (4, 25), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        q_logits = soft_forward(model, r, ids)[1].flatten(0, 1)
    r.gate_logit_quantiles = torch.quantile(q_logits, torch.linspace(0, 1, 101), dim=0).T
    counter = RowCounter(model)
    DepthAdapter(model, router="skip", skip_routers=r, keep_ratio=0.3).prefill_logits(ids)
    counter.remove()
    assert abs(counter.rows[1, "mlp.gate_proj"] / ids.numel() - 0.3) < 0.02


# -----------------------------------------------------------------------------
# Static dropping and the threshold search

def test_static_drop_picks_lowest_influence_never_layer_0():
    assert tune.static_drop_layers([0.0, 0.5, 0.1, 0.3, 0.2, 0.9], 2) == [2, 4]
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
    drop = tune.static_drop_layers(bi, 2)
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
    make = lambda z: DepthAdapter(model, router="skip", skip_routers=r, hard_threshold=tune._sigmoid(z))
    z, found, reached = tune.search_cutoff(make, -30.0, 30.0, 0.6, windows, tol=0.01)
    assert reached and abs(found["layer_ratio"] - 0.6) <= 0.01
    assert abs(tune.eval_ppl(make(z), windows)["layer_ratio"] - found["layer_ratio"]) < 1e-9   # reproducible
    make = lambda v: DepthAdapter(model, router="entropy", R=LAYERS - 1, base_layers=1, threshold=v)
    v, found, reached = tune.search_cutoff(make, 0.0, 5.0, 0.7, windows, tol=0.02)
    assert reached and abs(found["layer_ratio"] - 0.7) <= 0.02
    _, found, reached = tune.search_cutoff(make, 0.0, 5.0, 0.05, windows)   # below the 1 layer always run
    assert not reached and found["layer_ratio"] == pytest.approx(1 / LAYERS)


# -----------------------------------------------------------------------------
# Router files and sample.py

def test_router_file_round_trip_through_sample_py(tmp_path):
    model, tok = char_model(tmp_path / "model")
    r = spread_routers(hidden=64, exit_layers=(3,))
    path = str(tmp_path / "routers.pt")
    hf_wrap.save_skip_routers(path, r, model, model=str(tmp_path / "model"), hard_threshold=0.4, exit_threshold=0.8,
                              exits_trained=True)
    loaded, blob = hf_wrap.load_skip_routers(path, model)
    for a, b in zip(r.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    ad = DepthAdapter(model, router="skip", router_path=path)                 # the file's thresholds by default
    assert ad.hard_threshold == 0.4 and ad.exit_threshold == 0.8 and ad.use_exits
    ids = torch.tensor([tok("KING:")["input_ids"]])
    out, st = ad.generate(ids, max_new_tokens=12)
    want = tok.decode(out[0, ids.shape[1]:])
    p = subprocess.run([sys.executable, "sample.py", "--routers", path, "--prompt", "KING:", "--max_new_tokens", "12",
                        "--device", "cpu", "--return_depth_trace"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert want in p.stdout and "compute saved" in p.stdout and "depth trace" in p.stdout
    assert "skip routers: hard_threshold 0.4; exit gates at layers [3], exit_threshold 0.8" in p.stdout
    assert f"mean {st['mean_depth']:.2f}" in p.stdout


# -----------------------------------------------------------------------------
# Errors a person can act on

def test_tune_config_is_tune_py_s_own():
    """tune.py reads its own settings (train.py no longer has them) and refuses keys it does not have."""
    cfg = tune.default_config()
    assert cfg["hf"] == "smollm2-135m" and cfg["target_active_ratio"] == 0.6 and "n_layer" not in cfg
    with pytest.raises(KeyError, match="init_from"):
        tune.default_config(init_from="hf:x")


def test_errors_are_clear(tmp_path, monkeypatch):
    for kwargs, match in [(dict(pattern="odd"), "every_other"), (dict(start=0), "router_start"),
                          (dict(start=3, stop=3), "router_stop"), (dict(group=0), "router_group"),
                          (dict(exit_layers=(0,)), "exit_layers"), (dict(exit_layers=(LAYERS,)), "exit_layers")]:
        with pytest.raises(ValueError, match=match):
            skip_layout(LAYERS, **kwargs)
    model = tiny("llama")
    with pytest.raises(ValueError, match="needs trained routers"):
        DepthAdapter(model, router="skip")
    for drop in (None, [0, 2], [LAYERS]):
        with pytest.raises(ValueError, match="drop_layers"):
            DepthAdapter(model, router="drop", drop_layers=drop)
    with pytest.raises(ValueError, match="hard_threshold"):
        DepthAdapter(model, router="skip", skip_routers=spread_routers(), hard_threshold=1.5)
    with pytest.raises(ValueError, match="quantiles"):
        DepthAdapter(model, router="skip", skip_routers=spread_routers(), keep_ratio=0.5)
    with pytest.raises(ValueError, match="causal"):
        DepthAdapter(model, router="expert_choice", keep_ratio=0.5, random_routers=True).prefill_logits(prompts(1)[0])
    # router files: missing, not a router file, another model, the other kind
    with pytest.raises(ValueError, match="no router file"):
        hf_wrap.read_router_file(str(tmp_path / "nope.pt"))
    torch.save({"model": {}, "model_args": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a router file"):
        hf_wrap.read_router_file(str(tmp_path / "ckpt.pt"))
    path = str(tmp_path / "r.pt")
    hf_wrap.save_skip_routers(path, spread_routers(), model, model="tiny-6")
    with pytest.raises(ValueError, match="tuned for another model"):
        DepthAdapter(tiny("llama", num_hidden_layers=8), router="skip", router_path=path)
    with pytest.raises(ValueError, match="router='skip'"):
        DepthAdapter(model, router="expert_choice", keep_ratio=0.5, router_path=path)
    # tune_routers: a missing path, a non-Llama model, a bad layout
    cfg = tune_config(out_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="not a directory"):
        tune.tune_routers({**cfg, "hf": str(tmp_path / "missing")})
    with pytest.raises(SystemExit, match="names no model"):
        tune.tune_routers({**cfg, "hf": ""})
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: (gpt2, None))
    with pytest.raises(SystemExit, match="Llama-family"):
        tune.tune_routers({**cfg, "hf": "gpt2"})
    monkeypatch.setattr(tune, "load_hf", lambda *a, **k: char_model())
    with pytest.raises(SystemExit, match="router_pattern"):
        tune.tune_routers({**cfg, "hf": "x", "router_pattern": "all"})
    with pytest.raises(SystemExit, match="target_active_ratio"):
        tune.tune_routers({**cfg, "hf": "x", "target_active_ratio": 1.5})


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
    assert "compute saved" in s and "skip routers:" in s
    report = tmp_path / "ppl.csv"
    s = run("bench.py", "--mode=ppl", f"--hf={hf_dir}", f"--routers={out / 'routers.pt'}",
            f"--dataset={tmp_path / 'text.txt'}", "--block_size=32", "--ppl_windows=4", "--calib_windows=4",
            "--ppl_depths=0.75", "--device=cpu", f"--report_csv={report}")
    assert "perplexity at matched average depth" in s and "static drop" in s and "trained skip routers" in s
    assert "ppl" in report.read_text()
