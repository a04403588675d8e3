"""The feature cache: the Zarr store and its protocol (store), dtypes and codecs, locations (local,
S3), the streaming reader and the resident tiers.
"""
