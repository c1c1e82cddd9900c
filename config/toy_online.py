# online DPO on the toy task: config/toy_dpo.py's recipe (beta 0.1, lr 1e-4, 200 steps of 32 pairs),
# its steps spread over 4 rounds of 1600 fresh pairs each, sampled from the policy itself and judged
# by the toy task's exact reward
out_dir = "out/toy_online"
data_dir = "data/toy"
init_from = "out/toy_sft"
loss_type = "sigmoid"
beta = 0.1
global_batch_size = 32
batch_size = 32
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
max_iters = 200
eval_interval = 50
log_interval = 25
rounds = 4
prompts_per_round = 1600
num_samples = 2
