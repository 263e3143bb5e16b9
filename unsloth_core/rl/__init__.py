"""Preference optimisation on top of the trainer: DPO (sigmoid loss), with GRPO and others to come."""
