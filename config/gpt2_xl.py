# GPT-2 XL (1.56B parameters) on FineWeb-Edu's 10B-token sample, for one node of 8 GPUs of 80 GB:
#   python prepare.py --input hf://datasets/HuggingFaceFW/fineweb-edu --hf_config sample-10BT \
#       --tokenizer gpt2 --val_fraction 0.005   # -> data/fineweb-edu, as config/default.py
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_xl.py
out_dir = "out-gpt2-xl"
dataset = "fineweb-edu"

n_layer = 48
n_head = 25  # head size 64
n_embd = 1600
block_size = 1024
dropout = 0.0
bias = True

# Memory per GPU at micro-batch 16 (`python bench.py memory --batch_size 16`, GB, eager bf16):
#   DDP:  params 6.23 + grads 12.46 (with DDP's bucket copy) + AdamW 12.46 + bf16 weight copies 3.11
#         + activations 55.43 = 89.7: does not fit (DDP fits micro-batch 10)
#   FSDP: params 0.78 + grads 0.78 + AdamW 1.56 (each 1/8) + unsharded layers in flight 0.74
#         + activations 55.43 = 59.3 of 80: fits without checkpointing (FSDP fits up to 19)
# Activations are 48.8 saved (2.8 MB per token in the blocks, 0.2 MB at the head: the fp32
# log-probs) + 6.6 for the logits' gradients. grad_checkpoint = True would bring them to 12.6
# (micro-batch up to 86) for ~1/3 more compute: not needed at 16.
fsdp = True
grad_checkpoint = False

# 16 batch * 1024 block * 32 accumulation steps = 524,288 tokens per step (~0.5M)
# with 8 GPUs: 4 micro-steps each
batch_size = 16
gradient_accumulation_steps = 4 * 8

# 19,000 steps * 524,288 tokens = ~10B tokens: one pass over the sample. GPT-3's LR for its
# 1.3B model (2e-4, warmup over 375M tokens: ~715 steps), decaying to a tenth.
learning_rate = 2e-4
max_iters = 19_000
lr_decay_iters = 19_000
min_lr = 2e-5
warmup_iters = 700
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 100
log_interval = 10

compile = True
dtype = "bfloat16"  # FSDP's mixed precision computes in bf16 from fp32 master weights
