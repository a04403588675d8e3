"""What a user reads: compare decoders, visualize (Figure 2), plan (cache or online?), the bench and
its timer.
"""
