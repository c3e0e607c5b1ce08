"""Workflows: what runs a tokenizer over data (training, rate control, encoding, evaluation, pictures,
generation, the demo). May import every other room of :mod:`tatok_core`; nothing imports a workflow
except other workflows and ``tatok_cli``.
"""
