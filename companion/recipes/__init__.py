"""Training recipes, one module per headline run: ``cnn`` (Chapter 3), ``vit`` (Chapter 5), ``llm`` (Chapter 6).

Each module holds its recipe's settings and a ``train_<name>`` function; ``python -m companion train <name>``
imports ``companion.recipes.<name>`` and calls it. ``common`` holds what they share.
"""
