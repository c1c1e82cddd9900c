# DPO on Anthropic HH-RLHF from GPT-2 124M
# (first: python prepare.py --dataset=hh --hh_subsets=harmless-base,helpful-base --out_dir=data/hh)
# the paper's recipe: SFT first (loss_type = "sft", init_from = "gpt2"), then DPO from that checkpoint
out_dir = "out/hh_gpt2"
data_dir = "data/hh"
init_from = "gpt2"
loss_type = "sigmoid"
beta = 0.1
block_size = 1024
truncate = True
global_batch_size = 64  # the DPO paper's batch
# a whole one-GPU step in one packed micro-batch: one forward keeps the GPU busy; under torchrun
# each rank gets 64 / ranks of them. Memory per micro-batch size (and larger ones for larger cards):
# bench/README.md
batch_size = 64
learning_rate = 1e-6
min_lr = 1e-7
warmup_iters = 150
max_iters = 2000
eval_interval = 250
eval_pairs = 2000
log_interval = 10
