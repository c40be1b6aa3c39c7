# Mixture-of-Recursions: recursive_tiny.py plus an expert-choice router per step.
# Step r keeps the top (R - r) / R of each sequence's tokens (capacity 1, 2/3, 1/3), so
# on average a token runs 2 of the 3 recursions: 1 + 2*2 + 1 = 6 layer applications
# instead of 8. Attention at each step runs among the tokens still active
# (recursion-wise KV cache). The auxiliary BCE loss teaches the router logits the top-k
# decisions, so generation can decide causally with sigmoid(logit) > 0.5.
exec(open("config/recursive_tiny.py").read())
out_dir = "out-mor-tiny"
router = "expert_choice"
kv_mode = "recursion"
router_alpha = 0.1              # the paper's gate scale: g = 0.1 * sigmoid(logit)
router_aux_weight = 0.001       # the paper's auxiliary-loss coefficient
log_depth_hist_every = 250
