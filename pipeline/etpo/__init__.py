"""The ETPO method: the soft Bellman backup, the losses, and training."""
