"""Reinforcement learning: GRPO-family losses and advantages, the multi-purpose reward, the sandbox client and the loop."""
