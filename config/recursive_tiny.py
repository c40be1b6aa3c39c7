# Recursive baseline: the same 8 layer applications as vanilla_tiny.py, but the middle
# 6 are one 2-layer block applied R=3 times (middle_cycle: L0, [L1 L2] x 3, L3).
# Every token runs every recursion: no router. 4 unique layers = half of vanilla's
# parameters in the layers (the shared block itself is 1/R of the 6 middle layers).
exec(open("config/vanilla_tiny.py").read())
out_dir = "out-recursive-tiny"
n_recursion = 3
sharing = "middle_cycle"
