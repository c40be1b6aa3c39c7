# Ablation: mor_tiny.py (expert-choice) with recursive KV sharing instead of recursion-wise
# caching. The paper found share-first hurts expert-choice; this checks it at tiny scale.
exec(open("config/mor_tiny.py").read())
out_dir = "out-mor-tiny-share-first"
kv_mode = "share_first"
