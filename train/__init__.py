"""Pretraining: config, optimiser/schedule, checkpoints, the loop (train.pretrain), validation, plots."""
