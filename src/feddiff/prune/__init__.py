"""Structured pruning of the U-Net (FedPhD): Torch-Pruning with replayable history, and the strategy wrapper."""
