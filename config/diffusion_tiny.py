# Masked diffusion (MDLM / LLaDA objective, diffusion.py) on recursive_tiny.py's network: the middle 6 of 8
# layer applications are one 2-layer block applied R=3 times (middle_cycle), attention is bidirectional, and
# one extra id is [MASK]. Each step masks every sequence at its own rate t ~ U(0, 1) and learns to fill the
# masked characters (cross-entropy / t). Same shape, batch and step count as vanilla_tiny.py (~5 min on a
# 2-core CPU). Sampling adapts the number of refinement passes per token (python sample.py --out_dir=...).
exec(open("config/recursive_tiny.py").read())
out_dir = "out-diffusion-tiny"
objective = "diffusion"
