"""Split learning: sequential SL and SplitFed-v1 with compressed smashed data (ACP-SL, NSC-SL).

Reading order: ``settings.py`` (what a user sets, the models' cut points; no torch), ``models.py``
(split models: bottom, top and ACP's evaluation mask), ``compressors.py`` (identity, quant,
RandTopK, ACP, NSC behind one interface; the papers' rules vs our reconstructions), then
``strategy.py`` (the protocol hooks: client bottom, edge top, exchanges, the two modes).
"""
