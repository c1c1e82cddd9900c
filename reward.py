"""
A reward model trained by dpo.py itself: `--loss_type=reward`. The same pairs, batches, loop,
layouts (DDP, FSDP), checkpoints and resume as any run; only the forward and the loss differ:

    r = score(h_last)  the GPT-2 trunk's last hidden state at a response's last token -> a scalar
    loss = -log sigma(r_w - r_l) + center_rewards_coefficient * (r_w + r_l)^2

the Bradley-Terry loss of TRL's RewardTrainer (the second term pins the rewards' mean near 0).
The head is a Linear(n_embd, 1) named `score` on the GPT (model.py's GPTConfig.reward_head), so a
checkpoint of the run loads as any other; judges.py's `rm:PATH` scores (prompt, response) with it.

    python dpo.py --loss_type=reward --init_from=out/toy_sft --out_dir=out/toy_rm
    python online.py --judge=rm:out/toy_rm   # or --eval_judge=rm:out/toy_rm in any dpo.py run
"""
import dataclasses

import torch
import torch.nn as nn

from checkpoint import show


def model_for(cfg, model):
    """the model this run trains: with a scalar head for --loss_type=reward; a reward model is
    refused as the start of a run with another loss (its head would sit unused)"""
    if cfg.loss_type == "reward":
        return with_head(model, cfg.seed)
    if model.config.reward_head:
        raise ValueError(f"--init_from={cfg.init_from} is a reward model (--loss_type=reward); "
                         f"--loss_type={cfg.loss_type} starts from a language model (SFT or GPT-2)")
    return model


def with_head(model, seed):
    """the model with a fresh scalar head (N(0, 0.02), as HF's) unless it has one (a resume)"""
    if model.config.reward_head:
        return model
    model.config = dataclasses.replace(model.config, reward_head=True)
    generator = torch.Generator().manual_seed(seed)  # the same head in every run of this seed
    head = nn.Linear(model.config.n_embd, 1, bias=False)
    with torch.no_grad():
        weight = torch.randn(head.weight.shape, generator=generator) * 0.02
        head.weight.copy_(weight)
    model.score = head.to(model.lm_head.weight.device)
    return model


def scores(gpt, h, last):
    """h (R*T, C) flat hidden states, last (n,) flat positions -> (n,) float32 rewards"""
    return gpt.score(h[last]).squeeze(-1).float()


def check_config(cfg):
    """--loss_type=reward's rules, one line each"""
    types = cfg.loss_type.split(",")
    if "reward" in types and len(types) > 1:
        raise ValueError(f"--loss_type={cfg.loss_type}: reward trains a reward model; it goes alone")
    if cfg.center_rewards_coefficient < 0:
        raise ValueError(f"--center_rewards_coefficient={cfg.center_rewards_coefficient}: must be >= 0")
    if types != ["reward"]:
        return
    others = {"sft_weight": 0.0, "use_weighting": False, "ld_alpha": 1.0, "label_smoothing": 0.0,
              "f_divergence_type": "reverse_kl", "sync_ref_model": False, "export_hf": False,
              "eval_judge": ""}
    for key, default in others.items():
        if getattr(cfg, key) != default:
            raise ValueError(f"--{key}={show(getattr(cfg, key))}: not with --loss_type=reward (a "
                             f"reward model has no log-probs; leave it at {show(default)})")
