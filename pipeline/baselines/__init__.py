"""Baselines in the same harness as ETPO: token-level PPO, group-relative REINFORCE, best-of-N."""
