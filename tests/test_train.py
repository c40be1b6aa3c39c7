"""train.py and sample.py end to end, as a user runs them: training smoke runs, resume
that continues (not replays) the run, clear errors for bad input, sampling from every
router's checkpoint, and DDP through torchrun on CPU (gloo)."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import run, sample_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--n_layer=4", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--compile=False"]


def test_smoke_train_then_sample(tmp_path, data_dir):
    out = str(tmp_path / "out")
    p = run("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3")
    assert "step 6:" in p.stdout and os.path.exists(os.path.join(out, "ckpt.pt"))
    val = re.search(r"step 6: train [\d.]+, val ([\d.]+)", p.stdout).group(1)     # the closing line repeats it
    assert re.fullmatch(rf"done at iteration 6 in [\d.]+ s \(training and evaluation\): val loss {val}, compute "
                        rf"saved 0\.0% of layer calls, wrote {re.escape(out)}/ckpt\.pt", p.stdout.splitlines()[-1])
    with open(os.path.join(out, "train_log.csv")) as f:
        header = f.readline()
    for col in ("loss", "lr", "ms_per_iter", "tokens_per_s", "mfu"):
        assert col in header
    args = [f"--out_dir={out}", "--max_new_tokens=20", "--prompt=ROMEO:", "--device=cpu", "--num_samples=2"]
    s = run("sample.py", *args)
    assert "\nROMEO:" in s.stdout and "tok/s" in s.stdout
    # streamed (the default: the first sample as it is generated, the second at the end) = printed at the end
    whole = sample_text(run("sample.py", *args, "--stream=False").stdout)
    assert sample_text(s.stdout) == whole and whole.count("ROMEO:") == 2 and whole.endswith("---------------")



def test_train_model_globals_are_MoRConfigs_defaults():
    """train.py restates MoRConfig's fields as its config globals (nanoGPT's style: one screen of plain keys);
    every one must keep MoRConfig's default, read from train.py's source (not run: it would train)."""
    import ast
    from dataclasses import MISSING, fields
    from model import MoRConfig
    derived = ("vocab_size", "mask_token")      # set from the corpus and the objective, not config keys
    defaults = {f.name: f.default for f in fields(MoRConfig) if f.default is not MISSING and f.name not in derived}
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    shared = {}
    for node in tree.body:                     # the first assignment of each name: the config globals
        for t in node.targets if isinstance(node, ast.Assign) else ():
            if isinstance(t, ast.Name) and t.id in defaults and t.id not in shared:
                shared[t.id] = ast.literal_eval(node.value)
    assert {"n_layer", "n_recursion", "router", "capacity", "target_depth_weight"} <= shared.keys()
    assert {k: v for k, v in shared.items() if v != defaults[k]} == {}, f"of {len(shared)} shared keys"


def _assert_same(a, b, where):
    """Nested dicts/lists of tensors and numbers (a state dict) are equal, bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("variant", [[], ["--n_recursion=2", "--sharing=cycle", "--router=expert_choice"]])
def test_resume_continues_exactly(tmp_path, data_dir, variant):
    """8 iterations straight == 4 iterations, then resume to 8: same weights, same optimizer state."""
    common = [*TINY, *variant, f"--data_dir={data_dir}", "--eval_interval=4", "--lr_decay_iters=8", "--dropout=0.1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("train.py", *common, f"--out_dir={a}", "--max_iters=8")
    run("train.py", *common, f"--out_dir={b}", "--max_iters=4")
    first_leg = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    run("train.py", *common, f"--out_dir={b}", "--max_iters=8", "--init_from=resume")
    ca = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    cb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    assert first_leg["iter_num"] == 4 and ca["iter_num"] == cb["iter_num"] == 8
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    _assert_same(ca["optimizer"], cb["optimizer"], "optimizer")
    assert ca["optimizer"]["state"] and not torch.equal(first_leg["optimizer"]["state"][0]["exp_avg"],
                                                        cb["optimizer"]["state"][0]["exp_avg"])
    assert not torch.equal(first_leg["model"]["layers.0.mlp.up_proj.weight"], cb["model"]["layers.0.mlp.up_proj.weight"])


def test_resume_errors_are_clear(tmp_path, data_dir):
    out = str(tmp_path / "out")
    run("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    p = run("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume", "--n_layer=3",
            ok=False)
    assert p.returncode != 0 and "n_layer" in p.stderr and "does not match" in p.stderr
    ckpt = os.path.join(out, "ckpt.pt")
    good = open(ckpt, "rb").read()
    with open(ckpt, "wb") as f:
        f.write(good[: len(good) // 2])   # a truncated file
    for script, args in (("train.py", [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume"]),
                         ("sample.py", [f"--out_dir={out}", "--device=cpu"])):
        p = run(script, *args, ok=False)
        assert p.returncode != 0 and "corrupt" in p.stderr and "Traceback" not in p.stderr
    p = run("sample.py", f"--out_dir={tmp_path / 'nowhere'}", ok=False)
    assert "no checkpoint" in p.stderr and "Traceback" not in p.stderr


def test_bad_keys_and_values(tmp_path):
    p = run("train.py", "--lerning_rate=0.1", ok=False)
    assert p.returncode != 0 and "learning_rate" in p.stderr and "Traceback" not in p.stderr
    p = run("train.py", "--max_iters=lots", ok=False)
    assert p.returncode != 0 and "max_iters" in p.stderr and "Traceback" not in p.stderr
    p = run("train.py", "config/nope.py", ok=False)
    assert p.returncode != 0 and "nope.py" in p.stderr and "Traceback" not in p.stderr
    p = run("train.py", "--sharing=spiral", "--n_recursion=2", f"--out_dir={tmp_path}", f"--data_dir={tmp_path}",
            "--max_iters=0", ok=False)
    assert p.returncode != 0 and "sharing must be one of" in p.stderr and "Traceback" not in p.stderr
    assert "learning_rate" in run("train.py", "--help").stdout


@pytest.mark.parametrize("variant", [
    ["--router=expert_choice", "--kv_mode=recursion"],
    ["--router=expert_choice", "--kv_mode=share_first", "--router_aux=router"],
    ["--router=token_choice", "--kv_mode=share_first", "--balancing=loss_free"],
])
def test_every_router_checkpoint_samples_with_depths(tmp_path, data_dir, variant):
    out = str(tmp_path / "out")
    p = run("train.py", *TINY, "--n_layer=5", "--n_recursion=3", "--sharing=middle_cycle", *variant,
            f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3",
            "--log_depth_hist_every=1")
    saved = re.search(r"step 3: .* compute saved ([\d.]+%)", p.stdout).group(1)      # the closing line repeats it
    last = p.stdout.splitlines()[-1]
    assert last.startswith("done at iteration 3 ") and f"compute saved {saved} of layer calls" in last
    assert os.path.exists(os.path.join(out, "depth_hist.csv"))
    csv_path = str(tmp_path / "hist.csv")
    s = run("sample.py", f"--out_dir={out}", "--max_new_tokens=30", "--return_depth_trace", f"--csv={csv_path}",
            "--device=cpu", "--prompt=KING:")
    assert "depth trace" in s.stdout and "compute saved" in s.stdout and "depth 3 |" in s.stdout
    assert open(csv_path).readline().strip() == "depth,tokens,fraction"


def test_prompt_longer_than_context_is_cropped(tmp_path, data_dir):
    """As nanoGPT: the model sees the prompt's last block_size tokens (generation slides past the context anyway)."""
    out = str(tmp_path / "out")
    run("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1", "--eval_interval=1")
    p = run("sample.py", f"--out_dir={out}", "--prompt=" + "b" * 10 + "a" * 30, "--device=cpu", "--max_new_tokens=5")
    assert "the prompt is 40 tokens, longer than this model's context of 32 (block_size): cropped to its last 32" \
        in p.stdout
    assert re.search(r"^bbaaa", p.stdout, re.M) and "5 new tokens" in p.stdout


def test_deterministic_runs_repeat_exactly(tmp_path, data_dir):
    """--deterministic: two 50-iteration runs of config/mor_tiny.py (shrunk, dropout on so the torch RNG
    matters) log the same loss at every iteration. The second run also draws depth_hist.csv (--plot)."""
    common = ["config/mor_tiny.py", "--deterministic=True", "--max_iters=50", "--n_layer=5", "--n_head=2",
              "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_interval=50", "--eval_iters=2",
              "--log_interval=1", "--log_depth_hist_every=10", "--dropout=0.1", f"--data_dir={data_dir}"]
    losses = []
    for name in ("a", "b"):
        out = tmp_path / name
        plot = [f"--plot={tmp_path / 'depths.png'}"] if name == "b" else []
        p = run("train.py", *common, f"--out_dir={out}", *plot, env={"OMP_NUM_THREADS": "1"})
        with open(out / "train_log.csv") as f:
            losses.append([row.split(",")[:2] for row in f.read().splitlines()[1:]])
    assert len(losses[0]) == 50 and losses[0] == losses[1]
    assert "wrote the depth-over-training plot" in p.stdout or "needs matplotlib" in p.stdout


@pytest.mark.slow
def test_ddp_on_cpu_with_torchrun(tmp_path, data_dir):
    out = str(tmp_path / "out")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run([*torchrun, "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}",
                        "--max_iters=4", "--eval_interval=2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stdout and "step 4:" in p.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert len(ckpt["rng"]["train_gen"]) == 2    # each rank's batch stream saved for resume
