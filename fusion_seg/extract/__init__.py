"""Stage one: run the frozen encoder once per view into a store; the shared step (encode), in-process
(local), on dask (dask_cluster), and its requests.
"""
