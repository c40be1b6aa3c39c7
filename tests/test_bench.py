"""bench.py end to end on CPU at a tiny size: every table prints, the CSV holds every row."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke(tmp_path):
    report = tmp_path / "bench.csv"
    p = subprocess.run([sys.executable, "bench.py", "--device=cpu", "--n_layer=4", "--n_embd=32", "--n_head=2",
                        "--block_size=32", "--batch_size=2", "--train_iters=1", "--warmup_iters=1",
                        "--decode_batches=[1,2]", "--prompt_len=4", "--new_tokens=4", f"--report_csv={report}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for title in ("training:", "decode:", "HF adapter decode:"):
        assert title in p.stdout
    rows = list(csv.DictReader(open(report)))
    tables = {r["table"] for r in rows}
    assert {"train", "decode", "hf"} <= tables
    decode = [r for r in rows if r["table"] == "decode"]
    # every MoR model is measured both ways, against vanilla at each batch size
    assert {r["decode"] for r in decode} == {"per-step", "continuous"}   # vanilla decodes per-step
    assert all(float(r["tokens/s"]) > 0 for r in decode)


@pytest.mark.slow
def test_gpu_script_runs_at_a_tiny_size_on_the_cpu(tmp_path):
    """`bench.py --mode=gpu` is the one script a GPU session runs; here it must run end to end at a
    tiny size, each row appended to the CSV (medians of interleaved repeats)."""
    report = tmp_path / "gpu.csv"
    p = subprocess.run([sys.executable, "bench.py", "--mode=gpu", "--device=cpu", "--n_layer=4", "--n_embd=32",
                        "--n_head=2", "--block_size=32", "--batch_size=2", "--train_iters=1", "--warmup_iters=1",
                        "--prompt_len=4", "--new_tokens=4", "--repeats=2", f"--report_csv={report}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(report)))
    assert {r["table"] for r in rows} == {"decode", "train", "hf", "verify"}     # verify: a pass over w tokens
    verify = [r for r in rows if r["table"] == "verify"]
    one = {r["batch"]: float(r["ms per pass"]) for r in verify if r["tokens per row"] == "1"}   # batch 1, 8
    assert len(one) == 2 and all(float(r["vs one step"]) == pytest.approx(float(r["ms per pass"]) / one[r["batch"]],
                                                                          rel=1e-9) for r in verify)
    decode = [r for r in rows if r["table"] == "decode"]
    assert {r["model"] for r in decode} == {"vanilla", "MoR-3 expert-choice", "MoR-4 expert-choice"}
    assert all(float(r["spread %"]) >= 0 and float(r["ideal"]) >= 1 for r in decode)


def test_speculative_mode_is_its_own():
    """--mode=hf is the adapter at random shapes; with --hf (a real model's speculative decoding, the old form) it
    is an error that names --mode=spec, before any model loads."""
    p = subprocess.run([sys.executable, "bench.py", "--mode=hf", "--hf=smollm2-135m", "--routers=a.pt"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--mode=spec --hf=smollm2-135m --routers=a.pt" in p.stderr
