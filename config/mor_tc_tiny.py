# Mixture-of-Recursions with token-choice routing and recursive KV sharing.
# Each token picks its depth 1..3 once, before the first recursion (softmax, top-1);
# the output at its last recursion is gated by that probability. Only the first
# recursion writes K/V; deeper steps attend to it (share-first: 1/R of the K/V memory).
# The balancing loss (coefficient 0.1, as in the paper) keeps all three depths in use.
exec(open("config/recursive_tiny.py").read())
out_dir = "out-mor-tc-tiny"
router = "token_choice"
kv_mode = "share_first"
balancing = "loss"
router_balance_weight = 0.1
router_z_weight = 1e-5
log_depth_hist_every = 250
