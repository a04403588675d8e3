"""Stage two: training a decoder on cached features (or, online, on features computed each step).

- ``train``: the entry points, ``train_decoder`` (from a cache) and ``train_online`` (from images);
- ``config``: ``TrainConfig`` (what to train, range-checked), ``TrainingData`` (what on), ``TrainResult``;
- ``sources``: where batches come from (cache tiers, online) and the one batch-order rule they share;
- ``validation``: the validation store's checks, its views and ``validate``;
- ``run_dir``: the run directory's files (checkpoints, metrics.jsonl, config.json) and the resume checks;
- ``trainer``: the loop (``Trainer``: restore, train an epoch, validate and checkpoint, fit);
- ``hooks``: what a run shows and logs as it goes (progress, metrics.jsonl records, TensorBoard);
- ``warm_start``: ``--init`` from a decoder trained on another dataset;
- ``losses``, ``ddp``: the losses, and torchrun's processes.
"""
