"""WARN (Attend and Rectify) in PyTorch: model, datasets, training and evaluation."""
