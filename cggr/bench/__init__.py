"""``cggr bench``: time-to-quality benchmark of selective training on real text (see docs/bench.md).

Modules: ``data`` (corpus -> documents -> split -> cached tokens -> rows), ``tokenizer``, ``models``
(presets, checkpoints), ``configs`` (one builder per configuration), ``train`` (the shared loop),
``runner`` (the regimes), ``report`` (table, JSON, CSV, plots), ``cli`` (arguments).
"""
