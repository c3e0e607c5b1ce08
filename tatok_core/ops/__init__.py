"""Operations: the tensor algorithms components run, each with its reference and its backends in one place.

Imports only the contract.
"""
