"""Bad values on the command line get one clear line that says what is allowed, before any model loads: no
traceback, no silent garbage (issue 21, section 3). Each case runs the real script."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow                     # a script start each (~4 s)
@pytest.mark.parametrize("args, says", [
    (("sample.py", "--top_k=0"), "top_k=0: sample among the top_k"),
    (("sample.py", "--hf=smollm2-135m", "--top_k=0"), "top_k=0: sample among the top_k"),
    (("sample.py", "--temperature=-1"), "temperature=-1: it is >= 0"),
    (("sample.py", "--hf=smollm2-135m", "--temperature=-1"), "temperature=-1: it is >= 0"),
    (("sample.py", "--hf=smollm2-135m", "--speculative=100000"), "speculative=100000: the tokens drafted per cycle"),
    (("sample.py", "--hf=smollm2-135m", "--keep_ratio=2"), "keep_ratio=2: the share of the routed layer calls"),
    (("sample.py", "--chat=maybe"), "chat='maybe': auto (the chat template"),
    (("sample.py", "--router=foo"), "router='foo': one of none, drop"),
    (("sample.py", "--depth=-1"), "depth=-1: fixed's groups"),
    (("bench.py", "--repeats=0"), "repeats=0: must be an int >= 1."),
    (("bench.py", "--ppl_depths=2"), "ppl_depths=(2,): must be layer-call ratios in (0, 1]"),
    (("bench.py", "--decode_batches=[0]"), "decode_batches=(0,): batch sizes are ints >= 1"),
    (("bench.py", "--decode_batches=abc"), "decode_batches=('abc',): batch sizes are ints >= 1"),
    (("bench.py", "--mode=spec", "--hf=smollm2-135m", "--dtype=half"), "unknown dtype 'half'"),
])
def test_a_bad_value_is_one_clear_line(args, says):
    p = run(*args)
    assert p.returncode != 0 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_a_config_file_with_a_syntax_error_names_its_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 4\nmax_iters = = 3\n")
    p = run("train.py", str(bad))
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{bad}, line 2: invalid syntax" in p.stderr


@pytest.mark.parametrize("make", ["empty", "stray file"])
def test_hf_folder_without_a_model_says_so(tmp_path, make):
    import data
    if make == "stray file":
        (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SystemExit, match="a folder without a model in it"):
        data.load_hf(str(tmp_path))


def test_a_rejected_model_config_leaves_no_out_dir(tmp_path, data_dir):
    out = tmp_path / "new-run"
    p = run("train.py", "--n_embd=10", "--n_head=3", f"--out_dir={out}", f"--data_dir={data_dir}")
    assert p.returncode != 0 and "error: bad model config: n_embd=10" in p.stderr, p.stderr[-2000:]
    assert not out.exists()


TINY = ("--max_iters=0", "--eval_iters=1", "--batch_size=1", "--block_size=8", "--n_layer=2", "--n_embd=16",
        "--n_head=1", "--n_recursion=2", "--sharing=cycle", "--router=expert_choice")


@pytest.mark.parametrize("bad, says", [
    ("--beta1=1.5", "beta1=1.5, beta2=0.95: AdamW's decay rates lie in [0, 1)"),
    ("--weight_decay=-1", "weight_decay must be >= 0"),
    ("--lr_decay_iters=-5", "lr_decay_iters must be >= 0"),
    ("--decay_frac=2", "decay_frac=2.0: the fraction of max_iters"),
    ("--router_arch=foo", "router_arch must be one of linear | mlp, got 'foo'"),
    ("--router_temperature=0", "router_temperature must be > 0"),
    ("--router_alpha=-1", "router_alpha must be > 0"),
    ("--rope_theta=0", "rope_theta must be > 0"),
    ("--depth_hist_path=/nonexistent/x.csv", "depth_hist_path='/nonexistent/x.csv': its folder '/nonexistent' does"),
])
def test_a_bad_training_value_is_one_clear_line(tmp_path, data_dir, bad, says):
    """Values train.py used to take (a silent run, or a traceback from AdamW or the router)."""
    p = run("train.py", *TINY, bad, f"--out_dir={tmp_path / 'out'}", f"--data_dir={data_dir}")
    assert p.returncode != 0 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


TUNE_BAD = [("max_iters", -1), ("batch_size", 0), ("block_size", 0), ("learning_rate", -1.0), ("beta1", 1.5),
            ("keep_ratios", (2,)), ("exit_threshold", 2.0), ("eval_interval", 0), ("eval_iters", 0),
            ("log_interval", 0), ("calib_windows", 0), ("gradient_accumulation_steps", 0), ("R", 0),
            ("hard_gate_frac", 2.0), ("exit_layers", ("abc",)), ("router_pattern", "odd"), ("router_group", 0),
            ("self_distill", -1), ("draft_vocab", -1), ("exit_head_layer", -1), ("target_tol", 0.0),
            ("exit_iters", -1), ("warmup_iters", -1), ("tail_layers", -2), ("min_lr", 1.0), ("router", "gate")]


@pytest.mark.parametrize("key, bad", TUNE_BAD)
def test_a_bad_tuning_value_is_one_clear_line(key, bad):
    """Values tune.py used to take until the model had loaded (or for good: a silent run of nothing)."""
    import tune
    with pytest.raises(SystemExit, match="^" + re.escape(f"error: {key}={bad!r}: must be ")):
        tune.check_config(tune.default_config(**{key: bad}))


def test_each_router_kind_gets_its_own_defaults():
    """-1 is the kind's value: group routers train soft and keep the last two layers; a value given is kept."""
    import tune
    ec = tune.check_config(tune.default_config(router="expert_choice"))
    assert (ec["hard_gate_frac"], ec["tail_layers"]) == (0.0, 2)
    skip = tune.check_config(tune.default_config(router="skip"))
    assert (skip["hard_gate_frac"], skip["tail_layers"]) == (0.5, 0)
    mine = tune.check_config(tune.default_config(router="token_choice", hard_gate_frac=0.25, tail_layers=0))
    assert (mine["hard_gate_frac"], mine["tail_layers"]) == (0.25, 0)


def test_a_hub_name_not_cached_fails_at_once_without_network(tmp_path, monkeypatch):
    """Online mode, a hub that does not answer: one clear line after a 3 s connection test, not the hub client's
    ~26 s of retries."""
    import time
    import data
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")          # nothing listens on port 443 here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.time()
    with pytest.raises(SystemExit, match="error: cannot load 'someone/not-a-model'.*the hub did not answer"):
        data.load_hf("someone/not-a-model")
    assert time.time() - t0 < 10
