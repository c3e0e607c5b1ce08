"""Files: images, token files, weights and atomic writes, output locks.

Imports only the contract.
"""
