"""Training recipes, one module per headline run: ``cnn`` (Chapter 3), ``vit`` (Chapter 5), ``llm`` (Chapter 6),
and ``caption`` (Chapter 6's caption decoder, ``train_captioner``; not on the command line).

Each of the first three holds its recipe's settings and a ``train_<name>`` function;
``python -m companion train <name>`` imports ``companion.recipes.<name>`` and calls it.
``common`` holds what they share.
"""
