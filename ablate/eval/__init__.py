"""Evaluation: caption CIDEr, VQA accuracy and held-out text loss for trained variants."""
