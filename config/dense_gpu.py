# A dense (vanilla) 12-layer Llama-style model on Shakespeare characters, trained on one GPU in a few minutes, then
# exported to a transformers Llama folder that hf_wrap.py treats like any pretrained model (a base for
# config/hf_router_tune.py with --hf=out-dense-gpu/hf):
#   python train.py config/dense_gpu.py                                       # 237 s on an H100
#   python sample.py --out_dir=out-dense-gpu --export_hf=out-dense-gpu/hf
# config/dense_cpu.py is the same recipe, smaller, for a CPU.
out_dir = "out-dense-gpu"
dataset = "shakespeare"
tokenizer = "char"              # ~70 characters: a tiny LM head; the exported folder gets a char tokenizer

# 64 sequences * 256 characters = 16,384 tokens per iteration
batch_size = 64
block_size = 256
max_iters = 4100                # the measured H100 run; its val loss was lowest near iteration 2000
eval_interval = 500
eval_iters = 40
log_interval = 50

# 12 layers * (4 * 384^2 attention + 3 * 384 * 1024 MLP) = 21M parameters in the layers: deep enough that
# skipping or dropping layers is a real choice
n_layer = 12
n_head = 6                      # head size 64
n_embd = 384
dropout = 0.1                   # 4.3M training characters, ~15 epochs: it overfits after ~2,000 iterations even so

learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
weight_decay = 0.1
device = "auto"
