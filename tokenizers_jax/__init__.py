"""tokenizers_jax: FlowMo and DetailFlow image tokenizers in JAX/Flax."""
