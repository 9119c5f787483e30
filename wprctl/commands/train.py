"""Placeholder: replaced when this command is built."""

from wprctl.commands._stub import stub_module

register = stub_module(
    ('sft', 'Supervised fine-tuning (stage 1).'),
    ('rm', 'Reward-model training (stage 2).'),
    ('ppo', 'PPO with a pluggable policy regularizer (stage 3).'),
    ('dar', 'Dual-regularized Advantage Regression.'),
)
