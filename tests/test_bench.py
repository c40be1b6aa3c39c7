"""bench.py end to end on CPU at a tiny size: every table prints, the CSV holds every row."""
import csv
import os
import subprocess
import sys

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
    assert {r["decode"] for r in decode} == {"-", "per-step", "continuous"}
    assert all(float(r["tokens/s"]) > 0 for r in decode)
