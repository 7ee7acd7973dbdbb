"""Command-line tools around trained models: chat, prompt_eval (side by side), rw_eval (reward model scores)."""
