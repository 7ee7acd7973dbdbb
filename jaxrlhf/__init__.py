"""jaxrlhf: InstructGPT-style RLHF (SFT, reward model, PPO) in JAX/Flax on device meshes."""

__version__ = "0.1.0"
