"""Adapters the trainer attaches to a frozen model: LoRA, hypernetworks."""
