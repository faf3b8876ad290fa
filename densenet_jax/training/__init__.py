"""One training run: its config checks, the sharded train state and steps, the loop train.py
runs, checkpoints, metrics and the files it leaves for people and tools."""
