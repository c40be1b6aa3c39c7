"""Masked diffusion (diffusion.py): the objective masks only what it should, bidirectional attention
sees the future, the depth mapping follows its thresholds, committed tokens get no more compute
(rows fed to the layers), fixed N passes are N plain passes, the statistics add up, bad input
gets clear errors, and train -> sample runs end to end."""
import os

import pytest
import torch

import configurator
import torch.nn.functional as F

from conftest import run as run_script
from diffusion import AdaptiveRefiner, RefinementConfig, RefinementKV, corrupt, diffusion_loss
from kv_cache import KVCache
from model import MoR, MoRConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 21          # 20 tokens and [MASK]
MASK = V - 1


def tiny(seed=0, sharp=True, **kw):
    """A random bidirectional model. sharp: scale weights so that attention depends on position and
    predictions are confident and vary from position to position, as a trained model's do (a random
    model's masked positions all predict alike, near uniformly)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, block_size=32, n_layer=5, n_head=4, n_kv_head=2, n_embd=32, n_recursion=3,
               sharing="middle_cycle", bidirectional=True, mask_token=MASK, tie_embeddings=not sharp)
    cfg.update(kw)
    m = MoR(MoRConfig(**cfg)).eval()
    if sharp:
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.mul_(20 if name.endswith(("q_proj.weight", "k_proj.weight")) else
                       10 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1)
            m.lm_head.weight.mul_(30)
    return m


def masked_input(B=3, T=28, lo=4, hi=26, seed=1):
    torch.manual_seed(seed)
    x = torch.randint(0, MASK, (B, T))
    return x.clone().index_fill_(1, torch.arange(lo, hi), MASK)


def spread_config(m, x, **kw):
    """Thresholds at quantiles of the model's first-pass scores, so that depths really vary."""
    with torch.no_grad():
        logits = m(x)[0][x == MASK][:, :-1]
    q = AdaptiveRefiner().compute_confidence(logits).quantile(torch.tensor([0.2, 0.6, 0.85])).tolist()
    return RefinementConfig(**{**dict(confidence_low=q[0], confidence_high=q[1], skip_threshold=q[2]), **kw})


# -----------------------------------------------------------------------------
# The objective

def test_corrupt_masks_only_what_it_should_and_the_loss_reads_only_masked_tokens():
    x = torch.randint(0, MASK, (64, 400))
    x_t, masked, t = corrupt(x, MASK, torch.Generator().manual_seed(0))
    assert torch.equal(x_t[~masked], x[~masked]) and (x_t[masked] == MASK).all()
    assert ((t > 0) & (t < 1)).all()
    assert (masked.float().mean(1) - t).abs().max() < 0.1            # each row at its own rate
    gaps = t.sort().values.diff()                                      # the rates cover (0, 1) evenly
    assert torch.allclose(gaps, torch.full_like(gaps, gaps.mean()), atol=1e-5)
    logits = torch.randn(64, 400, V)
    ce = F.cross_entropy(logits.view(-1, V), x.view(-1), reduction="none").view(64, 400)
    expect = (ce * masked / t[:, None]).sum() / masked.numel()        # CE on masked tokens, / t, per token
    torch.testing.assert_close(diffusion_loss(logits, x, masked, t), expect)
    other = torch.where(masked[..., None], logits, torch.randn_like(logits))   # change every unmasked logit
    torch.testing.assert_close(diffusion_loss(other, x, masked, t), expect)


def test_bidirectional_attention_sees_the_future_and_the_causal_model_does_not():
    x = torch.randint(0, MASK, (2, 24))
    y = x.clone()
    y[:, 18] = (y[:, 18] + 1) % MASK
    for bidirectional in (True, False):
        m = tiny(sharp=False, bidirectional=bidirectional, mask_token=MASK if bidirectional else -1)
        with torch.no_grad():
            past = (m(x)[0][:, :18] - m(y)[0][:, :18]).abs().max()
        assert (past > 1e-4) == bidirectional


def test_bidirectional_ragged_rows_hide_their_pads():
    """With routing, rows keep different numbers of tokens and attention pads them to a grid; in
    both directions a pad must stay invisible: a row's logits are the same alone and in a batch."""
    m = tiny(sharp=False, router="token_choice")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("router"):
                p.normal_(0, 1.0)
        x = torch.randint(0, MASK, (3, 20))
        together = m(x)[0]
        assert m.last_depth.sum(1).unique().numel() > 1                  # ragged: the rows differ
        for b in range(3):
            torch.testing.assert_close(m(x[b:b + 1])[0], together[b:b + 1], atol=1e-5, rtol=1e-5)


def test_an_active_subset_with_a_filled_cache_equals_the_full_pass():
    """model.py's `run_only` with RefinementKV: run every token once, then only some of them against
    the cached K/V of the rest; nothing changed, so their logits are exactly the full pass's."""
    m = tiny()
    x = masked_input()
    active = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    active[2] = False                                                   # a row with nothing to run
    with torch.no_grad():
        kv = RefinementKV()
        full = m(x, kv=kv)[0]
        part = m(x, kv=kv, run_only=active)[0]
    torch.testing.assert_close(part[active], full[active], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# The schedule

@pytest.mark.parametrize("config,scores,depths", [
    (dict(), [1.0, 0.95, 0.9, 0.89, 0.8, 0.6, 0.55, 0.51, 0.5, 0.2, 0.0], [1, 1, 1, 1, 2, 3, 4, 4, 4, 4, 4]),
    (dict(min_recursions=2, max_recursions=8, confidence_high=0.8, confidence_low=0.2),
     [0.9, 0.8, 0.7, 0.5, 0.3, 0.2, 0.1], [2, 2, 3, 5, 7, 8, 8]),
    (dict(min_recursions=3, max_recursions=3), [1.0, 0.7, 0.0], [3, 3, 3]),
    (dict(strategy="fixed", max_recursions=6), [1.0, 0.7, 0.0], [6, 6, 6]),
])
def test_depth_mapping_follows_the_thresholds(config, scores, depths):
    refiner = AdaptiveRefiner(RefinementConfig(**config))
    difficulty = 1 - torch.tensor(scores, dtype=torch.float64)
    assert refiner.compute_recursion_depths(difficulty).tolist() == depths


def test_difficulty_signals():
    r = {s: AdaptiveRefiner(RefinementConfig(strategy=s)) for s in ("confidence", "entropy", "gradient")}
    certain, uniform = torch.tensor([50.0, 0, 0, 0]), torch.zeros(4)
    for refiner in r.values():
        assert float(refiner.compute_difficulty(certain)) < 1e-6 and float(refiner.compute_difficulty(uniform)) > 0.7
    # the same top probability, the rest on one rival or spread: only confidence cannot tell them apart
    rival, tail = torch.tensor([0.6, 0.4, 0.0, 0.0, 0.0]).log(), torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]).log()
    assert torch.isclose(r["confidence"].compute_difficulty(rival), r["confidence"].compute_difficulty(tail))
    assert r["gradient"].compute_difficulty(rival) > r["gradient"].compute_difficulty(tail)
    assert r["entropy"].compute_difficulty(rival) < r["entropy"].compute_difficulty(tail)


def test_committed_tokens_receive_no_further_compute():
    """Count the rows every call feeds to each layer's projections and MLP: a token committed in
    pass p runs in pass p + 1 at most (to write its K/V), and a skipped one never again."""
    m = tiny()
    x = masked_input()
    fill = x == MASK
    calls = []
    forward = m.forward

    def spy(idx, *args, run_only=None, **kw):
        calls.append({"x": idx.clone(), "active": torch.ones_like(fill) if run_only is None else run_only.clone(),
                      "rows": []})
        return forward(idx, *args, run_only=run_only, **kw)

    m.forward = spy
    for layer in m.layers:
        for mod in (layer.self_attn.q_proj, layer.mlp):
            mod.register_forward_hook(lambda mod, inp, out: calls[-1]["rows"].append(inp[0].shape[0]))
    writes = {}
    for skip in (False, True):
        refiner = AdaptiveRefiner(spread_config(m, x, skip_confident_tokens=skip))
        calls.clear()
        out = refiner.apply_adaptive_refinement(m, x.clone())
        stats = refiner.get_stats()
        assert (out != MASK).all() and len(calls) == stats["total_steps"] >= 3
        L = m.plan.full_depth_layers
        for c in calls:                                   # the layers ran exactly the active tokens
            assert c["rows"] == [int(c["active"].sum())] * (2 * L)
        assert sum(int(c["active"].sum()) for c in calls) * L == stats["token_layer_ops"]
        assert not any((c["active"] & ~fill).any() for c in calls[1:])   # the context runs once
        assert int(calls[-1]["active"].sum()) < int(fill.sum())          # and the passes shrink
        writes[skip] = 0
        for j in range(1, len(calls)):
            committed_earlier = fill & (calls[j - 1]["x"] != MASK)      # committed before pass j - 1
            assert not (calls[j]["active"] & committed_earlier).any()
            writes[skip] += int((calls[j]["active"] & fill & (calls[j]["x"] != MASK)).sum())
    assert writes[True] < writes[False]                    # skipped tokens do not even refresh their K/V


@pytest.mark.parametrize("N", [1, 3])
def test_fixed_with_N_passes_equals_N_plain_refinement_passes(N):
    """LLaDA's sampler by hand: N full passes, each committing an equal share (the first n % N
    passes one more) of each row's masked tokens, the most confident first."""
    m = tiny()
    x = masked_input()
    ref = x.clone()
    n = (ref == MASK).sum(1)
    with torch.no_grad():
        for p in range(1, N + 1):
            conf, pred = m(ref)[0][..., :-1].softmax(-1).max(-1)
            conf = conf.masked_fill(ref != MASK, -1.0)
            for b in range(ref.shape[0]):
                k = int(n[b] // N + (p <= n[b] % N))
                top = conf[b].argsort(descending=True, stable=True)[:k]
                ref[b, top] = pred[b, top]
    refiner = AdaptiveRefiner(RefinementConfig(strategy="fixed", max_recursions=N, cache_committed=False))
    out = refiner.apply_adaptive_refinement(m, x.clone())
    assert torch.equal(out, ref)
    stats = refiner.get_stats()
    assert stats["total_steps"] == N and stats["compute_saved_pct"] == 0.0
    assert stats["token_layer_ops"] == N * x.numel() * m.plan.full_depth_layers
    assert stats["mean_recursions_per_token"] == N


def test_one_call_per_row_gives_the_same_tokens():
    m = tiny()
    x = masked_input()
    outs, steps = [], []
    for batched in (True, False):
        refiner = AdaptiveRefiner(spread_config(m, x, batch_by_difficulty=batched))
        outs.append(refiner.apply_adaptive_refinement(m, x.clone()))
        steps.append(refiner.get_stats()["total_steps"])
    assert torch.equal(outs[0], outs[1]) and steps[1] > steps[0]


def spy_calls(m):
    """Record every forward call of m: the positions it ran ([B, T] bool; model.py's `run_only`, None = all)."""
    calls, forward = [], m.forward

    def spy(idx, *args, run_only=None, **kw):
        calls.append(torch.ones_like(idx, dtype=torch.bool) if run_only is None else run_only.clone())
        return forward(idx, *args, run_only=run_only, **kw)
    m.forward = spy
    return calls


def test_statistics_add_up_and_write_out(tmp_path):
    """Every statistic against a count made outside the refiner: easy / medium / hard from the model's own
    first-pass scores, the passes per token and the layer work from the positions each forward call ran."""
    m = tiny()
    x = masked_input()
    c = spread_config(m, x)
    fill = x == MASK
    n = 2 * int(fill.sum())
    with torch.no_grad():                                  # the first pass sees x as it is: the scores it reads
        score = 1 - (1 - m(x)[0][fill][:, :-1].softmax(-1).amax(-1))
    easy, hard = int((score >= c.confidence_high).sum()), int((score <= c.confidence_low).sum())
    refiner, calls = AdaptiveRefiner(c), spy_calls(m)
    for strategy_run in range(2):                          # statistics accumulate over calls
        refiner.apply_adaptive_refinement(m, x.clone())
    s = refiner.get_stats()
    assert s["tokens_processed"] == n
    assert (s["easy_tokens"], s["medium_tokens"], s["hard_tokens"]) == (2 * easy, n - 2 * easy - 2 * hard, 2 * hard)
    assert min(easy, hard, n // 2 - easy - hard) > 0
    half = len(calls) // 2                                 # the two runs are alike: count the first
    assert all(torch.equal(a, b) for a, b in zip(calls[:half], calls[half:]))
    passes = sum(a[fill] for a in calls[:half])            # forward calls that computed each filled position
    assert len(calls) == s["total_steps"] and s["total_recursions"] == 2 * int(passes.sum())
    assert s["depth_hist"] == (2 * torch.bincount(passes)).tolist()
    assert s["mean_recursions_per_token"] == 2 * int(passes.sum()) / n
    ops = sum(int(a.sum()) for a in calls) * m.plan.full_depth_layers
    full = 2 * c.max_recursions * x.numel() * m.plan.full_depth_layers     # every row has masked tokens
    assert s["token_layer_ops"] == ops and s["compute_saved_pct"] == pytest.approx(100 * (1 - ops / full))
    assert 0 < s["compute_saved_pct"] < 100 and 0 < s["tokens_skipped"] < n
    configurator.write_stats_csv(s, tmp_path / "s.csv")
    configurator.write_prometheus(s, str(tmp_path / "s.prom"), prefix="nanomor_diffusion")
    assert "tokens_processed," in (tmp_path / "s.csv").read_text()
    assert "nanomor_diffusion_compute_saved_pct " in (tmp_path / "s.prom").read_text()
    refiner.reset_stats()
    assert refiner.get_stats()["tokens_processed"] == 0


def test_generate_slides_past_the_context():
    m = tiny()
    prompt = torch.randint(0, MASK, (2, 5))
    out = AdaptiveRefiner(RefinementConfig(block_length=8)).generate(m, prompt, 40)   # 45 > block_size 32
    assert out.shape == (2, 45) and (out != MASK).all() and torch.equal(out[:, :5], prompt)


def test_generation_is_conditioned_on_the_context_generate_claims_to_keep():
    """generate's promise, recomputed by hand: while the sequence fits in block_size, a block is predicted in the
    whole sequence (later blocks still [MASK]); past it, in the block_size positions that end at the block. With
    fixed at one pass a block is one forward, each position its most likely token; an adaptive refiner gives the
    last block what apply_adaptive_refinement gives it in that window."""
    m, L, bs = tiny(seed=3), 8, 32                  # a seed whose predictions follow their context
    prompt = torch.randint(0, MASK, (2, 5), generator=torch.Generator().manual_seed(3))
    one_pass = RefinementConfig(strategy="fixed", max_recursions=1, cache_committed=False, block_length=L)
    out = AdaptiveRefiner(one_pass).generate(m, prompt, 40)          # blocks end at 13, 21, 29, 37 and 45 > 32
    ref, blind = torch.cat((prompt, torch.full((2, 40), MASK)), 1), 0
    with torch.no_grad():
        for lo in range(5, 45, L):
            start = 0 if lo + L <= bs else lo + L - bs
            logits = m(ref[:, start:max(lo + L, bs)])[0][:, lo - start:lo - start + L, :-1]
            ref[:, lo:lo + L] = logits.argmax(-1)
            blind += torch.equal(ref[:, lo:lo + L], m(torch.full((2, L), MASK))[0][..., :-1].argmax(-1))
    assert torch.equal(out, ref) and blind == 0          # and no block is what the block alone would give
    adaptive = RefinementConfig(block_length=L)
    out = AdaptiveRefiner(adaptive).generate(m, prompt, 40)
    window = torch.cat((out[:, 45 - bs:45 - L], torch.full((2, L), MASK)), 1)
    assert torch.equal(out[:, 45 - bs:], AdaptiveRefiner(adaptive).apply_adaptive_refinement(m, window))


# -----------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("kw,msg", [
    (dict(min_recursions=5, max_recursions=4), "more than max_recursions"),
    (dict(min_recursions=0), "min_recursions must be >= 1"),
    (dict(confidence_high=1.2), "confidence_high must lie in"),
    (dict(confidence_low=-0.1), "confidence_low must lie in"),
    (dict(skip_threshold=1.5), "skip_threshold must lie in"),
    (dict(confidence_low=0.9, confidence_high=0.9), "must be below confidence_high"),
    (dict(strategy="vibes"), "strategy must be one of"),
])
def test_bad_configs_explain_themselves(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RefinementConfig(**kw)


def test_presets():
    assert RefinementConfig.preset("max_speed").max_recursions == 2
    assert RefinementConfig.preset("max_quality", strategy="entropy").confidence_low == 0.2
    assert RefinementConfig.preset("balanced") == RefinementConfig()
    with pytest.raises(ValueError, match="preset must be one of"):
        RefinementConfig.preset("fastest")


def test_models_of_the_wrong_kind_are_refused():
    causal = tiny(sharp=False, bidirectional=False, mask_token=-1)
    with pytest.raises(ValueError, match="autoregressive checkpoint"):
        AdaptiveRefiner().apply_adaptive_refinement(causal, torch.zeros(1, 4, dtype=torch.long))
    bidirectional = tiny(sharp=False)
    with pytest.raises(ValueError, match="KVCache is for autoregressive generation"):
        bidirectional.generate(torch.zeros(1, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="KVCache"):
        KVCache(bidirectional, 1)


# -----------------------------------------------------------------------------
# End to end, as a user runs it

TINY = ["--device=cpu", "--n_layer=5", "--n_recursion=3", "--sharing=middle_cycle", "--n_head=2", "--n_embd=32",
        "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2"]


def run(script, *args, ok=True):
    return run_script(script, *args, ok=ok, env={"OMP_NUM_THREADS": "1"})


def test_train_then_sample_a_diffusion_model(tmp_path, data_dir):
    out = str(tmp_path / "out")
    p = run("train.py", *TINY, "--objective=diffusion", f"--data_dir={data_dir}", f"--out_dir={out}",
            "--max_iters=4", "--eval_interval=4")
    assert "step 4:" in p.stdout
    args = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model_args"]
    assert args["bidirectional"] and args["mask_token"] == args["vocab_size"] - 1
    stats = tmp_path / "stats.csv"
    s = run("sample.py", f"--out_dir={out}", "--prompt=ROMEO:", "--max_new_tokens=40", "--device=cpu",
            f"--csv={stats}", f"--prometheus={tmp_path / 'stats.prom'}")
    assert "\nROMEO:" in s.stdout and "compute saved" in s.stdout and "easy" in s.stdout
    assert "mean_recursions_per_token," in stats.read_text()
    assert "nanomor_diffusion_tokens_processed 40" in (tmp_path / "stats.prom").read_text()


def test_sampling_a_causal_checkpoint_with_diffusion_is_refused(tmp_path, data_dir):
    out = str(tmp_path / "out")
    run("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1", "--eval_interval=1")
    p = run("sample.py", f"--out_dir={out}", "--diffusion", "--device=cpu", ok=False)
    assert p.returncode != 0 and "autoregressive checkpoint" in p.stderr and "Traceback" not in p.stderr
    p = run("train.py", *TINY, "--objective=diffusion", "--router=expert_choice", f"--data_dir={data_dir}",
            f"--out_dir={out}", ok=False)
    assert p.returncode != 0 and "router='none'" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_bench_diffusion_mode_runs(tmp_path, data_dir):
    """bench.py --mode=diffusion on two tiny checkpoints: every decoder's row, and the claim line."""
    d, j = str(tmp_path / "d"), str(tmp_path / "j")
    run("train.py", *TINY, "--objective=diffusion", f"--data_dir={data_dir}", f"--out_dir={d}", "--max_iters=2",
        "--eval_interval=2")
    run("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={j}", "--max_iters=2", "--eval_interval=2")
    p = run("bench.py", "--mode=diffusion", "--device=cpu", f"--diffusion_dir={d}", f"--judge_dir={j}",
            "--infill_windows=4", "--gen_samples=2", "--gen_prompt=8", "--gen_tokens=16", "--gen_block=8",
            "--repeats=1", "--mask_rates=0.3", f"--report_csv={tmp_path / 'b.csv'}")
    assert "masked diffusion:" in p.stdout and "infill 30%: confidence vs fixed 4" in p.stdout
    for name in ("fixed 8", "gradient", "preset max_quality", "(validation text)"):
        assert name in p.stdout
