"""Recipes: TOML stages checked whole before the first runs (stages), run in order (recipes); requests
builds every request from plain options.
"""
