"""gpt_jax: the whole GPT recipe (pretraining, SFT, reward modeling, PPO) in JAX/Flax."""

__version__ = "0.1.0"
