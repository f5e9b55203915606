# The small-data experiment of SimpleLLM, a from-scratch tutorial: Edith Wharton's "The Verdict"
# (5,145 GPT-2 tokens; BENCHMARKS.md, "The small-data experiment").
#   python prepare.py --tokenizer gpt2 --out data/verdict --input \
#       https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt
#   python train.py config/verdict.py
# With 4,630 training tokens the danger is memorising, not under-fitting: a small model, heavy
# dropout and weight decay, and early stopping on val loss (best.pt keeps the best weights).
out_dir = "out-verdict"
dataset = "verdict"

n_layer = 2
n_head = 4
n_embd = 128
block_size = 64
batch_size = 16
dropout = 0.3

learning_rate = 1e-3
weight_decay = 0.1
max_iters = 1000
lr_decay_iters = 1000
min_lr = 1e-4
warmup_iters = 20

eval_interval = 25
eval_iters = 8  # 8 x 16 windows of 64 tokens: ~all 451 val windows, a few times over
log_interval = 25
patience = 6  # stop after 150 iterations without a better val loss
