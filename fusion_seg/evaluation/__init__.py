"""Scores: metrics (reset / process / evaluate), the Cityscapes scores, and evaluate, end to end on
images.
"""
