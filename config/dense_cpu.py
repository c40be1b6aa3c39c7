# A dense (vanilla) 12-layer Llama-style model on Shakespeare characters, sized to train on a 2-core CPU in
# about 10-15 minutes. It is the base model for router tuning (config/hf_router_tune.py): deep enough that
# depth matters (12 layers to skip or drop), and exported to a transformers Llama folder with
#   python sample.py --out_dir=out-dense-cpu --export_hf=out-dense-cpu/hf
out_dir = "out-dense-cpu"
dataset = "shakespeare"
tokenizer = "char"              # ~70 characters: a tiny LM head; the exported folder gets a char tokenizer

# 16 sequences * 128 characters = 2,048 tokens per iteration; 1,400 iterations = 2.9M tokens (~0.6 s each)
batch_size = 16
block_size = 128
max_iters = 1400
eval_interval = 350
eval_iters = 20
log_interval = 50

# 12 layers * (4 * 192^2 attention + 3 * 192 * 512 MLP) = 4.8M parameters in the layers
n_layer = 12
n_head = 4                      # head size 48
n_embd = 192
dropout = 0.0

learning_rate = 2e-3            # small models take a high learning rate
min_lr = 2e-4
warmup_iters = 100
weight_decay = 0.1
device = "cpu"
