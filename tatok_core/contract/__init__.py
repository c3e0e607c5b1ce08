"""The contract: what every component and workflow agrees on.

Interfaces, the registry and its plugin hook, pipeline specs, value types (selections, tokens), the cost
of tokens in bits, errors and optional extras. Imports nothing else from :mod:`tatok_core`.
"""
