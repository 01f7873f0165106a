"""percepdsl: a spec language for perception/reasoning experiments in VLM post-training."""

__version__ = "0.1.0"
