"""Stage zero: images and masks in. Image I/O (io), resizing and HRNet training views (transforms,
views), and the datasets (datasets/, each registering itself).
"""
