"""Trainers: the Flow-GRPO loop (`grpo.py`), its typed config (`config.py`), checkpoints and LoRA export."""
