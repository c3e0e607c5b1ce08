"""The :class:`~tatok_core.pipeline.tokenizer.Tokenizer`: components of a spec composed into one model.

Imports the contract, the operations and io (weights files); never the workflows.
"""
