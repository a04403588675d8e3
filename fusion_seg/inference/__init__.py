"""End to end: the Segmenter (encoder + decoder + upsample), load_model, test-time augmentation,
sliding window, predict.
"""
