"""Reinforcement learning: GRPO-family losses and advantages, the multi-purpose reward, the GRPO round."""
