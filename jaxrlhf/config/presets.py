"""PPO presets: named sets of step-3 values, applied under the YAML file and the command line.

`stable` is also what `PPOConfig`'s own defaults are (a test holds them equal), so a config
that names no preset gets the same values either way.
"""

PRESETS = {
    # DeepSpeed-Chat's hard-coded DeepSpeedPPOTrainer values, reproduced exactly.
    "deepspeed_chat": {
        "kl_coef": 0.1,
        "kl_estimator": "k1",
        "clip_reward_value": 5.0,
        "cliprange": 0.2,
        "cliprange_value": 0.2,
        "gamma": 1.0,
        "lam": 0.95,
        "whiten_advantages": False,
        "score_position": "after_last",
        "dual_clip": None,
        "entropy_coef": 0.0,
        "adaptive_kl": False,
        "kl_target": 6.0,  # unused: the KL coefficient stays fixed
    },
    # Our default: what keeps PPO on small models stable.
    "stable": {
        "kl_coef": 0.1,  # DeepSpeed-Chat's: holds the policy near SFT where the reward model is blind
        "kl_estimator": "k1",  # the log-ratio, whose sum over the answer is the sequence KL we report
        "clip_reward_value": 5.0,  # bounds outlier reward-model scores
        "cliprange": 0.2,  # standard PPO trust region
        "cliprange_value": 0.2,  # keeps the critic near its rollout values, as the actor
        "gamma": 1.0,  # episodic task with a terminal reward: no discounting needed
        "lam": 0.95,  # usual bias/variance trade-off for GAE
        "whiten_advantages": True,  # advantage scale independent of reward scale and batch
        "score_position": "last_token",  # score lands on the token that earned it, no pad-position value
        "dual_clip": 3.0,  # bounds the loss when a negative advantage meets a huge ratio (Ye et al. 2020)
        "entropy_coef": 0.0,  # entropy bonus degrades text; the KL to the reference regularises
        "adaptive_kl": False,  # a fixed coefficient is easier to reason about; the controller is an option
        "kl_target": 6.0,  # used when adaptive_kl is on: nats per sequence, Ziegler et al.'s value
    },
}
