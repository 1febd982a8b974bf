"""Data: the coding-task sets with public/hidden tests (tasks.py) and the SFT pipeline."""
