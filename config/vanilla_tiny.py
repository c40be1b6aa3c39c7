# Vanilla baseline: a plain 8-layer Llama-style decoder on Shakespeare characters.
# Trains in about 5 minutes on a 2-core CPU. Compare with recursive_tiny.py and mor_tiny.py:
# all share this shape (d=128, 4 heads, 8 layer applications per token at full depth).
out_dir = "out-vanilla-tiny"
dataset = "shakespeare"
tokenizer = "char"              # 65 characters: the LM head stays tiny

# 16 sequences * 64 characters = 1,024 tokens per iteration; 2,500 iterations = 2.6M tokens
batch_size = 16
block_size = 64
max_iters = 2500
eval_interval = 500
eval_iters = 20
log_interval = 50

# 8 layers * (4 * 128^2 attention + 3 * 128 * 352 MLP) = 1.6M parameters in the layers
n_layer = 8
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 2e-3            # small models take a high learning rate
min_lr = 2e-4
warmup_iters = 100
weight_decay = 0.1
device = "cpu"
