# A character-level GPT on tiny shakespeare, sized for a laptop / 2-core CPU.
# python prepare.py && python train.py config/small.py
out_dir = "out-small"
dataset = "shakespeare_char"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000  # = max_iters: decay all the way to min_lr
min_lr = 1e-4  # learning_rate / 10, as Chinchilla
warmup_iters = 100
beta2 = 0.99  # few tokens per iteration: a longer average of squared gradients

eval_interval = 250
eval_iters = 20
log_interval = 50
