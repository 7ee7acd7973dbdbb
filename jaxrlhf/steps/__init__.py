"""Steps 1 and 2: supervised fine-tuning and the reward model, on one shared training loop."""
