"""The frozen backbone: build (EncoderSpec, FrozenEncoder), its identity (what made the features) and
weight files.
"""
