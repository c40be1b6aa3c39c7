# Ablation: mor_tiny.py with the auxiliary router (a separate MLP trained on detached
# hidden states to predict the top-k choice) deciding at inference, instead of the
# auxiliary BCE loss on the main router.
exec(open("config/mor_tiny.py").read())
out_dir = "out-mor-tiny-aux-router"
router_aux = "router"
