# Ablation: mor_tc_tiny.py balanced without a loss: a per-depth bias, added to the
# routing scores for the choice only, moves by u = 1e-3 after every step towards the
# under-used depths (bias_i += u * sign(mean_load - load_i)).
exec(open("config/mor_tc_tiny.py").read())
out_dir = "out-mor-tc-tiny-loss-free"
balancing = "loss_free"
balance_bias_rate = 1e-3
