"""The claims suite (issue 7): the paper's claims measured on real held-out photos.

Each module measures one claim and can run alone (``python -m benchmarks.claims.<module> --quick``);
``benchmarks/run_claims.py`` runs them all and regenerates the "Claims benchmarks" section of
``docs/results.md``. Every part prints rich tables and writes ``<part>.json`` + PNGs into the output
folder (default ``runs/claims/``).

* :mod:`~benchmarks.claims.rate_distortion` — DTF vs fixed-count filters (topk, random, raster) on one
  trained model, and a DTF-trained tokenizer vs a fixed-rate one (filter ``all``) at equal training cost.
* :mod:`~benchmarks.claims.ablations` — information insufficiency (global + patch vs patch-only at equal
  total tokens) and redundancy (bits per patch token explained by the globals; dropping low-entropy vs
  random tokens).
* :mod:`~benchmarks.claims.allocation` — tokens kept vs image content (histogram entropy, gradient energy).
* :mod:`~benchmarks.claims.throughput` — encode/decode images/s and time per component on this CPU.
"""

PARTS = ("rate_distortion", "ablations", "allocation", "throughput")
