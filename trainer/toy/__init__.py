"""The toy worlds, kept apart from the training core: problem kinds and their worked steps (``problems``), the
worlds built from them and their data splits (``worlds``, ``python -m trainer.toy.worlds data``), and the toy base
models pre-trained on them (``python -m trainer.toy.pretrain``)."""
