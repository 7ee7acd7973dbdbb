"""Step 3: reinforcement learning from the reward model (PPO): rollouts, experience, the one-jit update, the driver."""
